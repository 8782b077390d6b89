"""Shared by the admin endpoint tests: a real server, fault relay and client on loopback,
each with its admin endpoint on a free port, and small HTTP helpers (aiohttp's client)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from ..aio.endpoints import close_all
from ..aio.faultnet import FaultRelay, Proc, tether_pair

FAST = ("--keepalive", "0.3", "--timeout", "60")


def run(coro: Coroutine[Any, Any, None], limit: float = 120) -> None:
    """Run one test's coroutine, bounded; the application ends it opened are closed in
    its loop."""

    async def main() -> None:
        try:
            await asyncio.wait_for(coro, limit)
        finally:
            close_all()
            await asyncio.sleep(0)

    asyncio.run(main())


@dataclass
class Tethers:
    server: Proc
    client: Proc
    relay: FaultRelay
    server_admin: str  # base URL, ending in /
    client_admin: str


async def admin_line(proc: Proc, limit: float = 10.0) -> list[str]:
    """The words after ``ADMIN`` on the line a tether prints after ``READY``: the URL and,
    over HTTPS, the certificate's fingerprint."""
    assert proc.popen.stdout is not None
    loop = asyncio.get_running_loop()
    line = await asyncio.wait_for(loop.run_in_executor(None, proc.popen.stdout.readline), limit)
    words = line.decode().split()
    assert words[:1] == ["ADMIN"], f"expected the ADMIN line, got {line!r}"
    return words[1:]


async def admin_url(proc: Proc, limit: float = 10.0) -> str:
    """The URL from the ``ADMIN URL`` line of a plain HTTP (loopback) endpoint."""
    words = await admin_line(proc, limit)
    assert words[0].startswith("http://") and len(words) == 1, f"expected plain HTTP: {words}"
    return words[0]


@contextlib.asynccontextmanager
async def tethers(
    backend: tuple[str, int],
    tmp: str,
    *,
    server_args: tuple[str, ...] = (),
    client_args: tuple[str, ...] = (),
) -> AsyncIterator[Tethers]:
    async with tether_pair(
        backend,
        tmp,
        server_args=("--admin", "127.0.0.1:0", *FAST, *server_args),
        client_args=("--admin", "127.0.0.1:0", *FAST, *client_args),
    ) as (server, client, relay):
        yield Tethers(server, client, relay, await admin_url(server), await admin_url(client))


async def get_json(url: str, **headers: str) -> Any:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.get(url, headers=headers) as response,
    ):
        assert response.status == 200, f"GET {url}: {response.status}"
        return await response.json()


async def request(method: str, url: str, **headers: str) -> tuple[int, bytes, dict[str, str]]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.request(method, url, headers=headers) as response,
    ):
        return response.status, await response.read(), dict(response.headers)


async def metrics(base: str, **headers: str) -> dict[str, float]:
    """Every sample of ``/metrics``, parsed by prometheus_client's own parser, keyed by
    ``name{label="value",...}``."""
    status, body, _ = await request("GET", base + "metrics", **headers)
    assert status == 200
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


async def poll(what: str, check: Any, limit: int = 200, interval: float = 0.05) -> Any:
    """Call ``await check()`` until it returns something true (bounded; CONTRIBUTING.md T6)."""
    for _ in range(limit):
        result = await check()
        if result:
            return result
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


SRC = Path(__file__).resolve().parents[2] / "src"


def tether_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """``python -m tether ARGS`` from this checkout, its output captured."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-m", "tether", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )
