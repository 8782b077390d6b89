"""Routing a link to the server that holds its session (docs/protocol.md, "Routing").

Behind a gateway (or HAProxy) several servers share one address, and a resume must come
back to the server that holds the session. The server that creates a session therefore
puts its own identity in the session id, authenticated under a routing key the site's
servers and gateways share:

    session_id = server_id (u16) || nonce (8 random bytes) || tag (6 bytes)
    tag        = HMAC-SHA256(routing_key, server_id || nonce)[:6]

From protocol version 3 a resuming client sends a ROUTE frame carrying the session id
right behind its hello, so the id sits at a fixed offset of the link's first bytes
(:data:`SERVER_ID_AT`), readable before the server has said anything. A forged or
guessed id fails the tag and is refused by the gateway without reaching any server.

:class:`FirstBytes` is the gateway's sans-I/O reading of those first bytes: it decides
where a link goes (:class:`RouteTo`) or what it is told (:class:`Refuse`), and keeps
every byte it read for the driver to replay to the chosen server. Randomness comes in
as a parameter (CONTRIBUTING.md L1).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from hashlib import sha256

from ..errors import ProtocolError
from .codes import CloseCode
from .frames import (
    CLIENT_HELLO_SIZE,
    FRAME_HEADER_SIZE,
    PROTOCOL_VERSION,
    SERVER_HELLO_SIZE,
    SESSION_ID_SIZE,
    FrameType,
    check_magic,
    parse_server_hello,
)
from .handshake import Random, SessionIds, refusal, refusal_version

__all__ = [
    "MAX_SERVER_ID",
    "MIN_ROUTING_KEY",
    "ROUTED_PREFIX",
    "ROUTE_VERSION",
    "SERVER_ID_AT",
    "TAG_AT",
    "UNREACHABLE_VERSION",
    "FirstBytes",
    "Refuse",
    "RouteTo",
    "RoutingKey",
    "health_answer",
    "parse_routing_key",
    "session_ids",
]

# docs/protocol.md, "Routing"
ROUTE_VERSION = 3  # the first version whose resumes send ROUTE
UNREACHABLE_VERSION = 4  # the first that knows REJECT(SERVER_UNREACHABLE)
SERVER_ID_SIZE = 2
ROUTE_NONCE_SIZE = 8
TAG_SIZE = 6
MAX_SERVER_ID = 0xFFFF  # 0 is "no routing": a server without a routing key
MIN_ROUTING_KEY = 16  # bytes of key, after base64 decoding
FIRST_FRAME_AT = CLIENT_HELLO_SIZE  # 10: the first frame's header, after the client hello
SERVER_ID_AT = FIRST_FRAME_AT + FRAME_HEADER_SIZE  # 14: the ROUTE's session id starts here
TAG_AT = SERVER_ID_AT + SERVER_ID_SIZE + ROUTE_NONCE_SIZE  # 24
ROUTED_PREFIX = SERVER_ID_AT + SESSION_ID_SIZE  # 30 bytes decide a resume

_SERVER_ID = struct.Struct("!H")
_HEADER = struct.Struct("!I")


class RoutingKey:
    """The site's routing key: makes and checks the routing field of session ids."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_ROUTING_KEY:
            raise ValueError(f"a routing key needs at least {MIN_ROUTING_KEY} bytes")
        self._key = bytes(key)

    def tag(self, server_id: int, nonce: bytes) -> bytes:
        message = _SERVER_ID.pack(server_id) + nonce
        return hmac.new(self._key, message, sha256).digest()[:TAG_SIZE]

    def make(self, server_id: int, random: Random = os.urandom) -> bytes:
        """A new session id routed to ``server_id``."""
        if not 1 <= server_id <= MAX_SERVER_ID:
            raise ValueError(f"server id {server_id} outside 1..{MAX_SERVER_ID}")
        nonce = random(ROUTE_NONCE_SIZE)
        return _SERVER_ID.pack(server_id) + nonce + self.tag(server_id, nonce)

    def server_of(self, session_id: bytes) -> int | None:
        """The server id ``session_id`` names, or None when its tag does not verify."""
        if len(session_id) != SESSION_ID_SIZE:
            return None
        server_id: int = _SERVER_ID.unpack_from(session_id)[0]
        nonce = session_id[SERVER_ID_SIZE : SERVER_ID_SIZE + ROUTE_NONCE_SIZE]
        if server_id == 0 or not hmac.compare_digest(
            self.tag(server_id, nonce), session_id[SERVER_ID_SIZE + ROUTE_NONCE_SIZE :]
        ):
            return None
        return server_id


def parse_routing_key(text: bytes) -> RoutingKey:
    """The key from its file's contents: base64 (``openssl rand -base64 32``)."""
    try:
        key = base64.b64decode(b"".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a routing key file holds base64 (openssl rand -base64 32)") from None
    return RoutingKey(key)


def session_ids(server_id: int, key: RoutingKey | None, random: Random = os.urandom) -> SessionIds:
    """What a server makes its session ids with: routed ones with a key, else random."""
    if key is None:
        if server_id != 0:
            raise ValueError("a server id needs a routing key")
        return lambda: random(SESSION_ID_SIZE)
    key.make(server_id, random=lambda n: bytes(n))  # checks the id now, not at a setup
    return lambda: key.make(server_id, random)


@dataclass(frozen=True, slots=True)
class RouteTo:
    """Forward the link: to ``server_id`` (a resume), or, None, to the server the
    gateway picks for a new session (a setup)."""

    server_id: int | None


@dataclass(frozen=True, slots=True)
class Refuse:
    """Do not forward: write ``answer`` (nothing, to a stranger) and close. ``reason`` is
    for the gateway's own log only."""

    answer: bytes
    reason: str


class FirstBytes:
    """A gateway's reading of one client link's first bytes (docs/protocol.md, "Routing").

    Feed it what the client sends until :attr:`decision` is set; :meth:`first_bytes`
    returns everything read, to be replayed to the server. It reads at most
    :data:`ROUTED_PREFIX` bytes' worth of protocol; the rest is only kept.
    """

    __slots__ = ("_buf", "_key", "_known", "_version", "decision")

    def __init__(self, key: RoutingKey, known: Callable[[int], bool]) -> None:
        """``known(server_id)``: does this gateway forward to that server?"""
        self._key = key
        self._known = known
        self._buf = bytearray()
        self._version = PROTOCOL_VERSION  # what a refusal's hello says
        self.decision: RouteTo | Refuse | None = None

    def first_bytes(self) -> bytes:
        return bytes(self._buf)

    def refusal(self, code: CloseCode, reason: str) -> Refuse:
        """What a client the gateway cannot serve is told: a server hello (zero nonce) and
        ``REJECT(code, reason)``, as a server would."""
        return Refuse(refusal(self._version, code, reason), f"{code.name}: {reason}")

    def unreachable(self) -> Refuse | None:
        """What a resume is told when its server cannot be reached: from version 4
        ``REJECT(SERVER_UNREACHABLE)``, transient (the client tries again, and its end
        reason names the cause); None for an older client, which would read the code as a
        protocol error: its link is closed with nothing said."""
        if self._version < UNREACHABLE_VERSION:
            return None
        return self.refusal(CloseCode.SERVER_UNREACHABLE, "its server is out of reach")

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Never raises on peer input (CONTRIBUTING.md E3): bad input is a Refuse."""
        if self.decision is not None:
            self._buf += data
            return
        self._buf += data
        try:
            self.decision = self._decide()
        except ProtocolError as exc:
            self.decision = Refuse(b"", str(exc))  # a stranger gets no answer at all

    def _decide(self) -> RouteTo | Refuse | None:
        buf = self._buf
        check_magic(buf, "client")
        if len(buf) < CLIENT_HELLO_SIZE:
            return None
        # The version a server would choose (the server itself refuses a client with none
        # in common, so such a link is forwarded like any setup).
        self._version = refusal_version(bytes(buf[:CLIENT_HELLO_SIZE]))
        if len(buf) < SERVER_ID_AT:
            return None
        (word,) = _HEADER.unpack_from(buf, FIRST_FRAME_AT)
        ftype, length = word >> 24, word & 0xFFFFFF
        if ftype == FrameType.SETUP:
            return RouteTo(None)
        if ftype != FrameType.ROUTE or length != SESSION_ID_SIZE:
            return self.refusal(CloseCode.PROTOCOL_ERROR, "expected SETUP or ROUTE")
        if len(buf) < ROUTED_PREFIX:
            return None
        server_id = self._key.server_of(bytes(buf[SERVER_ID_AT:ROUTED_PREFIX]))
        if server_id is None or not self._known(server_id):
            return self.refusal(CloseCode.UNKNOWN_SESSION, "no such session")
        return RouteTo(server_id)


def health_answer(raw: bytes) -> bool | None:
    """A health check's reading of a server's answer to a client hello: True once it is a
    whole server hello with a version (the server is up and speaks tether), False for
    anything else, None while incomplete."""
    try:
        check_magic(raw, "server")
        if len(raw) < SERVER_HELLO_SIZE:
            return None
        version, _ = parse_server_hello(bytes(raw[:SERVER_HELLO_SIZE]))
    except ProtocolError:
        return False
    return version != 0
