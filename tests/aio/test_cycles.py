"""A closed connection is freed when it closes, not by the cyclic garbage collector.

A TLS transport and its protocol refer to each other (asyncio's and uvloop's SSLProtocol
keep the application protocol); a link protocol that kept its transport after the
connection was lost made a cycle of about twenty objects per link, the TLS state and its
buffers among them, which only a full collection freed. A burst of failed TLS links (F5 in
tests/fuzz) left hundreds of MiB in use until then. Real tether servers and clients in
this process, over loopback, under asyncio and uvloop; the collector is off while they run
and the test then asks it what it would have had to free.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import socket
import ssl
from collections.abc import Iterator
from typing import Any, cast

import pytest

from tether.aio.client import TetherClient
from tether.aio.server import TetherServer
from tether.config import Address, ClientConfig, ServerConfig

from ..loops import LOOPS, Run, runner
from .endpoints import tethers

LINKS = 20  # of each kind


@pytest.fixture(params=LOOPS)
def run(request: pytest.FixtureRequest) -> Run[Any]:
    return runner(request.param, 120)


@pytest.fixture
def collector_off() -> Iterator[None]:
    """The cyclic collector off (what it finds is then left for the test to see)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was_enabled:
            gc.enable()


def cyclic_garbage() -> collections.Counter[str]:
    """Types of the objects the collector finds unreachable, by name, with counts."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    found = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage)
    gc.set_debug(0)
    gc.garbage.clear()
    return found


BULK = bytes(range(256)) * 4096


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def settle(check: Any) -> None:
    async with asyncio.timeout(30):  # bounded (CONTRIBUTING.md T6), never a timing claim
        while not check():
            await asyncio.sleep(0.02)


@pytest.mark.usefixtures("collector_off")
def test_links_and_sessions_that_end_leave_no_reference_cycle(run: Run[Any]) -> None:
    """TLS links the server refuses, sessions ended by their application, and sessions
    whose link was cut (resumed on a new one, then ended): once they are all over, and
    while the server and the client still run, the collector finds nothing of theirs."""

    async def main() -> collections.Counter[str]:
        loop = asyncio.get_running_loop()
        backend = await loop.create_server(Echo, "127.0.0.1", 0)
        port = backend.sockets[0].getsockname()[1]
        config = ServerConfig(listen=Address("127.0.0.1", 0), backend=Address("127.0.0.1", port))
        async with TetherServer(config) as server:
            address = server.addresses[0]
            # Links whose TLS handshake completes and then carry no tether hello.
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            for _ in range(LINKS):
                reader, writer = await asyncio.open_connection(
                    address.host, address.port, ssl=context
                )
                writer.write(b"not a tether hello" * 4)
                await reader.read()  # the server refuses and closes
                writer.close()
            await settle(lambda: server.counters.handshakes_failed >= LINKS)
            client_config = ClientConfig(listen=Address("127.0.0.1", 0), server=address)
            async with TetherClient(client_config) as client:
                app_at = client.addresses[0]
                for i in range(2 * LINKS):
                    reader, writer = await asyncio.open_connection(app_at.host, app_at.port)
                    writer.write(b"ping")
                    assert await reader.readexactly(4) == b"ping"
                    # 1 MiB each way: every connection then reads on the buffered path
                    # (aio/link.py BulkReads), which must leave no cycle either.
                    writer.write(BULK)
                    assert await reader.readexactly(len(BULK)) == BULK
                    if i % 2:  # cut its link: the client resumes on a new one
                        resumes = server.counters.resumes_total
                        for relay in server.relays():
                            if relay.link is not None:
                                relay.link.abort()
                        await settle(lambda r=resumes: server.counters.resumes_total > r)
                        writer.write(b"pong")
                        assert await reader.readexactly(4) == b"pong"
                    writer.close()
                    await writer.wait_closed()
                    await settle(lambda n=i + 1: server.counters.ended_total == n)
                await settle(lambda: client.counters.ended_total == 2 * LINKS)
                await asyncio.sleep(0.1)  # the loop's last callbacks for closed transports
                garbage = cyclic_garbage()  # with both still running
        backend.close()
        await backend.wait_closed()
        return garbage

    garbage = run(main())
    ours = {
        name: count
        for name, count in garbage.items()
        if name.startswith(("tether.", "ssl.", "_ssl.", "uvloop.", "asyncio.sslproto"))
    }
    assert not ours, sorted(ours.items())


@pytest.mark.usefixtures("collector_off")
def test_a_session_that_falls_back_leaves_no_reference_cycle(run: Run[Any]) -> None:
    """A client whose server is not there splices its application to the fallback: once
    those connections are over, the collector finds nothing of theirs either. The
    application sends 1 MiB at once, which its session reads (a read of 64 KiB or more
    moves it to the buffered path) before the fallback takes the connection over."""

    async def main() -> collections.Counter[str]:
        loop = asyncio.get_running_loop()
        fallback = await loop.create_server(Echo, "127.0.0.1", 0)
        nobody = socket.create_server(("127.0.0.1", 0))  # a port where no server listens
        gone = Address("127.0.0.1", nobody.getsockname()[1])
        nobody.close()
        client_config = ClientConfig(
            listen=Address("127.0.0.1", 0),
            server=gone,
            fallback=Address("127.0.0.1", fallback.sockets[0].getsockname()[1]),
            plaintext=True,
        )
        async with TetherClient(client_config) as client:
            app_at = client.addresses[0]
            for i in range(LINKS):
                reader, writer = await asyncio.open_connection(app_at.host, app_at.port)
                writer.write(BULK)  # before the fallback: read by the session first
                assert await reader.readexactly(len(BULK)) == BULK
                writer.close()
                await writer.wait_closed()
                await settle(lambda n=i + 1: client.counters.fallbacks_total == n)
            await asyncio.sleep(0.1)  # the loop's last callbacks for closed transports
            garbage = cyclic_garbage()  # with the client still running
        fallback.close()
        await fallback.wait_closed()
        return garbage

    garbage = run(main())
    ours = {name: n for name, n in garbage.items() if name.startswith(("tether.", "uvloop."))}
    assert not ours, sorted(ours.items())


@pytest.mark.usefixtures("collector_off")
def test_setups_refused_for_a_backend_that_is_down_leave_no_reference_cycle(
    run: Run[Any],
) -> None:
    """The server cannot reach its backend (refused): each setup is answered
    BACKEND_UNAVAILABLE, and neither the server nor the client keeps anything of it for
    the collector (asyncio's wait_for made a cycle of each refused connection)."""

    async def main() -> collections.Counter[str]:
        nobody = socket.create_server(("127.0.0.1", 0))
        down = nobody.getsockname()[1]
        nobody.close()
        async with tethers(down, tls=False) as (_, client):
            app_at = client.addresses[0]
            for i in range(LINKS):
                reader, writer = await asyncio.open_connection(app_at.host, app_at.port)
                assert await reader.read() == b""  # the session ended, never set up
                writer.close()
                await writer.wait_closed()
                await settle(lambda n=i + 1: client.counters.ended_total == n)
            await asyncio.sleep(0.1)  # the loop's last callbacks for closed transports
            return cyclic_garbage()  # with both still running

    garbage = run(main())
    ours = {name: n for name, n in garbage.items() if name.startswith(("tether.", "uvloop."))}
    assert not ours, sorted(ours.items())
