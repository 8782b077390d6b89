"""Link handshakes, one per side (docs/protocol.md, "Link handshake").

Every link starts with a handshake that owns it until the session is decided:

- :class:`ServerHandshake` reads the client hello, answers with the server hello and
  a fresh nonce, and *parses* one SETUP or RESUME into :attr:`~ServerHandshake.request`
  (reported as ``SetupRequested`` / ``ResumeRequested``). The driver then *decides*:
  ``accept_setup`` (once it has what the session needs, such as a backend
  connection), ``accept_resume`` for the session the id names, or ``reject``. A gateway
  or a probe can stop after the parse: nothing is created and no backend is dialled.
- :class:`ClientHandshake` sends the client hello with SETUP (a new session) or, after
  the server hello, RESUME (a detached one), and decides itself on the answer:
  ACCEPT and RESUMED are verified before the session is touched.

``accept_resume`` verifies the proof in constant time *before* it touches the
session; a wrong proof leaves the live session and its link exactly as they were.
On success each side hands the link over to its :class:`Session` the same way
(:meth:`_Handshake._hand_over`): the handshake's unsent bytes go first on the link,
and the bytes that arrived after the handshake's last frame are the session's.
"""

from __future__ import annotations

import enum
import os
from collections import deque
from collections.abc import Callable
from dataclasses import replace

from ..errors import InvalidState, ProtocolError
from . import resume as crypto
from .codes import CloseCode
from .events import Event, HandshakeFailed, ResumeRequested, SetupRequested
from .frames import (
    CLIENT_HELLO_SIZE,
    HEALTH_PROBE_VERSION,
    MIN_PROTOCOL_VERSION,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    SERVER_HELLO_SIZE,
    SESSION_ID_SIZE,
    Accept,
    FrameType,
    Reject,
    Resume,
    Resumed,
    Route,
    Setup,
    check_magic,
    check_window,
    client_hello,
    parse_client_hello,
    parse_server_hello,
    server_hello,
)
from .reader import take_control_frame
from .session import KEEPALIVE_MISSES, Role, Session, SessionConfig, SessionState

__all__ = [
    "TRANSIENT_REJECTS",
    "ClientHandshake",
    "HandshakeStage",
    "Random",
    "ServerHandshake",
    "SessionIds",
    "refusal",
    "refusal_version",
]

Random = Callable[[int], bytes]
SessionIds = Callable[[], bytes]  # makes a new session's 16-byte id (routing.py)

MAX_EARLY_BYTES = 64 * 1024  # bytes a client may send past its request before the answer

# docs/protocol.md, "Reason codes": a REJECT with one of these fails only the link (the
# client tries again until its connect timeout or its session timeout); any other ends
# the session.
TRANSIENT_REJECTS = frozenset(
    {
        CloseCode.HANDSHAKE_TIMEOUT,
        CloseCode.OVERLOADED,
        CloseCode.GOING_AWAY,
        CloseCode.SERVER_UNREACHABLE,
    }
)


def refusal_version(hello: bytes) -> int:
    """The version of a refusal's server hello (docs/protocol.md, "Version negotiation") to
    a client whose first bytes are ``hello``: the version a server would choose when they
    are a whole, valid client hello (at least MIN_PROTOCOL_VERSION, even with none in
    common), else MIN_PROTOCOL_VERSION. A client from before the refusal rule ends a
    resumed session on any version but its own; this one reads the REJECT whatever the
    version, so the refuser only has to say the client's when it knows it."""
    try:
        _, hi = parse_client_hello(hello[:CLIENT_HELLO_SIZE])
    except ProtocolError:
        return MIN_PROTOCOL_VERSION
    return max(MIN_PROTOCOL_VERSION, min(hi, PROTOCOL_VERSION))


def refusal(version: int, code: CloseCode, reason: str) -> bytes:
    """A refusal before any handshake (a busy or TLS-only server in clear text, a gateway):
    a server hello of ``version`` with a zero nonce, which marks it as a refusal, then
    ``REJECT(code, reason)``."""
    return server_hello(version, bytes(NONCE_SIZE)) + Reject(code, reason).serialize()


class HandshakeStage(enum.Enum):
    HELLO = "hello"  # waiting for the peer's hello
    REQUEST = "request"  # server: waiting for SETUP or RESUME
    DECIDING = "deciding"  # server: the request is parsed; the driver decides
    ANSWER = "answer"  # client: SETUP or RESUME sent; waiting for the answer
    DONE = "done"  # the session owns the link
    FAILED = "failed"


class _Step(enum.Enum):
    CLIENT_HELLO = "client hello received"
    SERVER_HELLO = "server hello received"
    REQUEST = "request received"
    ACCEPT = "accepted"
    FAIL = "failed"


_S = HandshakeStage
# docs/protocol.md, "Link handshake": the one table of both sides' stages.
STAGES: dict[tuple[HandshakeStage, _Step], HandshakeStage] = {
    (_S.HELLO, _Step.CLIENT_HELLO): _S.REQUEST,
    (_S.REQUEST, _Step.REQUEST): _S.DECIDING,
    (_S.DECIDING, _Step.ACCEPT): _S.DONE,
    (_S.HELLO, _Step.SERVER_HELLO): _S.ANSWER,
    (_S.ANSWER, _Step.ACCEPT): _S.DONE,
    **{(stage, _Step.FAIL): _S.FAILED for stage in (_S.HELLO, _S.REQUEST, _S.DECIDING, _S.ANSWER)},
}


class _Handshake:
    """What both sides' handshakes share: stage, buffer, deadline, outputs, hand-over."""

    _peer = ""  # "client" or "server": the other side, for error messages

    def __init__(self, config: SessionConfig, now: float, limit: float, random: Random) -> None:
        self.config = config
        self.stage = HandshakeStage.HELLO
        self.peer_is_tether = False  # the peer sent the whole magic
        self._random = random
        self._clock = now
        self._deadline: float | None = now + limit
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._events: deque[Event] = deque()

    @property
    def done(self) -> bool:
        return self.stage in (HandshakeStage.DONE, HandshakeStage.FAILED)

    @property
    def failed(self) -> bool:
        return self.stage is HandshakeStage.FAILED

    def data_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def next_timer(self) -> float | None:
        return self._deadline

    def handle_timer(self, now: float) -> None:
        self._clock = now
        if self._deadline is not None and now >= self._deadline and not self.done:
            self._timed_out()

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the link. Never raises on peer input: a failure is reported as
        ``HandshakeFailed`` (after a REJECT, where the peer should hear why)."""
        if self.done or not data:
            return
        self._buf += data
        try:
            self._advance()
        except ProtocolError as exc:
            self._refuse(exc.code, str(exc))

    # -- for the sides ----------------------------------------------------------------

    def _advance(self) -> None:
        raise NotImplementedError

    def _timed_out(self) -> None:
        self._fail(CloseCode.HANDSHAKE_TIMEOUT, "link handshake timed out")

    def _refuse(self, code: CloseCode, reason: str) -> None:
        self._fail(code, reason)

    def _step(self, step: _Step) -> None:
        try:
            self.stage = STAGES[self.stage, step]
        except KeyError:
            raise InvalidState(
                f"handshake: no step from {self.stage.value} on {step.value}"
            ) from None

    def _hello_seen(self, size: int) -> bytes | None:
        """The peer's hello once it is whole (its magic checked as it arrives)."""
        self.peer_is_tether = check_magic(self._buf, self._peer)
        if len(self._buf) < size:
            return None
        hello = bytes(self._buf[:size])
        del self._buf[:size]
        return hello

    def _hand_over(self) -> tuple[list[bytes], bytes]:
        """The link now belongs to the session: (bytes to send before the session's own,
        bytes the peer sent after the handshake's last frame)."""
        self._step(_Step.ACCEPT)
        self._deadline = None
        preamble, self._out = self._out, []
        leftover, self._buf = bytes(self._buf), bytearray()
        return preamble, leftover

    def _fail(self, code: CloseCode, reason: str) -> None:
        self._step(_Step.FAIL)
        self._deadline = None
        self._buf.clear()
        self._events.append(HandshakeFailed(code, reason, self.peer_is_tether))


class ServerHandshake(_Handshake):
    """Sans-I/O server handshake for one link: parse, then the driver decides."""

    _peer = "client"

    def __init__(
        self,
        config: SessionConfig,
        now: float,
        *,
        random: Random = os.urandom,
        session_ids: SessionIds | None = None,
        draining: bool = False,
    ) -> None:
        """``session_ids``: makes the id of a session this handshake creates (None: 16
        bytes of ``random``; a server behind a gateway puts its routing field in it).
        ``draining``: the server drains; a health probe's hello hears so."""
        super().__init__(config, now, config.handshake_timeout, random)
        self._session_ids = session_ids
        self._draining = draining
        self.version = 0  # the version agreed with the client hello
        self.route: bytes | None = None  # the session id a version-3 ROUTE named
        self._nonce = random(NONCE_SIZE)
        self._hellos = (b"", b"")  # (client's, ours): the key confirmation covers both
        self.request: Setup | Resume | None = None  # the parsed SETUP or RESUME
        self._keypair: crypto.KeyPair | None = None
        self._shared = b""  # X25519 result, computed when the SETUP arrives

    def _advance(self) -> None:
        if self.stage is HandshakeStage.HELLO:
            self._read_hello()
        if self.stage is HandshakeStage.REQUEST:
            self._read_request()
        if self.stage is HandshakeStage.DECIDING and len(self._buf) > MAX_EARLY_BYTES:
            raise ProtocolError("client sent too much before the handshake finished")

    def _read_hello(self) -> None:
        hello = self._hello_seen(CLIENT_HELLO_SIZE)
        if hello is None:
            return
        lo, hi = parse_client_hello(hello)
        if lo == HEALTH_PROBE_VERSION and self._draining:
            # docs/protocol.md, "Health probe": version 0 then REJECT(GOING_AWAY).
            self._out.append(server_hello(0, bytes(NONCE_SIZE)))
            self._step(_Step.CLIENT_HELLO)
            raise ProtocolError("server draining", CloseCode.GOING_AWAY)
        # docs/protocol.md, "Version negotiation": the highest version both speak.
        version = min(hi, PROTOCOL_VERSION)
        if version < max(lo, MIN_PROTOCOL_VERSION):
            self._out.append(server_hello(0, bytes(NONCE_SIZE)))
            self._step(_Step.CLIENT_HELLO)  # so the failure below sends a REJECT after it
            raise ProtocolError(
                f"client speaks versions {lo}..{hi}, "
                f"server {MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION}",
                CloseCode.UNSUPPORTED_VERSION,
            )
        self.version = version
        self._hellos = (hello, server_hello(version, self._nonce))
        self._out.append(self._hellos[1])
        self._step(_Step.CLIENT_HELLO)

    def _read_request(self) -> None:
        expected: tuple[FrameType, ...] = (FrameType.SETUP, FrameType.RESUME)
        if self.route is not None:
            expected = (FrameType.RESUME,)  # docs/protocol.md, "Routing"
        elif self.version >= 3:
            expected = (FrameType.SETUP, FrameType.ROUTE, FrameType.RESUME)
        frame = take_control_frame(self._buf, expected, "client")
        if isinstance(frame, Route):
            self.route = frame.session_id
            frame = take_control_frame(self._buf, (FrameType.RESUME,), "client")
        if frame is None:
            return
        if isinstance(frame, Resume) and self.route not in (None, frame.session_id):
            raise ProtocolError("RESUME names another session than ROUTE")
        self._step(_Step.REQUEST)
        if isinstance(frame, Setup):
            check_window(frame.window, "client")
            # The key agreement runs here, on peer input, so that a bad key (one of
            # low order) fails the handshake instead of raising in accept_setup().
            keypair = crypto.KeyPair()
            try:
                self._shared = keypair.shared(frame.client_public)
            except ValueError:
                raise ProtocolError("client public key is invalid") from None
            self._keypair = keypair
            self.request = frame
            self._events.append(SetupRequested())
        elif isinstance(frame, Resume):
            check_window(frame.window, "client")
            self.request = frame
            self._events.append(ResumeRequested(frame.session_id))

    def _timed_out(self) -> None:
        self._refuse(CloseCode.HANDSHAKE_TIMEOUT, "link handshake timed out", "too slow")

    def _refuse(self, code: CloseCode, reason: str, told: str | None = None) -> None:
        if self.stage is not HandshakeStage.HELLO:  # a stranger gets no answer at all
            self._out.append(Reject(code, reason if told is None else told).serialize())
        self._fail(code, reason)

    # -- decisions ---------------------------------------------------------------

    def accept_setup(self, now: float, *, window: int | None = None) -> Session:
        """Create the session the SETUP asked for; it owns the link from now on.
        ``window``: its replay-buffer bound, when not the configured one (the server's
        memory budget grants it; the ACCEPT advertises it)."""
        setup, keypair = self.request, self._keypair
        if not isinstance(setup, Setup) or keypair is None or self.stage is not _S.DECIDING:
            raise InvalidState("accept_setup() without a pending SETUP")
        session_id = (
            self._random(SESSION_ID_SIZE) if self._session_ids is None else self._session_ids()
        )
        secret = crypto.derive_secret(
            self._shared, session_id, setup.client_public, keypair.public, self._nonce
        )
        self._keypair, self._shared = None, b""
        config = self.config
        if window is not None and window != config.window:
            config = replace(config, window=window)  # checked by SessionConfig
        accept = Accept(
            session_id, keypair.public, config.window, config.timeout_ms, config.keepalive_ms, b""
        )
        client_hello, hello = self._hellos
        confirmed = crypto.transcript(client_hello, setup.serialize(), hello, accept.fields())
        accept = replace(accept, confirm=crypto.accept_confirm(secret, confirmed))
        self._out.append(accept.serialize())
        preamble, leftover = self._hand_over()
        session = Session(Role.SERVER, config, now)
        session.establish(
            now,
            session_id=session_id,
            secret=secret,
            peer_window=setup.window,
            preamble=preamble,
            version=self.version,
        )
        session.receive_data(leftover)
        session.await_confirmation()  # bytes sent before the ACCEPT do not count
        return session

    def accept_resume(self, session: Session, now: float) -> bool:
        """Verify the resume against ``session``; only then move the session here.

        Returns False (and rejects the link) when the proof or the offsets are wrong;
        the session is not touched in that case.
        """
        request = self.request
        if not isinstance(request, Resume) or self.stage is not _S.DECIDING:
            raise InvalidState("accept_resume() without a pending RESUME")
        if session.closed or session.session_id != request.session_id:
            self.reject(CloseCode.UNKNOWN_SESSION, "no such session")
            return False
        secret = session.secret
        expected = crypto.client_resume_proof(
            secret,
            request.session_id,
            self._nonce,
            request.client_nonce,
            request.received,
            request.window,
            request.keepalive_ms,
        )
        if not crypto.verify(expected, request.proof):
            self.reject(CloseCode.BAD_PROOF, "resume proof did not verify")
            return False
        if not session.can_resume_from(request.received):
            self.reject(CloseCode.PROTOCOL_ERROR, "resume offset outside the replay buffer")
            return False
        received = session.resume_offset()
        proof = crypto.server_resume_proof(
            secret, request.session_id, self._nonce, request.client_nonce, received
        )
        self._out.append(Resumed(received, proof).serialize())
        preamble, leftover = self._hand_over()
        session.attach(
            now, peer_received=request.received, peer_window=request.window, preamble=preamble
        )
        session.receive_data(leftover)
        return True

    def reject(self, code: CloseCode, reason: str = "") -> None:
        """Refuse the request: the client is told ``code`` and ``reason``."""
        if not self.done:
            self._refuse(code, reason or code.name)


# What a client may read after the server's hello: an answer, or after a refusal's hello
# (version, zero nonce) only the REJECT that must follow it (docs/protocol.md, "Version
# negotiation").
_ANSWERS: tuple[FrameType, ...] = (FrameType.ACCEPT, FrameType.RESUMED, FrameType.REJECT)
_REFUSAL: tuple[FrameType, ...] = (FrameType.REJECT,)


class ClientHandshake(_Handshake):
    """Sans-I/O client handshake for one link of ``session`` (NEW: a setup; DETACHED: a
    resume). It decides on the server's answer itself and hands the link over."""

    _peer = "server"

    def __init__(
        self, session: Session, now: float, *, token: bytes = b"", random: Random = os.urandom
    ) -> None:
        """``token``: the client's credential, sent in SETUP (docs/protocol.md, "Setup")."""
        config = session.config
        if session.role is not Role.CLIENT:
            raise InvalidState("ClientHandshake is for client sessions")
        limit = config.handshake_timeout
        if session.state is SessionState.DETACHED:
            # A resume on a path that is up answers within a round trip or two; one that
            # stays mute as long as a dead link would is abandoned for a fresh connection
            # rather than waiting on TCP's retransmission backoff.
            limit = min(limit, max(KEEPALIVE_MISSES * config.keepalive, 1.0))
        elif session.state is not SessionState.NEW:
            raise InvalidState(f"ClientHandshake for a {session.state.value} session")
        super().__init__(config, now, limit, random)
        self.session = session
        self._server_nonce = b""
        self._client_nonce = b""
        # A setup offers every version we speak; a resume, the one its setup agreed, and
        # from version 3 names its session at once for a gateway (docs/protocol.md,
        # "Routing").
        self._versions = (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION)
        if session.state is SessionState.DETACHED:
            self._versions = (session.version, session.version)
        self._sent = [client_hello(*self._versions)]  # hello and SETUP: confirmed by ACCEPT
        self._keypair: crypto.KeyPair | None = None
        self._version = 0  # the server's choice
        self._refused = False  # its hello was a refusal's: only a REJECT may follow
        if session.state is SessionState.DETACHED and session.version >= 3:
            self._out.append(self._sent[0])
            self._out.append(Route(session.session_id).serialize())
            return
        if session.state is SessionState.NEW:
            self._keypair = crypto.KeyPair()
            setup = Setup(self._keypair.public, config.window, config.keepalive_ms, token)
            self._sent.append(setup.serialize())
        self._out += self._sent

    def _advance(self) -> None:
        session = self.session
        if session.closed:
            self._fail(CloseCode.NORMAL, "the session ended during the handshake")
            return
        if self.stage is HandshakeStage.HELLO:
            hello = self._hello_seen(SERVER_HELLO_SIZE)
            if hello is None:
                return
            version, self._server_nonce = parse_server_hello(hello)
            self._sent.append(hello)
            # A hello with a version and an all-zero nonce is a refusal's (a busy or TLS-only
            # server in clear text, a gateway), whatever the version: a server that answers
            # sends a fresh nonce. Its REJECT decides, so that a busy server's version-2
            # refusal does not end a session resumed at version 4 (docs/protocol.md,
            # "Version negotiation").
            self._refused = version != 0 and self._server_nonce == bytes(NONCE_SIZE)
            lo, hi = self._versions
            if not self._refused and not lo <= version <= hi:
                reason = f"server offers version {version}"
                session.rejected(CloseCode.UNSUPPORTED_VERSION, reason)
                raise ProtocolError(reason, CloseCode.UNSUPPORTED_VERSION)
            self._version = version
            self._step(_Step.SERVER_HELLO)
            if session.state is SessionState.DETACHED and not self._refused:
                self._send_resume()
        if self.stage is HandshakeStage.ANSWER:
            expected = _REFUSAL if self._refused else _ANSWERS
            frame = take_control_frame(self._buf, expected, "server")
            if isinstance(frame, Reject):
                self._rejected(frame)
            elif isinstance(frame, Accept):
                self._accepted(frame)
            elif isinstance(frame, Resumed):
                self._resumed(frame)

    def _send_resume(self) -> None:
        session, config = self.session, self.config
        self._client_nonce = self._random(NONCE_SIZE)
        received = session.resume_offset()
        proof = crypto.client_resume_proof(
            session.secret,
            session.session_id,
            self._server_nonce,
            self._client_nonce,
            received,
            config.window,
            config.keepalive_ms,
        )
        resume = Resume(
            session.session_id,
            self._client_nonce,
            received,
            config.window,
            config.keepalive_ms,
            proof,
        )
        self._out.append(resume.serialize())

    def _rejected(self, frame: Reject) -> None:
        session = self.session
        if frame.code in TRANSIENT_REJECTS:
            # The server is busy or going away: a later link may still set up or resume.
            what = "resume" if session.state is SessionState.DETACHED else "setup"
            why = f" ({frame.reason})" if frame.reason else ""
            raise ProtocolError(f"{what} refused for now: {frame.code.name}{why}", frame.code)
        reason = frame.reason or "rejected by the server"
        session.rejected(frame.code, reason)
        self._fail(frame.code, reason)

    def _accepted(self, frame: Accept) -> None:
        keypair = self._keypair
        if keypair is None:
            raise ProtocolError("ACCEPT answers a RESUME")
        try:
            shared = keypair.shared(frame.server_public)
        except ValueError:
            raise ProtocolError("server public key is invalid") from None
        secret = crypto.derive_secret(
            shared, frame.session_id, keypair.public, frame.server_public, self._server_nonce
        )
        client_hello, setup, hello = self._sent
        confirmed = crypto.transcript(client_hello, setup, hello, frame.fields())
        if not crypto.verify(crypto.accept_confirm(secret, confirmed), frame.confirm):
            raise ProtocolError("server key confirmation failed")
        check_window(frame.window, "server")
        self._keypair = None
        preamble, leftover = self._hand_over()
        self.session.establish(
            self._clock,
            session_id=frame.session_id,
            secret=secret,
            peer_window=frame.window,
            peer_timeout=frame.timeout_ms / 1000 if frame.timeout_ms > 0 else None,
            preamble=preamble,
            version=self._version,
        )
        self.session.receive_data(leftover)

    def _resumed(self, frame: Resumed) -> None:
        session = self.session
        if self._keypair is not None:
            raise ProtocolError("RESUMED answers a SETUP")
        expected = crypto.server_resume_proof(
            session.secret,
            session.session_id,
            self._server_nonce,
            self._client_nonce,
            frame.received,
        )
        if not crypto.verify(expected, frame.proof):
            raise ProtocolError("server resume proof failed")
        if not session.can_resume_from(frame.received):
            raise ProtocolError(f"server resumes from impossible offset {frame.received}")
        preamble, leftover = self._hand_over()
        session.attach(self._clock, peer_received=frame.received, preamble=preamble)
        session.receive_data(leftover)
