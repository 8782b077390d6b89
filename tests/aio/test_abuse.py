"""Abuse and flow control through the asyncio drivers, on loopback.

- A peer that floods PINGs and never reads, against a real ``tether server`` and a
  real ``tether client`` process: their memory (VmRSS, read from /proc) stays bounded
  and the link is dropped with a stated reason.
- A link whose peer does not read: the session frames nothing more for it once its
  write buffer is above the high-water mark (in-process server and client, so the
  transport's buffer can be inspected), and every byte arrives once the peer reads.
- A backend that reads slowly while the client uploads: neither end may mistake the
  pauses for a dead link.
- Reads full of small DATA frames: at most FRAMES_PER_TURN of them per turn of the
  server's event loop, under asyncio and uvloop, with and without backpressure.

The raw peers (rawpeer.py) speak the tether protocol in clear text, so the flood and
the unread-link cases run with --plaintext on the tether end; the slow-backend case runs
with TLS (the default). Every loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import random
import socket
from collections.abc import Coroutine
from typing import Any, cast

import pytest

from tether.aio.client import TetherClient
from tether.aio.link import FRAMES_PER_TURN, READ_SIZE
from tether.aio.server import TetherServer
from tether.config import Address, ClientConfig, ServerConfig
from tether.protocol.session import CONTROL_FLOOD, ORPHAN_GRACE, ORPHANED, SessionConfig

from ..loops import LOOPS, runner
from .endpoints import Backend, close_all, connect_app, stream_digest
from .faultnet import start_tether, stop, tether_pair
from .rawpeer import (
    RawClient,
    RawServer,
    data_block,
    ping_block,
    read_stream,
    rss_bytes,
    stream_bytes,
)

FLOOD_SECONDS = 4.0  # unfixed, a server kept ~6 bytes per byte of PINGs: 100+ MiB by then
RSS_BOUND = 32 * 1024 * 1024
# The link's high-water mark (64 KiB) + one local read framed (its DATA headers included),
# with room to spare.
LINK_BUFFER_BOUND = 2 * READ_SIZE


def run(coro: Coroutine[Any, Any, None], limit: float = 120) -> None:
    async def main() -> None:
        try:
            await asyncio.wait_for(coro, limit)
        finally:
            close_all()
            await asyncio.sleep(0)

    asyncio.run(main())


async def log_shows(proc_log: Any, text: str, limit: float = 5.0) -> bool:
    """Whether ``text`` appears in the log within ``limit`` seconds."""
    for _ in range(int(limit / 0.05)):
        if text in proc_log():
            return True
        await asyncio.sleep(0.05)
    return text in proc_log()


# -- PING floods against real processes ---------------------------------------------------


def test_a_ping_flood_that_never_reads_costs_the_server_no_memory(tmp_path: Any) -> None:
    async def main() -> None:
        backend = socket.create_server(("127.0.0.1", 0))  # connections wait in its backlog
        port = backend.getsockname()[1]
        server = await start_tether(
            "server", "--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{port}", "--plaintext",
            tmp=str(tmp_path),
        )  # fmt: skip
        try:
            raw = await asyncio.to_thread(RawClient, server.address)
            pid = server.popen.pid
            before = rss_bytes(pid)
            sent = await asyncio.to_thread(raw.flood, ping_block(), FLOOD_SECONDS)
            growth = rss_bytes(pid) - before
            raw.close()
            assert growth < RSS_BOUND, f"{growth >> 20} MiB kept for {sent >> 20} MiB of PINGs"
            assert await log_shows(server.log, CONTROL_FLOOD), server.log()
        finally:
            assert stop(server) == 0, server.log()
            backend.close()

    run(main())


def test_a_ping_flood_from_a_server_that_never_reads_costs_the_client_no_memory(
    tmp_path: Any,
) -> None:
    async def main() -> None:
        raw = RawServer()
        host, port = raw.address
        client = await start_tether(
            "client", "--listen", "127.0.0.1:0", "--server", f"{host}:{port}", "--plaintext",
            tmp=str(tmp_path),
        )  # fmt: skip
        app = socket.create_connection(client.address)
        try:
            await asyncio.to_thread(raw.accept)
            pid = client.popen.pid
            before = rss_bytes(pid)
            sent = await asyncio.to_thread(raw.flood, ping_block(), FLOOD_SECONDS)
            growth = rss_bytes(pid) - before
            assert growth < RSS_BOUND, f"{growth >> 20} MiB kept for {sent >> 20} MiB of PINGs"
            assert await log_shows(client.log, CONTROL_FLOOD), client.log()
        finally:
            app.close()
            raw.close()
            assert stop(client) == 0, client.log()

    run(main())


# -- a read of tiny frames ------------------------------------------------------------------


class DenseFlood:
    """An in-process server whose one session receives DATA frames from a raw client
    (rawpeer.py), and a callback that runs once per turn of the loop and records the most
    frames (``size`` bytes each) the session received in one turn."""

    def __init__(self, server: TetherServer, raw: RawClient, size: int) -> None:
        self.server, self.raw, self.size = server, raw, size
        (self.relay,) = server.relays()
        self.loop = asyncio.get_running_loop()
        self.seen = self.most = self.turns = 0
        self.backpressure = False  # the backend's transport was ever above its high mark
        self.ticking = True
        self.tick()

    def tick(self) -> None:
        self.turns += 1
        received = self.relay.core.statistics().bytes_received
        self.most = max(self.most, (received - self.seen) // self.size)
        self.seen = received
        self.backpressure = self.backpressure or self.relay._local_writing_paused
        if self.ticking:
            self.loop.call_soon(self.tick)


async def dense_flood(
    tls: bool, tmp_path: Any, count: int, size: int, *, backend_waits: bool = False
) -> DenseFlood:
    """Send ``count`` frames of ``size`` bytes at once; with ``backend_waits`` the backend
    reads nothing until the server has stopped writing to it. Checks that every byte
    arrives in order, and that the link is read again afterwards (one more frame)."""
    async with Backend(seed=0, size=0, eof=False) as backend:
        config = ServerConfig(
            listen=Address("127.0.0.1", 0),
            backend=Address(*backend.address),
            plaintext=not tls,
            state_dir=tmp_path,
        )
        async with TetherServer(config) as server:
            address = server.addresses[0]
            pin = server.fingerprint if tls else None
            raw = await asyncio.to_thread(RawClient, (address.host, address.port), pin=pin)
            try:
                async with asyncio.timeout(60):
                    while not backend.connections or backend.connections[0].transport is None:
                        await asyncio.sleep(0.01)
                connection = backend.connections[0]
                assert connection.transport is not None
                if backend_waits:
                    connection.transport.pause_reading()
                flood = DenseFlood(server, raw, size)
                block = data_block(0, count, size)
                sending = asyncio.create_task(asyncio.to_thread(raw.sock.sendall, block))
                async with asyncio.timeout(60):
                    if backend_waits:
                        while not flood.backpressure:
                            await asyncio.sleep(0.01)
                        connection.transport.resume_reading()
                    await sending
                    total = count * size
                    while connection.received < total:
                        await asyncio.sleep(0.01)
                    raw.sock.sendall(data_block(total, 1, size))  # the link is read again
                    while connection.received < total + size:
                        await asyncio.sleep(0.01)
                flood.ticking = False
                expected = hashlib.sha256(stream_bytes(0, total + size)).hexdigest()
                assert connection.digest.hexdigest() == expected
                return flood
            finally:
                raw.close()


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("tls", [False, True], ids=["clear", "tls"])
def test_a_read_of_tiny_frames_is_handled_over_many_turns_of_the_loop(
    loop: str, tls: bool, tmp_path: Any
) -> None:
    """A peer that sends one-byte DATA frames as fast as it can: the server handles at most
    FRAMES_PER_TURN of them per turn of its event loop (docs/design.md, "Dense reads"),
    where one read of them used to keep every other session waiting (p99 135-207 ms for
    another session's round trips: ``python -m tests.aio.rawpeer tiny``). Counted in
    turns, not time. And every byte arrives, in order."""
    flood = runner(loop, 120)(dense_flood(tls, tmp_path, 200_000, 1))
    # A part of a read per turn, and a new read once the last part is taken.
    assert flood.most <= 2 * FRAMES_PER_TURN, f"{flood.most} frames in one turn of {flood.turns}"


@pytest.mark.parametrize("loop", LOOPS)
def test_a_dense_flood_into_a_backend_that_waits_arrives_whole(loop: str, tmp_path: Any) -> None:
    """The parts of a read meet backpressure: the backend reads nothing until the server
    has stopped writing to it (its transport above the high mark), so the link may be
    paused for both reasons at once (not checked: the two may not overlap). Every byte
    arrives once it reads, and the link is read again."""
    # 10 MiB: more than the server's socket (4 MiB at most, tcp_wmem) and the backend's (which
    # reads nothing, so its 128 KiB does not grow) take between them.
    flood = runner(loop, 120)(dense_flood(False, tmp_path, 65_536, 160, backend_waits=True))
    assert flood.backpressure
    assert flood.most <= 2 * FRAMES_PER_TURN, f"{flood.most} frames in one turn of {flood.turns}"


# -- a link whose peer does not read --------------------------------------------------------


SIZE = 24 * 1024 * 1024  # more than the kernel's socket buffers hold on loopback
WINDOW = 32 * 1024 * 1024  # all of it fits the replay buffer: only where it waits differs


def link_buffer(service: TetherServer | TetherClient) -> int:
    (relay,) = service.relays()
    assert relay.link is not None
    return relay.link.get_write_buffer_size()


def test_the_server_frames_nothing_more_for_a_link_that_is_not_read() -> None:
    async def main() -> None:
        async with Backend(seed=21, size=SIZE, eof=False) as backend:
            config = ServerConfig(
                listen=Address("127.0.0.1", 0),
                backend=Address(*backend.address),
                session=SessionConfig(window=WINDOW),
                plaintext=True,
            )
            async with TetherServer(config) as server:
                address = server.addresses[0]
                raw = await asyncio.to_thread(
                    functools.partial(RawClient, window=WINDOW), (address.host, address.port)
                )
                try:
                    (relay,) = server.relays()
                    for _ in range(400):  # until the backend's bytes are all in the session
                        if relay.core.statistics().bytes_sent == SIZE:
                            break
                        await asyncio.sleep(0.025)
                    assert relay.core.statistics().bytes_sent == SIZE
                    held = link_buffer(server)
                    assert held < LINK_BUFFER_BOUND, f"{held >> 20} MiB framed onto the link"
                    got = await asyncio.to_thread(read_stream, raw.sock, raw.session, SIZE, 60)
                    assert len(got) == SIZE
                    assert backend.connections[0].received == 0
                finally:
                    raw.close()
        assert hashlib.sha256(got).hexdigest() == stream_digest(21, SIZE)

    run(main())


def test_the_client_frames_nothing_more_for_a_link_that_is_not_read() -> None:
    async def main() -> None:
        raw = RawServer()
        config = ClientConfig(
            server=Address(*raw.address),
            session=SessionConfig(window=WINDOW),
            fallback=None,
            plaintext=True,
        )
        payload = random.Random(22).randbytes(SIZE)
        try:
            async with TetherClient(config, listen=False) as client:
                accepting = asyncio.ensure_future(asyncio.to_thread(raw.accept))
                async with client.open_stream() as stream:
                    await accepting
                    view = memoryview(payload)
                    for lo in range(0, SIZE, 256 * 1024):
                        stream.write(bytes(view[lo : lo + 256 * 1024]))
                    held = link_buffer(client)
                    assert held < LINK_BUFFER_BOUND, f"{held >> 20} MiB framed onto the link"
                    assert raw.session is not None and raw.sock is not None
                    got = await asyncio.to_thread(read_stream, raw.sock, raw.session, SIZE, 60)
                    assert got == payload
        finally:
            raw.close()

    run(main())


# -- a slow backend under a sustained upload -----------------------------------------------


class SlowReader(asyncio.Protocol):
    """A backend that reads about ``chunk`` bytes every ``period`` seconds, then at full
    speed once ``slow_for`` seconds have passed."""

    def __init__(self, chunk: int, period: float, slow_for: float) -> None:
        self.chunk, self.period = chunk, period
        self.loop = asyncio.get_running_loop()
        self.slow_until = self.loop.time() + slow_for
        self.transport: asyncio.Transport | None = None
        self.received = 0
        self.in_period = 0
        self.pauses = 0
        self.digest = hashlib.sha256()
        self.done = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.chunk)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.digest.update(data)
        self.in_period += len(data)
        if self.in_period >= self.chunk and self.loop.time() < self.slow_until:
            assert self.transport is not None
            self.transport.pause_reading()
            self.pauses += 1
            self.loop.call_later(self.period, self._resume)

    def _resume(self) -> None:
        self.in_period = 0
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        self.done.set()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.done.set()


def test_a_slow_backend_under_a_sustained_upload_is_not_a_dead_link(tmp_path: Any) -> None:
    size = 48 * 1024 * 1024
    keepalive = ("--keepalive", "0.3")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        readers: list[SlowReader] = []

        def make() -> SlowReader:
            readers.append(SlowReader(64 * 1024, 0.5, slow_for=6.0))
            return readers[-1]

        listener = await loop.create_server(make, "127.0.0.1", 0)
        backend = cast(tuple[str, int], listener.sockets[0].getsockname()[:2])
        try:
            async with tether_pair(
                backend, str(tmp_path), server_args=keepalive, client_args=keepalive
            ) as (server, client, _):
                app = await connect_app(client.address, seed=23, size=size, eof=True)
                for _ in range(100):
                    if readers:
                        break
                    await asyncio.sleep(0.05)
                (reader,) = readers
                await asyncio.wait_for(reader.done.wait(), 90)
                assert reader.received == size
                assert reader.digest.hexdigest() == stream_digest(23, size)
                assert reader.pauses >= 6  # the backend really was slow, for seconds
                assert "link lost" not in server.log(), server.log()
                assert "link lost" not in client.log(), client.log()
                assert app.transport is not None
        finally:
            listener.close()
            for reader in readers:
                if reader.transport is not None:
                    reader.transport.abort()
            await asyncio.sleep(0)

    run(main())


# -- a streaming backend against the memory budget ------------------------------------------

BUDGET = 8 * 1024 * 1024
ATTACKERS = 40  # unbudgeted, each would hold a 4 MiB window: 160 MiB
BUDGET_RSS_BOUND = 2 * BUDGET + 16 * 1024 * 1024  # about twice the budget, plus a constant


def test_a_streaming_backend_flood_stays_within_the_memory_budget(tmp_path: Any) -> None:
    """Sessions that never read, while the backend streams: the server holds no more
    than its --memory-budget (RSS within about twice it), refuses new setups OVERLOADED
    once not even a floor fits, and an established honest session is still served."""

    async def main() -> None:
        async with Backend(seed=31, size=1 << 30, eof=False) as backend:
            server = await start_tether(
                "server", "--listen", "127.0.0.1:0",
                "--backend", f"127.0.0.1:{backend.address[1]}", "--plaintext",
                "--memory-budget", "8M",
                tmp=str(tmp_path),
            )  # fmt: skip
            attackers: list[RawClient] = []
            overloaded = 0
            try:
                honest = await asyncio.to_thread(RawClient, server.address, source="127.0.0.2")
                got = await asyncio.to_thread(read_stream, honest.sock, honest.session, 1 << 20, 30)
                before = rss_bytes(server.popen.pid)
                for i in range(ATTACKERS):
                    try:
                        attackers.append(
                            await asyncio.to_thread(
                                RawClient, server.address, source=f"127.0.1.{i + 1}"
                            )
                        )
                    except ConnectionError as exc:
                        assert "OVERLOADED" in str(exc), exc
                        overloaded += 1
                    await asyncio.sleep(0.05)  # the backend fills the new session
                for _ in range(100):  # until the budget is full and a setup refused
                    if overloaded:
                        break
                    try:
                        (await asyncio.to_thread(RawClient, server.address)).close()
                    except ConnectionError as exc:
                        assert "OVERLOADED" in str(exc), exc
                        overloaded += 1
                    await asyncio.sleep(0.1)
                growth = rss_bytes(server.popen.pid) - before
                assert growth < BUDGET_RSS_BOUND, (
                    f"{growth >> 20} MiB for {len(attackers)} sessions that never read"
                )
                assert overloaded, f"{len(attackers)} sessions admitted, none refused"
                assert "refused: overloaded" in server.log()
                # The honest session, established before, still gets its stream.
                more = await asyncio.to_thread(
                    read_stream, honest.sock, honest.session, 2 << 20, 30
                )
                assert len(got) >= 1 << 20 and len(more) >= 2 << 20
                honest.close()
            finally:
                for raw in attackers:
                    raw.close()
                assert stop(server) == 0, server.log()

    run(main())


# -- orphaned setups ---------------------------------------------------------------------------


@pytest.mark.once  # waits out ORPHAN_GRACE; the core's rule runs plain in test_budget.py
def test_a_setup_whose_client_leaves_at_once_is_released_after_the_grace(tmp_path: Any) -> None:
    """A peer that sets up a session and leaves without a further byte: the server
    releases it (and its backend connection) after ORPHAN_GRACE, not the 180 s timeout;
    a session whose client spoke keeps the full timeout."""

    async def main() -> None:
        backend = socket.create_server(("127.0.0.1", 0))
        backend.listen(16)
        server = await start_tether(
            "server", "--listen", "127.0.0.1:0",
            "--backend", f"127.0.0.1:{backend.getsockname()[1]}", "--plaintext",
            tmp=str(tmp_path),
        )  # fmt: skip
        try:
            heard = await asyncio.to_thread(RawClient, server.address)
            heard.session.send(b"hello")
            heard.sock.sendall(b"".join(heard.session.data_to_send()))
            orphan = await asyncio.to_thread(RawClient, server.address)
            orphan.close()
            await asyncio.sleep(0.2)
            heard.close()
            assert await log_shows(server.log, f"ended EXPIRED ({ORPHANED})", ORPHAN_GRACE + 20)
            assert server.log().count("ended EXPIRED") == 1, server.log()  # not the heard one
            assert server.log().count("link lost") == 2, server.log()
        finally:
            assert stop(server) == 0, server.log()
            backend.close()

    run(main())
