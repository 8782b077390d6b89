"""The two read paths (aio/link.py, ``BulkReads``; docs/design.md, "Two read paths"): a
connection reads small messages through the event loop's plain ``data_received`` and bulk
through the buffered path, moving between them by the size of its reads, and the local
side never reads on the plain path past its session's room. Real sockets and transports
under asyncio and uvloop; then real tethers, clear text and TLS, with every byte checked."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tether.aio.client import TetherClient
from tether.aio.link import (
    BULK_READ,
    PLAIN_READ_MAX,
    SMALL_READS_TO_PLAIN,
    BulkReads,
    LocalProtocol,
    SessionRelay,
    protocol_of,
)
from tether.aio.server import TetherServer
from tether.protocol.admission import MemoryBudget
from tether.protocol.codes import CloseCode
from tether.protocol.session import Role, Session, SessionConfig, SessionState

from ..loops import LOOPS, Run, runner
from .endpoints import tethers


@pytest.fixture(params=LOOPS)
def run(request: pytest.FixtureRequest) -> Run[Any]:
    return runner(request.param, 120)


async def _until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(30):  # bounded (CONTRIBUTING.md T6), never a timing claim
        while not check():
            await asyncio.sleep(0.005)


async def _local(
    window: int, budget: MemoryBudget | None = None
) -> tuple[asyncio.Transport, LocalProtocol, socket.socket, Session]:
    """A LocalProtocol on a real connected socket, bound to a relay whose core (not yet
    established: it keeps what it is sent) has a replay buffer of ``window``, charged to
    ``budget`` when one is given (as a server's session is); and the socket's other end."""
    loop = asyncio.get_running_loop()
    mine, theirs = socket.socketpair()
    theirs.setblocking(False)  # written with send() and the loop's sock_sendall()
    protocol = LocalProtocol(CloseCode.APPLICATION_RESET)
    transport, _ = await loop.connect_accepted_socket(lambda: protocol, mine)
    core = Session(Role.CLIENT, SessionConfig(window=window), loop.time())
    if budget is not None:
        account = budget.grant(window)
        assert account is not None
        core.charge_to(account)
    assert transport.get_protocol() is protocol  # plain until bound
    protocol.bind(SessionRelay(core, logging.getLogger("tests")))
    return transport, protocol, theirs, core


async def _until_sent(core: Session, total: int) -> None:
    """Until the core holds ``total`` bytes from the local side (each read is in)."""
    await _until(lambda: core.statistics().replay_buffered == total)


def test_a_bulk_read_moves_to_the_buffered_path_and_small_ones_move_back(run: Run[Any]) -> None:
    async def main() -> None:
        transport, protocol, theirs, core = await _local(4 * 1024 * 1024)
        try:
            assert transport.get_protocol() is protocol  # a connection starts plain
            theirs.send(b"x" * 100)
            await _until_sent(core, 100)
            assert transport.get_protocol() is protocol  # a small read stays plain
            protocol.data_received(b"y" * BULK_READ)  # a read as large as the plain path's
            bulk = transport.get_protocol()
            assert isinstance(bulk, BulkReads) and bulk.protocol is protocol
            assert protocol_of(transport) is protocol
            total = 100 + BULK_READ
            for _ in range(SMALL_READS_TO_PLAIN):
                assert transport.get_protocol() is bulk  # not yet
                theirs.send(b"z")  # one read each: the next is sent once this one is in
                total += 1
                await _until_sent(core, total)
            assert transport.get_protocol() is protocol  # back, after that many in a row
            assert protocol._bulk is None  # no cycle left between the two
        finally:
            transport.abort()
            theirs.close()

    run(main())


def test_the_local_side_reads_plain_only_with_room_for_a_whole_plain_read(
    run: Run[Any],
) -> None:
    """A plain read takes what the loop read, whatever the session has room for; so with
    less room than a plain read (a small window, or a full replay buffer) the local side
    reads on the buffered path, whose reads are cut to the room, from its first read on,
    and stays there however small its reads."""

    async def main() -> None:
        transport, _, theirs, core = await _local(PLAIN_READ_MAX // 2)
        try:
            assert isinstance(transport.get_protocol(), BulkReads)  # at bind, before a read
            for n in range(1, SMALL_READS_TO_PLAIN + 4):
                theirs.send(b"x")
                await _until_sent(core, n)
            assert isinstance(transport.get_protocol(), BulkReads)  # small, but no room
            # More than the room, less than a plain read: cut to the room, then one byte,
            # then the reader is paused.
            sending = asyncio.ensure_future(
                asyncio.get_running_loop().sock_sendall(theirs, b"w" * (PLAIN_READ_MAX - 1))
            )
            await _until(lambda: core.send_capacity() <= 0)
            await asyncio.sleep(0.05)  # a read more would show here (not a timing claim)
            assert core.statistics().replay_buffered <= PLAIN_READ_MAX // 2 + 1
            sending.cancel()
        finally:
            transport.abort()
            theirs.close()

    run(main())


def test_a_session_charged_to_a_memory_budget_reads_its_local_side_buffered(
    run: Run[Any],
) -> None:
    """A server's sessions share a memory budget, whose room for one of them shrinks as
    the others use it, between two of its reads: its local side reads only on the
    buffered path, each read cut to the room at that moment."""

    async def main() -> None:
        budget = MemoryBudget(64 * 1024 * 1024)
        transport, _, theirs, core = await _local(4 * 1024 * 1024, budget)
        try:
            assert isinstance(transport.get_protocol(), BulkReads)
            for n in range(1, SMALL_READS_TO_PLAIN + 4):
                theirs.send(b"x")
                await _until_sent(core, n)
            assert isinstance(transport.get_protocol(), BulkReads)
        finally:
            transport.abort()
            theirs.close()

    run(main())


EARLY_MAX = 64 * 1024  # a server's backend, before bind()


def _early(protocol: LocalProtocol) -> int:
    return sum(len(chunk) for chunk in protocol._early)


def now() -> float:
    return asyncio.get_running_loop().time()


@contextlib.asynccontextmanager
async def _speaking_backend(
    total: int,
) -> AsyncIterator[tuple[asyncio.Transport, LocalProtocol, asyncio.Future[None]]]:
    """A server's backend connection, bounded to EARLY_MAX before ``bind()``, on a real
    socket whose other end sends ``total`` bytes at once (``sending``): yielded once its
    early bytes reached the bound and it reads no more."""
    loop = asyncio.get_running_loop()
    mine, theirs = socket.socketpair()
    theirs.setblocking(False)
    protocol = LocalProtocol(CloseCode.BACKEND_RESET, EARLY_MAX)
    transport, _ = await loop.connect_accepted_socket(lambda: protocol, mine)
    sending = asyncio.ensure_future(loop.sock_sendall(theirs, b"b" * total))
    try:
        assert isinstance(transport.get_protocol(), BulkReads)  # from the first read
        await _until(lambda: _early(protocol) == EARLY_MAX)
        await asyncio.sleep(0.05)  # a read more would show here (not a timing claim)
        assert _early(protocol) == EARLY_MAX and not transport.is_reading()  # type: ignore[attr-defined]
        yield transport, protocol, sending
    finally:
        sending.cancel()
        transport.abort()
        theirs.close()


def test_what_a_backend_says_before_bind_is_read_up_to_its_bound_then_waits(
    run: Run[Any],
) -> None:
    """A server's backend may speak before its session is accepted and bound (the turns
    of the loop in between): it is read in reads cut to ``early_max``, then not at all
    until ``bind()``, which hands those bytes over and reads the rest within the room."""
    total = 1024 * 1024

    async def main() -> None:
        async with _speaking_backend(total) as (_, protocol, sending):
            core = Session(Role.SERVER, SessionConfig(window=4 * total), now())
            protocol.bind(SessionRelay(core, logging.getLogger("tests")))
            await _until_sent(core, total)  # read again once bound, every byte
            await sending

    run(main())


def test_early_bytes_that_fill_the_session_leave_its_backend_paused_at_bind(
    run: Run[Any],
) -> None:
    """The bytes read before ``bind()`` already fill the session's window: ``bind()`` hands
    them over and leaves the reader paused (the session's room rules now), rather than
    resuming it for a read the session has no room for."""

    async def main() -> None:
        async with _speaking_backend(1024 * 1024) as (transport, protocol, _):
            core = Session(Role.SERVER, SessionConfig(window=EARLY_MAX // 4), now())
            protocol.bind(SessionRelay(core, logging.getLogger("tests")))
            await asyncio.sleep(0.05)  # a read more would show here (not a timing claim)
            assert core.statistics().replay_buffered == EARLY_MAX  # not a byte more
            assert not transport.is_reading()  # type: ignore[attr-defined]

    run(main())


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


Tethers = tuple[TetherServer, TetherClient, asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def _tethers(
    tls: bool,
    session: SessionConfig | None = None,
    backend: Callable[[], asyncio.Protocol] = _Echo,
) -> AsyncIterator[Tethers]:
    """An echo backend (or ``backend``), a tether server in front of it (with
    ``session``'s settings), a tether client of it, and an application's connection
    through them."""
    echo = await asyncio.get_running_loop().create_server(backend, "127.0.0.1", 0)
    try:
        port = echo.sockets[0].getsockname()[1]
        async with tethers(port, tls=tls, session=session) as (server, client):
            where = client.addresses[0]
            reader, writer = await asyncio.open_connection(where.host, where.port)
            try:
                yield server, client, reader, writer
            finally:
                writer.close()
    finally:
        echo.close()


def test_a_client_told_a_small_window_reads_its_application_buffered_before_a_read(
    run: Run[Any],
) -> None:
    """The client binds its application's connection before its session is set up, with its
    own window; the server's ACCEPT may grant less (a window under PLAIN_READ_MAX here), and
    then the application's next read must already be cut to the room: the path is decided
    again when the session is established, not only after a read."""

    async def main() -> None:
        small = SessionConfig(window=PLAIN_READ_MAX // 2)
        async with _tethers(False, small) as (_, client, _, _):
            await _until(
                lambda: any(r.core.state is SessionState.ATTACHED for r in client.relays())
            )
            (relay,) = client.relays()
            assert relay.local is not None
            assert isinstance(relay.local.get_protocol(), BulkReads)  # type: ignore[attr-defined]

    run(main())


@pytest.mark.parametrize("tls", [False, True], ids=["clear", "tls"])
def test_a_session_moves_between_the_paths_and_loses_nothing(run: Run[Any], tls: bool) -> None:
    """Small round trips, then 16 MiB echoed, then small round trips again, through a
    real tether client and server: every byte comes back in order, the four connections
    (backend, application, and the link at both ends) are seen reading bulk on the buffered
    path, and the three that may are back on the plain path once the messages are small
    again."""

    async def main() -> None:
        async with _tethers(tls) as (server, client, reader, writer):
            rng = random.Random(7)

            async def exchange(message: bytes) -> None:
                writer.write(message)
                assert await reader.readexactly(len(message)) == message

            def paths() -> list[bool]:  # on the buffered path, per connection
                relays = [*server.relays(), *client.relays()]  # server's first
                transports = [t for r in relays for t in (r.local, r.link)]
                assert len(transports) == 4 and all(transports)
                return [isinstance(t.get_protocol(), BulkReads) for t in transports]

            # The server's backend, the application, the server's and the client's link;
            # the backend's session is charged to the server's memory budget, so it reads
            # buffered throughout.
            small = [True, False, False, False]
            for _ in range(20):
                await exchange(rng.randbytes(64))
            assert paths() == small
            # Seen on the buffered path while the bulk goes through: once it is through,
            # the client's ACKs of the tail of the echo (small reads) may already have
            # moved the server's link back, as they should.
            seen = [False] * 4

            async def watch() -> None:
                while True:
                    seen[:] = [a or b for a, b in zip(seen, paths(), strict=True)]
                    await asyncio.sleep(0.001)

            watching = asyncio.ensure_future(watch())
            try:
                await exchange(rng.randbytes(16 * 1024 * 1024))
            finally:
                watching.cancel()
            assert seen == [True] * 4
            for _ in range(2 * SMALL_READS_TO_PLAIN):
                await exchange(rng.randbytes(64))
            assert paths() == small

    run(main())


class _Speaker(asyncio.Protocol):
    """A backend that speaks first: SPEECH as soon as it is connected, then echoes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(SPEECH)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


SPEECH = random.Random(11).randbytes(4 * 1024 * 1024)


@pytest.mark.parametrize("tls", [False, True], ids=["clear", "tls"])
def test_a_backend_that_speaks_first_is_heard_whole_through_tethers(
    run: Run[Any], tls: bool
) -> None:
    """A backend that sends 4 MiB the moment it is connected (before its session is
    accepted, so most of it waits in the kernel until the session binds it): the
    application gets every byte in order, then an echo."""

    async def main() -> None:
        async with _tethers(tls, backend=_Speaker) as (_, _, reader, writer):
            assert await reader.readexactly(len(SPEECH)) == SPEECH
            writer.write(b"after")
            assert await reader.readexactly(5) == b"after"

    run(main())
