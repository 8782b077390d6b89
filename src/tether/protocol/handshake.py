"""The server's side of a link handshake (docs/protocol.md, "Link handshake").

One :class:`ServerHandshake` per accepted transport. It reads the client hello,
answers with the server hello and a fresh nonce, reads one SETUP or RESUME frame
and reports it as an event. The driver then decides only what it must: for a
SETUP, whether the backend could be reached (``accept_setup`` or ``reject``);
for a RESUME, which session the id names (``accept_resume`` or ``reject``).
``accept_resume`` verifies the proof in constant time *before* it touches the
session; a wrong proof leaves the live session and its link exactly as they were.
"""

from __future__ import annotations

import os
import struct

from ..errors import InvalidState, ProtocolError
from . import resume as crypto
from .codes import CloseCode
from .events import Event, HandshakeFailed, ResumeRequested, SetupRequested
from .frames import (
    CLIENT_HELLO_SIZE,
    FRAME_HEADER_SIZE,
    MAGIC,
    MAX_CONTROL_PAYLOAD,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    SESSION_ID_SIZE,
    Accept,
    FrameType,
    Reject,
    Resume,
    Resumed,
    Setup,
    parse_client_hello,
    parse_control,
    server_hello,
)
from .session import MAX_WINDOW, Random, Session, SessionConfig

__all__ = ["ServerHandshake"]

_HEADER = struct.Struct("!I")
MAX_EARLY_BYTES = 64 * 1024  # bytes a client may send past its request before the answer


class ServerHandshake:
    """Sans-I/O server handshake for one link."""

    def __init__(self, config: SessionConfig, now: float, *, random: Random = os.urandom) -> None:
        self.config = config
        self._random = random
        self._nonce = random(NONCE_SIZE)
        self._buf = bytearray()
        self._stage = "hello"  # hello -> request -> deciding -> done | failed
        self._deadline: float | None = now + config.handshake_timeout
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self._setup: Setup | None = None
        self._keypair: crypto.KeyPair | None = None
        self._shared = b""  # X25519 result, computed when the SETUP arrives
        self._resume: Resume | None = None

    @property
    def done(self) -> bool:
        return self._stage in ("done", "failed")

    @property
    def failed(self) -> bool:
        return self._stage == "failed"

    def data_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> Event | None:
        return self._events.pop(0) if self._events else None

    def next_timer(self) -> float | None:
        return self._deadline

    def handle_timer(self, now: float) -> None:
        if self._deadline is not None and now >= self._deadline and not self.done:
            if self._stage != "hello":
                self._out.append(Reject(CloseCode.HANDSHAKE_TIMEOUT, "too slow").serialize())
            self._fail(CloseCode.HANDSHAKE_TIMEOUT, "link handshake timed out")

    def leftover(self) -> bytes:
        """Bytes that arrived after the request: the first bytes of the session's link."""
        rest, self._buf = bytes(self._buf), bytearray()
        return rest

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.done:
            return
        self._buf += data
        try:
            if self._stage == "hello":
                self._read_hello()
            if self._stage == "request":
                self._read_request()
            if self._stage == "deciding" and len(self._buf) > MAX_EARLY_BYTES:
                raise ProtocolError("client sent too much before the handshake finished")
        except ProtocolError as exc:
            if self._stage != "hello":
                self._out.append(Reject(exc.code, str(exc)).serialize())
            self._fail(exc.code, str(exc))

    def _read_hello(self) -> None:
        seen = bytes(self._buf[: len(MAGIC)])
        if seen != MAGIC[: len(seen)]:
            raise ProtocolError("not a tether client (bad magic)")
        if len(self._buf) < CLIENT_HELLO_SIZE:
            return
        lo, hi = parse_client_hello(bytes(self._buf[:CLIENT_HELLO_SIZE]))
        del self._buf[:CLIENT_HELLO_SIZE]
        if not lo <= PROTOCOL_VERSION <= hi:
            self._out.append(server_hello(0, bytes(NONCE_SIZE)))
            self._stage = "request"  # so the failure below sends a REJECT after the hello
            raise ProtocolError(
                f"client speaks versions {lo}..{hi}, server {PROTOCOL_VERSION}",
                CloseCode.UNSUPPORTED_VERSION,
            )
        self._out.append(server_hello(PROTOCOL_VERSION, self._nonce))
        self._stage = "request"

    def _read_request(self) -> None:
        if len(self._buf) < FRAME_HEADER_SIZE:
            return
        (word,) = _HEADER.unpack_from(self._buf)
        ftype, length = word >> 24, word & 0xFFFFFF
        if ftype not in (FrameType.SETUP, FrameType.RESUME):
            raise ProtocolError(f"expected SETUP or RESUME, got frame type 0x{ftype:02x}")
        if length > MAX_CONTROL_PAYLOAD:
            raise ProtocolError(f"request of {length} bytes exceeds the limit")
        if len(self._buf) < FRAME_HEADER_SIZE + length:
            return
        payload = bytes(self._buf[FRAME_HEADER_SIZE : FRAME_HEADER_SIZE + length])
        del self._buf[: FRAME_HEADER_SIZE + length]
        frame = parse_control(ftype, payload)
        self._stage = "deciding"
        if isinstance(frame, Setup):
            if not 1024 <= frame.window <= MAX_WINDOW:
                raise ProtocolError(f"client window {frame.window} out of range")
            # The key agreement runs here, on peer input, so that a bad key (one of
            # low order) fails the handshake instead of raising in accept_setup().
            keypair = crypto.KeyPair()
            try:
                self._shared = keypair.shared(frame.client_public)
            except ValueError:
                raise ProtocolError("client public key is invalid") from None
            self._keypair = keypair
            self._setup = frame
            self._events.append(SetupRequested())
        elif isinstance(frame, Resume):
            if not 1024 <= frame.window <= MAX_WINDOW:
                raise ProtocolError(f"client window {frame.window} out of range")
            self._resume = frame
            self._events.append(ResumeRequested(frame.session_id))

    # -- decisions ---------------------------------------------------------------

    def accept_setup(self, now: float) -> Session:
        """Create the session the SETUP asked for; its link is established at once."""
        setup, keypair = self._setup, self._keypair
        if setup is None or keypair is None or self._stage != "deciding":
            raise InvalidState("accept_setup() without a pending SETUP")
        session_id = self._random(SESSION_ID_SIZE)
        secret = crypto.derive_secret(
            self._shared, session_id, setup.client_public, keypair.public, self._nonce
        )
        self._keypair, self._shared = None, b""
        accept = Accept(
            session_id,
            keypair.public,
            self.config.window,
            round(self.config.timeout * 1000),
            self.config.keepalive_ms,
            crypto.accept_confirm(secret, session_id, setup.client_public),
        )
        self._out.append(accept.serialize())
        self._finish()
        return Session.server(
            self.config,
            now,
            session_id=session_id,
            secret=secret,
            peer_window=setup.window,
            random=self._random,
        )

    def accept_resume(self, session: Session, now: float) -> bool:
        """Verify the resume against ``session``; only then move the session here.

        Returns False (and rejects the link) when the proof or the offsets are wrong;
        the session is not touched in that case.
        """
        request = self._resume
        if request is None or self._stage != "deciding":
            raise InvalidState("accept_resume() without a pending RESUME")
        if session.closed or session.session_id != request.session_id:
            self.reject(CloseCode.UNKNOWN_SESSION, "no such session")
            return False
        received, secret = session.resume_fields()
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
        if not session.check_peer_received(request.received):
            self.reject(CloseCode.PROTOCOL_ERROR, "resume offset outside the replay buffer")
            return False
        proof = crypto.server_resume_proof(
            secret, request.session_id, self._nonce, request.client_nonce, received
        )
        self._out.append(Resumed(received, proof).serialize())
        self._finish()
        session.note_peer_window(request.window)
        session.attach(now, request.received)
        return True

    def reject(self, code: CloseCode, reason: str = "") -> None:
        if self.done:
            return
        self._out.append(Reject(code, reason).serialize())
        self._fail(code, reason or code.name)

    def _finish(self) -> None:
        self._stage = "done"
        self._deadline = None

    def _fail(self, code: CloseCode, reason: str) -> None:
        self._stage = "failed"
        self._deadline = None
        self._events.append(HandshakeFailed(code, reason))
