"""What the server and the client share as running services: the TaskGroup of their
sessions, their listening sockets, their counters and their statistics
(CONTRIBUTING.md, "Concurrency" C1: every task lives in a group as long as its resource).

The roles report each session's life here (``note_new``, ``note_detached``,
``note_resumed``, ``note_ended``, ``note_rejected``): the counters, the outage and resume
histograms and a short ring of recent events, which the admin endpoint (tether.admin)
reads through :meth:`Service.statistics` and :meth:`Service.recent_events`.
"""

from __future__ import annotations

import asyncio
import bisect
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Self

from ..config import Address
from ..protocol.admission import MemoryStatistics
from ..protocol.codes import CloseCode
from ..protocol.events import SessionResumed
from ..protocol.session import SessionState, SessionStatistics
from .link import SessionRelay, protocol_of
from .listener import open_listening_socket

__all__ = [
    "Counters",
    "Histogram",
    "HistogramSnapshot",
    "Service",
    "ServiceStatistics",
    "SessionEvent",
    "TrafficStatistics",
]

# Upper bounds (seconds) of the histogram buckets, for the admin endpoint's /metrics:
# outages from link lost to resumed, resumes from the new link's TCP connection to resumed.
OUTAGE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)
RESUME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
EVENTS_KEPT = 64  # recent session events a status page shows


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    bounds: tuple[float, ...]  # the buckets' upper bounds; one more bucket (+Inf) follows
    counts: tuple[int, ...]  # observations per bucket (not cumulative), len(bounds) + 1
    total: float  # the sum of the observations


class Histogram:
    """Observations counted into fixed buckets (Prometheus' histogram, kept by us)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.bounds, tuple(self.counts), self.total)


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """One line of a service's recent history, for the status page."""

    at: float  # wall clock (time.time())
    session_id: str  # shortened, as the log names it (CONTRIBUTING.md S4)
    kind: str  # "new", "link lost", "resumed", "ended"
    detail: str


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
    bytes_sent_ended: int = 0  # application bytes sent by sessions that have ended
    bytes_received_ended: int = 0
    ends_by_code: Counter[str] = field(default_factory=Counter)  # CloseCode names
    rejects_by_reason: Counter[str] = field(default_factory=Counter)  # CloseCode names


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
    handshakes_in_flight: int
    ends_by_code: Mapping[str, int]
    rejects_by_reason: Mapping[str, int]  # setups and resumes refused, by REJECT code
    outage_seconds: HistogramSnapshot  # outages that ended in a resume, as this end saw them
    resume_seconds: HistogramSnapshot  # from a resuming link's TCP connection to resumed
    accepting: bool  # new sessions are accepted now (listening, below the limits)


@dataclass(frozen=True, slots=True)
class TrafficStatistics:
    """Bytes of a server or a client, summed over every session: a pass over all of them,
    so apart from :class:`ServiceStatistics` (about 0.5 us per session)."""

    bytes_sent: int  # application bytes this end sent to its peer, ended sessions included
    bytes_received: int
    replay_buffered: int  # held now for possible retransmission


class Service:
    """A server or a client: an async context manager owning the TaskGroup of its
    sessions and its listening sockets."""

    role = "service"
    local_name = "local"  # what a session's local connection is: "backend", "application"

    def __init__(self) -> None:
        self.counters = Counters()
        self.addresses: list[Address] = []
        self._listeners: list[asyncio.Server] = []
        self._tasks: asyncio.TaskGroup | None = None
        self._outages = Histogram(OUTAGE_BUCKETS)
        self._resume_times = Histogram(RESUME_BUCKETS)
        self._events: deque[SessionEvent] = deque(maxlen=EVENTS_KEPT)

    # -- for the roles -----------------------------------------------------------------

    async def start(self) -> None:
        """Start listening (called on entering the context)."""

    def shutdown(self) -> None:
        """End every session (called on leaving the context, after the listener closed)."""

    def relays(self) -> Iterable[SessionRelay]:
        """The live sessions' relays."""
        return ()

    def handshakes_in_flight(self) -> int:
        """Links connected whose handshake has not finished."""
        return 0

    def accepting(self) -> bool:
        """Would a new session be taken now?"""
        return bool(self._listeners)

    def memory(self) -> MemoryStatistics | None:
        """The replay buffers' memory budget, where there is one (the server)."""
        return None

    @property
    def handing_over(self) -> bool:
        """A takeover is moving the sessions to another process (only a server's)."""
        return False

    @property
    def draining(self) -> bool:
        """Refusing new sessions while the live ones finish (a server's drain)."""
        return False

    def drain(self) -> bool:
        """Start draining; False where this role does not drain (only a server does)."""
        return False

    # -- session events, reported by the roles -------------------------------------------

    def note_new(self, relay: SessionRelay) -> None:
        self._event(relay, "new", f"peer {relay.peer}, {self.local_name} {relay.local_address}")

    def note_detached(self, relay: SessionRelay, reason: str) -> None:
        if relay.detached_at is None:
            relay.detached_at = relay.loop.time()
            self._event(relay, "link lost", reason)

    def note_resumed(self, relay: SessionRelay, event: SessionResumed) -> None:
        self.counters.resumes_total += 1
        now = relay.loop.time()
        link = protocol_of(relay.link) if relay.link is not None else None
        opened_at: float | None = getattr(link, "opened_at", None)
        if opened_at is not None:
            self._resume_times.observe(now - opened_at)
        away = ""
        if relay.detached_at is not None:  # None: the old link was not yet seen to die
            self._outages.observe(now - relay.detached_at)
            away = f" after {now - relay.detached_at:.1f}s away"
            relay.detached_at = None
        self._event(relay, "resumed", f"peer {relay.peer}{away}, {event.replayed} bytes replayed")

    def note_ended(self, relay: SessionRelay, code: CloseCode, reason: str) -> None:
        stats = relay.core.statistics()
        counters = self.counters
        counters.bytes_sent_ended += stats.bytes_sent
        counters.bytes_received_ended += stats.bytes_received
        counters.ends_by_code[code.name] += 1
        self._event(relay, "ended", f"{code.name} ({reason})")

    def note_rejected(self, code: CloseCode) -> None:
        self.counters.rejected_total += 1
        self.counters.rejects_by_reason[code.name] += 1

    def _event(self, relay: SessionRelay, kind: str, detail: str) -> None:
        sid = relay.core.session_id.hex()[:12] or "-"
        self._events.append(SessionEvent(time.time(), sid, kind, detail))

    def recent_events(self) -> list[SessionEvent]:
        """The last session events, oldest first."""
        return list(self._events)

    async def listen(
        self,
        factory: Callable[[], asyncio.BaseProtocol],
        addresses: Address | Sequence[Address],
        **kwargs: Any,
    ) -> None:
        """Listen on every address (an IPv6 one takes IPv4 too, see
        :func:`~tether.aio.listener.open_listening_socket`); raises ``ListenError`` naming
        the address that failed, with none of them left open."""
        loop = asyncio.get_running_loop()
        sockets: list[socket.socket] = []
        try:
            for address in [addresses] if isinstance(addresses, Address) else addresses:
                sockets.append(open_listening_socket(address))
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        for sock in sockets:
            self._listeners.append(
                await loop.create_server(factory, sock=sock, backlog=4096, **kwargs)
            )
        self.addresses = [Address(*s.getsockname()[:2]) for s in sockets]

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        assert self._tasks is not None, "use the service as an async context manager"
        return self._tasks.create_task(coro)

    # -- the public face ----------------------------------------------------------------

    def statistics(self) -> ServiceStatistics:
        states = [relay.core.state for relay in self.relays()]
        counters = {f.name: getattr(self.counters, f.name) for f in fields(Counters)}
        del counters["bytes_sent_ended"], counters["bytes_received_ended"]  # in traffic()
        counters["ends_by_code"] = dict(self.counters.ends_by_code)  # copies: a snapshot
        counters["rejects_by_reason"] = dict(self.counters.rejects_by_reason)
        return ServiceStatistics(
            self.role,
            len(states),
            states.count(SessionState.ATTACHED),
            states.count(SessionState.DETACHED),
            **counters,
            handshakes_in_flight=self.handshakes_in_flight(),
            outage_seconds=self._outages.snapshot(),
            resume_seconds=self._resume_times.snapshot(),
            accepting=self.accepting(),
        )

    def traffic(self) -> TrafficStatistics:
        """Bytes each way and held for replay, read from the cores in one pass (no
        snapshot per session; nothing is counted per chunk, CONTRIBUTING.md D4)."""
        counters = self.counters
        sent, received, held = counters.bytes_sent_ended, counters.bytes_received_ended, 0
        for relay in self.relays():
            core = relay.core
            sent += core.bytes_sent
            received += core.bytes_received
            held += core.replay_buffered
        return TrafficStatistics(sent, received, held)

    def sessions(self) -> list[SessionStatistics]:
        """A frozen snapshot of every live session."""
        return [relay.core.statistics() for relay in self.relays()]

    def stop_listening(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()

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
