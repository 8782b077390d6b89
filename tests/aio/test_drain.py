"""Graceful drain (issue 11; docs/operations.md, "Drain"): real ``tether server`` and
``tether client`` processes on loopback, with a fault relay between them. SIGTERM makes
the server refuse new sessions (REJECT GOING_AWAY) while its live ones go on, resume
across a cut, and end; it exits when the last one ends, or at ``--drain-timeout``, or at
a second SIGTERM. Every wait is bounded (CONTRIBUTING.md T6)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path
from typing import Any

from ..admin.helpers import poll, request, run, tether_cli, tethers
from .endpoints import Backend, Streamer, connect_app
from .faultnet import Proc


async def _draining(t: Any) -> None:
    """Until the server's /readyz says it drains."""

    async def check() -> bool:
        status, body, _ = await request("GET", t.server_admin + "readyz")
        return status == 503 and json.loads(body) == {"ready": False, "reason": "draining"}

    await poll("/readyz to say draining", check)


async def _exit(proc: Proc, limit: float) -> int:
    try:
        return await asyncio.to_thread(proc.popen.wait, limit)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the server did not exit within {limit}s:\n{proc.log()}") from None


async def _received(streamer: Streamer, count: int, what: str) -> None:
    async def check() -> bool:
        return streamer.received >= count

    await poll(what, check, limit=400)


def test_sigterm_refuses_new_sessions_keeps_live_ones_and_exits_when_they_end(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with (
            Backend(seed=1, size=1024, eof=False) as backend,
            tethers(backend.address, str(tmp_path)) as t,
        ):
            app = await connect_app(t.client.address, seed=2, size=1024, eof=False)
            far = await backend.serving(1024)
            await _received(app, 1024, "the backend's first bytes at the application")

            t.server.popen.send_signal(signal.SIGTERM)
            await _draining(t)
            assert t.server.popen.poll() is None  # a live session keeps it running

            # A new session is refused GOING_AWAY; its client retries, the backend sees none.
            late = await connect_app(t.client.address, seed=3, size=16, eof=False)

            async def refused() -> bool:
                return "refused: going away (server draining)" in t.server.log()

            await poll("the new setup to be refused", refused)
            assert len(backend.connections) == 1

            # The live session keeps streaming, and resumes across a cut during the drain.
            assert app.transport is not None and far.transport is not None
            app.transport.write(b"a" * 4096)
            await _received(far, 1024 + 4096, "bytes sent during the drain")
            t.relay.kill_all()
            app.transport.write(b"b" * 4096)
            far.transport.write(b"c" * 4096)
            await _received(far, 1024 + 8192, "bytes sent across the cut")
            await _received(app, 1024 + 4096, "the backend's bytes across the cut")
            assert "resumed from" in t.server.log()
            assert t.server.popen.poll() is None

            # The last session ends (both ends close): the server exits on its own.
            assert late.transport is not None
            late.transport.close()
            app.transport.close()
            far.transport.close()
            assert await _exit(t.server, 30) == 0, t.server.log()
            log = t.server.log()
            assert "draining: new sessions refused, 1 sessions left" in log
            assert "drained: every session ended" in log
            assert len(backend.connections) == 1

    run(main())


def test_the_drain_timeout_ends_the_rest_with_going_away(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            Backend(seed=1, size=1024, eof=False) as backend,
            tethers(backend.address, str(tmp_path), server_args=("--drain-timeout", "2s")) as t,
        ):
            app = await connect_app(t.client.address, seed=2, size=1024, eof=False)
            await backend.serving(1024)
            t.server.popen.send_signal(signal.SIGTERM)
            await _draining(t)
            assert await _exit(t.server, 20) == 0, t.server.log()
            assert "drain timeout: ending 1 sessions left (GOING_AWAY)" in t.server.log()
            await asyncio.wait_for(app.peer_eof.wait(), 20)  # the client ended it too

            async def told() -> bool:
                return "GOING_AWAY" in t.client.log()

            await poll("the client to be told GOING_AWAY", told)

    run(main())


def test_a_second_sigterm_stops_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            Backend(seed=1, size=1024, eof=False) as backend,
            tethers(backend.address, str(tmp_path)) as t,
        ):
            await connect_app(t.client.address, seed=2, size=1024, eof=False)
            await backend.serving(1024)
            t.server.popen.send_signal(signal.SIGTERM)
            await _draining(t)
            t.server.popen.send_signal(signal.SIGTERM)
            assert await _exit(t.server, 10) == 0, t.server.log()
            assert "stopping now: ending 1 sessions left" in t.server.log()

    run(main())


def test_tether_drain_asks_over_the_admin_endpoint(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            Backend(seed=1, size=1024, eof=False) as backend,
            tethers(backend.address, str(tmp_path)) as t,
        ):
            app = await connect_app(t.client.address, seed=2, size=1024, eof=False)
            far = await backend.serving(1024)
            status, body, _ = await request("POST", t.client_admin + "api/drain")
            assert (status, json.loads(body)) == (409, {"error": "only a server drains"})
            asked = await asyncio.to_thread(tether_cli, "drain", "--admin", t.server_admin)
            assert asked.returncode == 0, asked.stderr
            assert asked.stdout == "draining: 1 sessions left; new sessions are refused\n"
            status, body, _ = await request("POST", t.server_admin + "api/drain")  # again
            assert (status, json.loads(body)) == (200, {"draining": True, "sessions": 1})
            await _draining(t)
            assert t.server.popen.poll() is None
            assert app.transport is not None and far.transport is not None
            app.transport.close()
            far.transport.close()
            assert await _exit(t.server, 30) == 0, t.server.log()

    run(main())
