"""What the server and the client share as running services: the TaskGroup of their
sessions, their listening sockets, their counters and their statistics
(CONTRIBUTING.md, "Concurrency" C1: every task lives in a group as long as its resource).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Self

from ..config import Address
from ..protocol.session import SessionState, SessionStatistics
from .link import SessionRelay

__all__ = ["Counters", "Service", "ServiceStatistics"]


@dataclass(slots=True)
class Counters:
    """Running totals of one service; the one place they are counted."""

    sessions_total: int = 0  # sessions started
    resumes_total: int = 0
    ended_total: int = 0
    expired_total: int = 0
    rejected_total: int = 0  # setups and resumes refused (server) or refused to us (client)
    handshakes_failed: int = 0  # links that never reached a session
    fallbacks_total: int = 0  # client: sessions that went straight to the fallback


@dataclass(frozen=True, slots=True)
class ServiceStatistics:
    """A frozen snapshot of a server or a client."""

    role: str
    sessions: int  # open now
    attached: int
    detached: int
    sessions_total: int
    resumes_total: int
    ended_total: int
    expired_total: int
    rejected_total: int
    handshakes_failed: int
    fallbacks_total: int


class Service:
    """A server or a client: an async context manager owning the TaskGroup of its
    sessions and its listening sockets."""

    role = "service"

    def __init__(self) -> None:
        self.counters = Counters()
        self.addresses: list[Address] = []
        self._listener: asyncio.Server | None = None
        self._tasks: asyncio.TaskGroup | None = None

    # -- for the roles -----------------------------------------------------------------

    async def start(self) -> None:
        """Start listening (called on entering the context)."""

    def shutdown(self) -> None:
        """End every session (called on leaving the context, after the listener closed)."""

    def relays(self) -> Iterable[SessionRelay]:
        """The live sessions' relays."""
        return ()

    async def listen(
        self, factory: Callable[[], asyncio.BaseProtocol], address: Address, **kwargs: Any
    ) -> None:
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            factory, address.host, address.port, reuse_address=True, backlog=4096, **kwargs
        )
        self.addresses = [Address(*s.getsockname()[:2]) for s in self._listener.sockets]

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        assert self._tasks is not None, "use the service as an async context manager"
        return self._tasks.create_task(coro)

    # -- the public face ----------------------------------------------------------------

    def statistics(self) -> ServiceStatistics:
        states = [relay.core.state for relay in self.relays()]
        return ServiceStatistics(
            self.role,
            len(states),
            states.count(SessionState.ATTACHED),
            states.count(SessionState.DETACHED),
            **asdict(self.counters),
        )

    def sessions(self) -> list[SessionStatistics]:
        """A frozen snapshot of every live session."""
        return [relay.core.statistics() for relay in self.relays()]

    def stop_listening(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def close(self) -> None:
        """Stop listening and end every session."""
        self.stop_listening()
        self.shutdown()

    async def __aenter__(self) -> Self:
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        try:
            await self.start()
        except BaseException:
            await self._tasks.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()
        assert self._tasks is not None
        if exc_info[0] is not None and issubclass(exc_info[0], Exception):
            # The caller's own error: every session is closed, so the tasks end; let
            # the error propagate as itself rather than wrapped in an ExceptionGroup.
            exc_info = (None, None, None)
        await self._tasks.__aexit__(*exc_info)
