"""Admission control: what the server lets in before and after authentication, and how
much replay-buffer memory each session may hold (issue 9, "Hold up under abuse").

Three small policies, sans-I/O like the rest of the core: no sockets, no clock, no tasks.
The driver calls them at fixed points and acts on the answer; they only count.

- :class:`HandshakeAdmission` bounds *unauthenticated* links (accepted, handshake not yet
  answered with ACCEPT or RESUMED), globally and per source, with OpenSSH's MaxStartups
  ``start:rate:full`` random early drop between the two global thresholds.
- :class:`SessionAdmission` bounds established sessions, globally and per source.
- :class:`MemoryBudget` bounds the sum of all replay buffers, hands each new session its
  window, and tells the driver which senders to stop reading (backpressure, never loss).

Sources are keyed by network, not by address (:func:`source_key`): an IPv4 client by its
address, an IPv6 client by its /64, since one IPv6 host usually owns a whole /64 and could
otherwise take a fresh address for every connection. An IPv4-mapped IPv6 address
(``::ffff:192.0.2.1``, what a dual-stack listener reports for IPv4 peers) counts as the IPv4
address. Anything that is not an IP address (a Unix socket path, ``"?"``) is its own key.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from random import random as _uniform
from typing import Final

from ..errors import InvalidState

__all__ = [
    "DEFAULT_FLOOR",
    "DEFAULT_HIGH_WATER",
    "Account",
    "Admission",
    "HandshakeAdmission",
    "HandshakeStatistics",
    "MemoryBudget",
    "MemoryStatistics",
    "SessionAdmission",
    "SessionAdmissionStatistics",
    "source_key",
]

DEFAULT_FLOOR: Final = 64 * 1024  # the smallest window a session is given, reserved for it up front
# above this fraction of the budget, no session may exceed its fair share
DEFAULT_HIGH_WATER: Final = 0.9
DEFAULT_RATE: Final = 30  # percent refused at ``start`` (OpenSSH's MaxStartups 10:30:100)


class Admission(enum.Enum):
    """The answer of an admission policy: ADMIT, or why not."""

    ADMIT = "admit"
    FULL = "full"  # the global limit is reached
    PER_SOURCE = "per-source"  # this source (address or /64) holds its limit
    RANDOM_EARLY_DROP = "random-early-drop"  # between start and full, refused by chance

    @property
    def admitted(self) -> bool:
        return self is Admission.ADMIT


def source_key(address: str, *, ipv4_prefix: int = 32, ipv6_prefix: int = 64) -> str:
    """The key that per-source limits count ``address`` (a peer host, no port) under.

    IPv4 by address (``ipv4_prefix`` bits), IPv6 by its /64 (``ipv6_prefix`` bits), an
    IPv4-mapped IPv6 address as its IPv4 address; a zone (``%eth0``) is ignored, so every
    link-local peer shares ``fe80::/64``. A string that is not an IP address is its own key.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        if ipv4_prefix >= 32:
            return str(ip)
        masked = int(ip) >> (32 - ipv4_prefix) << (32 - ipv4_prefix)
        return f"{ipaddress.IPv4Address(masked)}/{ipv4_prefix}"
    if ipv6_prefix >= 128:
        return str(ipaddress.IPv6Address(int(ip)))  # without the zone
    masked = int(ip) >> (128 - ipv6_prefix) << (128 - ipv6_prefix)
    return f"{ipaddress.IPv6Address(masked)}/{ipv6_prefix}"


class _PerSource:
    """Counts per source key; a key is present only while its count is positive, so the
    dict never holds more keys than the global limit allows admissions."""

    __slots__ = ("_counts", "_ipv4_prefix", "_ipv6_prefix")

    def __init__(self, ipv4_prefix: int, ipv6_prefix: int) -> None:
        if not 0 < ipv4_prefix <= 32 or not 0 < ipv6_prefix <= 128:
            raise ValueError("prefixes must be within (0, 32] for IPv4 and (0, 128] for IPv6")
        self._counts: dict[str, int] = {}
        self._ipv4_prefix = ipv4_prefix
        self._ipv6_prefix = ipv6_prefix

    def key(self, source: str) -> str:
        return source_key(source, ipv4_prefix=self._ipv4_prefix, ipv6_prefix=self._ipv6_prefix)

    def count(self, key: str) -> int:
        return self._counts.get(key, 0)

    def add(self, key: str) -> None:
        self._counts[key] = self._counts.get(key, 0) + 1

    def remove(self, key: str, what: str) -> None:
        count = self._counts.get(key, 0)
        if count <= 0:
            raise InvalidState(f"release() of {what} from {key!r}, which holds none")
        if count == 1:
            del self._counts[key]
        else:
            self._counts[key] = count - 1

    def __len__(self) -> int:
        return len(self._counts)


@dataclass(frozen=True, slots=True)
class HandshakeStatistics:
    in_flight: int  # unauthenticated links now
    sources: int  # distinct source keys among them
    admitted_total: int
    refused_full: int
    refused_per_source: int
    refused_random: int


class HandshakeAdmission:
    """Admission of new links before authentication: OpenSSH's MaxStartups and
    PerSourceMaxStartups, HAProxy's maxconn.

    With ``n`` links in flight (admitted, not yet released), a new link from ``source`` is

    - refused ``FULL`` when ``n >= max_handshakes``;
    - refused ``PER_SOURCE`` when its source key already holds ``per_source`` links;
    - admitted when ``n < start``;
    - otherwise refused ``RANDOM_EARLY_DROP`` with probability
      ``rate + (100 - rate) * (n - start) / (max_handshakes - start)`` percent: ``rate`` % at
      ``start``, rising linearly towards 100 % at ``max_handshakes`` (OpenSSH computes the
      same line in integer percent; here it is exact).

    ``start=None`` means ``start = max_handshakes``: a hard cap, no random drop. A flood of
    slow handshakes then fills the table and refuses everyone until the handshake timeout
    frees it; the random drop keeps a chance for legitimate clients during the flood.

    ``random`` returns a float in ``[0, 1)``; a link is dropped when ``random() * 100`` falls
    below the percentage. It is called only in the random-drop band.

    Memory is bounded: one dict entry per source key with links in flight, removed when its
    count returns to zero, so never more than ``max_handshakes`` entries.
    """

    __slots__ = (
        "_admitted",
        "_in_flight",
        "_random",
        "_refused_full",
        "_refused_per_source",
        "_refused_random",
        "_sources",
        "max_handshakes",
        "per_source",
        "rate",
        "start",
    )

    def __init__(
        self,
        max_handshakes: int,
        per_source: int,
        start: int | None = None,
        rate: int = DEFAULT_RATE,
        *,
        random: Callable[[], float] = _uniform,
        ipv4_prefix: int = 32,
        ipv6_prefix: int = 64,
    ) -> None:
        if max_handshakes < 1:
            raise ValueError("max_handshakes must be at least 1")
        if per_source < 1:
            raise ValueError("per_source must be at least 1")
        if start is None:
            start = max_handshakes
        if not 0 <= start <= max_handshakes:
            raise ValueError("start must be within [0, max_handshakes]")
        if not 0 <= rate <= 100:
            raise ValueError("rate must be a percentage within [0, 100]")
        self.max_handshakes = max_handshakes
        self.per_source = per_source
        self.start = start
        self.rate = rate
        self._random = random
        self._sources = _PerSource(ipv4_prefix, ipv6_prefix)
        self._in_flight = 0
        self._admitted = 0
        self._refused_full = 0
        self._refused_per_source = 0
        self._refused_random = 0

    @property
    def in_flight(self) -> int:
        """Links admitted and not yet released."""
        return self._in_flight

    def in_flight_from(self, source: str) -> int:
        """Links in flight from ``source``'s key."""
        return self._sources.count(self._sources.key(source))

    def drop_percent(self) -> float:
        """The chance, in percent, that the global rule refuses the next link now."""
        n = self._in_flight
        if n >= self.max_handshakes:
            return 100.0
        if n < self.start:
            return 0.0
        return self.rate + (100 - self.rate) * (n - self.start) / (self.max_handshakes - self.start)

    def admit(self, source: str) -> Admission:
        """Decide on a new link from ``source`` (the peer's host, no port). On ADMIT the link
        counts until :meth:`release`; on a refusal nothing is counted."""
        if self._in_flight >= self.max_handshakes:
            self._refused_full += 1
            return Admission.FULL
        sources = self._sources
        key = sources.key(source)
        if sources.count(key) >= self.per_source:
            self._refused_per_source += 1
            return Admission.PER_SOURCE
        if self._in_flight >= self.start and self._random() * 100 < self.drop_percent():
            self._refused_random += 1
            return Admission.RANDOM_EARLY_DROP
        sources.add(key)
        self._in_flight += 1
        self._admitted += 1
        return Admission.ADMIT

    def release(self, source: str) -> None:
        """An admitted link left the handshake (answered, failed, timed out or lost): call
        exactly once per ADMIT, with the same ``source``."""
        self._sources.remove(self._sources.key(source), "a handshake")
        self._in_flight -= 1

    def statistics(self) -> HandshakeStatistics:
        return HandshakeStatistics(
            in_flight=self._in_flight,
            sources=len(self._sources),
            admitted_total=self._admitted,
            refused_full=self._refused_full,
            refused_per_source=self._refused_per_source,
            refused_random=self._refused_random,
        )


@dataclass(frozen=True, slots=True)
class SessionAdmissionStatistics:
    sessions: int
    sources: int
    admitted_total: int
    refused_full: int
    refused_per_source: int


class SessionAdmission:
    """Admission of new sessions (SETUP), globally and per source key.

    A session counts against the source that set it up until it ends, wherever its later
    resumes come from (sessions are routed by id, never by address). Resumes are not
    admitted here: they bring no new session. One dict entry per source key holding
    sessions, removed at zero.
    """

    __slots__ = (
        "_admitted",
        "_refused_full",
        "_refused_per_source",
        "_sessions",
        "_sources",
        "max_per_source",
        "max_sessions",
    )

    def __init__(
        self,
        max_sessions: int,
        max_per_source: int,
        *,
        ipv4_prefix: int = 32,
        ipv6_prefix: int = 64,
    ) -> None:
        if max_sessions < 1 or max_per_source < 1:
            raise ValueError("max_sessions and max_per_source must be at least 1")
        self.max_sessions = max_sessions
        self.max_per_source = max_per_source
        self._sources = _PerSource(ipv4_prefix, ipv6_prefix)
        self._sessions = 0
        self._admitted = 0
        self._refused_full = 0
        self._refused_per_source = 0

    @property
    def sessions(self) -> int:
        return self._sessions

    def sessions_from(self, source: str) -> int:
        return self._sources.count(self._sources.key(source))

    def admit(self, source: str) -> Admission:
        """ADMIT (counted until :meth:`release`), FULL or PER_SOURCE (nothing counted)."""
        if self._sessions >= self.max_sessions:
            self._refused_full += 1
            return Admission.FULL
        sources = self._sources
        key = sources.key(source)
        if sources.count(key) >= self.max_per_source:
            self._refused_per_source += 1
            return Admission.PER_SOURCE
        sources.add(key)
        self._sessions += 1
        self._admitted += 1
        return Admission.ADMIT

    def adopt(self, source: str) -> None:
        """Count a session that exists already (handed over by another process, a
        takeover) for ``source``, past the limits if need be: refusing it would end it."""
        self._sources.add(self._sources.key(source))
        self._sessions += 1

    def release(self, source: str) -> None:
        """The session admitted for ``source`` ended, or its setup failed after admission."""
        self._sources.remove(self._sources.key(source), "a session")
        self._sessions -= 1

    def statistics(self) -> SessionAdmissionStatistics:
        return SessionAdmissionStatistics(
            sessions=self._sessions,
            sources=len(self._sources),
            admitted_total=self._admitted,
            refused_full=self._refused_full,
            refused_per_source=self._refused_per_source,
        )


@dataclass(frozen=True, slots=True)
class MemoryStatistics:
    total: int
    committed: int  # bytes no new charge may take: sum of max(used, reserved) per session
    used: int  # bytes actually in replay buffers
    held: int  # bytes slow local sides hold for their sessions (Account.hold): not refusable
    sessions: int
    refused_total: int  # grants refused (REJECT OVERLOADED)


class MemoryBudget:
    """One budget of replay-buffer bytes for the whole server.

    Each session holds an :class:`Account`, opened by :meth:`grant`, with

    - ``window``: its replay-buffer bound (what the server advertises in ACCEPT);
    - ``reserved``: ``min(floor, window)`` bytes set aside for it at grant time;
    - ``used``: the bytes its replay buffer holds now;
    - ``held``: the bytes its slow local side holds for it (:meth:`Account.hold`).

    The budget counts ``committed = sum(max(used, reserved))`` over open accounts: reserved
    bytes are held whether used or not, bytes beyond the reservation come from the shared
    pool as they are used. **Invariant: ``sum(used) <= committed <= total`` at all times.**
    It holds by construction, not by hope: :meth:`grant` opens an account only when its
    reservation fits (``committed + reserved <= total``), and :meth:`Account.charge` refuses
    (raises :class:`~tether.errors.InvalidState`) any charge that would take an account past
    its window or ``committed`` past ``total``. The driver therefore never reads more from a
    sender than :meth:`Account.capacity` allows (read into a buffer of at most that size),
    and the bytes it read can always be charged. Established sessions are never dropped to
    make room: a full budget refuses new sessions and stops readers, nothing else.

    Held bytes are the other direction's: what the peer sent within the window it was
    given, delivered to a local side that is not taking it (a backend that does not read),
    and not yet acknowledged. They cannot be refused once they have arrived (the window
    allowed them), so they are counted apart, as ``held``, and weigh where refusing is
    possible: a new session's window and grant see ``free = total - committed - held``,
    and the high-water mark is tested on ``committed + held``. They never cut the holding
    session's own :meth:`Account.capacity` below what its reservation and fair share give
    it, for its replay buffer drains by its peer's acknowledgements whatever it holds, and
    a backend that writes its answer before it reads what is held for it must still be
    read (docs/design.md, "Flow control: acknowledge what the local side takes"). The
    invariant above is the replay buffers'; ``committed + held`` may pass ``total`` by
    what sessions hold, each at most its window and the driver's slack.

    Why this design rather than reserving whole windows up front: a reserved window sits
    idle in most sessions (an interactive session uses a few KiB of its 4 MiB), so full
    reservation would refuse sessions long before memory is in use; charging purely as used
    would give no session a guaranteed minimum, and a new session could be starved until
    others' clients acknowledge. The floor reservation gives both the hard bound and
    progress: every session can always buffer its ``reserved`` bytes (``capacity() > 0``
    whenever ``used < reserved``), and a session stopped above its reservation or its fair
    share is resumed by its own peer's acknowledgements, which only lower ``used``: no
    cross-session wake-up is needed.

    The window shrinks as the budget fills: with ``free = total - committed - held``, a session gets
    ``min(requested, max_window, total)`` while at least half the budget is free, then that scaled
    by ``2 * free / total``, never below ``floor`` (nor above what was requested). When not
    even its reservation fits, :meth:`grant` returns None: answer REJECT OVERLOADED.

    Above the high-water mark (``committed + held > high_water * total``) no session may grow past
    ``max(fair_share(), reserved)``: :meth:`over_share` says so and :meth:`Account.capacity`
    is clamped to it, so the last of the pool goes to the small sessions, not the largest.
    """

    __slots__ = (
        "_committed",
        "_held",
        "_refused",
        "_sessions",
        "_used",
        "floor",
        "high_water",
        "max_window",
        "total",
    )

    def __init__(
        self,
        total: int,
        floor: int = DEFAULT_FLOOR,
        max_window: int | None = None,
        *,
        high_water: float = DEFAULT_HIGH_WATER,
    ) -> None:
        if floor < 1:
            raise ValueError("floor must be at least 1 byte")
        if total < floor:
            raise ValueError("total must be at least floor")
        if max_window is not None and max_window < 1:
            raise ValueError("max_window must be at least 1 byte")
        if not 0.0 < high_water <= 1.0:
            raise ValueError("high_water must be a fraction within (0, 1]")
        self.total = total
        self.floor = floor
        self.max_window = max_window
        self.high_water = int(total * high_water)  # in bytes
        self._committed = 0
        self._used = 0
        self._held = 0
        self._sessions = 0
        self._refused = 0

    @property
    def committed(self) -> int:
        return self._committed

    @property
    def used(self) -> int:
        return self._used

    @property
    def held(self) -> int:
        return self._held

    @property
    def free(self) -> int:
        """Bytes neither reserved, used nor held: what new sessions can take (negative
        while held bytes overdraw the budget)."""
        return self.total - self._committed - self._held

    def _above_high_water(self) -> bool:
        return self._committed + self._held > self.high_water

    @property
    def sessions(self) -> int:
        return self._sessions

    def fair_share(self) -> int:
        """``total`` divided among the open accounts (``total`` when there are none)."""
        return self.total // self._sessions if self._sessions else self.total

    def window_for(self, requested_window: int) -> int | None:
        """The window :meth:`grant` would give now, or None if it would refuse."""
        if requested_window < 1:
            raise ValueError("requested_window must be at least 1 byte")
        cap = min(requested_window, self.total)
        if self.max_window is not None:
            cap = min(cap, self.max_window)
        free = self.free
        if free < min(self.floor, cap):
            return None
        if 2 * free >= self.total:
            return cap
        return min(cap, max(self.floor, cap * 2 * free // self.total))

    def grant(self, requested_window: int) -> Account | None:
        """Open an account for a new session, reserving ``min(floor, window)`` bytes; None
        when the budget cannot reserve even that (answer REJECT OVERLOADED)."""
        window = self.window_for(requested_window)
        if window is None:
            self._refused += 1
            return None
        reserved = min(self.floor, window)
        self._committed += reserved
        self._sessions += 1
        return Account(self, window, reserved)

    def adopt(self, window: int) -> Account:
        """Open an account for a session that exists already (a takeover) with the
        ``window`` its client was told, whatever the budget holds: its bytes were within
        the old process's budget, and refusing it would end it. Charge its bytes with
        :meth:`Account.follow` (an overdraft until acknowledgements bring it back)."""
        if window < 1:
            raise ValueError("window must be at least 1 byte")
        reserved = min(self.floor, window)
        self._committed += reserved
        self._sessions += 1
        return Account(self, window, reserved)

    def over_share(self, account: Account) -> bool:
        """True when the driver must stop reading this session's sender: the budget is above
        its high-water mark and the session holds more than its fair share (and more than
        its own reservation). Backpressure only; nothing is dropped."""
        return (
            not account.closed
            and self._above_high_water()
            and account.used > max(self.fair_share(), account.reserved)
        )

    def statistics(self) -> MemoryStatistics:
        return MemoryStatistics(
            total=self.total,
            committed=self._committed,
            used=self._used,
            held=self._held,
            sessions=self._sessions,
            refused_total=self._refused,
        )


class Account:
    """One session's share of a :class:`MemoryBudget`; open it with :meth:`MemoryBudget.grant`.

    ``charge(n)`` when ``n`` bytes join the replay buffer, ``credit(n)`` when acknowledged
    bytes leave it (or :meth:`set_used` with the buffer's length after each pump),
    :meth:`hold` with what the session's slow local side holds for it, and :meth:`close`
    when the session ends.
    """

    __slots__ = ("_budget", "_closed", "_held", "_used", "reserved", "window")

    def __init__(self, budget: MemoryBudget, window: int, reserved: int) -> None:
        self._budget = budget
        self.window = window
        self.reserved = reserved
        self._used = 0
        self._held = 0
        self._closed = False

    @property
    def used(self) -> int:
        return self._used

    @property
    def held(self) -> int:
        return self._held

    @property
    def closed(self) -> bool:
        return self._closed

    def capacity(self) -> int:
        """Bytes the replay buffer may take now: the driver reads at most this much from the
        sender and stops reading at 0. Every ``n <= capacity()`` can be charged."""
        if self._closed:
            return 0
        budget = self._budget
        used = self._used
        room = self.window - used
        # The pool is the replay buffers' (held bytes are not in ``_committed``); held
        # bytes, this session's too, count only in the high-water test (MemoryBudget).
        pool = budget.total - budget._committed + max(0, self.reserved - used)
        if budget._above_high_water():
            room = min(room, max(budget.fair_share(), self.reserved) - used)
        return max(0, min(room, pool))

    def charge(self, n: int) -> None:
        """``n`` bytes joined the replay buffer. Raises InvalidState past the window or the
        budget (a driver that read more than :meth:`capacity`); nothing is charged then."""
        if n < 0:
            raise ValueError("charge() of a negative size")
        self._set(self._used + n)

    def credit(self, n: int) -> None:
        """``n`` acknowledged bytes left the replay buffer."""
        if n < 0:
            raise ValueError("credit() of a negative size")
        if n > self._used:
            raise InvalidState(f"credit({n}) exceeds the {self._used} bytes charged")
        self._set(self._used - n)

    def set_used(self, used: int) -> None:
        """Charge or credit to bring ``used`` to the replay buffer's current length."""
        if used < 0:
            raise ValueError("set_used() of a negative size")
        self._set(used)

    def _set(self, used: int) -> None:
        if self._closed:
            raise InvalidState("the account is closed")
        budget = self._budget
        if used > self.window:
            raise InvalidState(f"{used} bytes exceed the session's window of {self.window}")
        reserved = self.reserved
        committed = budget._committed - max(self._used, reserved) + max(used, reserved)
        if committed > budget.total:
            raise InvalidState(f"charging to {used} bytes would exceed the memory budget")
        budget._committed = committed
        budget._used += used - self._used
        self._used = used

    def follow(self, used: int) -> None:
        """The replay buffer now holds ``used`` bytes: what a session reports after each
        change (never raises; a few integer operations). Unlike :meth:`set_used` it takes
        bytes beyond :meth:`capacity` too: the core accepts every ``send()`` and only
        *reports* its capacity (docs/protocol.md, "Limits": a buffer may exceed its bound
        by one write), so an overdraft is possible when a caller writes past it. It is
        bounded by that one write per session, because the caller is stopped at zero
        capacity; ``committed`` then exceeds ``total`` until acknowledgements bring it
        back, and nothing more is granted meanwhile."""
        if self._closed:
            return
        budget = self._budget
        reserved = self.reserved
        old = self._used
        budget._committed += (used if used > reserved else reserved) - (
            old if old > reserved else reserved
        )
        budget._used += used - old
        self._used = used

    def hold(self, held: int) -> None:
        """The session's local side holds ``held`` bytes the peer sent and it has not
        taken (0 once it takes them again). Never refused: they have arrived, within the
        window the peer was given; they count against new sessions and the high-water
        mark, not against this session's replay buffer (MemoryBudget, "Held bytes")."""
        if self._closed:
            return
        if held < 0:
            raise ValueError("hold() of a negative size")
        self._budget._held += held - self._held
        self._held = held

    def close(self) -> None:
        """The session ended: return its reservation and its bytes. Idempotent."""
        if self._closed:
            return
        self._closed = True
        budget = self._budget
        budget._committed -= max(self._used, self.reserved)
        budget._used -= self._used
        budget._held -= self._held
        budget._sessions -= 1
        self._used = 0
        self._held = 0
