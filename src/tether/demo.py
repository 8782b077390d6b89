"""``tether demo``: a whole session through an outage, on loopback, as a timeline.

An embedded backend echoes what it receives. An application connects through
``tether client`` -> a cuttable network path -> ``tether server`` -> backend, types
keystrokes and streams bulk data. Mid-session the path is cut (every connection
reset, new ones refused) for a few seconds; the application keeps typing into the
client's replay buffer; then the path comes back and the session resumes. The
demo exits 0 only if every byte arrived exactly once, in order, both ways.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import socket
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

from .aio.client import TetherClient
from .aio.server import TetherServer
from .config import Address, ClientConfig, ServerConfig
from .protocol.session import SessionConfig

__all__ = ["run_demo"]

_MSG = struct.Struct("!cI")  # kind (K keystroke, B bulk) | payload length


class _Timeline:
    def __init__(self) -> None:
        self.start = asyncio.get_running_loop().time()

    def say(self, text: str) -> None:
        now = asyncio.get_running_loop().time() - self.start
        print(f"  {now:6.2f}s  {text}", flush=True)


class _EchoBackend(asyncio.Protocol):
    """The backend: echoes everything and hashes what it received."""

    def __init__(self, stats: dict[str, object]) -> None:
        self.stats = stats
        self.digest = hashlib.sha256()
        self.count = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.stats["backend_connections"] = int(str(self.stats.get("backend_connections", 0))) + 1

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.stats.get("backend_sha"):
            self.stats["backend_dropped"] = True  # closed before the application finished

    def data_received(self, data: bytes) -> None:
        self.digest.update(data)
        self.count += len(data)
        self.transport.write(data)

    def eof_received(self) -> bool:
        self.stats["backend_bytes"] = self.count
        self.stats["backend_sha"] = self.digest.hexdigest()
        self.transport.write_eof()
        return True


class _Path:
    """A network path between client and server that can be cut and restored."""

    def __init__(self, target: Address, timeline: _Timeline) -> None:
        self.target = target
        self.timeline = timeline
        self.up = True
        self.pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self.handlers: set[asyncio.Task[Any]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:  # so that close() can wait for it
            self.handlers.add(task)
            task.add_done_callback(self.handlers.discard)
        if not self.up:
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target.host, self.target.port)
        except OSError:
            _reset(writer)
            return
        pair = (writer, up_writer)
        self.pairs.append(pair)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(_pipe(reader, up_writer))
            tg.create_task(_pipe(up_reader, writer))
        if pair in self.pairs:
            self.pairs.remove(pair)

    async def close(self) -> None:
        """Cut every connection and wait for their handlers to end (none is left for the
        event loop to cancel at exit, which Python 3.11's asyncio reports as an error)."""
        self.cut()
        if self.handlers:
            await asyncio.wait(self.handlers, timeout=5)

    def cut(self) -> None:
        self.up = False
        for a, b in self.pairs:
            _reset(a)
            _reset(b)
        self.pairs.clear()


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, RuntimeError):
        writer.transport.abort()


async def run_demo(
    outage: float = 3.0, total_bulk: int = 8 * 1024 * 1024, *, verbose: bool = False
) -> int:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.ERROR,
        stream=sys.stderr,
        format="            %(name)s: %(message)s",
    )
    print("tether demo: one session through a network outage, on loopback\n")
    tl = _Timeline()
    loop = asyncio.get_running_loop()
    stats: dict[str, object] = {}
    backend = await loop.create_server(lambda: _EchoBackend(stats), "127.0.0.1", 0)
    backend_addr = Address(*backend.sockets[0].getsockname()[:2])
    tl.say(f"backend (echo) listening on {backend_addr}")
    session = SessionConfig(keepalive=1.0, timeout=60.0)
    # TLS on, as by default; the demo's server identity lives in a temporary directory and
    # the client pins it, so nothing is written to the user's own tether directories.
    with tempfile.TemporaryDirectory(prefix="tether-demo-") as state:
        async with TetherServer(
            ServerConfig(
                listen=Address("127.0.0.1", 0),
                backend=backend_addr,
                session=session,
                state_dir=Path(state),
            )
        ) as server:
            path = _Path(server.addresses[0], tl)
            net = await asyncio.start_server(path.handle, "127.0.0.1", 0)
            net_addr = Address(*net.sockets[0].getsockname()[:2])
            client_config = ClientConfig(
                listen=Address("127.0.0.1", 0),
                server=net_addr,
                session=session,
                server_fingerprint=server.fingerprint,
            )
            async with TetherClient(client_config) as client:
                tl.say(
                    f"tether server on {server.addresses[0]} (TLS 1.3, certificate "
                    f"{(server.fingerprint or '')[:19]}...), network path on {net_addr}, "
                    f"tether client on {client.addresses[0]} (certificate pinned)"
                )
                code = await _application(tl, client, server, path, outage, total_bulk, stats)
            net.close()
            await path.close()
    backend.close()
    return code


async def _application(
    tl: _Timeline,
    client: TetherClient,
    server: TetherServer,
    path: _Path,
    outage: float,
    total_bulk: int,
    stats: dict[str, object],
) -> int:
    listen = client.addresses[0]
    reader, writer = await asyncio.open_connection(listen.host, listen.port)
    tl.say("application connected to the tether client")
    sent = hashlib.sha256()
    sent_count = 0
    rng = random.Random(2598)
    keystrokes = [f"echo line {i}" for i in range(1, 13)]
    typed_at: dict[str, float] = {}

    def emit(kind: bytes, payload: bytes) -> None:
        nonlocal sent_count
        message = _MSG.pack(kind, len(payload)) + payload
        sent.update(message)
        sent_count += len(message)
        writer.write(message)

    async def receive() -> tuple[int, str]:
        got = hashlib.sha256()
        count = 0
        while True:
            try:
                header = await reader.readexactly(_MSG.size)
            except asyncio.IncompleteReadError as exc:
                got.update(exc.partial)
                count += len(exc.partial)
                return count, got.hexdigest()
            kind, size = _MSG.unpack(header)
            payload = await reader.readexactly(size)
            got.update(header + payload)
            count += len(header) + len(payload)
            if kind == b"K":
                text = payload.decode()
                delay = asyncio.get_running_loop().time() - typed_at[text]
                tl.say(f"echo of {text!r} arrived ({delay * 1000:.0f} ms after typing)")

    async def type_and_stream() -> None:
        bulk_step = max(1, total_bulk // 24)
        bulk_sent = 0
        loop = asyncio.get_running_loop()
        for step in range(24):
            if step == 6:
                path.cut()
                tl.say(f"PATH CUT: every connection reset, new ones refused for {outage:g}s")
                await asyncio.sleep(0.05)  # the client notices the reset at once
            if step % 2 == 0 and keystrokes:
                text = keystrokes.pop(0)
                typed_at[text] = loop.time()
                emit(b"K", text.encode())
                queued = ""
                if not path.up:
                    await asyncio.sleep(0.02)  # let the client take the keystroke in
                    held = sum(s.replay_buffered for s in client.sessions())
                    queued = f" while the path is down: the client holds {held} bytes for replay"
                tl.say(f"typed {text!r}{queued}")
            chunk = rng.randbytes(min(bulk_step, total_bulk - bulk_sent))
            bulk_sent += len(chunk)
            emit(b"B", chunk)
            await writer.drain()
            await asyncio.sleep(outage / 6 if not path.up else 0.15)
            if step == 11:
                path.up = True
                tl.say("PATH RESTORED")
                for _ in range(200):
                    if any(s.resumes for s in client.sessions()):
                        break
                    await asyncio.sleep(0.01)
                for st in client.sessions():
                    tl.say(
                        f"session {st.session_id[:12]} resumed ({st.resumes} resume): the client "
                        f"replayed {st.bytes_replayed} bytes the server had not received"
                    )
        writer.write_eof()
        tl.say(f"application finished sending ({sent_count} bytes) and half-closed")

    try:
        async with asyncio.timeout(60 + 4 * outage), asyncio.TaskGroup() as tasks:
            tasks.create_task(type_and_stream())
            receiving = tasks.create_task(receive())
    except TimeoutError:
        tl.say("FAILED: the session did not finish in time")
        return 1
    got_count, got_sha = receiving.result()
    writer.close()
    up_ok = (
        stats.get("backend_bytes") == sent_count and stats.get("backend_sha") == sent.hexdigest()
    )
    down_ok = got_count == sent_count and got_sha == sent.hexdigest()
    print()
    print(
        f"  application -> backend: sent {sent_count} bytes, backend received "
        f"{stats.get('backend_bytes')} bytes"
    )
    print(f"      sha256 sent     {sent.hexdigest()}")
    print(f"      sha256 received {stats.get('backend_sha')}   {'OK' if up_ok else 'MISMATCH'}")
    print(
        f"  backend -> application: echoed {stats.get('backend_bytes')} bytes, application "
        f"received {got_count} bytes"
    )
    print(f"      sha256 echoed   {stats.get('backend_sha')}")
    print(f"      sha256 received {got_sha}   {'OK' if down_ok else 'MISMATCH'}")
    connections = stats.get("backend_connections")
    print(f"  the backend saw {connections} connection, never dropped mid-session")
    ok = up_ok and down_ok and connections == 1 and not stats.get("backend_dropped")
    print()
    print(
        "  every byte arrived exactly once, in order, both ways: the backend saw a pause, "
        "not a disconnection."
        if ok
        else "  FAILED: bytes were lost, duplicated or reordered"
    )
    return 0 if ok else 1
