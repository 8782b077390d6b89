"""Metrics that need a particular situation: a refused setup counted by its reason on both
ends, and a link that is still in its handshake."""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import sys
from pathlib import Path
from typing import Any

from tether import credentials

from ..aio.endpoints import Backend, connect_app
from .helpers import metrics, poll, request, run, tethers


def glibc_trims() -> bool:
    """Where the processes (which inherit this environment) trim their heap: glibc, on
    Linux, unless turned off."""
    if os.environ.get("TETHER_NO_MALLOC_TUNING") or os.environ.get("TETHER_NO_HEAP_TRIM"):
        return False
    return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")


def test_a_refused_setup_is_counted_by_its_reason_on_both_ends(tmp_path: Path) -> None:
    clients = tmp_path / "clients"
    credentials.append_client(clients, credentials.token_hash(credentials.new_token()), "other")

    async def main() -> None:
        async with (
            Backend(seed=1, size=0, eof=False) as backend,
            tethers(backend.address, str(tmp_path), server_args=("--clients", str(clients))) as t,
        ):
            app = await connect_app(t.client.address, seed=2, size=0, eof=False)
            await asyncio.wait_for(app.peer_eof.wait(), 20)  # refused: no token

            async def counted() -> Any:
                m = await metrics(t.server_admin)
                return m if m.get('tether_rejects_total{reason="UNAUTHORIZED"}') == 1 else None

            server = await poll("the server to count the refusal", counted)
            assert server["tether_session_starts_total"] == 0
            client = await metrics(t.client_admin)
            assert client['tether_rejects_total{reason="UNAUTHORIZED"}'] == 1
            assert client['tether_session_ends_total{code="UNAUTHORIZED"}'] == 1
            assert client['tether_sessions{state="setup"}'] == 0

    run(main())


def test_a_link_in_its_handshake_is_in_flight(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            Backend(seed=1, size=0, eof=False) as backend,
            tethers(backend.address, str(tmp_path)) as t,
        ):
            loop = asyncio.get_running_loop()
            silent = socket.socket()
            silent.setblocking(False)
            try:
                await loop.sock_connect(silent, t.server.address)

                async def in_flight() -> Any:
                    m = await metrics(t.server_admin)
                    return m["tether_handshakes_in_flight"] == 1

                await poll("the silent link to be in its handshake", in_flight)
            finally:
                silent.close()

            async def none() -> Any:
                m = await metrics(t.server_admin)
                return m["tether_handshakes_in_flight"] == 0

            await poll("the closed link to leave the handshakes", none)

    run(main())


def test_a_full_memory_budget_shows_and_makes_the_server_not_ready(tmp_path: Path) -> None:
    # One floor (64 KiB) of budget: the first session reserves all of it.
    async def main() -> None:
        async with (
            Backend(seed=1, size=0, eof=False) as backend,
            tethers(backend.address, str(tmp_path), server_args=("--memory-budget", "64K")) as t,
        ):
            before = await metrics(t.server_admin)
            assert before["tether_memory_budget_bytes"] == 64 * 1024
            # the heap trim's counters (tether.allocator), from the start where it trims
            heap = ("tether_heap_trims_total", "tether_heap_released_bytes_total")
            if glibc_trims():
                assert all(name in before for name in heap), before
            else:
                assert not any(name in before for name in heap), before
            assert before["tether_memory_budget_committed_bytes"] == 0
            assert before["tether_memory_budget_held_bytes"] == 0
            assert before["tether_accepting"] == 1
            assert (await request("GET", t.server_admin + "readyz"))[0] == 200
            assert "tether_memory_budget_bytes" not in await metrics(t.client_admin)
            await connect_app(t.client.address, seed=2, size=4096, eof=False)

            async def full() -> Any:
                m = await metrics(t.server_admin)
                return m if m["tether_memory_budget_committed_bytes"] == 64 * 1024 else None

            during = await poll("the session to reserve the whole budget", full)
            assert during["tether_accepting"] == 0
            status, body, _ = await request("GET", t.server_admin + "readyz")
            assert (status, body) == (503, b'{"ready": false}')

    run(main())
