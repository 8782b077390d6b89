"""The TLS link transport on the socket itself (aio/tlssocket.py): real TLS 1.3 over real
loopback sockets, under asyncio and uvloop. What a link relies on: every byte in order on
both read paths and across a switch between them, backpressure both ways, close() that
delivers what was written and a close_notify, bounded closes and handshakes, a failed
verification that never reaches the protocol, session resumption, and a failing protocol
that costs its own connection only."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tether import tls
from tether.aio import tlssocket
from tether.aio.tlssocket import TLSSocketTransport

from ..loops import LOOPS, Run, runner


@pytest.fixture(params=LOOPS)
def run(request: pytest.FixtureRequest) -> Run[Any]:
    return runner(request.param, 60)


@pytest.fixture
def contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    identity, _ = tls.load_or_create_identity(tmp_path)
    return tls.server_context(identity), tls.client_context()


class Recorder(asyncio.Protocol):
    """Keeps what it is told: bytes, EOF, loss, and the write side's pauses."""

    def __init__(self) -> None:
        self.transport: TLSSocketTransport | None = None
        self.received = bytearray()
        self.eof = False
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.paused = 0
        self.resumed = 0
        self.arrived = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, TLSSocketTransport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += data
        self.arrived.set()

    def eof_received(self) -> bool:
        self.eof = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed += 1


class SmallBuffers(asyncio.BufferedProtocol):
    """A buffered protocol that offers ``size`` bytes per read and hands them to ``into``."""

    def __init__(self, into: Recorder, size: int) -> None:
        self.into = into
        self.buf = bytearray(size)
        self.reads = 0

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buf)

    def buffer_updated(self, nbytes: int) -> None:
        self.reads += 1
        self.into.data_received(bytes(self.buf[:nbytes]))

    def eof_received(self) -> bool:
        return self.into.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.into.connection_lost(exc)


@contextlib.asynccontextmanager
async def pair(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
    server: Callable[[], asyncio.BaseProtocol] = Recorder,
    **connect: Any,
) -> AsyncIterator[tuple[TLSSocketTransport, Any, asyncio.Future[tuple[Any, Any]]]]:
    """A listening socket whose first connection is accepted with :func:`tlssocket.accept`;
    yields the client's transport and protocol and a future of the server's."""
    server_context, client_context = contexts
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    accepted: asyncio.Future[tuple[Any, Any]] = loop.create_future()

    async def serve() -> None:
        conn, _ = await loop.sock_accept(listener)
        try:
            made = await tlssocket.accept(server, conn, server_context, handshake_timeout=10)
        except Exception as exc:
            accepted.set_exception(exc)
            return
        accepted.set_result(made)

    task = asyncio.create_task(serve())
    client: TLSSocketTransport | None = None
    try:
        port = listener.getsockname()[1]
        client, protocol = await tlssocket.connect(
            Recorder, "127.0.0.1", port, client_context, server_hostname=None, **connect
        )
        yield client, protocol, accepted
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if client is not None:
            client.abort()
        if accepted.done() and not accepted.cancelled() and accepted.exception() is None:
            accepted.result()[0].abort()
        elif not accepted.done():
            accepted.cancel()
        listener.close()
        for _ in range(3):  # connection_lost, then the sockets' close, run from the loop
            await asyncio.sleep(0)


async def _until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.005)


def test_bytes_arrive_in_order_on_both_read_paths_and_across_switches(
    run: Run[Any], contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    rng = random.Random(12)
    payload = rng.randbytes(3 * 1024 * 1024)

    async def main() -> None:
        async with pair(contexts) as (client, _, accepted):
            server, received = await accepted
            plain: Recorder = received
            buffered = SmallBuffers(plain, 1000)  # smaller than a record: OpenSSL holds the rest
            at = 0
            while at < len(payload):
                size = rng.choice([1, 13, 700, 16384, 65536, 200000])
                client.write(payload[at : at + size])
                at += size
                server.set_protocol(buffered if rng.random() < 0.5 else plain)
                await asyncio.sleep(0)
            async with asyncio.timeout(30):
                await _until(lambda: len(plain.received) >= len(payload))
            assert hashlib.sha256(plain.received).digest() == hashlib.sha256(payload).digest()
            assert buffered.reads > 0  # both paths were used

    run(main())


def test_a_peer_that_does_not_read_pauses_the_writer_and_resumes_it_once_read(
    run: Run[Any], contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    payload = random.Random(3).randbytes(16 * 1024 * 1024)

    async def main() -> None:
        async with pair(contexts) as (client, protocol, accepted):
            server, received = await accepted
            server.pause_reading()
            for at in range(0, len(payload), 65536):
                client.write(payload[at : at + 65536])
            assert protocol.paused == 1  # once, however much more was written
            assert client.get_write_buffer_size() > 0
            await asyncio.sleep(0.1)
            assert protocol.resumed == 0
            server.resume_reading()
            async with asyncio.timeout(30):
                await _until(lambda: len(received.received) >= len(payload))
                await _until(lambda: protocol.resumed == 1)
            assert received.received == payload
            assert client.get_write_buffer_size() == 0

    run(main())


def test_close_delivers_what_waits_then_a_close_notify(
    run: Run[Any], contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    payload = random.Random(5).randbytes(4 * 1024 * 1024)

    async def main() -> None:
        async with pair(contexts) as (client, protocol, accepted):
            _server, received = await accepted
            client.write(payload)
            assert client.get_write_buffer_size() > 0  # more than the socket takes at once
            client.close()
            assert client.is_closing()
            client.write(b"after close")  # dropped, as asyncio's transports do
            async with asyncio.timeout(30):
                assert await received.lost is None
                assert await protocol.lost is None
            assert received.received == payload
            assert received.eof  # the close_notify: an orderly end, not a reset

    run(main())


def test_a_close_that_the_peer_never_reads_is_aborted_after_the_close_timeout(
    run: Run[Any], contexts: tuple[ssl.SSLContext, ssl.SSLContext], monkeypatch: Any
) -> None:
    monkeypatch.setattr(tlssocket, "CLOSE_TIMEOUT", 0.3)

    async def main() -> None:
        async with pair(contexts) as (client, protocol, accepted):
            server, _ = await accepted
            server.pause_reading()
            sock = client.get_extra_info("socket")
            while client.get_write_buffer_size() == 0:
                client.write(bytes(1 << 20))
            client.close()
            async with asyncio.timeout(10):
                assert await protocol.lost is None
            assert sock.fileno() == -1  # the socket is closed, its buffer let go
            assert client.get_write_buffer_size() == 0

    run(main())


def test_a_record_held_across_a_pause_is_delivered_on_resume(
    run: Run[Any], contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """A 1,000-byte read buffer against one 5,000-byte record: OpenSSL holds 4,000 decrypted
    bytes that no readiness will announce; pausing after the first read and resuming must
    still deliver them."""

    async def main() -> None:
        async with pair(contexts) as (client, _, accepted):
            server, plain = await accepted
            buffered = SmallBuffers(plain, 1000)
            original = buffered.buffer_updated

            def pause_after_first(nbytes: int) -> None:
                original(nbytes)
                if buffered.reads == 1:
                    server.pause_reading()

            buffered.buffer_updated = pause_after_first  # type: ignore[method-assign]
            server.set_protocol(buffered)
            client.write(b"x" * 5000)
            async with asyncio.timeout(10):
                await _until(lambda: buffered.reads == 1)
            await asyncio.sleep(0.1)
            assert len(plain.received) == 1000  # paused: nothing more
            server.resume_reading()
            async with asyncio.timeout(10):
                await _until(lambda: len(plain.received) == 5000)

    run(main())


def test_a_fin_without_close_notify_is_the_end_of_the_stream(
    run: Run[Any], contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    async def main() -> None:
        async with pair(contexts) as (client, _, accepted):
            _server, received = await accepted
            client.write(b"last words")
            async with asyncio.timeout(10):
                await received.arrived.wait()
            client.get_extra_info("socket").shutdown(socket.SHUT_WR)  # TCP FIN, no TLS alert
            async with asyncio.timeout(10):
                assert await received.lost is None
            assert received.eof and received.received == b"last words"

    run(main())


def test_a_handshake_that_never_comes_is_cut_at_its_limit(
    run: Run[Any], contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    async def main() -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        silent = socket.create_connection(listener.getsockname())
        conn, _ = listener.accept()
        try:
            with pytest.raises(TimeoutError):
                await tlssocket.accept(Recorder, conn, contexts[0], handshake_timeout=0.2)
            silent.settimeout(5)
            assert silent.recv(100) == b""  # the server closed it
        finally:
            silent.close()
            listener.close()

    run(main())


def test_a_server_the_client_does_not_trust_never_meets_its_protocol(
    run: Run[Any], contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    made: list[Recorder] = []

    def refuse(der: bytes) -> None:
        raise tls.TrustError(f"not the pinned one ({len(der)} bytes)")

    async def main() -> None:
        def recorded() -> Recorder:
            made.append(Recorder())
            return made[-1]

        with pytest.raises(tls.TrustError, match="not the pinned one"):
            async with pair(contexts, server=recorded, verify=refuse):
                pass

    run(main())
    assert len(made) <= 1  # the server's side may have finished its handshake
    if made:
        assert made[0].received == b""  # but was sent nothing


def test_a_second_connection_resumes_the_first_ones_tls_session(
    run: Run[Any], contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    async def main() -> None:
        async with pair(contexts) as (client, _, accepted):
            server, _received = await accepted
            server.write(b"ticket")  # the client reads the server's session tickets with it
            async with asyncio.timeout(10):
                await _until(lambda: bool(client.get_protocol().received))  # type: ignore[attr-defined]
            session = client.get_extra_info("ssl_object").session
            assert not client.get_extra_info("ssl_object").session_reused
        async with pair(contexts, session=session) as (again, _, _accepted):
            assert again.get_extra_info("ssl_object").session_reused

    run(main())


def test_a_protocol_that_fails_costs_its_own_connection_only(
    run: Run[Any], contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    class Broken(Recorder):
        def data_received(self, data: bytes) -> None:
            raise RuntimeError("a bug in the protocol")

    async def main() -> None:
        async with pair(contexts, server=Broken) as (client, protocol, accepted):
            _server, broken = await accepted
            client.write(b"boom")
            async with asyncio.timeout(10):
                exc = await broken.lost
                assert isinstance(exc, RuntimeError)
                await protocol.lost  # the peer sees its connection end
            async with pair(contexts) as (other, _, accepted_other):
                _server_other, received = await accepted_other
                other.write(b"still serving")
                async with asyncio.timeout(10):
                    await received.arrived.wait()
                assert received.received == b"still serving"

    run(main())


def test_bytes_that_come_with_a_reset_are_delivered_and_the_transport_ends(
    run: Run[Any], contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """The peer writes and resets at once, so one readiness brings both. uvloop (libuv)
    calls the reader once for an error and then stops watching the socket: the transport
    must see the reset after the bytes, not wait for a readiness that never comes."""

    async def main() -> None:
        async with pair(contexts) as (client, protocol, accepted):
            server, _ = await accepted
            client.pause_reading()  # so that the bytes and the reset are both there
            server.write(b"last words")
            sock = server.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            server.abort()  # an RST
            await asyncio.sleep(0.2)
            client.resume_reading()
            async with asyncio.timeout(5):
                await protocol.lost
            assert protocol.received == b"last words"
            assert client.get_extra_info("socket").fileno() == -1

    run(main())
