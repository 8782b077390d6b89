"""How a client reaches its server: capped exponential backoff with jitter, one
connection within a time limit, and races of attempts for a reconnect.

A reconnect starts a fresh attempt every backoff step, even while older ones still
wait: an attempt whose SYNs were lost is stuck in TCP's own backoff (1, 3, 7 s), so
only a fresh SYN uses a restored path at once. Past ``max_attempts_in_flight`` the
oldest attempt gives way.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Callable

from ..config import ClientConfig
from .link import LinkProtocol
from .util import describe

__all__ = ["Backoff", "Dialer"]

Connection = tuple[asyncio.Transport, LinkProtocol]


class Backoff:
    """Delays that double from ``initial`` up to ``cap``, each with jitter (50-100 %)."""

    def __init__(self, initial: float, cap: float) -> None:
        self._next = initial
        self._cap = cap

    def next(self) -> float:
        delay = self._next * random.uniform(0.5, 1.0)
        self._next = min(self._next * 2, self._cap)
        return delay


class Dialer:
    """Connections from a client to its server; ``link`` makes each link's protocol."""

    def __init__(
        self,
        config: ClientConfig,
        link: Callable[[], LinkProtocol],
        on_failure: Callable[[str], None],
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self._link = link
        self._on_failure = on_failure
        self._ssl = ssl_context if ssl_context is not None else config.ssl
        self._winner: asyncio.Future[Connection | None] | None = None

    def backoff(self) -> Backoff:
        return Backoff(self.config.backoff_initial, self.config.backoff_cap)

    async def connect(self, limit: float) -> Connection:
        """One TCP (or TLS) connection to the server, within ``limit`` seconds."""
        server = self.config.server
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(
            loop.create_connection(
                self._link,
                server.host,
                server.port,
                ssl=self._ssl,
                server_hostname=self.config.server_hostname if self._ssl else None,
            ),
            limit,
        )

    async def race(self) -> Connection | None:
        """Race attempts until one connects; None when :meth:`cancel` was called."""
        loop = asyncio.get_running_loop()
        winner: asyncio.Future[Connection | None] = loop.create_future()
        self._winner = winner
        backoff = self.backoff()
        try:
            async with asyncio.TaskGroup() as attempts:
                in_flight: list[asyncio.Task[None]] = []
                while not winner.done():
                    in_flight = [task for task in in_flight if not task.done()]
                    if len(in_flight) >= self.config.max_attempts_in_flight:
                        in_flight.pop(0).cancel()
                    in_flight.append(attempts.create_task(self._attempt(winner)))
                    await asyncio.wait({winner}, timeout=backoff.next())
                for task in in_flight:
                    task.cancel()
        finally:
            self._winner = None
        return winner.result()

    def cancel(self) -> None:
        """End the race under way, if any, with no winner."""
        if self._winner is not None and not self._winner.done():
            self._winner.set_result(None)

    async def _attempt(self, winner: asyncio.Future[Connection | None]) -> None:
        try:
            transport, link = await self.connect(self.config.session.handshake_timeout)
        except (OSError, TimeoutError) as exc:
            self._on_failure(describe(exc))
            return
        if winner.done():
            transport.close()
        else:
            winner.set_result((transport, link))
