"""Graceful drain (issue 11; docs/operations.md, "Drain"): real ``tether server`` and
``tether client`` processes on loopback, with a fault relay between them. SIGTERM makes
the server refuse new sessions (REJECT GOING_AWAY) while its live ones go on, resume
across a cut, and end; it exits when the last one ends, or at ``--drain-timeout``, or at
a second SIGTERM. Every wait is bounded (CONTRIBUTING.md T6)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..admin.helpers import FAST, poll, request, run, tether_cli, tethers
from .endpoints import Backend, Streamer, connect_app
from .faultnet import Proc, start_tether, stop


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


def _hook_script(tmp_path: Path) -> tuple[str, Path]:
    out = tmp_path / "drain-hook"
    script = tmp_path / "drain-hook.py"
    script.write_text(
        "import os, sys\n"
        "with open(sys.argv[1], 'a') as f:\n"
        "    f.write('|'.join(os.environ.get(k, '-') for k in ('TETHER_EVENT', "
        "'TETHER_SERVER', 'TETHER_DRAIN_SECONDS', 'TETHER_REASON')) + '\\n')\n"
    )
    return f"{sys.executable} {script} {out}", out


def test_clients_are_told_and_take_new_sessions_to_the_next_server(tmp_path: Path) -> None:
    """A live session's client is told its server drains (DRAINING): the session goes on,
    the --on-drain hook runs, and the client's next session goes to its second --server;
    another client, not yet told, is refused GOING_AWAY by the first and moves on at once."""
    hook, out = _hook_script(tmp_path)

    async def main() -> None:
        async with Backend(seed=1, size=1024, eof=False) as backend:
            other = await _another_server(backend, tmp_path)
            second = f"127.0.0.1:{other.address[1]}"
            late_client = None
            try:
                async with tethers(
                    backend.address,
                    str(tmp_path),
                    client_args=("--server", second, "--on-drain", hook),
                ) as t:
                    first = f"127.0.0.1:{t.relay.port}"
                    app = await connect_app(t.client.address, seed=2, size=1024, eof=False)
                    far = await backend.serving(1024)
                    await _received(app, 1024, "the backend's first bytes at the application")
                    assert f"established via {first}" in t.client.log()

                    t.server.popen.send_signal(signal.SIGTERM)

                    async def told() -> bool:
                        return f"server {first} is draining" in t.client.log()

                    await poll("the client to be told of the drain", told)
                    assert "the session goes on until it ends or for at most 30" in t.client.log()
                    lines = await poll("the drain hook", lambda: _read(out))
                    event, server, seconds, reason = lines[0].split("|")
                    assert (event, server, reason) == ("drain", first, "server draining")
                    assert 280 <= int(seconds) <= 300  # the default --drain-timeout, 5 min

                    # The told session goes on.
                    assert app.transport is not None and far.transport is not None
                    app.transport.write(b"a" * 4096)
                    await _received(far, 1024 + 4096, "bytes sent during the drain")

                    # A new session of this client goes to the second server, at once.
                    app2 = await connect_app(t.client.address, seed=3, size=64, eof=False)
                    await backend.serving(64)

                    async def moved() -> bool:
                        return f"established via {second}" in t.client.log()

                    await poll("the new session on the second server", moved)
                    assert "new from" in other.log()
                    assert "refused: going away" not in t.server.log()  # it never tried

                    # Another client, not told: refused GOING_AWAY by the first, it moves on.
                    late_client = await start_tether(
                        "client", "--listen", "127.0.0.1:0", "--server", first,
                        "--server", second, *FAST, tmp=str(tmp_path),
                    )  # fmt: skip
                    app3 = await connect_app(late_client.address, seed=4, size=64, eof=False)
                    await backend.serving(64)
                    log = await _established(late_client)
                    assert f"server {first} did not take the session" in log, log
                    assert f"established via {second}" in log
                    assert "fallback" not in log

                    for each in (app, app2, app3, *backend.connections):
                        assert each.transport is not None
                        each.transport.close()
                    assert await _exit(t.server, 30) == 0, t.server.log()
                    assert len(backend.connections) == 3
            finally:
                codes = [stop(p) for p in (late_client, other) if p is not None]
                assert codes == [0] * len(codes)

    run(main())


def test_a_client_moves_on_from_a_server_that_is_not_there(tmp_path: Path) -> None:
    async def main() -> None:
        async with Backend(seed=1, size=64, eof=False) as backend:
            server = await _another_server(backend, tmp_path)
            with socket.socket() as closed:  # a port nothing listens on
                closed.bind(("127.0.0.1", 0))
                nobody = f"127.0.0.1:{closed.getsockname()[1]}"
            client = None
            try:
                client = await start_tether(
                    "client", "--listen", "127.0.0.1:0", "--server", nobody,
                    "--server", f"127.0.0.1:{server.address[1]}",
                    "--fallback", f"{backend.address[0]}:{backend.address[1]}",
                    *FAST, tmp=str(tmp_path),
                )  # fmt: skip
                app = await connect_app(client.address, seed=2, size=64, eof=False)
                await backend.serving(64)
                log = await _established(client)
                assert f"server {nobody} did not take the session" in log
                assert f"established via 127.0.0.1:{server.address[1]}" in log
                assert "connecting directly to fallback" not in log
                assert app.transport is not None
                app.transport.close()
            finally:
                codes = [stop(p) for p in (client, server) if p is not None]
                assert codes == [0] * len(codes)

    run(main())


async def _another_server(backend: Backend, tmp: Path) -> Proc:
    """A second tether server for ``backend`` (the tests' own, outside ``tethers``)."""
    host, port = backend.address
    return await start_tether(
        "server", "--listen", "127.0.0.1:0", "--backend", f"{host}:{port}", *FAST, tmp=str(tmp)
    )


async def _read(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def _established(client: Proc) -> str:
    """The client's log once it has said where its session was established (the log line
    may come a moment after the backend saw the session's first bytes)."""

    async def check() -> str:
        log = client.log()
        return log if "established via" in log else ""

    text: str = await poll("the client's 'established via' line", check)
    return text
