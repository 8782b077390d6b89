"""The session state machine (docs/protocol.md, "Session lifecycle").

One :class:`Session` is one reliable byte stream in each direction between an
application and a backend, carried over a succession of links (TCP connections).
It survives the loss of any link: bytes are kept in a :class:`ReplayBuffer` until
the peer acknowledges them and are sent again on the next link from exactly the
offset the peer reports, so nothing is lost, duplicated or reordered.

The API is sans-I/O (STYLE.md item 2):

- inputs: ``link_opened(now)``, ``receive_data(data)``, ``link_lost(now)``,
  ``send(data)``, ``send_eof()``, ``close(code)``, ``handle_timer(now)``;
- outputs: ``data_to_send()``, ``next_event()``, ``next_timer()``,
  ``send_capacity()`` and ``statistics()``.

The client role runs its own link handshake (hello, then SETUP or RESUME); the
server role is created by :class:`~tether.protocol.handshake.ServerHandshake`
once the client has been authenticated.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import InvalidState, ProtocolError
from . import resume as crypto
from .buffer import ReplayBuffer
from .codes import CloseCode
from .events import (
    DataReceived,
    EofReceived,
    Event,
    LinkLost,
    SessionEnded,
    SessionEstablished,
    SessionResumed,
)
from .frames import (
    MAGIC,
    MAX_DATA_CHUNK,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    SERVER_HELLO_SIZE,
    Accept,
    Ack,
    Close,
    Data,
    Eof,
    Ping,
    Pong,
    Reject,
    Resume,
    Resumed,
    Setup,
    client_hello,
    data_header,
    parse_server_hello,
)
from .reader import FrameReader

__all__ = [
    "LinkState",
    "Role",
    "Session",
    "SessionConfig",
    "SessionState",
    "SessionStatistics",
]

Random = Callable[[int], bytes]

# docs/protocol.md, "Limits" and "Keepalive"
DEFAULT_WINDOW = 4 * 1024 * 1024  # replay buffer bound per direction, bytes
DEFAULT_KEEPALIVE = 3.0  # seconds of silence before a PING
DEFAULT_TIMEOUT = 180.0  # session-reliability timeout (Citrix's documented default)
DEFAULT_HANDSHAKE_TIMEOUT = 10.0  # one link handshake, seconds
KEEPALIVE_MISSES = 2  # silent keepalive intervals after which a link is dead
PING_CREDIT = 2  # intervals a received PING counts as heard: one side pings, not both
SERVER_TICK_LAG = 1.5  # the server's first keepalive tick, in intervals after establishment
MAX_WINDOW = 1 << 30
ACK_FRACTION = 4  # acknowledge once a quarter of the peer's window is unacknowledged
MAX_ACK_THRESHOLD = 1024 * 1024


# docs/protocol.md, "Reason codes": a REJECT of a resume with one of these leaves the
# session detached (the client tries again until its timeout); any other ends it.
TRANSIENT_REJECTS = frozenset(
    {CloseCode.HANDSHAKE_TIMEOUT, CloseCode.OVERLOADED, CloseCode.GOING_AWAY}
)


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Parameters of one end of a session (docs/protocol.md, "Limits")."""

    window: int = DEFAULT_WINDOW
    keepalive: float = DEFAULT_KEEPALIVE
    timeout: float = DEFAULT_TIMEOUT
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT

    def __post_init__(self) -> None:
        if not 1024 <= self.window <= MAX_WINDOW:
            raise ValueError(f"window must be within [1024, {MAX_WINDOW}] bytes")
        if not 0.05 <= self.keepalive <= 3600:
            raise ValueError("keepalive must be within [0.05, 3600] seconds")
        if not 0 < self.timeout <= 7 * 86400:
            raise ValueError("timeout must be positive and at most a week")
        if not 0 < self.handshake_timeout <= 600:
            raise ValueError("handshake_timeout must be within (0, 600] seconds")

    @property
    def keepalive_ms(self) -> int:
        return round(self.keepalive * 1000)


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class SessionState(enum.Enum):
    SETUP = "setup"  # client only: no session id yet
    ATTACHED = "attached"  # a link carries the session
    DETACHED = "detached"  # no link; waiting for a resume until the timeout
    CLOSED = "closed"


class LinkState(enum.Enum):
    NONE = "none"
    HELLO = "hello"  # client sent its hello, waits for the server's
    HANDSHAKE = "handshake"  # client sent SETUP or RESUME, waits for the answer
    ESTABLISHED = "established"


class _Input(enum.Enum):
    LINK_ESTABLISHED = "link established"
    LINK_LOST = "link lost"
    END = "end"


# docs/protocol.md, "Session lifecycle": the one transition table. A pair not in it
# is a bug in the caller or the core, never something a peer can cause.
TRANSITIONS: dict[tuple[SessionState, _Input], SessionState] = {
    (SessionState.SETUP, _Input.LINK_ESTABLISHED): SessionState.ATTACHED,
    (SessionState.SETUP, _Input.LINK_LOST): SessionState.SETUP,
    (SessionState.SETUP, _Input.END): SessionState.CLOSED,
    (SessionState.ATTACHED, _Input.LINK_ESTABLISHED): SessionState.ATTACHED,
    (SessionState.ATTACHED, _Input.LINK_LOST): SessionState.DETACHED,
    (SessionState.ATTACHED, _Input.END): SessionState.CLOSED,
    (SessionState.DETACHED, _Input.LINK_ESTABLISHED): SessionState.ATTACHED,
    (SessionState.DETACHED, _Input.LINK_LOST): SessionState.DETACHED,
    (SessionState.DETACHED, _Input.END): SessionState.CLOSED,
}


@dataclass(frozen=True, slots=True)
class SessionStatistics:
    """A frozen snapshot of one session, for status pages and metrics."""

    role: str
    state: str
    link: str
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


class Session:
    """One end of a tether session. Create with :meth:`client` or via ServerHandshake."""

    __slots__ = (
        "_acked",
        "_buffer",
        "_client_nonce",
        "_clock",
        "_detached_since",
        "_end_code",
        "_eof_acked",
        "_eof_ever_sent",
        "_eof_queued",
        "_eof_sent",
        "_events",
        "_expire_at",
        "_handshake_at",
        "_heard",
        "_hello",
        "_keypair",
        "_links",
        "_misses",
        "_out",
        "_peer_eof",
        "_peer_is_tether",
        "_peer_timeout",
        "_peer_window",
        "_ping_credit",
        "_ping_token",
        "_random",
        "_reader",
        "_receive_paused",
        "_received",
        "_replayed",
        "_resumes",
        "_secret",
        "_send_next",
        "_server_nonce",
        "_tick_at",
        "config",
        "link",
        "role",
        "session_id",
        "state",
    )

    def __init__(
        self,
        role: Role,
        config: SessionConfig,
        now: float,
        *,
        random: Random = os.urandom,
    ) -> None:
        self.role = role
        self.config = config
        self._random = random
        self.state = SessionState.SETUP
        self.link = LinkState.NONE
        self.session_id = b""
        self._secret = b""
        self._clock = now
        self._events: list[Event] = []  # a handful at a time; a list is 10x smaller than a deque
        self._out: list[bytes | memoryview] = []
        self._reader = FrameReader()
        # outbound direction
        self._buffer = ReplayBuffer()
        self._send_next = 0  # next offset to put on the current link
        self._eof_queued = False  # send_eof() called: the EOF occupies offset buffer.end
        self._eof_sent = False  # EOF frame on the current link
        self._eof_acked = False
        self._eof_ever_sent = False
        self._peer_timeout = config.timeout  # the client adopts the server's if shorter
        self._peer_window = DEFAULT_WINDOW
        # inbound direction
        self._received = 0  # stream offset received, EOF included
        self._acked = 0  # what we last acknowledged
        self._peer_eof = False
        # link liveness and deadlines
        self._heard = False
        self._ping_credit = 0  # ticks that count as heard after the peer's PING
        self._receive_paused = False  # the driver stopped reading the link on purpose
        self._misses = 0
        self._ping_token = 0
        self._tick_at: float | None = None
        self._handshake_at: float | None = None
        self._expire_at: float | None = None
        self._detached_since: float | None = None
        # client handshake
        self._hello = bytearray()
        self._keypair: crypto.KeyPair | None = None
        self._server_nonce = b""
        self._client_nonce = b""
        self._peer_is_tether = False
        # statistics
        self._replayed = 0
        self._links = 0
        self._resumes = 0
        self._end_code: CloseCode | None = None

    # -- construction ------------------------------------------------------------

    @classmethod
    def client(cls, config: SessionConfig, now: float, *, random: Random = os.urandom) -> Session:
        """A client session in SETUP: open a link and call :meth:`link_opened`."""
        session = cls(Role.CLIENT, config, now, random=random)
        # A session that never reaches a server gives up after one timeout too.
        session._expire_at = now + config.timeout
        return session

    @classmethod
    def server(
        cls,
        config: SessionConfig,
        now: float,
        *,
        session_id: bytes,
        secret: bytes,
        peer_window: int,
        random: Random = os.urandom,
    ) -> Session:
        """A server session whose first link has just been established."""
        session = cls(Role.SERVER, config, now, random=random)
        session.session_id = session_id
        session._secret = secret
        session._peer_window = peer_window
        session._establish(now, peer_received=0)
        return session

    # -- properties --------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.state is SessionState.CLOSED

    @property
    def close_code(self) -> CloseCode | None:
        return self._end_code

    @property
    def secret(self) -> bytes:
        return self._secret

    def send_capacity(self) -> int:
        """Bytes the replay buffer can still take; the driver stops reading at <= 0."""
        return self.config.window - len(self._buffer)

    def statistics(self) -> SessionStatistics:
        return SessionStatistics(
            role=self.role.value,
            state=self.state.value,
            link=self.link.value,
            session_id=self.session_id.hex(),
            bytes_sent=self._buffer.end,
            bytes_received=self._received - (1 if self._peer_eof else 0),
            bytes_acked=self._buffer.start,
            replay_buffered=len(self._buffer),
            bytes_replayed=self._replayed,
            links=self._links,
            resumes=self._resumes,
            eof_sent=self._eof_queued,
            eof_received=self._peer_eof,
            detached_since=self._detached_since,
        )

    # -- outputs -------------------------------------------------------------------

    def data_to_send(self) -> list[bytes | memoryview]:
        """Bytes for the current link, as a list of buffers to write in order, with one
        gathering write (``transport.writelines``); payloads are views, not copies."""
        if self.link is LinkState.ESTABLISHED and self._received > self._acked and self._out:
            self._out.append(Ack(self._received).serialize())  # piggyback
            self._acked = self._received
        out, self._out = self._out, []
        return out

    def next_event(self) -> Event | None:
        return self._events.pop(0) if self._events else None

    def next_timer(self) -> float | None:
        times = (self._tick_at, self._handshake_at, self._expire_at)
        deadlines = [t for t in times if t is not None]
        return min(deadlines) if deadlines else None

    def pending(self) -> list[memoryview]:
        """Every byte the peer has not acknowledged, oldest first (views, no copy).

        A client that falls back to a direct connection forwards these: bytes the
        application wrote while the session was being set up.
        """
        return [piece for _, piece in self._buffer.views(self._buffer.start, MAX_DATA_CHUNK)]

    def pause_receiving(self, paused: bool) -> None:
        """The driver stopped (or resumed) reading the link because the local side is
        slow. While paused, keepalive silence does not count against the link: the
        peer's bytes wait in the kernel, unread, and the link is not dead."""
        self._receive_paused = paused

    # -- application inputs ------------------------------------------------------

    def send(self, data: bytes | memoryview) -> None:
        """Queue application bytes. Always accepted; respect :meth:`send_capacity`."""
        if self.state is SessionState.CLOSED:
            raise InvalidState("send() on a closed session")
        if self._eof_queued:
            raise InvalidState("send() after send_eof()")
        if not data:
            return
        start = self._buffer.end
        self._buffer.append(data)
        if self.link is LinkState.ESTABLISHED and self._send_next == start:
            self._frame(start, memoryview(data))
            self._send_next = self._buffer.end

    def send_eof(self) -> None:
        """Half-close: the peer's application sees EOF after every byte sent so far."""
        if self.state is SessionState.CLOSED:
            raise InvalidState("send_eof() on a closed session")
        if self._eof_queued:
            return
        self._eof_queued = True
        if self.link is LinkState.ESTABLISHED:
            self._flush()

    def close(self, code: CloseCode = CloseCode.NORMAL, reason: str = "") -> None:
        """End the session now in both directions (an abort, unless already finished)."""
        if self.state is not SessionState.CLOSED:
            self._end(code, reason, by_peer=False)

    # -- link inputs -------------------------------------------------------------

    def link_opened(self, now: float) -> None:
        """Client: a new transport to the server is connected; start its handshake."""
        if self.role is not Role.CLIENT:
            raise InvalidState("link_opened() is for the client role")
        if self.state is SessionState.CLOSED or self.link is not LinkState.NONE:
            raise InvalidState(f"link_opened() in {self.state.value}/{self.link.value}")
        self._clock = now
        self._reset_link()
        self.link = LinkState.HELLO
        limit = self.config.handshake_timeout
        if self.state is SessionState.DETACHED:
            # A resume on a path that is up answers within a round trip or two; one that
            # stays mute as long as a dead link would is abandoned for a fresh connection
            # rather than waiting on TCP's retransmission backoff.
            limit = min(limit, max(KEEPALIVE_MISSES * self.config.keepalive, 1.0))
        self._handshake_at = now + limit
        self._out.append(client_hello())
        if self.state is SessionState.SETUP:
            self._keypair = crypto.KeyPair()
            setup = Setup(self._keypair.public, self.config.window, self.config.keepalive_ms)
            self._out.append(setup.serialize())

    def link_lost(self, now: float, reason: str = "connection lost") -> None:
        """The current transport failed or closed. Call once per link."""
        self._clock = now
        if self.link is LinkState.NONE or self.state is SessionState.CLOSED:
            return
        self._drop_link(now)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the current link. Never raises on peer input."""
        if self.state is SessionState.CLOSED or self.link is LinkState.NONE or not data:
            return
        self._heard = True
        try:
            if self.link is LinkState.HELLO:
                data = self._receive_hello(data)
                if not data:
                    return
            for frame in self._reader.feed(data):
                if self.link is LinkState.ESTABLISHED:
                    self._handle_frame(frame)
                elif self.link is LinkState.HANDSHAKE:
                    self._handle_handshake(frame)
                else:
                    return  # the link failed while handling an earlier frame
                if self.closed:
                    return
            if self._received - self._acked >= self._ack_threshold():
                self._send_ack()
        except ProtocolError as exc:
            self._fail(exc.code, str(exc))

    def handle_timer(self, now: float) -> None:
        self._clock = now
        if self.state is SessionState.CLOSED:
            return
        if self._expire_at is not None and now >= self._expire_at:
            if self.state is SessionState.SETUP:
                self._end(CloseCode.RESUME_FAILED, "no tether server reached in time", False)
            else:
                self._end(CloseCode.EXPIRED, "session-reliability timeout passed", False)
            return
        if self._handshake_at is not None and now >= self._handshake_at:
            self._lose_link(now, CloseCode.HANDSHAKE_TIMEOUT, "link handshake timed out")
            return
        if self._tick_at is not None and now >= self._tick_at:
            self._tick(now)

    # -- server side -------------------------------------------------------------

    def check_peer_received(self, offset: int) -> bool:
        """Is ``offset`` a place the peer can truthfully have received up to?"""
        # Only what was ever put on a link: bytes queued while detached were never sent.
        limit = self._send_next + (1 if self._eof_ever_sent else 0)
        return self._buffer.start <= offset <= limit

    def attach(self, now: float, peer_received: int) -> None:
        """Server: an authenticated resume moves the session onto a new link."""
        if self.role is not Role.SERVER or self.state is SessionState.CLOSED:
            raise InvalidState("attach() is for open server sessions")
        if not self.check_peer_received(peer_received):
            raise InvalidState("attach() with an offset outside the replay buffer")
        self._reset_link()
        self._resumes += 1
        self._establish(now, peer_received)

    def resume_fields(self) -> tuple[int, bytes]:
        """(bytes received so far, session secret): what a resume proof is checked against."""
        return self._received, self._secret

    def note_peer_window(self, window: int) -> None:
        self._peer_window = window

    # -- internals: handshake (client) -------------------------------------------

    def _receive_hello(self, data: bytes | bytearray | memoryview) -> memoryview:
        need = SERVER_HELLO_SIZE - len(self._hello)
        view = memoryview(data)
        self._hello += view[:need]
        rest = view[need:]
        seen = bytes(self._hello[: len(MAGIC)])
        if seen != MAGIC[: len(seen)]:
            raise ProtocolError("the peer is not a tether server (bad magic)")
        self._peer_is_tether = len(seen) == len(MAGIC)
        if len(self._hello) < SERVER_HELLO_SIZE:
            return rest[:0]
        version, self._server_nonce = parse_server_hello(bytes(self._hello))
        if version != PROTOCOL_VERSION:
            self._end(CloseCode.UNSUPPORTED_VERSION, f"server offers version {version}", True)
            return rest[:0]
        self.link = LinkState.HANDSHAKE
        if self.state is SessionState.DETACHED:
            self._client_nonce = self._random(NONCE_SIZE)
            proof = crypto.client_resume_proof(
                self._secret,
                self.session_id,
                self._server_nonce,
                self._client_nonce,
                self._received,
                self.config.window,
                self.config.keepalive_ms,
            )
            request = Resume(
                self.session_id,
                self._client_nonce,
                self._received,
                self.config.window,
                self.config.keepalive_ms,
                proof,
            )
            self._out.append(request.serialize())
        return rest

    def _handle_handshake(self, frame: object) -> None:
        if isinstance(frame, Reject):
            if self.state is SessionState.DETACHED and frame.code in TRANSIENT_REJECTS:
                # The server is busy or going away: a later link may still resume.
                raise ProtocolError(f"resume refused for now: {frame.code.name}", frame.code)
            self._end(frame.code, frame.reason or "rejected by the server", True)
        elif isinstance(frame, Accept) and self.state is SessionState.SETUP:
            assert self._keypair is not None
            try:
                shared = self._keypair.shared(frame.server_public)
            except ValueError:
                raise ProtocolError("server public key is invalid") from None
            secret = crypto.derive_secret(
                shared,
                frame.session_id,
                self._keypair.public,
                frame.server_public,
                self._server_nonce,
            )
            expected = crypto.accept_confirm(secret, frame.session_id, self._keypair.public)
            if not crypto.verify(expected, frame.confirm):
                raise ProtocolError("server key confirmation failed")
            if not 1024 <= frame.window <= MAX_WINDOW:
                raise ProtocolError(f"server window {frame.window} out of range")
            self._keypair = None
            self.session_id = frame.session_id
            self._secret = secret
            self._peer_window = frame.window
            if frame.timeout_ms > 0:
                self._peer_timeout = frame.timeout_ms / 1000
            self._establish(self._clock, peer_received=0)
            self._events.append(SessionEstablished(self.session_id))
        elif isinstance(frame, Resumed) and self.state is SessionState.DETACHED:
            expected = crypto.server_resume_proof(
                self._secret,
                self.session_id,
                self._server_nonce,
                self._client_nonce,
                frame.received,
            )
            if not crypto.verify(expected, frame.proof):
                raise ProtocolError("server resume proof failed")
            if not self.check_peer_received(frame.received):
                raise ProtocolError(f"server resumes from impossible offset {frame.received}")
            self._resumes += 1
            replayed = self._establish(self._clock, frame.received)
            self._events.append(SessionResumed(replayed, frame.received))
        else:
            raise ProtocolError(f"unexpected {type(frame).__name__} during handshake")

    # -- internals: established link ----------------------------------------------

    def _handle_frame(self, frame: object) -> None:
        if isinstance(frame, Data):
            if self._peer_eof:
                raise ProtocolError("DATA after EOF")
            if frame.offset != self._received:
                raise ProtocolError(f"DATA at offset {frame.offset}, expected {self._received}")
            self._received += len(frame.payload)
            self._events.append(DataReceived(frame.payload))
        elif isinstance(frame, Ack):
            self._handle_ack(frame.offset)
        elif isinstance(frame, Ping):
            self._out.append(Pong(frame.token).serialize())
            # The peer pings only after a silent interval of its own, so it will be heard
            # from again within two of ours: no need to ping it back meanwhile.
            self._ping_credit = PING_CREDIT
        elif isinstance(frame, Pong):
            pass  # hearing it is the point
        elif isinstance(frame, Eof):
            if self._peer_eof or frame.offset != self._received:
                raise ProtocolError(f"EOF at offset {frame.offset}, expected {self._received}")
            self._received += 1
            self._peer_eof = True
            self._events.append(EofReceived())
            self._send_ack()
            self._check_finished()
        elif isinstance(frame, Close):
            self._end(frame.code, frame.reason or "closed by the peer", True)
        else:
            raise ProtocolError(f"unexpected {type(frame).__name__} on an established link")

    def _handle_ack(self, offset: int) -> None:
        sent_limit = self._send_next + (1 if self._eof_sent else 0)
        if offset > sent_limit:
            raise ProtocolError(f"ACK of offset {offset} beyond what was sent ({sent_limit})")
        if offset <= self._buffer.start:
            return
        self._buffer.discard_until(min(offset, self._buffer.end))
        if offset > self._buffer.end:
            self._eof_acked = True
            self._check_finished()

    def _check_finished(self) -> None:
        if self._eof_acked and self._peer_eof and self.state is not SessionState.CLOSED:
            self._end(CloseCode.NORMAL, "both directions finished", False)

    def _ack_threshold(self) -> int:
        return max(1, min(self._peer_window // ACK_FRACTION, MAX_ACK_THRESHOLD))

    def _send_ack(self) -> None:
        if self.link is LinkState.ESTABLISHED and self._received > self._acked:
            self._out.append(Ack(self._received).serialize())
            self._acked = self._received

    def _frame(self, offset: int, view: memoryview) -> None:
        # Header and payload stay separate buffers: the driver hands the list to a
        # gathering write, so payload bytes are never copied here (STYLE.md item 9).
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
        if self._send_next < self._buffer.end:
            for offset, piece in self._buffer.views(self._send_next, MAX_DATA_CHUNK):
                self._out.append(data_header(offset, len(piece)))
                self._out.append(piece)
            self._send_next = self._buffer.end
        if self._eof_queued and not self._eof_sent and not self._eof_acked:
            self._out.append(Eof(self._buffer.end).serialize())
            self._eof_sent = self._eof_ever_sent = True

    def _establish(self, now: float, peer_received: int) -> int:
        """The link is up and the peer has ``peer_received``: send from there."""
        self._transition(_Input.LINK_ESTABLISHED)
        self.link = LinkState.ESTABLISHED
        self._links += 1
        self._handshake_at = None
        self._expire_at = None
        self._detached_since = None
        self._heard = False
        self._ping_credit = 0
        self._misses = 0
        # The server's ticks run half an interval behind the client's, so on an idle
        # link the client's PING arrives first and the server never needs its own.
        lag = SERVER_TICK_LAG if self.role is Role.SERVER else 1.0
        self._tick_at = now + self.config.keepalive * lag
        if peer_received > self._buffer.end:
            self._eof_acked = True
        self._buffer.discard_until(min(peer_received, self._buffer.end))
        self._send_next = self._buffer.start
        replayed = self._buffer.end - self._send_next
        self._replayed += replayed
        self._acked = self._received  # the handshake told the peer where we are
        self._flush()
        self._check_finished()
        return replayed

    def _tick(self, now: float) -> None:
        interval = self.config.keepalive
        if self._heard or self._receive_paused or self._ping_credit:
            # Silence we caused by not reading (the local side is slow) is not a dead link.
            # A PING's credit covers the ticks it vouches for in one go: the next tick
            # comes after all of them (an idle server wakes once per client PING).
            interval *= max(1, self._ping_credit)
            self._heard = False
            self._ping_credit = 0
            self._misses = 0
        else:
            self._misses += 1
            if self._misses >= KEEPALIVE_MISSES:
                self._lose_link(now, CloseCode.LINK_LOST, "keepalive timed out")
                return
            self._ping_token += 1
            self._out.append(Ping(self._ping_token).serialize())
        self._send_ack()  # a delayed acknowledgement waits one tick at most
        self._tick_at = now + interval

    def _reset_link(self) -> None:
        self._out.clear()
        self._reader = FrameReader()
        self._hello.clear()
        self._eof_sent = False
        self._peer_is_tether = False

    def _drop_link(self, now: float) -> None:
        was_established = self.link is LinkState.ESTABLISHED
        self._out.clear()
        self.link = LinkState.NONE
        self._tick_at = None
        self._handshake_at = None
        self._eof_sent = False
        self._transition(_Input.LINK_LOST)
        if was_established:
            self._detached_since = now
            self._expire_at = now + min(self.config.timeout, self._peer_timeout)

    def _lose_link(self, now: float, code: CloseCode, reason: str) -> None:
        """The core decided the link is dead: tell the driver to close it."""
        peer_is_tether = self._peer_is_tether or self.link is not LinkState.HELLO
        self._drop_link(now)
        self._events.append(LinkLost(reason, code, peer_is_tether))

    def _fail(self, code: CloseCode, reason: str) -> None:
        """Peer input broke the protocol."""
        if self.link is LinkState.ESTABLISHED:
            # An authenticated peer that breaks the stream cannot be trusted with it.
            self._end(code, reason, by_peer=False)
        else:
            self._lose_link(self._clock, code, reason)

    def _end(self, code: CloseCode, reason: str, by_peer: bool) -> None:
        if self.link is LinkState.ESTABLISHED and not by_peer:
            if self._eof_acked and self._peer_eof:
                self._send_ack()  # finished: the peer only needs our last acknowledgement
            else:
                # Any end before both directions finished, whatever its code, is one
                # the peer must hear of, or it would wait for a resume until it expires.
                self._out.append(Close(code, reason).serialize())
        self._transition(_Input.END)
        self._end_code = code
        self._tick_at = self._handshake_at = self._expire_at = None
        self._buffer.discard_until(self._buffer.end)  # free the bytes, keep the offsets
        self._events.append(SessionEnded(code, reason, by_peer))

    def _transition(self, event: _Input) -> None:
        try:
            self.state = TRANSITIONS[self.state, event]
        except KeyError:
            raise InvalidState(f"no transition from {self.state.value} on {event.value}") from None
