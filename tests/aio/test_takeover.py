"""Takeover (issue 11, "upgrade without losing a session"; docs/operations.md, "Takeover"):
real ``tether server`` processes on loopback, TLS on. A ``tether server --takeover``
started mid-stream takes the listening socket and every session's backend socket from
the running one, which exits 0; the clients resume on the same address and every byte
arrives once and in order, both ways, with one backend connection per session. A
request that is not a takeover, or one that fails half way, leaves the running server
serving. Every wait is bounded (CONTRIBUTING.md T6); durations are printed, not
asserted (T7)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import stat
import statistics
import struct
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from ..admin.helpers import admin_url, poll, request, run
from .endpoints import Backend, Streamer, connect_app
from .faultnet import Proc, start_tether, stop

SESSIONS = 50
PACE = 4096  # bytes each way per session per interval
PACE_INTERVAL = 0.02  # seconds: 200 KB/s each way per session, 10 MB/s in all
FAST = ("--keepalive", "0.5", "--timeout", "60")


async def _server(
    backend: Backend, state: Path, tmp: Path, *more: str, ready_timeout: float = 20.0
) -> Proc:
    host, port = backend.address
    return await start_tether(
        "server",
        "--listen",
        "127.0.0.1:0",
        "--backend",
        f"{host}:{port}",
        "--state-dir",
        str(state),
        "--buffer",
        "256K",
        *FAST,
        *more,
        tmp=str(tmp),
        ready_timeout=ready_timeout,
    )


async def _client(server: Proc, tmp: Path) -> Proc:
    return await start_tether(
        "client",
        "--listen",
        "127.0.0.1:0",
        "--server",
        f"{server.address[0]}:{server.address[1]}",
        "--buffer",
        "256K",
        *FAST,
        tmp=str(tmp),
    )


@contextlib.asynccontextmanager
async def _running(
    tmp: Path, *, size: int, server_args: tuple[str, ...] = (), server_first: bool = False
) -> AsyncIterator[tuple[Path, Backend, Proc, Proc]]:
    """A backend, a tether server for it (state in ``tmp/state``) and a client; both
    processes must exit 0 when stopped (the server first with ``server_first``: a
    draining server exits on its own once the client's session ends)."""
    state = tmp / "state"
    async with Backend(seed=7, size=size, eof=False) as backend:
        old = await _server(backend, state, tmp, *server_args)
        client = await _client(old, tmp)
        try:
            yield state, backend, old, client
        finally:
            procs = (old, client) if server_first else (client, old)
            assert [stop(proc) for proc in procs] == [0, 0]


async def _exit(proc: Proc, limit: float) -> int:
    try:
        return await asyncio.to_thread(proc.popen.wait, limit)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"tether did not exit within {limit}s:\n{proc.log()}") from None


async def _takeover_run(
    backend: Backend, state: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    """``tether server --takeover`` run to its end (one that fails exits at once)."""
    host, port = backend.address
    return await asyncio.to_thread(
        subprocess.run,
        [
            *(sys.executable, "-m", "tether", "server", "--takeover"),
            *("--listen", "127.0.0.1:0", "--backend", f"{host}:{port}"),
            *("--state-dir", str(state), *extra),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _control(state: Path) -> Path:
    return state / "takeover.sock"


def _fingerprint(proc: Proc) -> str:
    found = re.search(r"certificate (sha256:[0-9a-f]+)", proc.log())
    assert found, proc.log()
    return found.group(1)


def _request(fingerprint: str) -> bytes:
    code = fingerprint.encode()
    return struct.pack("!8sIB", b"TTAKEOV1", os.getpid(), len(code)) + code


class Paced:
    """Seeded random bytes written to one end at a steady pace, hashed as they are sent:
    the session is streaming whenever the takeover comes."""

    def __init__(self, end: Streamer, seed: int) -> None:
        self.end = end
        self.rng = random.Random(seed)
        self.digest = hashlib.sha256()
        self.sent = 0

    def tick(self) -> None:
        transport = self.end.transport
        if transport is not None and not transport.is_closing():
            block = self.rng.randbytes(PACE)
            self.digest.update(block)
            self.sent += len(block)
            transport.write(block)


async def _pace(ends: list[Paced], stop: asyncio.Event) -> None:
    while not stop.is_set():
        for end in ends:
            end.tick()
        await asyncio.sleep(PACE_INTERVAL)


async def _take_over_mid_stream(
    apps: list[Streamer],
    backend: Backend,
    downs: list[Paced],
    state: Path,
    tmp: Path,
    old: Proc,
    started: list[Proc],
) -> Proc:
    """Once every session streams both ways: ``tether server --takeover`` (put in
    ``started`` as soon as it runs); the old server exits 0, and bytes flow again through
    the new one."""

    async def streaming() -> bool:
        return all(c.received >= 4 * PACE for c in backend.connections) and all(
            app.received >= 4 * PACE for app in apps
        )

    await poll("every session to be streaming", streaming, limit=1200)
    mode = stat.S_IMODE(os.stat(_control(state)).st_mode)
    assert mode == 0o600, oct(mode)
    new = await _server(backend, state, tmp, "--takeover", ready_timeout=90)
    started.append(new)
    assert await _exit(old, 30) == 0, old.log()
    assert new.address == old.address  # the same listening socket
    moved = [d.sent for d in downs]

    async def resumed() -> bool:
        return all(app.received > sent for app, sent in zip(apps, moved, strict=True))

    await poll("every session to stream again", resumed, limit=1200)
    return new


def test_fifty_sessions_streaming_both_ways_survive_a_takeover(tmp_path: Path) -> None:
    async def main() -> None:
        state = tmp_path / "state"
        async with Backend(seed=0, size=0, eof=False) as backend:
            old = await _server(backend, state, tmp_path)
            client = await _client(old, tmp_path)
            started: list[Proc] = []  # the new server, once it runs
            stop_pacing = asyncio.Event()
            try:
                apps = [
                    await connect_app(client.address, seed=0, size=0, eof=False)
                    for _ in range(SESSIONS)
                ]
                ups = [Paced(app, seed) for seed, app in enumerate(apps)]

                async def connected() -> bool:
                    return len(backend.connections) >= SESSIONS

                await poll("every session's backend connection", connected, limit=1200)
                downs = [Paced(c, 1000 + n) for n, c in enumerate(backend.connections)]
                async with asyncio.TaskGroup() as pacing:  # until stop_pacing
                    pacing.create_task(_pace(ups, stop_pacing))
                    pacing.create_task(_pace(downs, stop_pacing))
                    new = await _take_over_mid_stream(
                        apps, backend, downs, state, tmp_path, old, started
                    )
                    stop_pacing.set()

                for end in apps + backend.connections:
                    assert end.transport is not None
                    end.transport.write_eof()

                async def finished() -> bool:  # each end has the other's EOF, and both
                    ends = [*apps, *backend.connections]  # tethers ended every session
                    return all(end.peer_eof.is_set() for end in ends) and all(
                        proc.log().count("ended NORMAL") >= SESSIONS for proc in (client, new)
                    )

                await poll("every session to finish", finished, limit=1200)
                assert all(app.exc is None for app in apps)
                assert len(backend.connections) == SESSIONS  # one each, never a second
                # Every byte once and in order, both ways (each stream is distinct).
                got_up = sorted(c.digest.hexdigest() for c in backend.connections)
                assert got_up == sorted(up.digest.hexdigest() for up in ups)
                got_down = sorted(app.digest.hexdigest() for app in apps)
                assert got_down == sorted(down.digest.hexdigest() for down in downs)
                assert sum(c.received for c in backend.connections) == sum(u.sent for u in ups)

                old_log, new_log, client_log = old.log(), new.log(), client.log()
                assert f"handed over {SESSIONS} sessions and 1 listening sockets" in old_log
                assert f"took over {SESSIONS} sessions and 1 listening sockets from pid" in new_log
                assert client_log.count("ended NORMAL") == SESSIONS, client_log
                assert new_log.count("ended NORMAL") == SESSIONS, new_log
                away = [float(x) for x in re.findall(r"resumed from .* after ([0-9.]+)s", new_log)]
                assert len(away) == SESSIONS, new_log  # each resumed once, on the new one
                handed = re.search(r"handed over .* in ([0-9.]+)s", old_log)
                print(
                    f"takeover of {SESSIONS} streaming sessions: handed over in "
                    f"{handed.group(1) if handed else '?'}s; clients detached "
                    f"median {statistics.median(away):.2f}s, max {max(away):.2f}s; "
                    f"{sum(u.sent for u in ups)} bytes up, {sum(d.sent for d in downs)} down"
                )
            except BaseException:
                print(f"--- old server ---\n{old.log()}\n--- client ---\n{client.log()}")
                for proc in started:
                    print(f"--- new server ---\n{proc.log()}")
                raise
            finally:
                stop_pacing.set()
                # The old one has exited (0) already: stop() only reaps it and its pipe.
                codes = [stop(client), stop(old), *map(stop, started)]
                assert codes == [0] * len(codes), codes

    run(main(), limit=280)


def test_a_takeover_with_no_server_to_take_over_fails_with_exit_1(tmp_path: Path) -> None:
    async def main() -> None:
        async with Backend(seed=1, size=16) as backend:
            done = await _takeover_run(backend, tmp_path / "empty")
            assert done.returncode == 1, done.stderr
            assert "tether: error: --takeover " in done.stderr
            assert "no server to take over there" in done.stderr

    run(main())


def test_a_bad_request_is_refused_and_the_server_serves_on(tmp_path: Path) -> None:
    async def main() -> None:
        async with _running(tmp_path, size=1024) as (state, backend, old, client):
            app = await connect_app(client.address, seed=8, size=1024, eof=False)
            far = await backend.serving(1024)

            def ask(payload: bytes) -> bytes:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(10)
                    sock.connect(str(_control(state)))
                    sock.sendall(payload)
                    sock.shutdown(socket.SHUT_WR)
                    answer = b""
                    try:
                        while chunk := sock.recv(65536):
                            answer += chunk
                    except ConnectionResetError:  # closed with our bytes unread
                        pass
                    return answer

            assert await asyncio.to_thread(ask, b"GET / HTTP/1.0\r\n\r\n") == b""
            answer = await asyncio.to_thread(ask, _request("sha256:" + "0" * 64))
            assert answer[:1] == b"\x04", answer  # REFUSED, with the reason
            assert b"TLS identity" in answer

            async def refused() -> bool:
                return "takeover by pid" in old.log() and "refused" in old.log()

            await poll("the refusal to be logged", refused)
            assert old.popen.poll() is None
            assert "closing" not in old.log()  # nothing was frozen
            assert app.transport is not None and far.transport is not None
            app.transport.write(b"still here")
            await poll("the session to carry on", _at_least(far, 1024 + 10))

    run(main())


def test_a_successor_that_dies_half_way_leaves_the_server_serving(tmp_path: Path) -> None:
    async def main() -> None:
        async with _running(tmp_path, size=1024) as (state, backend, old, client):
            app = await connect_app(client.address, seed=8, size=1024, eof=False)
            far = await backend.serving(1024)
            await poll("the backend's bytes at the application", _at_least(app, 1024))

            def half_way() -> int:
                """Ask, read the first message (with its descriptors), then vanish."""
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(10)
                    sock.connect(str(_control(state)))
                    sock.sendall(_request(_fingerprint(old)))
                    _, fds, _, _ = socket.recv_fds(sock, 9, 16)
                    for fd in fds:
                        os.close(fd)  # the old server holds them: nothing is sent
                    return len(fds)

            assert await asyncio.to_thread(half_way) == 1  # the listening socket

            async def serving_on() -> bool:
                return "takeover failed; serving on" in old.log()

            await poll("the old server to carry on", serving_on)
            assert old.popen.poll() is None
            # Its links were closed: the session resumes here and goes on, both ways.
            assert app.transport is not None and far.transport is not None
            app.transport.write(b"u" * 5000)
            far.transport.write(b"d" * 5000)
            await poll("bytes up after the failed takeover", _at_least(far, 1024 + 5000))
            await poll("bytes down after the failed takeover", _at_least(app, 1024 + 5000))
            assert "resumed from" in old.log()
            assert len(backend.connections) == 1
            # And a new session is taken, on the same listening socket.
            late = await connect_app(client.address, seed=9, size=100, eof=False)
            await backend.serving(100)
            assert late.exc is None

    run(main())


def _at_least(streamer: Streamer, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return streamer.received >= count

    return check


NOBODY = 65534


def test_a_request_from_another_user_is_refused(tmp_path: Path) -> None:
    """SO_PEERCRED, not only the file's mode: the socket file is opened to everyone here,
    and a process of another user (nobody) still gets nothing."""
    if os.geteuid() != 0:
        pytest.skip("needs root: to connect as another user")
    python = "/usr/bin/python3"  # this one's interpreter may be out of nobody's reach
    if not os.access(python, os.X_OK) or not os.stat(python).st_mode & stat.S_IXOTH:
        pytest.skip(f"needs {python}, which another user may run")

    async def main() -> None:
        base = Path(tempfile.mkdtemp(prefix="tether-takeover-", dir="/tmp"))
        try:
            base.chmod(0o711)  # nobody may reach the socket file below
            state = base / "state"
            state.mkdir(mode=0o711)
            async with Backend(seed=7, size=16, eof=False) as backend:
                old = await _server(backend, state, tmp_path)
                try:
                    _control(state).chmod(0o666)
                    script = (
                        "import socket, sys\n"
                        "s = socket.socket(socket.AF_UNIX)\n"
                        "s.settimeout(10)\n"
                        "s.connect(sys.argv[1])\n"
                        "try:\n"  # refused before a byte is read: the send may fail too
                        "    s.sendall(bytes.fromhex(sys.argv[2]))\n"
                        "    print(len(s.recv(65536)))\n"
                        "except (BrokenPipeError, ConnectionResetError):\n"
                        "    print(0)\n"
                    )
                    asked = await asyncio.to_thread(
                        subprocess.run,
                        [python, "-c", script, str(_control(state)), _request("").hex()],
                        capture_output=True,
                        text=True,
                        timeout=30,
                        user=NOBODY,
                        cwd="/",
                    )
                    assert asked.returncode == 0, asked.stderr
                    assert asked.stdout.strip() == "0"  # closed, with nothing said

                    async def refused() -> bool:
                        return "not this server's user" in old.log()

                    await poll("the refusal to be logged", refused)
                    assert f"(uid {NOBODY}) refused" in old.log()
                    assert old.popen.poll() is None
                finally:
                    assert stop(old) == 0
        finally:
            shutil.rmtree(base, ignore_errors=True)

    run(main())


@pytest.mark.once  # waits out server.py's FLUSH_TIMEOUT (not compiled code)
def test_a_backend_that_does_not_read_makes_the_takeover_wait_then_refuse(
    tmp_path: Path,
) -> None:
    """Bytes the client was told had arrived, still waiting for a backend that does not
    read, exist only in the old server: it refuses the takeover rather than lose them, and
    carries on; once the backend reads, every byte is there. While it waits, the admin
    endpoint will neither end a session nor start a drain (409): the session may be in the
    successor's hands already."""

    async def main() -> None:
        admin_args = ("--admin", "127.0.0.1:0")
        async with _running(tmp_path, size=0, server_args=admin_args) as running:
            state, backend, old, client = running
            admin = await admin_url(old)
            app = await connect_app(client.address, seed=8, size=0, eof=False)
            up = Paced(app, 8)
            up.tick()
            far = await backend.serving(PACE)
            assert far.transport is not None
            far.transport.pause_reading()  # the backend stops reading
            for _ in range(2048):  # 8 MiB: more than the kernel's buffers take
                up.tick()
            successor = asyncio.ensure_future(
                _takeover_run(backend, state, "--buffer", "256K", *FAST)
            )

            async def handing_over() -> bool:
                return "closing 1 sessions' links and handing them over" in old.log()

            await poll("the hand-over to begin", handing_over, limit=400)
            status, body, _ = await request("GET", admin + "api/sessions")
            (listed,) = json.loads(body)["sessions"]
            status, body, _ = await request("DELETE", admin + f"api/sessions/{listed['id']}")
            assert status == 409 and b"takeover" in body, (status, body)
            status, body, _ = await request("POST", admin + "api/drain")
            assert status == 409 and b"takeover" in body, (status, body)
            done = await successor
            assert done.returncode == 1, done.stderr
            assert "did not read what they were sent within 5s" in done.stderr
            assert "takeover failed; serving on" in old.log()
            far.transport.resume_reading()
            await poll("every byte at the backend", _at_least(far, up.sent), limit=1200)
            assert far.received == up.sent
            assert far.digest.hexdigest() == up.digest.hexdigest()
            assert len(backend.connections) == 1

    run(main())


def test_the_successor_takes_the_admin_port_once_the_old_server_lets_it_go(
    tmp_path: Path,
) -> None:
    """The same --admin address for both: the old server holds it until it exits, a moment
    after the hand-over; the successor waits for it rather than fail (and lose every
    session it just took)."""

    async def main() -> None:
        state = tmp_path / "state"
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        admin = ("--admin", f"127.0.0.1:{port}")
        async with Backend(seed=7, size=1024, eof=False) as backend:
            old = await _server(backend, state, tmp_path, *admin)
            client = await _client(old, tmp_path)
            started: list[Proc] = []
            try:
                assert (await admin_url(old)) == f"http://127.0.0.1:{port}/"
                app = await connect_app(client.address, seed=8, size=1024, eof=False)
                far = await backend.serving(1024)
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", 0))
                    elsewhere = f"127.0.0.1:{probe.getsockname()[1]}"
                started.append(
                    await _server(
                        backend, state, tmp_path, "--takeover", *admin, "--listen", elsewhere
                    )
                )
                new = started[0]
                assert (await admin_url(new)) == f"http://127.0.0.1:{port}/"
                # It listens where the old server did, and says its own --listen waits.
                assert new.address == old.address
                assert f"--listen {elsewhere} takes effect only at a restart" in new.log()
                assert await _exit(old, 30) == 0, old.log()
                status, body, _ = await request("GET", f"http://127.0.0.1:{port}/api/sessions")
                assert status == 200 and len(json.loads(body)["sessions"]) == 1, body
                assert app.transport is not None
                app.transport.write(b"after")
                await poll("the session to carry on", _at_least(far, 1024 + 5))
                assert len(backend.connections) == 1
            finally:
                codes = [stop(client), stop(old), *map(stop, started)]
                assert codes == [0] * len(codes), codes

    run(main())


def test_a_draining_server_refuses_a_takeover(tmp_path: Path) -> None:
    async def main() -> None:
        async with _running(tmp_path, size=1024, server_first=True) as running:
            state, backend, old, client = running
            await connect_app(client.address, seed=8, size=1024, eof=False)
            await backend.serving(1024)
            old.popen.send_signal(signal.SIGTERM)

            async def draining() -> bool:
                return "draining: new sessions refused" in old.log()

            await poll("the drain to start", draining)
            done = await _takeover_run(backend, state)
            assert done.returncode == 1, done.stderr
            assert "refused: this server is draining" in done.stderr
            assert old.popen.poll() is None  # it drains on, its session kept
            assert "closing" not in old.log()

    run(main())
