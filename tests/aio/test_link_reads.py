"""Link reads into a reused buffer (aio/link.py ``LinkReads``; docs/design.md, "The path of
one byte"): bytes still held as views by a slow local side are never overwritten by later
reads. The buffer's rules on their own, then real tether servers and clients in this
process, clear text and TLS, under asyncio and uvloop, over loopback (no mocks)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import random
import socket
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

from tether.admin.metrics import registry_for
from tether.aio.client import TetherClient
from tether.aio.link import (
    HOLD_SLACK,
    LINGER,
    LINK_READ_SIZE,
    LINK_VIEW_FROM,
    MAX_EARLY_LINK_BYTES,
    READ_SIZE,
    LinkOwner,
    LinkProtocol,
    SessionRelay,
)
from tether.aio.link import _close_link as close_link
from tether.aio.link import _deliver as deliver
from tether.aio.server import TetherServer
from tether.config import Address, ClientConfig, ServerConfig
from tether.protocol.codes import CloseCode
from tether.protocol.events import SessionEnded
from tether.protocol.session import STATE_SLACK, Role, Session, SessionConfig

from ..loops import LOOPS, Run, runner
from ..protocol.pair import Pair
from .endpoints import tethers
from .rawpeer import OVERRUN, RawClient, overrun, stream_bytes


def _link() -> LinkProtocol:
    """A link past its handshake (no transport: reads are driven by hand)."""
    return LinkProtocol(cast(LinkOwner, None))


def _read(protocol: LinkProtocol, payload: bytes) -> bytes | memoryview:
    """One read of ``payload``, as an event loop does it (get_buffer, fill), and what
    ``buffer_updated`` hands the relay for it."""
    buf = protocol.get_buffer(-1)
    assert len(buf) >= len(payload)
    buf[: len(payload)] = payload
    del buf  # the loop drops its view once buffer_updated returns
    return protocol.take_read(len(payload))


# -- the buffer's rules ----------------------------------------------------------------------


def test_a_saved_session_may_hold_one_local_read_past_its_window() -> None:
    """Session.restore() (a takeover) accepts a replay buffer up to STATE_SLACK past its
    window, which one local read may put it (the core never refuses send())."""
    assert STATE_SLACK >= READ_SIZE


def test_a_free_buffer_is_read_into_again_from_its_start(run: Run[Any]) -> None:
    async def main() -> None:
        link = _link()
        first = _read(link, b"a" * LINK_VIEW_FROM)
        assert isinstance(first, memoryview)  # a large read is handed on uncopied
        storage = first.obj
        del first  # nothing holds it any more
        second = _read(link, b"b" * LINK_VIEW_FROM)
        assert isinstance(second, memoryview)
        assert second.obj is storage  # the same buffer, from its start
        assert bytes(second) == b"b" * LINK_VIEW_FROM

    run(main())


def test_bytes_still_held_are_never_read_over(run: Run[Any]) -> None:
    async def main() -> None:
        one, other = _link(), _link()  # two links of one loop share the buffer
        first = _read(one, b"a" * LINK_VIEW_FROM)
        held = cast(memoryview, first)[100:200]  # a DATA payload a local transport kept
        del first
        second = _read(other, b"b" * LINK_VIEW_FROM)  # after the held bytes, same buffer
        assert bytes(held) == b"a" * 100
        assert isinstance(second, memoryview) and second.obj is held.obj
        del second
        # Until less than LINK_VIEW_FROM is left: then a fresh buffer.
        third = _read(one, b"c" * (LINK_READ_SIZE - 3 * LINK_VIEW_FROM + 1))
        assert bytes(held) == b"a" * 100
        fourth = other.get_buffer(-1)
        assert fourth.obj is not held.obj and len(fourth) == LINK_READ_SIZE
        fourth[:] = b"d" * LINK_READ_SIZE
        assert bytes(held) == b"a" * 100
        del third, fourth

    run(main())


def test_a_held_buffer_with_less_than_a_view_left_is_not_read_into(run: Run[Any]) -> None:
    """With less than LINK_VIEW_FROM left after held bytes, the next read gets a whole
    fresh buffer: a read into the rest could only be copied, and the rest would never be
    used up while the held bytes live, so every read of the loop would be a copy."""

    async def main() -> None:
        link = _link()
        first = _read(link, b"a" * LINK_VIEW_FROM)
        second = _read(link, b"b" * (LINK_READ_SIZE - 2 * LINK_VIEW_FROM + 1))
        held = cast(memoryview, second)[:1]
        del first, second
        offered = link.get_buffer(-1)
        assert len(offered) == LINK_READ_SIZE and offered.obj is not held.obj
        del offered

    run(main())


class _Behind:
    """A local transport with ``backlog`` bytes not yet written; keeps what it is handed."""

    def __init__(self, backlog: int) -> None:
        self.backlog = backlog
        self.got: list[bytes | memoryview] = []

    def write(self, data: bytes | memoryview) -> None:
        self.got.append(data)

    def writelines(self, pieces: list[bytes | memoryview]) -> None:
        self.got.extend(pieces)

    def get_write_buffer_size(self) -> int:
        return self.backlog

    def is_closing(self) -> bool:
        return False


@pytest.mark.parametrize("backlog", [0, 1])
def test_a_local_side_that_is_behind_is_handed_copies(run: Run[Any], backlog: int) -> None:
    """What a local transport queues behind earlier bytes must not keep the link's read
    buffer: with a backlog the relay hands over one copy; without, the views as they are."""

    async def main() -> None:
        link = _link()
        read = cast(memoryview, _read(link, b"d" * LINK_VIEW_FROM))
        pieces: list[bytes | memoryview] = [read[:10], read[100:200]]
        del read
        relay = SessionRelay(Session(Role.SERVER, SessionConfig(), 0.0), logging.getLogger())
        local = _Behind(backlog)
        relay.local = local
        deliver(relay, pieces)
        if backlog:
            assert local.got == [b"d" * 110] and type(local.got[0]) is bytes
        else:
            assert local.got == pieces and all(type(p) is memoryview for p in local.got)

    run(main())


def test_small_reads_are_copied_and_leave_the_buffer_free(run: Run[Any]) -> None:
    async def main() -> None:
        link = _link()
        small = _read(link, b"x" * (LINK_VIEW_FROM - 1))
        assert type(small) is bytearray  # a copy of its own, not a view of the shared buffer
        big = _read(link, b"y" * LINK_VIEW_FROM)
        assert isinstance(big, memoryview)
        storage = big.obj
        small = _read(link, b"z" * 10)  # while the big one is held: copied, not over it
        assert small == b"z" * 10 and bytes(big) == b"y" * LINK_VIEW_FROM
        del big
        assert cast(memoryview, _read(link, b"w" * LINK_VIEW_FROM)).obj is storage

    run(main())


def test_views_held_by_a_transport_that_cannot_write_keep_the_buffer(run: Run[Any]) -> None:
    """What a local transport does with the views it cannot write yet: uvloop keeps them
    (asyncio 3.11 copies them into its own buffer; later versions keep views too)."""

    async def main() -> None:
        link = _link()
        loop = asyncio.get_running_loop()
        sink, source = socket.socketpair()
        sink.setblocking(False)
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, source)
        try:
            pattern = random.Random(1).randbytes(LINK_VIEW_FROM)  # each read a view
            writes = 0
            while transport.get_write_buffer_size() < 4 * LINK_READ_SIZE:
                # Until the socket's buffer is full, each read is written at once and the
                # buffer is free again; then the transport keeps the views it was given.
                transport.write(_read(link, pattern))
                writes += 1
            for _ in range(8):  # later reads, while those views are held
                assert _read(link, b"\0" * LINK_VIEW_FROM) == b"\0" * LINK_VIEW_FROM
            transport.write_eof()
            got = bytearray()
            while chunk := await loop.sock_recv(sink, 1 << 20):
                got += chunk
            assert len(got) == writes * len(pattern)
            assert got == pattern * writes  # everything arrives as written
        finally:
            transport.abort()
            sink.close()

    run(main())


class _Lost:
    """A LinkOwner that only hears of a link's end (the handshake has not started)."""

    def __init__(self) -> None:
        self.lost = asyncio.get_running_loop().create_future()

    def link_event(self, link: LinkProtocol, event: object) -> None:
        raise AssertionError(f"no handshake was started, yet {event!r}")

    def link_ready(self, link: LinkProtocol) -> None:
        raise AssertionError("no handshake was started")

    def link_lost(self, link: LinkProtocol, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


def test_a_peer_that_speaks_before_the_handshake_is_cut_past_max_early_link_bytes(
    run: Run[Any],
) -> None:
    """A link keeps what its peer says before its handshake starts (a server that speaks
    first: ``LinkProtocol._early``) up to MAX_EARLY_LINK_BYTES and is aborted at one byte
    more, on a real socket: a hostile server cannot make a client hold more."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for extra in (0, 1):
            ours, theirs = socket.socketpair()
            owner = _Lost()
            made = functools.partial(LinkProtocol, cast(LinkOwner, owner))
            transport, link = await loop.connect_accepted_socket(made, ours)
            with theirs:
                theirs.setblocking(False)  # written by the loop, under its timeouts (T6)
                async with asyncio.timeout(30):
                    await loop.sock_sendall(theirs, bytes(MAX_EARLY_LINK_BYTES))
                async with asyncio.timeout(30):  # bounded (CONTRIBUTING.md T6)
                    while len(link._early) < MAX_EARLY_LINK_BYTES:
                        await asyncio.sleep(0.005)
                assert not transport.is_closing()
                if extra:
                    await loop.sock_sendall(theirs, b"!")
                    async with asyncio.timeout(30):
                        await owner.lost
                    assert transport.is_closing()
                else:  # the check is made in the read that appends: none came
                    assert len(link._early) == MAX_EARLY_LINK_BYTES and not owner.lost.done()
                    transport.close()

    run(main())


# -- real tethers with a slow local side --------------------------------------------------------


@pytest.fixture(params=LOOPS)
def run(request: pytest.FixtureRequest) -> Run[Any]:
    return runner(request.param, 120)


SIZE = 48 * 1024 * 1024  # well beyond what loopback's socket buffers absorb


class _End(asyncio.Protocol):
    """A connection end with ``data`` to send (``size`` seeded bytes) that hashes what it
    reads; ``eof`` is set at the peer's EOF or the end of the connection."""

    def __init__(self, seed: int, size: int = SIZE) -> None:
        self.data = random.Random(seed).randbytes(size)
        self.digest = hashlib.sha256()
        self.received = 0
        self.eof = asyncio.Event()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.digest.update(data)
        self.received += len(data)

    def eof_received(self) -> bool:
        self.eof.set()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof.set()


class _Slow(_End):
    """Sends its data (then EOF) and does not read until :meth:`resume`."""

    resumed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.write(self.data)
        if self.data:
            self.transport.write_eof()
        self.transport.pause_reading()
        # uvloop starts reading after connection_made returns, whatever it was told.
        asyncio.get_running_loop().call_soon(self._pause)

    def _pause(self) -> None:
        if not self.resumed and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume(self) -> None:
        assert self.transport is not None
        self.resumed = True
        self.transport.resume_reading()


async def _until(what: str, check: Callable[[], bool]) -> None:
    async with asyncio.timeout(60):  # bounded (CONTRIBUTING.md T6), never a timing claim
        while not check():
            await asyncio.sleep(0.01)


E = TypeVar("E", bound=_End)


@contextlib.asynccontextmanager
async def _backends(make: Callable[[], E]) -> AsyncIterator[tuple[int, list[E]]]:
    """A listening backend on loopback: its port and the ends ``make`` made for it."""
    ends: list[E] = []

    def backend() -> E:
        ends.append(make())
        return ends[-1]

    listener = await asyncio.get_running_loop().create_server(backend, "127.0.0.1", 0)
    try:
        yield listener.sockets[0].getsockname()[1], ends
    finally:
        listener.close()
        for end in ends:
            if end.transport is not None:
                end.transport.abort()


@contextlib.asynccontextmanager
async def _tethers(
    tls: bool, make: Callable[[], E], memory_budget: int | None = None
) -> AsyncIterator[tuple[TetherServer, TetherClient, list[E]]]:
    """A tether server in front of :func:`_backends` and a tether client of it."""
    async with (
        _backends(make) as (port, backends),
        tethers(port, tls=tls, memory_budget=memory_budget) as (server, client),
    ):
        yield server, client, backends


async def _relay(server: TetherServer) -> SessionRelay:
    """The server's one session, once it has one."""
    await _until("the server's session", lambda: bool(list(server.relays())))
    return next(iter(server.relays()))


@pytest.mark.parametrize("tls", [False, True], ids=["clear", "tls"])
def test_a_local_side_that_stops_reading_gets_every_byte_intact(
    run: Run[Any], tls: bool, tmp_path: Path
) -> None:
    """Both the application and the backend send 48 MiB and read nothing until their
    tether's local transport holds bytes it could not write (views of link reads, under
    uvloop), then read everything: each must get the other's stream byte for byte."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with _tethers(tls, lambda: _Slow(seed=1)) as (server, client, backends):
            _, app = await loop.create_connection(
                lambda: _Slow(seed=2), client.addresses[0].host, client.addresses[0].port
            )
            try:
                await _until("the backend connection", lambda: bool(backends))
                far = backends[0]

                def held() -> bool:
                    relays = [*server.relays(), *client.relays()]
                    sizes = [
                        cast(asyncio.Transport, r.local).get_write_buffer_size()
                        for r in relays
                        if r.local is not None
                    ]
                    return len(sizes) == 2 and min(sizes) > 0

                await _until("both local transports to hold bytes", held)
                app.resume()
                far.resume()
                await _until("both streams", lambda: app.eof.is_set() and far.eof.is_set())
                assert (app.received, far.received) == (SIZE, SIZE)
                assert app.digest.digest() == hashlib.sha256(far.data).digest()
                assert far.digest.digest() == hashlib.sha256(app.data).digest()
            finally:
                assert app.transport is not None
                app.transport.abort()

    run(main())


class _WritesFirst(_End):
    """A backend that sends its data and reads nothing until all of it is in its kernel
    (a blocking program that answers before it reads, say a server sending a large result
    to a client that pipelines its next requests); then reads everything."""

    def __init__(self) -> None:
        super().__init__(seed=1)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.set_write_buffer_limits(high=1, low=0)  # resume_writing once all sent
        self.transport.pause_reading()
        self.transport.write(self.data)
        self.transport.write_eof()
        asyncio.get_running_loop().call_soon(self._pause)

    def _pause(self) -> None:  # uvloop starts reading after connection_made, whatever it was told
        if self.transport is not None and self.transport.get_write_buffer_size():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()


class _Reads(_End):
    """An application that sends its data (then EOF) and reads all along."""

    def __init__(self) -> None:
        super().__init__(seed=2)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.write(self.data)
        self.transport.write_eof()


async def _exchange(app: _Reads, far: _WritesFirst) -> None:
    await _until("both streams", lambda: app.eof.is_set() and far.eof.is_set())
    assert (app.received, far.received) == (SIZE, SIZE)
    assert app.digest.digest() == hashlib.sha256(far.data).digest()
    assert far.digest.digest() == hashlib.sha256(app.data).digest()


SMALL_BUDGET = 2 * 1024 * 1024  # the window is cut to it: what is held can fill it


@pytest.mark.parametrize("path", ["direct", "clear", "tls", "budget"])
def test_a_backend_that_answers_before_it_reads_is_not_deadlocked(
    run: Run[Any], path: str, tmp_path: Path
) -> None:
    """The backend writes 48 MiB before it reads anything, while the application uploads
    48 MiB and reads all along. Over plain TCP ("direct") both finish. Through tether the
    server's backend stops taking bytes, yet the server must go on reading the link: the
    client's acknowledgements of the backend's bytes travel behind the upload, and without
    them the server's window stays full, it stops reading the backend, and the backend,
    blocked in its write, never starts reading (docs/design.md, "Flow control").

    "budget": in clear text with a memory budget of 2 MiB, which the upload held for the
    backend fills (charged to it, as the watch below sees): held bytes count against new
    sessions, never against the holding session's own reads of its backend, or this
    exchange would deadlock again (docs/design.md, limitation 16's resolution)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        most_held = 0
        async with contextlib.AsyncExitStack() as stack:
            if path == "direct":
                port, backends = await stack.enter_async_context(_backends(_WritesFirst))
                host = "127.0.0.1"
            else:
                budget = SMALL_BUDGET if path == "budget" else None
                server, client, backends = await stack.enter_async_context(
                    _tethers(path == "tls", _WritesFirst, memory_budget=budget)
                )
                host, port = client.addresses[0].host, client.addresses[0].port

                async def watch() -> None:
                    nonlocal most_held
                    while True:
                        memory = server.memory()
                        assert memory is not None
                        most_held = max(most_held, memory.held)
                        await asyncio.sleep(0.005)

                watching = asyncio.ensure_future(watch())
                stack.callback(watching.cancel)
            _, app = await loop.create_connection(_Reads, host, port)
            try:
                await _until("the backend connection", lambda: bool(backends))
                await _exchange(app, backends[0])
            finally:
                assert app.transport is not None
                app.transport.abort()
        if path == "budget":
            assert most_held > SMALL_BUDGET // 2, most_held

    run(main())


@pytest.mark.parametrize("tls", [False, True], ids=["clear", "tls"])
def test_a_backend_that_answers_before_it_reads_is_not_deadlocked_across_resumes(
    run: Run[Any], tls: bool, tmp_path: Path
) -> None:
    """The same exchange, with the link cut three times while the backend's transport
    holds the client's bytes. A resume tells the client where the server is, which is an
    acknowledgement: the server tells only what it acknowledged, so the client's window
    stays spent, the server never holds past the window and HOLD_SLACK, and the link is
    never left unread (which would bring the deadlock back for good)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with _tethers(tls, _WritesFirst) as (server, client, backends):
            address = client.addresses[0]
            _, app = await loop.create_connection(_Reads, address.host, address.port)
            try:
                relay = await _relay(server)
                await _until("the backend connection", lambda: bool(backends))
                window = relay.core.config.window
                local = cast(asyncio.Transport, relay.local)
                for cut in range(1, 4):
                    await _until(
                        "the backend's transport to hold half a window",
                        lambda: local.get_write_buffer_size() >= window // 2,
                    )
                    assert not relay._link_held
                    assert local.get_write_buffer_size() <= window + HOLD_SLACK + LINK_READ_SIZE
                    assert relay.link is not None
                    relay.link.abort()
                    await _until("the resume", lambda n=cut: relay.core.statistics().resumes == n)
                await _exchange(app, backends[0])
            finally:
                assert app.transport is not None
                app.transport.abort()

    run(main())


class _Quiet(asyncio.Protocol):
    """A link's protocol after its session: reads nothing itself (the transport's reads
    are what _close_link drives), and tells the relay when its transport is gone, as
    LinkProtocol does."""

    def __init__(self) -> None:
        self.lost = asyncio.Event()
        self.relay: SessionRelay | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()
        if self.relay is not None and self.transport is not None:
            self.relay.link_closed(self.transport, exc)


class _Lingers(SessionRelay):
    __slots__ = ("lingered",)

    def __init__(self, core: Session) -> None:
        super().__init__(core, logging.getLogger("test"))
        self.lingered: list[str | None] = []

    def on_lingered(self, unconfirmed: str | None) -> None:
        self.lingered.append(unconfirmed)


def _ended_first(how: str) -> tuple[Session, SessionEnded]:
    """A client session that ended itself while attached: by an abort (its last word a
    CLOSE), or by finishing first (the ACK of the server's EOF; limitation 1)."""
    pair = Pair(SessionConfig())
    pair.establish()
    if how == "aborted":
        pair.client.close(CloseCode.APPLICATION_RESET, "reset")
        pair.pump()
    else:
        pair.client_eof()
        pair.server_eof()
        pair.transfer()
    assert pair.app.ended is not None and pair.client.ended_on_link
    return pair.client, pair.app.ended


@pytest.mark.parametrize("how", ["aborted", "finished"])
def test_a_client_that_ended_itself_lingers_until_the_server_has_read_its_last_word(
    run: Run[Any], how: str
) -> None:
    """A link closed with the peer's bytes unread in its receive queue makes Linux send a
    reset, which drops what was not yet sent: here 4 MiB and a last word, written just
    before, while the peer has not read yet (a fresh link's small window, as after a
    resume). ``_close_link`` half-closes and reads instead, so the peer reads
    every byte, then its EOF, and the link closes when the peer does; meanwhile it is the
    relay's ``lingering`` link, and the relay hears when it is closed."""
    payload = random.Random(5).randbytes(4 << 20) + b"LAST WORD"

    def peer(listener: socket.socket) -> bytes:
        conn, _ = listener.accept()
        with conn:
            conn.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                for _ in range(64):  # unread by the other end: in its receive queue
                    conn.send(bytes(64 * 1024))
            conn.settimeout(30)
            got = bytearray()
            while data := conn.recv(1 << 20):  # a reset raises here
                got += data
            return bytes(got)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with socket.create_server(("127.0.0.1", 0)) as listener:
            reading = asyncio.ensure_future(asyncio.to_thread(peer, listener))
            transport, protocol = await loop.create_connection(_Quiet, *listener.getsockname()[:2])
            transport.pause_reading()  # the peer's bytes wait, unread
            core, end = _ended_first(how)
            relay = protocol.relay = _Lingers(core)
            await asyncio.sleep(0.2)  # they are in the receive queue
            transport.write(payload)
            close_link(relay, transport, end)
            assert relay.lingering is transport
            got = await asyncio.wait_for(reading, 60)
            assert len(got) == len(payload) and got == payload
            await asyncio.wait_for(protocol.lost.wait(), 2 * LINGER)
            assert relay.lingering is None and relay.lingered == [None]

    run(main())


class _Both(_End):
    """Sends its data (no EOF) and reads all along."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.write(self.data)


@pytest.mark.parametrize("tls", [False, True], ids=["clear", "tls"])
def test_an_abort_while_both_directions_stream_reaches_the_server(run: Run[Any], tls: bool) -> None:
    """The application resets while it uploads and the backend downloads: the client ends
    the session with CLOSE behind the upload still queued for the link, with the server's
    bytes unread on it. Closed at once, Linux would answer with a reset that drops what
    was not yet sent, the CLOSE among it, and the server would hold the session until
    expiry; the client's link lingers until the server closes it (link.py, _close_link),
    so the server ends the session APPLICATION_RESET."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with _tethers(tls, lambda: _Both(seed=1)) as (server, client, backends):
            address = client.addresses[0]
            _, app = await loop.create_connection(lambda: _Both(seed=2), address.host, address.port)
            relay = await _relay(server)
            await _until("the backend connection", lambda: bool(backends))
            far = backends[0]
            await _until("both ways", lambda: min(app.received, far.received) > 4 << 20)
            assert app.transport is not None
            sock = app.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            app.transport.abort()  # a reset: the client aborts the session
            async with asyncio.timeout(20):  # the session's timeout is 180 s
                await relay.ended.wait()
            assert relay.close_code is CloseCode.APPLICATION_RESET

    run(main())


@pytest.mark.parametrize("server", ["reads", "silent"])
@pytest.mark.parametrize("tls", [False, True], ids=["clear", "tls"])
def test_a_clients_exit_waits_for_the_link_of_a_session_that_just_ended(
    run: Run[Any], tls: bool, server: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The application resets and the client sends CLOSE, which the server has not read
    yet (its link not read): the session is no longer listed, but its link lingers, and
    leaving the client's ``async with`` waits for it rather than cutting it (a reset that
    could lose the CLOSE) or leaving it open past the client (an unclosed transport once
    the loop ends). Once the server reads the CLOSE it closes the link, and the exit
    completes; a server that never reads it is given up on after LINGER, and the client
    says that the server may keep the session (which it does: limitation 3)."""

    async def main() -> None:
        async with _backends(lambda: _End(seed=1, size=0)) as (port, _):
            listen = Address("127.0.0.1", 0)
            backend = Address("127.0.0.1", port)
            async with TetherServer(
                ServerConfig(listen=listen, backend=backend, plaintext=not tls)
            ) as tether_server:
                client = TetherClient(
                    ClientConfig(
                        listen=listen, server=tether_server.addresses[0], plaintext=not tls
                    )
                )
                await client.__aenter__()
                closing: list[asyncio.Future[None]] = []  # the client's exit, once begun
                try:
                    await _abort_and_exit(client, tether_server, closing)
                finally:
                    if closing:
                        await asyncio.wait_for(closing[0], 10)
                    else:
                        await client.__aexit__(None, None, None)

    async def _abort_and_exit(
        client: TetherClient, tether_server: TetherServer, closing: list[asyncio.Future[None]]
    ) -> None:
        loop = asyncio.get_running_loop()
        address = client.addresses[0]
        _, app = await loop.create_connection(
            lambda: _End(seed=2, size=0), address.host, address.port
        )
        relay = await _relay(tether_server)
        await _until("attached", lambda: [s.state for s in client.sessions()] == ["attached"])
        assert relay.link is not None and app.transport is not None
        relay.link.pause_reading()  # the server reads nothing more from the link
        sock = app.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        app.transport.abort()  # a reset: the client aborts the session
        await _until("the client's end", lambda: not client.relays())
        (ended,) = client._live
        assert ended.core.closed and ended.lingering is not None
        closing.append(asyncio.ensure_future(client.__aexit__(None, None, None)))
        # A few turns of the loop, not a wait (LINGER is 2 s away): without the linger's
        # wait the exit has nothing left to wait for, and completes within them.
        for _ in range(50):
            await asyncio.sleep(0)
        assert not closing[0].done() and ended.lingering is not None
        if server == "reads":
            relay.link.resume_reading()
        await asyncio.wait_for(closing[0], 10)
        assert ended.lingering is None and not client._live
        unconfirmed = [r for r in caplog.records if "may not have read the end" in r.message]
        if server == "reads":
            await _until("the server's end", lambda: relay.close_code is not None)
            assert relay.close_code is CloseCode.APPLICATION_RESET and not unconfirmed
        else:
            assert relay.close_code is None  # it keeps the session, and says so
            assert len(unconfirmed) == 1 and "within 2 s" in unconfirmed[0].message
            if relay.link is not None:  # (uvloop's TLS may have seen the reset already)
                relay.link.resume_reading()  # else its TLS close would wait for nothing

    with caplog.at_level(logging.INFO, logger="tether"):
        run(main())


def _sink(answer: int = 8 << 20) -> _Slow:
    """A backend that sends ``answer`` bytes at once (more than the server's window, which
    a peer that never acknowledges leaves spent: the server reads the link for ACKs) and
    reads nothing until ``resume()``."""
    return _Slow(seed=3, size=answer)


@pytest.mark.parametrize("tls", [False, True], ids=["clear", "tls"])
def test_a_slow_backend_holds_little_when_the_server_waits_for_nothing(
    run: Run[Any], tls: bool
) -> None:
    """The application uploads 48 MiB and the backend reads nothing and says nothing:
    the server, whose window is not spent, stops reading the link (TCP pushes back on the
    client) instead of taking a window into the backend's transport; once the backend
    reads, every byte arrives."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with _tethers(tls, lambda: _sink(answer=0)) as (server, client, sinks):
            address = client.addresses[0]
            _, app = await loop.create_connection(_Reads, address.host, address.port)
            try:
                relay = await _relay(server)
                await _until("the link to stop", lambda: relay._link_stopped)
                await asyncio.sleep(0.5)
                local = cast(asyncio.Transport, relay.local)
                assert relay._link_stopped and not relay._link_held
                assert local.get_write_buffer_size() <= 2 * LINK_READ_SIZE
                assert relay.core.statistics().bytes_received < SIZE
                sinks[0].resume()
                await _until("every byte", lambda: sinks[0].received == SIZE)
                assert sinks[0].digest.digest() == hashlib.sha256(app.data).digest()
            finally:
                assert app.transport is not None
                app.transport.abort()

    run(main())


def test_a_peer_that_does_not_keep_to_the_window_is_held_past_it(run: Run[Any]) -> None:
    """A peer that sends past the window while the backend reads nothing, and the server
    waits for its ACKs (its own window spent): the server reads the link past the window
    (for the ACKs on it), then stops, holding no more than the window, HOLD_SLACK and one
    read, and TCP pushes back; once the backend reads, every byte arrives in order and the
    link is read again.

    What it holds is charged to the memory budget (8 MiB; the session's window is 4 MiB
    and its replay buffer full of the backend's unacknowledged answer): a new setup is
    refused OVERLOADED while it is held, which the replay buffer alone would have let in,
    and admitted again once the backend has taken it."""

    async def main() -> None:
        async with _backends(_sink) as (port, sinks):
            config = ServerConfig(
                listen=Address("127.0.0.1", 0),
                backend=Address("127.0.0.1", port),
                plaintext=True,
                session=SessionConfig(keepalive=60),  # the raw peer answers no PING
                memory_budget=8 * 1024 * 1024,
            )
            async with TetherServer(config) as server:
                address = (server.addresses[0].host, server.addresses[0].port)
                raw = await asyncio.to_thread(RawClient, address)
                sending = asyncio.ensure_future(asyncio.to_thread(overrun, raw.sock))
                others: list[RawClient] = []
                try:
                    relay = await _relay(server)
                    window = relay.core.config.window
                    await _until("the link to be held", lambda: relay._link_held)
                    local = cast(asyncio.Transport, relay.local)
                    held = local.get_write_buffer_size()
                    await asyncio.sleep(0.5)  # held: nothing more is read
                    assert local.get_write_buffer_size() == held
                    assert window < held <= window + HOLD_SLACK + LINK_READ_SIZE
                    memory = server.memory()
                    assert memory is not None and memory.held == held
                    gauge = registry_for(server).get_sample_value("tether_memory_budget_held_bytes")
                    assert gauge == held  # what an operator sees (docs/operations.md)
                    assert memory.committed + held > memory.total
                    assert memory.total - memory.committed >= 64 * 1024  # in, but for held
                    with pytest.raises(ConnectionError, match="OVERLOADED"):
                        others.append(await asyncio.to_thread(RawClient, address))
                    sinks[0].resume()
                    await sending
                    await _until("every byte", lambda: sinks[0].received == OVERRUN)
                    expected = hashlib.sha256(stream_bytes(0, OVERRUN)).digest()
                    assert sinks[0].digest.digest() == expected
                    assert not relay._link_held
                    memory = server.memory()
                    assert memory is not None and memory.held == 0
                    others.append(await asyncio.to_thread(RawClient, address))
                finally:
                    for peer in (raw, *others):
                        peer.close()
                    with contextlib.suppress(OSError):  # closed under the sender on failure
                        await sending

    run(main())
