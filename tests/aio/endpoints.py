"""Backend and application endpoints for loopback tests: seeded random streams,
hashed on arrival (asyncio Protocols; no per-byte Python)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from collections.abc import AsyncIterator
from typing import cast

from tether.aio.client import TetherClient
from tether.aio.server import TetherServer
from tether.config import Address, ClientConfig, ServerConfig
from tether.protocol.session import SessionConfig

CHUNK = 256 * 1024


@contextlib.asynccontextmanager
async def tethers(
    backend_port: int,
    *,
    tls: bool,
    session: SessionConfig | None = None,
    memory_budget: int | None = None,
) -> AsyncIterator[tuple[TetherServer, TetherClient]]:
    """A tether server in front of 127.0.0.1:``backend_port`` (with ``session``'s settings,
    and ``memory_budget`` when given) and a tether client of it, on loopback, their link in
    TLS or in clear text."""
    budget = {} if memory_budget is None else {"memory_budget": memory_budget}
    server_config = ServerConfig(
        listen=Address("127.0.0.1", 0),
        backend=Address("127.0.0.1", backend_port),
        plaintext=not tls,
        session=session or SessionConfig(),
        **budget,
    )
    async with TetherServer(server_config) as server:
        client_config = ClientConfig(
            listen=Address("127.0.0.1", 0), server=server.addresses[0], plaintext=not tls
        )
        async with TetherClient(client_config) as client:
            yield server, client


def stream_digest(seed: int, size: int) -> str:
    """SHA-256 of the ``size`` bytes a :class:`Streamer` with ``seed`` sends."""
    rng = random.Random(seed)
    digest = hashlib.sha256()
    left = size
    while left:
        n = min(CHUNK, left)
        digest.update(rng.randbytes(n))
        left -= n
    return digest.hexdigest()


class Streamer(asyncio.Protocol):
    """Sends ``size`` seeded random bytes (then EOF if ``eof``) and hashes what arrives."""

    def __init__(self, seed: int, size: int, *, eof: bool = True) -> None:
        self.rng = random.Random(seed)
        self.left = size
        self.eof = eof
        self.digest = hashlib.sha256()
        self.received = 0
        self.peer_eof = asyncio.Event()
        self.closed = asyncio.Event()
        self.sent_all = asyncio.Event()
        self.exc: Exception | None = None
        self.transport: asyncio.Transport | None = None
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._fill()

    def _fill(self) -> None:
        transport = self.transport
        while transport is not None and self.left and not self._paused:
            if transport.is_closing():
                return
            n = min(CHUNK, self.left)
            self.left -= n
            transport.write(self.rng.randbytes(n))
        if not self.left and not self.sent_all.is_set():
            self.sent_all.set()
            if self.eof and transport is not None and not transport.is_closing():
                transport.write_eof()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._fill()

    def data_received(self, data: bytes) -> None:
        self.digest.update(data)
        self.received += len(data)

    def eof_received(self) -> bool:
        self.peer_eof.set()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.exc = exc
        self.peer_eof.set()
        self.closed.set()


class Backend:
    """A TCP server whose every connection is a :class:`Streamer`."""

    def __init__(self, seed: int, size: int, *, eof: bool = True) -> None:
        self.seed, self.size, self.eof = seed, size, eof
        self.connections: list[Streamer] = []
        self.server: asyncio.Server | None = None
        self.address = ("127.0.0.1", 0)
        self.connected = asyncio.Event()

    def _make(self) -> Streamer:
        streamer = Streamer(self.seed, self.size, eof=self.eof)
        self.connections.append(streamer)
        self.connected.set()
        return streamer

    async def serving(self, sent: int, limit: float = 30.0) -> Streamer:
        """The connection of the session whose application has sent ``sent`` (> 0) bytes.
        Not ``connections[0]``: a setup retried after its link was lost before the ACCEPT
        leaves an orphaned session whose backend connection may come first and never sees
        the application's bytes (docs/protocol.md, "Expiry": released after a grace)."""
        assert sent > 0
        async with asyncio.timeout(limit):
            while True:
                for connection in self.connections:
                    if connection.received >= sent:
                        return connection
                await asyncio.sleep(0.02)

    async def __aenter__(self) -> Backend:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._make, "127.0.0.1", 0)
        self.address = self.server.sockets[0].getsockname()[:2]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for c in self.connections:
            if c.transport is not None:
                c.transport.abort()
        await self.server.wait_closed()


OPEN: list[Streamer] = []  # application ends the tests opened, closed by close_all()


def close_all() -> None:
    for streamer in OPEN:
        if streamer.transport is not None:
            streamer.transport.abort()
    OPEN.clear()


async def connect_app(
    address: tuple[str, int], seed: int, size: int, *, eof: bool = True
) -> Streamer:
    loop = asyncio.get_running_loop()
    _, app = await loop.create_connection(lambda: Streamer(seed, size, eof=eof), *address)
    OPEN.append(app)
    return app
