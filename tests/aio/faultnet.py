"""A fault-injecting TCP relay and real ``tether`` processes, for loopback tests.

The relay sits between ``tether client`` and ``tether server`` like a network path.
It can kill every connection with a reset, blackhole the path (bytes are held, no
reset, so only keepalive notices), or accept new connections and reset them at
once. It can also cut automatically every N forwarded bytes, so cuts land in the
middle of a transfer however fast the machine is.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import cast

KILL, BLACKHOLE, RESET_NEW = "kill", "blackhole", "reset-new"


def _reset(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class _Half(asyncio.Protocol):
    def __init__(self, relay: FaultRelay, pair: _Pair) -> None:
        self.relay = relay
        self.pair = pair
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.held: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        if relay.blackholed or self.pair.blackholed:
            return  # swallowed: the sender thinks it went out
        peer = self.peer
        if peer is None or peer.transport is None:
            self.held.append(data)
            return
        peer.transport.write(data)
        if self is self.pair.up and len(relay.sniffed) < 4096:
            relay.sniffed += data[:4096]
        relay.forwarded += len(data)
        relay.on_forward()

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.transport is not None:
            with contextlib.suppress(OSError, RuntimeError):
                self.peer.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()
        self.relay.pairs.discard(self.pair)

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            with contextlib.suppress(RuntimeError):
                self.peer.transport.resume_reading()


@dataclass(eq=False)
class _Pair:
    down: _Half | None = None
    up: _Half | None = None
    blackholed: bool = False

    def kill(self) -> None:
        for half in (self.down, self.up):
            if half is not None and half.transport is not None:
                _reset(half.transport)


@dataclass
class FaultRelay:
    target: tuple[str, int]
    blackholed: bool = False
    reset_new: bool = False
    forwarded: int = 0
    accepted: int = 0
    pairs: set[_Pair] = field(default_factory=set)
    cut_every: int = 0  # bytes between automatic cuts (0: never)
    on_cut: Callable[[], None] | None = None
    port: int = 0
    _next_cut: int = 0
    _server: asyncio.Server | None = None
    sniffed: bytearray = field(default_factory=bytearray)  # first bytes server -> client

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._next_cut = self.cut_every

    def _accept(self) -> asyncio.Protocol:
        pair = _Pair()
        down = _Half(self, pair)
        self.halves.append(down)
        pair.down = down
        self.accepted += 1
        loop = asyncio.get_running_loop()

        async def connect_up() -> None:
            if self.reset_new:
                await asyncio.sleep(0)
                if down.transport is not None:
                    _reset(down.transport)
                return
            up = _Half(self, pair)
            self.halves.append(up)
            try:
                await loop.create_connection(lambda: up, *self.target)
            except OSError:
                if down.transport is not None:
                    _reset(down.transport)
                return
            pair.up = up
            up.peer, down.peer = down, up
            self.pairs.add(pair)
            for data in down.held:
                down.data_received(data)
            down.held.clear()

        loop.call_soon(lambda: self._tasks.add(asyncio.ensure_future(connect_up())))
        return down

    _tasks: set[asyncio.Future[None]] = field(default_factory=set)
    halves: list[_Half] = field(default_factory=list)

    def on_forward(self) -> None:
        if self.cut_every and self.forwarded >= self._next_cut:
            self._next_cut = self.forwarded + self.cut_every
            if self.on_cut is not None:
                asyncio.get_running_loop().call_soon(self.on_cut)

    def kill_all(self) -> None:
        for pair in list(self.pairs):
            pair.kill()
        self.pairs.clear()

    def blackhole_current(self) -> None:
        """Stop carrying bytes on every existing connection; new ones work."""
        for pair in self.pairs:
            pair.blackholed = True

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.kill_all()
        for task in self._tasks:
            task.cancel()
        for half in self.halves:
            if half.transport is not None:
                half.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
        await asyncio.sleep(0)  # let the aborted transports finish closing


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    address: tuple[str, int]
    stderr_path: str

    def log(self) -> str:
        with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
            return f.read()


async def logged(proc: Proc, text: str, after: int = 0, limit: float = 20.0) -> str:
    """The first log line of ``proc`` holding ``text`` (past character ``after``), polled
    for at most ``limit`` seconds (a bound, not a measurement); fails if ``proc`` exits."""
    for _ in range(int(limit / 0.05)):
        log = proc.log()[after:]
        for line in log.splitlines():
            if text in line:
                return line
        assert proc.popen.poll() is None, f"tether exited ({proc.popen.returncode}):\n{log}"
        await asyncio.sleep(0.05)
    raise AssertionError(f"no log line with {text!r} within {limit}s:\n{proc.log()}")


_LOGS = itertools.count(1)  # one log file per process (id() of a dead tuple is reused)


async def start_tether(role: str, *args: str, tmp: str, ready_timeout: float = 20.0) -> Proc:
    """Start ``tether ROLE ARGS`` and wait for its READY line (never a sleep)."""
    stderr_path = os.path.join(tmp, f"{role}-{os.getpid()}-{next(_LOGS)}.log")
    err = open(stderr_path, "xb")  # noqa: SIM115 - owned by the process
    popen = subprocess.Popen(
        [sys.executable, "-m", "tether", role, *args],
        stdout=subprocess.PIPE,
        stderr=err,
        stdin=subprocess.DEVNULL,
    )
    err.close()
    assert popen.stdout is not None
    loop = asyncio.get_running_loop()
    try:
        line = await asyncio.wait_for(
            loop.run_in_executor(None, popen.stdout.readline), ready_timeout
        )
        text = line.decode().strip()
        if not text.startswith("READY "):
            popen.wait(ready_timeout)  # it exits: its error is complete in the log
            with open(stderr_path) as f:
                raise RuntimeError(f"tether {role} did not start: {text!r}\n{f.read()}")
    except BaseException:  # no process or pipe outlives a failed start
        popen.kill()
        popen.wait()
        popen.stdout.close()
        raise
    host, _, port = text.split()[1].rpartition(":")
    return Proc(popen, (host.strip("[]"), int(port)), stderr_path)


def stop(proc: Proc, timeout: float = 10.0) -> int:
    try:
        if proc.popen.poll() is None:
            # SIGINT stops at once; SIGTERM would drain a server (test_drain.py tests that).
            proc.popen.send_signal(signal.SIGINT)
        try:
            return proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait()
            raise
    finally:
        if proc.popen.stdout is not None:
            proc.popen.stdout.close()


@contextlib.asynccontextmanager
async def tether_pair(
    backend: tuple[str, int],
    tmp: str,
    *,
    server_args: tuple[str, ...] = (),
    client_args: tuple[str, ...] = (),
    relay: FaultRelay | None = None,
) -> AsyncIterator[tuple[Proc, Proc, FaultRelay]]:
    """A tether server for ``backend``, a fault relay in front of it and a client."""
    server = await start_tether(
        "server",
        "--listen",
        "127.0.0.1:0",
        "--backend",
        f"{backend[0]}:{backend[1]}",
        *server_args,
        tmp=tmp,
    )
    relay = relay or FaultRelay(server.address)
    relay.target = server.address
    await relay.start()
    client = await start_tether(
        "client",
        "--listen",
        "127.0.0.1:0",
        "--server",
        f"127.0.0.1:{relay.port}",
        *client_args,
        tmp=tmp,
    )
    try:
        yield server, client, relay
    except BaseException:
        # What each side logged is the first thing to read when a test here fails.
        print(f"--- client log ---\n{client.log()}\n--- server log ---\n{server.log()}")
        raise
    finally:
        await relay.close()
        codes = (stop(client), stop(server))
        assert codes == (0, 0), f"tether exited with {codes}\n{client.log()}\n{server.log()}"
