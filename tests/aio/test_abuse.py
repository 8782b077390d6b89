"""Abuse and flow control through the asyncio drivers, on loopback.

- A backend that reads slowly while the client uploads: neither end may mistake the
  pauses for a dead link.

Every loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
from collections.abc import Coroutine
from typing import Any, cast

from .endpoints import close_all, connect_app, stream_digest
from .faultnet import tether_pair


def run(coro: Coroutine[Any, Any, None], limit: float = 120) -> None:
    async def main() -> None:
        try:
            await asyncio.wait_for(coro, limit)
        finally:
            close_all()
            await asyncio.sleep(0)

    asyncio.run(main())


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
