"""The session: one reliable byte stream each way (docs/protocol.md, "Session lifecycle").

One :class:`Session` is one reliable byte stream in each direction between an
application and a backend, carried over a succession of links (TCP connections).
It survives the loss of any link: bytes are kept in a :class:`ReplayBuffer` until
the peer acknowledges them and are sent again on the next link from exactly the
offset the peer reports, so nothing is lost, duplicated or reordered.

A session only ever sees established links. Each link starts with a handshake
(handshake.py) that owns it until the setup or resume is decided; the handshake then
hands the link over with :meth:`Session.establish` (the first link) or
:meth:`Session.attach` (a resume), passing the answer frame that must precede
everything the session sends on it.

The API is sans-I/O (CONTRIBUTING.md, "Layers" L2):

- inputs: ``receive_data(data, now)``, ``link_lost(now)``, ``send(data)``, ``send_eof()``,
  ``close(code)``, ``handle_timer(now)``, and the driver's word on the link's flow in
  each direction: ``pause_receiving(paused)`` and ``link_writable(writable)``, and on
  the local side's: ``local_writable(writable)``;
- outputs: ``data_to_send()``, ``next_event()``, ``next_timer()``, ``send_capacity()``
  and ``statistics()``.
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass, replace
from typing import Final

from ..errors import InvalidState, ProtocolError, StateError
from . import events
from .admission import Account
from .buffer import ReplayBuffer
from .codes import CloseCode
from .frames import (
    DRAINING_VERSION,
    KEY_SIZE,
    MAX_DATA_CHUNK,
    MAX_WINDOW,
    MIN_PROTOCOL_VERSION,
    MIN_WINDOW,
    NO_DEADLINE,
    PROTOCOL_VERSION,
    SESSION_ID_SIZE,
    Ack,
    Close,
    Data,
    Draining,
    Eof,
    Ping,
    Pong,
    ack_and_data_header,
    ack_frame,
    data_header,
    ping_frame,
    pong_frame,
)
from .ratelimit import TokenBucket
from .reader import FrameReader

__all__ = [
    "Role",
    "Session",
    "SessionConfig",
    "SessionState",
    "SessionStatistics",
]

# docs/protocol.md, "Limits" and "Keepalive"
DEFAULT_WINDOW: Final = 4 * 1024 * 1024  # replay buffer bound per direction, bytes
DEFAULT_KEEPALIVE: Final = 3.0  # seconds of silence before a PING
DEFAULT_TIMEOUT: Final = 180.0  # session-reliability timeout (Citrix's documented default)
DEFAULT_HANDSHAKE_TIMEOUT: Final = 10.0  # one link handshake, seconds
KEEPALIVE_MISSES: Final = 2  # silent keepalive intervals after which a link is dead
PING_CREDIT: Final = 2  # intervals a received PING counts as heard: one side pings, not both
SERVER_TICK_LAG: Final = 1.5  # the server's first keepalive tick, in intervals after establishment
ACK_FRACTION: Final = 4  # acknowledge once a quarter of the peer's window is unacknowledged
MAX_ACK_THRESHOLD: Final = 1024 * 1024
# docs/protocol.md, "Limits": control frames that carry no progress (PING, PONG, an ACK
# of nothing new) a peer may send on one link. A tether peer sends at most one PING per
# keepalive tick of its own (>= 0.05 s) and one PONG per PING of ours: under 40 a second.
CONTROL_RATE: Final = 64.0  # frames per second
CONTROL_BURST: Final = 128.0  # frames at once
CONTROL_FLOOD: Final = "peer sends control frames without reading"  # LinkLost reason
JOIN_BELOW: Final = 4096  # DATA pieces of one read averaging fewer bytes are delivered joined
# docs/protocol.md, "Limits": a server session whose client was never heard from after
# the ACCEPT (its setup link died first) waits this long for a resume, not the timeout.
ORPHAN_GRACE: Final = 10.0  # seconds
ORPHANED: Final = "orphaned setup: the client was never heard from after ACCEPT"  # its end reason
# docs/design.md, "Takeover": a server session's state, handed to another process.
# magic | format u8 | protocol version u8 | session id | secret | _STATE_BODY | the
# unacknowledged outbound bytes. Checked like peer input (it crossed a process boundary).
STATE_MAGIC: Final = b"TTS\x00"
STATE_FORMAT: Final = 1
_STATE_HEAD: Final = struct.Struct(f"!4sBB{SESSION_ID_SIZE}s{KEY_SIZE}s")
# window, peer_window u32 | peer_timeout f64 | buffer start, peer_acked, sent_high,
# received u64 | flags u8 | expires_in, detached_for, drain_in f64 | links, resumes u32 |
# replayed u64 | unacknowledged bytes u32
_STATE_BODY: Final = struct.Struct("!IIdQQQQBdddIIQI")
_EOF_SENT, _EOF_RECEIVED, _CONFIRMED, _DRAINING, _DRAIN_DEADLINE = (1, 2, 4, 8, 16)
MAX_OFFSET: Final = 1 << 62  # no stream gets near it; an offset past it is a forged state
# docs/protocol.md, "Limits": a replay buffer may exceed its bound by one write (a read of
# the local side, at most 1 MiB in aio/link.py).
STATE_SLACK: Final = 1024 * 1024
MAX_STATE_TIME: Final = 7 * 86400.0  # seconds: SessionConfig's longest timeout


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Parameters of one end of a session (docs/protocol.md, "Limits")."""

    window: int = DEFAULT_WINDOW
    keepalive: float = DEFAULT_KEEPALIVE
    timeout: float = DEFAULT_TIMEOUT
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT

    def __post_init__(self) -> None:
        if not MIN_WINDOW <= self.window <= MAX_WINDOW:
            raise ValueError(f"window must be within [{MIN_WINDOW}, {MAX_WINDOW}] bytes")
        if not 0.05 <= self.keepalive <= 3600:
            raise ValueError("keepalive must be within [0.05, 3600] seconds")
        if not 0 < self.timeout <= 7 * 86400:
            raise ValueError("timeout must be positive and at most a week")
        if not 0 < self.handshake_timeout <= 600:
            raise ValueError("handshake_timeout must be within (0, 600] seconds")

    @property
    def keepalive_ms(self) -> int:
        return round(self.keepalive * 1000)

    @property
    def timeout_ms(self) -> int:
        return round(self.timeout * 1000)


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class SessionState(enum.Enum):
    NEW = "new"  # client only: the application may write; no id and no link yet
    ATTACHED = "attached"  # a link carries the session
    DETACHED = "detached"  # no link; waiting for a resume until the timeout
    CLOSED = "closed"


class _Input(enum.Enum):
    ESTABLISH = "establish"  # the setup completed: the session's id and first link
    ATTACH = "attach"  # an authenticated resume moved the session onto a new link
    DETACH = "detach"  # the link died
    END = "end"


# docs/protocol.md, "Session lifecycle": the one transition table. A pair not in it
# is a bug in the caller or the core, never something a peer can cause.
TRANSITIONS: Final[dict[tuple[SessionState, _Input], SessionState]] = {
    (SessionState.NEW, _Input.ESTABLISH): SessionState.ATTACHED,
    (SessionState.NEW, _Input.END): SessionState.CLOSED,
    # A server may hear a resume before it noticed that the old link died.
    (SessionState.ATTACHED, _Input.ATTACH): SessionState.ATTACHED,
    (SessionState.ATTACHED, _Input.DETACH): SessionState.DETACHED,
    (SessionState.ATTACHED, _Input.END): SessionState.CLOSED,
    (SessionState.DETACHED, _Input.ATTACH): SessionState.ATTACHED,
    (SessionState.DETACHED, _Input.END): SessionState.CLOSED,
}


@dataclass(frozen=True, slots=True)
class SessionStatistics:
    """A frozen snapshot of one session, for status pages and metrics."""

    role: str
    state: str
    session_id: str
    bytes_sent: int  # application bytes accepted by send()
    bytes_received: int  # application bytes delivered as DataReceived
    bytes_acked: int  # of bytes_sent, acknowledged by the peer
    replay_buffered: int  # bytes held for possible retransmission
    bytes_replayed: int  # bytes sent again after resumes
    links: int  # links established over the session's life
    resumes: int
    eof_sent: bool
    eof_received: bool
    detached_since: float | None
    expires_at: float | None  # when a detached session (or a client's setup) gives up


class Session:
    """One end of a tether session. A client creates it with :meth:`client` before the
    setup; a server's comes from ``ServerHandshake.accept_setup``."""

    __slots__ = (
        "_account",
        "_ack_held",
        "_acked",
        "_buffer",
        "_close_later",
        "_confirmed",
        "_control",
        "_detached_since",
        "_drain_at",
        "_drain_told",
        "_draining",
        "_dup_next",
        "_end_code",
        "_ended_on_link",
        "_eof",
        "_event_head",
        "_events",
        "_expire_at",
        "_flow_window",
        "_heard",
        "_links",
        "_misses",
        "_now",
        "_out",
        "_paused_in_interval",
        "_peer_acked",
        "_peer_eof",
        "_peer_timeout",
        "_peer_window",
        "_ping_credit",
        "_ping_token",
        "_pong_token",
        "_reader",
        "_receive_paused",
        "_received",
        "_replayed",
        "_resumes",
        "_secret",
        "_send_next",
        "_sent_high",
        "_tick_at",
        "_told",
        "_writable",
        "config",
        "role",
        "session_id",
        "state",
        "version",
    )

    def __init__(self, role: Role, config: SessionConfig, now: float) -> None:
        self.role = role
        self.config = config
        self.state = SessionState.NEW
        self.session_id = b""
        self.version = 0  # the protocol version the setup agreed (0 before it)
        self._secret = b""
        # A handful of events at a time: a list read from a moving head (a deque is 10x
        # larger when idle, and pop(0) is quadratic under many small frames).
        self._events: list[events.Event] = []
        self._event_head = 0
        self._out: list[bytes | bytearray | memoryview] = []
        self._reader = FrameReader()
        # Outbound stream. The EOF, once queued, occupies offset ``buffer.end``; offsets
        # below count it, so "the EOF is on this link" is ``_send_next > buffer.end``.
        self._buffer = ReplayBuffer()
        self._eof = False  # send_eof() called
        self._send_next = 0  # next offset to put on the current link
        self._sent_high = 0  # highest offset ever put on any link
        self._peer_acked = 0  # highest offset the peer acknowledged (the EOF counts)
        self._peer_timeout = config.timeout  # the client adopts the server's if shorter
        self._peer_window = DEFAULT_WINDOW
        # What either end holds unacknowledged at most: the smaller window
        # (docs/protocol.md, "Flow control"); set with _peer_window (_adopt_peer_window).
        self._flow_window = min(config.window, DEFAULT_WINDOW)
        # Inbound stream.
        self._received = 0  # stream offset received, EOF included
        self._acked = 0  # what we last acknowledged
        # A resume told the peer ``_told``; while below ``_received`` (the local side was
        # slow, resume_offset()) the peer sends again from there: DATA at ``_dup_next``
        # below ``_received`` is what we have already, dropped. None: no such overlap.
        self._told = 0
        self._dup_next: int | None = None
        # The local side is not taking what is delivered, and the peer's EOF (which is
        # acknowledged at once, and after which nothing comes) has not arrived: no ACK.
        self._ack_held = False
        self._peer_eof = False
        # The current link: its flow and what the peer may make us do on it.
        self._now = now  # the latest time the driver gave
        self._writable = True  # the link's write buffer is below its high-water mark
        self._pong_token: int | None = None  # the one PING owed an answer
        self._control = TokenBucket(CONTROL_RATE, CONTROL_BURST)
        # Link liveness and deadlines.
        self._heard = False
        self._ping_credit = 0  # ticks that count as heard after the peer's PING
        self._receive_paused = False  # the driver stopped reading the link on purpose
        self._paused_in_interval = False  # ... at any time since the last tick
        self._misses = 0
        self._ping_token = 0
        self._tick_at: float | None = None
        # A client session that never reaches a server gives up after one timeout too.
        self._expire_at: float | None = now + config.timeout if role is Role.CLIENT else None
        self._detached_since: float | None = None
        # Statistics.
        self._replayed = 0
        self._links = 0
        self._resumes = 0
        self._end_code: CloseCode | None = None
        # A client's abort while detached, sent as CLOSE on the next link (close(deliver=True)).
        self._close_later: tuple[CloseCode, str] | None = None
        self._ended_on_link = False  # this end ended the session while attached (_end)
        # Replay-buffer memory (server): the budget's account the buffer is charged to.
        self._account: Account | None = None
        # The peer has shown it knows the session (server: it spoke after the ACCEPT, or
        # resumed); until then a lost link is an orphaned setup (ORPHAN_GRACE).
        self._confirmed = role is Role.CLIENT
        # Drain (docs/protocol.md, "Drain"). Server: it drains, and ends what is left at
        # ``_drain_at`` (None: no limit); each link of a version-4 session is told so.
        # Client: its server said so, last on link number ``_drain_told``.
        self._draining = False
        self._drain_at: float | None = None
        self._drain_told = 0

    @classmethod
    def client(cls, config: SessionConfig, now: float) -> Session:
        """A client session in NEW: it takes the application's bytes at once; a
        ClientHandshake on a new link sets it up."""
        return cls(Role.CLIENT, config, now)

    # -- properties --------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.state is SessionState.CLOSED

    @property
    def close_code(self) -> CloseCode | None:
        return self._end_code

    @property
    def ended_on_link(self) -> bool:
        """This end ended the session while attached: what it wrote last, a CLOSE (an
        abort, or any end before both directions finished) or the acknowledgement of the
        peer's EOF (both finished: now, or earlier if this end finished second), may be
        unread by the peer yet, which a driver that closes the link at once could lose
        (link.py, ``_close_link``). Not after an end the peer sent, nor one while
        detached."""
        return self._ended_on_link

    @property
    def close_pending(self) -> bool:
        """A client's abort waits for the next link to tell the server (:meth:`close`)."""
        return self._close_later is not None and self.state is not SessionState.CLOSED

    @property
    def secret(self) -> bytes:
        return self._secret

    @property
    def received(self) -> int:
        """Stream offset received so far, the peer's EOF included (a resume starts from
        :meth:`resume_offset`, which may be less)."""
        return self._received

    def resume_offset(self) -> int:
        """The offset to tell the peer in a RESUME or RESUMED (the handshake asks once per
        link): everything received, or, while the local side is not taking bytes
        (``local_writable(False)``), only what was acknowledged. The peer then sends the
        rest again, which is dropped here: a resume must not free the peer's window for
        bytes the local side has not taken, any more than an ACK may (docs/protocol.md,
        "Flow control")."""
        if not self._ack_held:
            told = self._received
        else:
            # Never less than an earlier attempt told: the peer may have taken it (and
            # dropped its bytes below it) though its answer was lost.
            told = self._acked if self._acked > self._told else self._told
        self._told = told
        return told

    @property
    def eof_sent(self) -> bool:
        """send_eof() was called: the application finished writing."""
        return self._eof

    @property
    def eof_received(self) -> bool:
        return self._peer_eof

    @property
    def replay_buffered(self) -> int:
        return len(self._buffer)

    @property
    def bytes_sent(self) -> int:
        """Application bytes accepted by send() (statistics() without the snapshot)."""
        return self._buffer.end

    @property
    def bytes_received(self) -> int:
        """Application bytes delivered, the peer's EOF not counted."""
        return self._received - (1 if self._peer_eof else 0)

    @property
    def detached_since(self) -> float | None:
        return self._detached_since

    @property
    def draining(self) -> bool:
        """Server: :meth:`drain` was called. Client: the server said it drains."""
        return self._draining

    @property
    def expires_at(self) -> float | None:
        """When (the driver's clock) the session ends EXPIRED unless a link carries it
        again; None while one does."""
        return self._expire_at

    def send_capacity(self) -> int:
        """Bytes the replay buffer can still take; the driver stops reading at <= 0.
        With a memory account (:meth:`charge_to`), also no more than the server's budget
        gives it now: above the budget's high-water mark a session past its fair share
        gets 0 (backpressure on its sender until its own peer acknowledges)."""
        buffer = self._buffer
        room = self._flow_window - (buffer.end - buffer.start)
        account = self._account
        if account is None:
            return room
        capacity = account.capacity()
        return capacity if capacity < room else room

    @property
    def charged(self) -> bool:
        """True once the replay buffer is charged to a memory budget (:meth:`charge_to`),
        whose room moves with other sessions' use: a driver then reads no more than
        :meth:`send_capacity` at each read, never a read it cannot size."""
        return self._account is not None

    def charge_to(self, account: Account) -> None:
        """Charge this session's replay buffer to ``account`` (a server's
        :class:`~tether.protocol.admission.MemoryBudget`) from now on; the account is
        closed when the session ends."""
        self._account = account
        account.follow(len(self._buffer))
        if self.state is SessionState.CLOSED:
            account.close()

    def await_confirmation(self) -> None:
        """Server: the session was just set up; until its client is heard on a link (any
        bytes after the ACCEPT) or resumes, a lost link makes it an orphan, released
        after ORPHAN_GRACE rather than the full timeout (docs/protocol.md, "Limits")."""
        if self.role is Role.SERVER:
            self._confirmed = False

    def can_resume_from(self, offset: int) -> bool:
        """Can the peer truthfully have received up to ``offset``? Only what was ever put
        on a link counts: bytes queued while detached were never sent."""
        return self._buffer.start <= offset <= self._sent_high

    def statistics(self) -> SessionStatistics:
        return SessionStatistics(
            role=self.role.value,
            state=self.state.value,
            session_id=self.session_id.hex(),
            bytes_sent=self.bytes_sent,
            bytes_received=self.bytes_received,
            bytes_acked=self._buffer.start,
            replay_buffered=len(self._buffer),
            bytes_replayed=self._replayed,
            links=self._links,
            resumes=self._resumes,
            eof_sent=self._eof,
            eof_received=self._peer_eof,
            detached_since=self._detached_since,
            expires_at=self._expire_at,
        )

    # -- takeover (docs/design.md, "Takeover") ----------------------------------------

    def export_state(self, now: float) -> bytes:
        """This server session as bytes another process can :meth:`restore`: identity,
        secret, offsets both ways, EOFs, the unacknowledged bytes, and its deadlines as
        durations from ``now``. An attached session is exported as if its link were lost
        at ``now`` (the driver closes every link before a takeover). The state holds the
        session secret: it goes only to a process of the same user (docs/security.md)."""
        if self.role is not Role.SERVER:
            raise InvalidState("export_state() of a client session")
        if self.state not in (SessionState.ATTACHED, SessionState.DETACHED):
            raise InvalidState(f"export_state() of a {self.state.value} session")
        if self._expire_at is None or self.state is SessionState.ATTACHED:
            wait = min(self.config.timeout, self._peer_timeout)
            expires_in = min(wait, ORPHAN_GRACE) if not self._confirmed else wait
            detached_for = 0.0
        else:
            expires_in = max(0.0, self._expire_at - now)
            since = self._detached_since
            detached_for = max(0.0, now - since) if since is not None else 0.0
        flags = (
            (_EOF_SENT if self._eof else 0)
            | (_EOF_RECEIVED if self._peer_eof else 0)
            | (_CONFIRMED if self._confirmed else 0)
            | (_DRAINING if self._draining else 0)
            | (_DRAIN_DEADLINE if self._drain_at is not None else 0)
        )
        drain_in = max(0.0, self._drain_at - now) if self._drain_at is not None else 0.0
        pending = self.pending()  # views: joined once, with the header, below
        head = _STATE_HEAD.pack(
            STATE_MAGIC, STATE_FORMAT, self.version, self.session_id, self._secret
        )
        body = _STATE_BODY.pack(
            self.config.window,
            self._peer_window,
            self._peer_timeout,
            self._buffer.start,
            self._peer_acked,
            self._sent_high,
            self._received,
            flags,
            expires_in,
            detached_for,
            drain_in,
            self._links,
            self._resumes,
            self._replayed,
            sum(map(len, pending)),
        )
        return b"".join([head, body, *pending])  # the one copy of the unacknowledged bytes

    @classmethod
    def restore(cls, state: bytes, config: SessionConfig, now: float) -> Session:
        """A DETACHED server session from :meth:`export_state` (another process's), with
        ``config`` but the window its client was told, waiting for a resume until the time
        it had left. Raises :class:`~tether.errors.StateError` for anything malformed."""
        fixed = _STATE_HEAD.size + _STATE_BODY.size
        if len(state) < fixed:
            raise StateError(f"session state of {len(state)} bytes, at least {fixed} expected")
        magic, form, version, session_id, secret = _STATE_HEAD.unpack_from(state)
        if magic != STATE_MAGIC or form != STATE_FORMAT:
            raise StateError("not a session state of this format")
        if not MIN_PROTOCOL_VERSION <= version <= PROTOCOL_VERSION:
            raise StateError(f"session state of protocol version {version}")
        (
            window,
            peer_window,
            peer_timeout,
            start,
            peer_acked,
            sent_high,
            received,
            flags,
            expires_in,
            detached_for,
            drain_in,
            links,
            resumes,
            replayed,
            size,
        ) = _STATE_BODY.unpack_from(state, _STATE_HEAD.size)
        if len(state) != fixed + size:
            raise StateError(f"session state of {len(state)} bytes, {fixed + size} expected")
        for name, value in (("window", window), ("peer window", peer_window)):
            if not MIN_WINDOW <= value <= MAX_WINDOW:
                raise StateError(f"session state: {name} {value} out of range")
        if size > window + STATE_SLACK:
            raise StateError(f"session state: {size} bytes held, window {window}")
        for name, seconds in (
            ("peer timeout", peer_timeout),
            ("expiry", expires_in),
            ("detached time", detached_for),
            ("drain deadline", drain_in),
        ):
            if not (math.isfinite(seconds) and 0 <= seconds <= MAX_STATE_TIME):
                raise StateError(f"session state: {name} {seconds!r} out of range")
        if peer_timeout <= 0 or flags >= 2 * _DRAIN_DEADLINE:
            raise StateError("session state: bad timeout or flags")
        eof, peer_eof = bool(flags & _EOF_SENT), bool(flags & _EOF_RECEIVED)
        end = start + size
        top = end + 1 if eof else end  # the EOF takes one offset
        if not (
            max(start, peer_acked, sent_high, received) < MAX_OFFSET
            and start == min(peer_acked, end)
            and peer_acked <= sent_high <= top
            and (received >= 1 or not peer_eof)
        ):
            raise StateError("session state: inconsistent offsets")
        session = cls(Role.SERVER, replace(config, window=window), now)
        session.state = SessionState.DETACHED
        session.session_id, session.version, session._secret = session_id, version, secret
        session._buffer = ReplayBuffer.restored(start, state[fixed:])
        session._eof, session._peer_eof = eof, peer_eof
        session._peer_acked, session._sent_high = peer_acked, sent_high
        session._send_next = sent_high
        session._received = session._acked = received
        session._adopt_peer_window(peer_window)
        session._peer_timeout = peer_timeout
        session._confirmed = bool(flags & _CONFIRMED)
        session._draining = bool(flags & _DRAINING)
        session._drain_at = now + drain_in if flags & _DRAIN_DEADLINE else None
        session._expire_at = now + expires_in
        session._detached_since = now - detached_for
        session._links, session._resumes, session._replayed = links, resumes, replayed
        return session

    # -- outputs -------------------------------------------------------------------

    def data_to_send(self) -> list[bytes | bytearray | memoryview]:
        """Bytes for the current link, as a list of buffers to write in order, with one
        gathering write (``transport.writelines``); payloads are views, not copies."""
        out = self._out
        if self._writable and self.state is SessionState.ATTACHED:
            if self._pong_token is not None:
                # The answer to the newest PING: at most one is ever pending.
                out.append(pong_frame(self._pong_token))
                self._pong_token = None
            if out and self._received > self._acked and not self._ack_held:
                out.append(ack_frame(self._received))  # piggyback
                self._acked = self._received
        self._out = []
        return out

    def next_event(self) -> events.Event | None:
        queue = self._events
        head = self._event_head
        if head == len(queue):
            return None
        event = queue[head]
        head += 1
        if head == len(queue):
            queue.clear()
            head = 0
        self._event_head = head
        return event

    def next_events(self) -> list[events.Event]:
        """Every event not yet taken, oldest first, in one call: what ``next_event()``
        gives one at a time (a driver's pump takes a read's events in one go)."""
        queue = self._events
        if not queue:  # next_event() empties the list once its head reaches the end
            return []
        head = self._event_head
        if head:
            taken = queue[head:]
            queue.clear()
            self._event_head = 0
            return taken
        self._events = []
        return queue

    def next_timer(self) -> float | None:
        tick, expire = self._tick_at, self._expire_at
        if tick is None:
            return expire
        return tick if expire is None or tick < expire else expire

    def pending(self) -> list[memoryview]:
        """Every byte the peer has not acknowledged, oldest first (views, no copy).

        A client that falls back to a direct connection forwards these: bytes the
        application wrote while the session was being set up.
        """
        return [piece for _, piece in self._buffer.views(self._buffer.start, MAX_DATA_CHUNK)]

    def pause_receiving(self, paused: bool) -> None:
        """The driver stopped (or resumed) reading the link because the local side is
        slow. Silence over a keepalive interval in which receiving was paused at any
        time does not count against the link: the peer's bytes wait in the kernel,
        unread, and the link is not dead."""
        self._receive_paused = paused
        if paused:
            self._paused_in_interval = True

    def local_writable(self, writable: bool) -> None:
        """The driver's word on the local side's write buffer (the application's, the
        backend's): False once it is above its high-water mark, True when it has drained.

        While it is False the session acknowledges nothing new but the peer's EOF, so the
        peer sends at most a window past the last acknowledgement, and a driver that waits
        for the peer's acknowledgements of our own bytes can read the link for them while
        the slow local side holds at most that much. Acknowledging
        resumes, for everything received, when it is True again (docs/protocol.md, "Flow
        control"), and what :meth:`local_held` charged ends."""
        if writable and self._account is not None:
            self._account.hold(0)
        held = not writable and not self._peer_eof
        if held == self._ack_held:
            return
        self._ack_held = held
        if not held and self._writable and self.state is SessionState.ATTACHED:
            self._send_ack()

    def local_held(self, held: int) -> None:
        """The driver's word, while the local side is not writable, on the bytes it holds
        that the peer sent and it has not taken: a server's memory account counts them
        (:meth:`~tether.protocol.admission.Account.hold`) until :meth:`local_writable` is
        True again. Without an account, nothing."""
        if self._account is not None:
            self._account.hold(held)

    def link_writable(self, writable: bool) -> None:
        """The driver's word on the current link's write buffer: False once it is above
        its high-water mark (``pause_writing``), True when it has drained again
        (``resume_writing``). A new link starts writable.

        While the link is not writable the session produces nothing for it but its own
        keepalive PING and a CLOSE: new stream bytes wait in the replay buffer (and the
        local side is paused by :meth:`send_capacity`), acknowledgements wait, and of
        the peer's PINGs only the newest is owed an answer. All of it goes out when the
        link is writable again.
        """
        if writable == self._writable:
            return
        self._writable = writable
        if writable and self.state is SessionState.ATTACHED:
            self._flush()
            if not self._ack_held:
                self._send_ack()

    # -- application inputs ------------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Queue application bytes. Always accepted; respect :meth:`send_capacity`.
        ``data`` is kept as it is, not copied, until the peer acknowledges it: a
        ``bytearray`` or a view handed here must not be changed afterwards."""
        if self.state is SessionState.CLOSED:
            raise InvalidState("send() on a closed session")
        if self._eof:
            raise InvalidState("send() after send_eof()")
        if not data:
            return
        buffer = self._buffer
        start = buffer.end
        buffer.append(data)
        end = buffer.end
        if self._account is not None:
            self._account.follow(end - buffer.start)
        if self._send_next == start and self._writable and self.state is SessionState.ATTACHED:
            if end - start <= MAX_DATA_CHUNK:  # one frame: _frame's first case, inlined
                out = self._out
                received = self._received
                if received > self._acked and not self._ack_held:
                    # data_to_send()'s piggybacked ACK, here, so that it is packed with the
                    # DATA header in one call and goes out before it (rule 2 of "When ACKs
                    # are sent", docs/protocol.md).
                    out.append(ack_and_data_header(received, start, end - start))
                    self._acked = received
                else:
                    out.append(data_header(start, end - start))
                out.append(data)
            else:
                self._frame(start, memoryview(data))
            self._send_next = self._sent_high = end

    def send_eof(self) -> None:
        """Half-close: the peer's application sees EOF after every byte sent so far."""
        if self.state is SessionState.CLOSED:
            raise InvalidState("send_eof() on a closed session")
        if self._eof:
            return
        self._eof = True
        if self._writable and self.state is SessionState.ATTACHED:
            self._flush()

    def close(
        self, code: CloseCode = CloseCode.NORMAL, reason: str = "", *, deliver: bool = False
    ) -> None:
        """End the session now in both directions (an abort, unless already finished).

        ``deliver``: a client whose local side is gone while the session is DETACHED
        does not end it yet, for no link would carry the CLOSE and the server would keep
        its backend connection until the session expires. The session goes on resuming
        as before (until its timeout) and ends with ``code`` on the next link that
        carries it, as soon as the resume is done, with CLOSE and nothing else: what was
        in flight is dropped, as by any abort (docs/protocol.md, "Abort"). No more bytes
        are to be sent meanwhile.
        A server ends at once: the client learns the end code when it resumes (REJECT,
        from the ended sessions the router remembers). Attached, or in NEW, it ends at
        once too. A later close without ``deliver`` (a shutdown) ends it at once."""
        if self.state is SessionState.CLOSED:
            return
        if deliver and self.state is SessionState.DETACHED and self.role is Role.CLIENT:
            if self._close_later is None:
                self._close_later = (code, reason)
            return
        self._end(code, reason, by_peer=False)

    # -- link inputs (from the driver) -----------------------------------------------

    def receive_data(
        self, data: bytes | bytearray | memoryview, now: float | None = None, max_frames: int = 0
    ) -> int:
        """Bytes from the current link, read at ``now`` (without it: the latest time the
        core was given). Never raises on peer input.

        The work is linear in the frames and bounded by the bytes fed in: consecutive
        DATA pieces become one ``DataReceived`` each, or a single one joining them when
        they are small (so a read of tiny frames costs one event, not one per frame).
        With ``max_frames``, at most that many frames are handled; the number returned is
        how many bytes at the end of ``data`` were left for the caller to feed again,
        before anything newer (docs/design.md, "Dense reads"). Without it: 0.
        """
        if self.state is not SessionState.ATTACHED or not data:
            return 0
        if now is not None:
            self._now = now
        self._heard = self._confirmed = True
        run: list[bytes | memoryview] = []  # DATA pieces of this read not yet delivered
        reader = self._reader
        try:
            for frame in reader.feed(data, max_frames):
                if type(frame) is Data:
                    payload = frame.payload
                    if frame.offset != self._received or self._peer_eof:
                        payload = self._sent_again(frame.offset, payload)
                        if not payload:
                            continue
                    elif self._dup_next is not None:
                        self._dup_next = None  # the peer skipped the bytes sent again
                    self._received += len(payload)
                    run.append(payload)
                    continue
                if type(frame) is Ack:
                    # The control frame of the per-message path. It reports no event, so the
                    # run of DATA goes on past it; it can end the session only after the
                    # peer's EOF, which delivered the run (and no DATA may follow an EOF).
                    self._handle_ack(frame.offset)
                else:
                    if run:  # this frame's events come after the DATA before it
                        self._deliver(run)
                        run = []
                    self._handle_frame(frame)
                if self.state is not SessionState.ATTACHED:
                    return 0
            if run:
                if len(run) == 1:  # _deliver's first case, inlined: one small message
                    self._events.append(events.DataReceived(run[0]))
                else:
                    self._deliver(run)
            unacked = self._received - self._acked
            if unacked and self._writable and not self._ack_held:
                # ACK once unacked >= max(1, min(a quarter of what the peer may send, the
                # cap)) (docs/design.md, "ACK thresholds"); unacked >= 1 already, so max(1,
                # ...). The peer keeps to the smaller window, as we do (send_capacity()).
                quarter = self._flow_window // ACK_FRACTION
                if unacked >= (quarter if quarter < MAX_ACK_THRESHOLD else MAX_ACK_THRESHOLD):
                    self._send_ack()
            return reader.unread
        except _ControlFlood:
            if run:
                self._deliver(run)
            self._drop_link(CONTROL_FLOOD, self._now)
        except ProtocolError as exc:
            if run:
                self._deliver(run)
            # An authenticated peer that breaks the stream cannot be trusted with it.
            self._end(exc.code, str(exc), by_peer=False)
        return 0

    def link_lost(self, now: float) -> None:
        """The current link's transport failed or closed (the driver saw it)."""
        if self.state is SessionState.ATTACHED:
            self._detach(now)

    def handle_timer(self, now: float) -> None:
        if self.state is SessionState.CLOSED:
            return
        self._now = now
        if self._expire_at is not None and now >= self._expire_at:
            if self.state is SessionState.NEW:
                self._end(CloseCode.RESUME_FAILED, "no tether server reached in time", False)
            elif not self._confirmed:
                self._end(CloseCode.EXPIRED, ORPHANED, False)
            else:
                self._end(CloseCode.EXPIRED, "session-reliability timeout passed", False)
            return
        if self._tick_at is not None and now >= self._tick_at:
            self._tick(now)

    # -- handshake inputs (from ClientHandshake / ServerHandshake) ----------------------

    def establish(
        self,
        now: float,
        *,
        session_id: bytes,
        secret: bytes,
        peer_window: int,
        peer_timeout: float | None = None,
        preamble: list[bytes] | None = None,
        version: int = MIN_PROTOCOL_VERSION,
    ) -> None:
        """The setup completed: the session has its identity and its first link.
        ``preamble``: the handshake's last bytes, which go out before the session's;
        ``version``: the protocol version the setup agreed (its resumes use it too)."""
        self._transition(_Input.ESTABLISH)
        self.session_id = session_id
        self.version = version
        self._secret = secret
        self._adopt_peer_window(peer_window)
        if peer_timeout is not None:
            self._peer_timeout = peer_timeout
        self._start_link(now, 0, preamble)
        self._events.append(events.SessionEstablished(session_id))

    def attach(
        self,
        now: float,
        *,
        peer_received: int,
        peer_window: int | None = None,
        preamble: list[bytes] | None = None,
    ) -> int:
        """An authenticated resume moved the session onto a new link; the peer has
        ``peer_received``. Returns the number of bytes being sent again."""
        if self.state not in (SessionState.ATTACHED, SessionState.DETACHED):
            raise InvalidState(f"attach() on a {self.state.value} session")
        if not self.can_resume_from(peer_received):
            raise InvalidState(f"attach() from offset {peer_received}, never sent")
        self._transition(_Input.ATTACH)
        if peer_window is not None:
            self._adopt_peer_window(peer_window)
        self._resumes += 1
        self._confirmed = True  # the client proved it knows the session
        later = self._close_later
        if later is not None:
            # An abort waited for this link: the CLOSE alone, what was in flight dropped
            # as by any abort (docs/protocol.md, "Abort"), nothing sent again.
            self._out = list(preamble) if preamble else []
            self._peer_acked = max(self._peer_acked, peer_received)
            self._events.append(events.SessionResumed(0, peer_received))
            self._end(later[0], later[1], by_peer=False)
            return 0
        replayed = self._start_link(now, peer_received, preamble)
        self._events.append(events.SessionResumed(replayed, peer_received))
        return replayed

    def drain(self, now: float, deadline: float | None) -> None:
        """Server: the server drains and ends this session at ``deadline`` (the driver's
        clock; None: no limit) if it has not ended by then. A version-4 client is told now
        and on every link that resumes the session (docs/protocol.md, "Drain"); the session
        itself goes on as before. Idempotent."""
        if self.role is not Role.SERVER:
            raise InvalidState("drain() on a client session")
        first = not self._draining
        self._draining, self._drain_at = True, deadline
        if first and self.state is SessionState.ATTACHED:
            self._now = now
            self._tell_draining()

    def _tell_draining(self) -> None:
        if self.version < DRAINING_VERSION:
            return  # its client would read an unknown frame: it learns at its next setup
        deadline = NO_DEADLINE
        if self._drain_at is not None:
            deadline = min(max(round((self._drain_at - self._now) * 1000), 0), NO_DEADLINE - 1)
        self._out.append(Draining(deadline).serialize())

    def rejected(self, code: CloseCode, reason: str) -> None:
        """The server refused this session for good in a handshake: it ends now."""
        if self.state is not SessionState.CLOSED:
            self._end(code, reason, by_peer=True)

    # -- internals: the established link ----------------------------------------------

    def _sent_again(self, offset: int, payload: bytes | memoryview) -> bytes | memoryview:
        """DATA at ``offset`` is not the next byte: after a resume that told the peer less
        than was received (resume_offset()), the peer's bytes sent again, of which the part
        past ``_received`` (maybe none) is returned; anything else is a protocol error."""
        expected = self._dup_next
        if expected is None or offset != expected or self._peer_eof:
            self._bad_data(offset)
        end = offset + len(payload)
        if end < self._received:
            self._dup_next = end
            return b""
        self._dup_next = None
        return payload[self._received - offset :]

    def _bad_data(self, offset: int) -> None:
        if self._peer_eof:
            raise ProtocolError("DATA after EOF")
        raise ProtocolError(f"DATA at offset {offset}, expected {self._received}")

    def _deliver(self, run: list[bytes | memoryview]) -> None:
        """Report the DATA pieces of one read: views as they are, or, when they are
        small, one bytes object joining them (one copy, at most the read's size)."""
        if len(run) == 1:
            self._events.append(events.DataReceived(run[0]))
        elif sum(map(len, run)) < JOIN_BELOW * len(run):
            self._events.append(events.DataReceived(b"".join(run)))
        else:
            self._events.extend(map(events.DataReceived, run))

    def _control_frame(self) -> None:
        """The peer sent a frame that carries no progress: it costs a token."""
        if not self._control.take(self._now):
            raise _ControlFlood

    def _handle_frame(self, frame: object) -> None:
        # ACK does not come here: receive_data() hands it to _handle_ack() itself.
        if isinstance(frame, Ping):
            self._control_frame()
            # One answer pending at most, sent when the link is writable: a peer that
            # pings without reading our answers cannot make us queue more of them.
            self._pong_token = frame.token
            # The peer pings only after a silent interval of its own, so it will be heard
            # from again within two of ours: no need to ping it back meanwhile.
            self._ping_credit = PING_CREDIT
        elif isinstance(frame, Pong):
            self._control_frame()  # hearing it is the point
        elif isinstance(frame, Eof):
            if self._peer_eof or frame.offset != self._received:
                raise ProtocolError(f"EOF at offset {frame.offset}, expected {self._received}")
            self._received += 1
            self._peer_eof = True
            self._ack_held = False  # nothing can follow: acknowledging holds nothing back
            self._events.append(events.EofReceived())
            if self._writable:
                self._send_ack()
            self._check_finished()
        elif isinstance(frame, Close):
            self._end(frame.code, frame.reason or "closed by the peer", True)
        elif isinstance(frame, Draining):
            if self.role is Role.SERVER or self.version < DRAINING_VERSION:
                raise ProtocolError(f"unexpected DRAINING in a version-{self.version} session")
            self._control_frame()
            if self._drain_told != self._links:  # reported once per link
                self._draining, self._drain_told = True, self._links
                within = None if frame.deadline_ms == NO_DEADLINE else frame.deadline_ms / 1000
                self._events.append(events.ServerDraining(within))
        else:
            raise ProtocolError(f"unexpected {type(frame).__name__} on an established link")

    def _handle_ack(self, offset: int) -> None:
        if offset > self._send_next:
            raise ProtocolError(f"ACK of offset {offset} beyond what was sent ({self._send_next})")
        if offset <= self._peer_acked:
            self._control_frame()  # acknowledges nothing new
            return
        self._peer_acked = offset
        buffer = self._buffer
        end = buffer.end
        buffer.discard_until(offset if offset < end else end)
        if self._account is not None:
            self._account.follow(end - buffer.start)
        if self._peer_eof:  # _check_finished() can only end a session after the peer's EOF
            self._check_finished()

    def _check_finished(self) -> None:
        finished = self._peer_eof and self._eof and self._peer_acked > self._buffer.end
        if finished and self.state is not SessionState.CLOSED:
            self._end(CloseCode.NORMAL, "both directions finished", False)

    def _adopt_peer_window(self, window: int) -> None:
        self._peer_window = window
        self._flow_window = min(self.config.window, window)

    def _send_ack(self) -> None:
        if self._received > self._acked and self.state is SessionState.ATTACHED:
            self._out.append(ack_frame(self._received))
            self._acked = self._received

    def _frame(self, offset: int, view: memoryview) -> None:
        # Header and payload stay separate buffers: the driver hands the list to a
        # gathering write, so payload bytes are never copied here (CONTRIBUTING.md D2).
        out = self._out
        size = len(view)
        if size <= MAX_DATA_CHUNK:
            out.append(data_header(offset, size))
            out.append(view)
            return
        for lo in range(0, size, MAX_DATA_CHUNK):
            piece = view[lo : lo + MAX_DATA_CHUNK]
            out.append(data_header(offset + lo, len(piece)))
            out.append(piece)

    def _flush(self) -> None:
        """Put everything not yet on the current link onto it, EOF last."""
        end = self._buffer.end
        if self._send_next < end:
            for offset, piece in self._buffer.views(self._send_next, MAX_DATA_CHUNK):
                self._out.append(data_header(offset, len(piece)))
                self._out.append(piece)
            self._send_next = end
        if self._eof and self._send_next == end and self._peer_acked <= end:
            self._out.append(Eof(end).serialize())
            self._send_next = end + 1
        self._sent_high = max(self._sent_high, self._send_next)

    def _start_link(self, now: float, peer_received: int, preamble: list[bytes] | None) -> int:
        """A new link carries the session and the peer has ``peer_received``: send from
        there. Returns the number of bytes sent again."""
        self._out = list(preamble) if preamble else []
        if self._draining and self.role is Role.SERVER:
            self._now = now
            self._tell_draining()  # right after the handshake's answer
        self._reader = FrameReader()
        self._links += 1
        self._now = now
        self._writable = True
        self._pong_token = None
        self._control = TokenBucket(CONTROL_RATE, CONTROL_BURST)
        self._paused_in_interval = self._receive_paused
        self._expire_at = None
        self._detached_since = None
        self._heard = False
        self._ping_credit = 0
        self._misses = 0
        # The server's ticks run half an interval behind the client's, so on an idle
        # link the client's PING arrives first and the server never needs its own.
        lag = SERVER_TICK_LAG if self.role is Role.SERVER else 1.0
        self._tick_at = now + self.config.keepalive * lag
        self._peer_acked = max(self._peer_acked, peer_received)
        start = min(peer_received, self._buffer.end)
        self._buffer.discard_until(max(start, self._buffer.start))
        if self._account is not None:
            self._account.follow(len(self._buffer))
        replayed = self._buffer.end - start
        self._replayed += replayed
        self._send_next = peer_received
        # The handshake told the peer where we are (resume_offset()): that is acknowledged,
        # and the peer sends again from there.
        told = self._told if self._told < self._received else self._received
        self._acked = told
        self._dup_next = told if told < self._received else None
        self._flush()
        self._check_finished()
        return replayed

    def _tick(self, now: float) -> None:
        interval = self.config.keepalive
        if self._heard or self._paused_in_interval or self._ping_credit:
            # Silence we caused by not reading (the local side is slow) is not a dead link,
            # even if reading resumed just before this tick: paused at any time since the
            # last one counts. A PING's credit covers the ticks it vouches for in one go:
            # the next tick comes after all of them (an idle server wakes once per PING).
            interval *= max(1, self._ping_credit)
            if self._paused_in_interval:
                # The peer, whose PINGs we do not read, must hear that we are alive.
                self._ping_token += 1
                self._out.append(ping_frame(self._ping_token))
            self._heard = False
            self._ping_credit = 0
            self._misses = 0
            self._paused_in_interval = self._receive_paused
        else:
            self._misses += 1
            if self._misses >= KEEPALIVE_MISSES:
                self._drop_link("keepalive timed out", now)
                return
            self._ping_token += 1
            self._out.append(ping_frame(self._ping_token))
        if self._writable and not self._ack_held and self._received > self._acked:
            self._send_ack()  # a delayed acknowledgement waits one tick at most
        self._tick_at = now + interval

    def _drop_link(self, reason: str, now: float) -> None:
        """The core gives up on the current link: the driver closes it."""
        self._detach(now)
        self._events.append(events.LinkLost(reason, CloseCode.LINK_LOST))

    def _detach(self, now: float) -> None:
        """The link is gone: wait for a resume until the timeout."""
        self._transition(_Input.DETACH)
        self._out.clear()
        self._pong_token = None
        self._tick_at = None
        self._detached_since = now
        wait = min(self.config.timeout, self._peer_timeout)
        if not self._confirmed:
            wait = min(wait, ORPHAN_GRACE)  # no client knows of this session: an orphan
        self._expire_at = now + wait

    def _end(self, code: CloseCode, reason: str, by_peer: bool) -> None:
        if self.state is SessionState.ATTACHED and not by_peer:
            if self._eof and self._peer_eof and self._peer_acked > self._buffer.end:
                self._send_ack()  # finished: the peer only needs our last acknowledgement
            else:
                # Any end before both directions finished, whatever its code, is one
                # the peer must hear of, or it would wait for a resume until it expires.
                self._out.append(Close(code, reason).serialize())
            self._ended_on_link = True
        self._transition(_Input.END)
        self._end_code = code
        self._tick_at = self._expire_at = None
        self._buffer.discard_until(self._buffer.end)  # free the bytes, keep the offsets
        if self._account is not None:
            self._account.close()  # its reservation and bytes go back to the budget
        self._events.append(events.SessionEnded(code, reason, by_peer))

    def _transition(self, event: _Input) -> None:
        try:
            self.state = TRANSITIONS[self.state, event]
        except KeyError:
            raise InvalidState(f"no transition from {self.state.value} on {event.value}") from None


class _ControlFlood(Exception):
    """The peer overdrew its control-frame budget on this link (internal)."""
