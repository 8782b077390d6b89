"""Frame types, their limits and their wire encoding (docs/protocol.md, "Frames").

Every frame is ``type: u8 | length: u24 | payload``, big-endian, where ``length``
counts the payload only. One frozen dataclass per frame type, fields in wire
order. ``parse_control`` turns a complete control frame's payload into its
dataclass or raises :class:`~tether.errors.ProtocolError`; DATA is parsed by the
incremental reader in reader.py so that payloads are never buffered whole.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final, final

from ..errors import ProtocolError
from .codes import CloseCode

__all__ = [
    "ACK_WORD",
    "CLIENT_HELLO_SIZE",
    "DRAINING_VERSION",
    "FRAME_HEADER_SIZE",
    "MAGIC",
    "MAX_CONTROL_PAYLOAD",
    "MAX_DATA_CHUNK",
    "MAX_REASON_BYTES",
    "MAX_TOKEN_BYTES",
    "MAX_WINDOW",
    "MIN_PROTOCOL_VERSION",
    "MIN_WINDOW",
    "NONCE_SIZE",
    "NO_DEADLINE",
    "PROTOCOL_VERSION",
    "SERVER_HELLO_SIZE",
    "SESSION_ID_SIZE",
    "Accept",
    "Ack",
    "Close",
    "ControlFrame",
    "Data",
    "Draining",
    "Eof",
    "FrameType",
    "Ping",
    "Pong",
    "Reject",
    "Resume",
    "Resumed",
    "Route",
    "Setup",
    "ack_frame",
    "check_header",
    "check_magic",
    "check_window",
    "client_hello",
    "data_header",
    "parse_client_hello",
    "parse_control",
    "parse_server_hello",
    "ping_frame",
    "pong_frame",
    "server_hello",
]

# docs/protocol.md, "Link hello"
MAGIC: Final = b"\x89TETHER\n"  # 8 bytes: high bit and LF catch 7-bit and text mangling
PROTOCOL_VERSION: Final = 4  # 4: a draining server tells its sessions (DRAINING, "Drain")
# (3: a resume sends ROUTE with its hello, routing.py)
DRAINING_VERSION: Final = 4  # the first version whose sessions may receive DRAINING
# 2: SETUP carries a credential; ACCEPT confirms the whole transcript
MIN_PROTOCOL_VERSION: Final = 2
# docs/protocol.md, "Health probe": a client hello whose lowest version is 0 is a health
# check's (no client sends it); a draining server answers it with version 0, others as usual.
HEALTH_PROBE_VERSION: Final = 0
NONCE_SIZE: Final = 32
SESSION_ID_SIZE: Final = 16
KEY_SIZE: Final = 32
MAC_SIZE: Final = 32
CLIENT_HELLO_SIZE: Final = len(MAGIC) + 2  # magic | min_version u8 | max_version u8
SERVER_HELLO_SIZE: Final = len(MAGIC) + 1 + NONCE_SIZE  # magic | version u8 | server_nonce

# docs/protocol.md, "Limits"
FRAME_HEADER_SIZE: Final = 4
MAX_DATA_CHUNK: Final = 65536  # payload bytes in one DATA frame, after its offset
MAX_CONTROL_PAYLOAD: Final = 512  # every frame but DATA
MAX_REASON_BYTES: Final = 256  # UTF-8 reason text in CLOSE and REJECT
MAX_TOKEN_BYTES: Final = 255  # the client credential in SETUP (u8 length)
MIN_WINDOW: Final = 1024  # a replay buffer (window) announced in SETUP, ACCEPT or RESUME, bytes
MAX_WINDOW: Final = 1 << 30

_HEADER: Final = struct.Struct("!I")
_DATA_HEADER: Final = struct.Struct("!IQ")
_U64: Final = struct.Struct("!Q")
_U32: Final = struct.Struct("!I")
_SETUP: Final = struct.Struct(f"!{KEY_SIZE}sII")
_ACCEPT_FIELDS: Final = struct.Struct(f"!{SESSION_ID_SIZE}s{KEY_SIZE}sIII")  # what confirm covers
_ACCEPT: Final = struct.Struct(f"!{_ACCEPT_FIELDS.format[1:]}{MAC_SIZE}s")
_RESUME: Final = struct.Struct(f"!{SESSION_ID_SIZE}s{NONCE_SIZE}sQII{MAC_SIZE}s")
_RESUMED: Final = struct.Struct(f"!Q{MAC_SIZE}s")
_ROUTE: Final = struct.Struct(f"!{SESSION_ID_SIZE}s")
_CODE: Final = struct.Struct("!H")


class FrameType(enum.IntEnum):
    """The u8 type of a frame (docs/protocol.md, "Frames")."""

    SETUP = 0x01
    ACCEPT = 0x02
    RESUME = 0x03
    RESUMED = 0x04
    REJECT = 0x05
    ROUTE = 0x06
    DATA = 0x10
    ACK = 0x11
    EOF = 0x12
    PING = 0x13
    PONG = 0x14
    CLOSE = 0x15
    DRAINING = 0x16


def check_header(word: int) -> tuple[int, int, int]:
    """Split a frame header's u32 into (type, length, bytes to read before the frame can
    be handled: the offset too for DATA, the whole payload otherwise); raise
    ProtocolError when the length is outside its limit. The one place header errors are
    worded; ``FrameReader.feed`` inlines its two accepting cases for whole headers (the
    per-message path) and calls it for everything else."""
    ftype, length = word >> 24, word & 0xFFFFFF
    if ftype == FrameType.DATA:
        if not 8 < length <= 8 + MAX_DATA_CHUNK:
            raise ProtocolError(f"DATA frame length {length} out of range")
        return ftype, length, FRAME_HEADER_SIZE + 8
    if length > MAX_CONTROL_PAYLOAD:
        raise ProtocolError(f"control frame 0x{ftype:02x} of {length} bytes exceeds limit")
    return ftype, length, FRAME_HEADER_SIZE + length


def check_magic(seen: bytes | bytearray, peer: str) -> bool:
    """Raise ProtocolError unless ``seen`` is a prefix of MAGIC; True once it is all of it."""
    seen = bytes(seen[: len(MAGIC)])
    if seen != MAGIC[: len(seen)]:
        raise ProtocolError(f"the peer is not a tether {peer} (bad magic)")
    return len(seen) == len(MAGIC)


def check_window(window: int, peer: str) -> int:
    """A replay buffer size announced by the peer; raise ProtocolError when out of range."""
    if not MIN_WINDOW <= window <= MAX_WINDOW:
        raise ProtocolError(f"{peer} window {window} out of range")
    return window


def _frame(ftype: FrameType, payload: bytes) -> bytes:
    return _HEADER.pack((ftype << 24) | len(payload)) + payload


# Bound and computed once: compiled code (setup.py) then neither looks the method up nor
# shifts an enum member per frame (CONTRIBUTING.md D6).
_pack_data_header: Final = _DATA_HEADER.pack
_DATA_WORD: Final = int(FrameType.DATA) << 24


def data_header(offset: int, length: int) -> bytes:
    """Header of a DATA frame carrying ``length`` bytes at stream ``offset``."""
    return _pack_data_header(_DATA_WORD | (8 + length), offset)


_U64_FRAME: Final = struct.Struct("!IQ")  # a header and a u64 payload: ACK, PING, PONG
_pack_u64_frame: Final = _U64_FRAME.pack  # bound once, as _pack_data_header
# The whole header word of an ACK (its payload is exactly an offset): ack_frame writes it and
# the reader (reader.py) recognises a whole ACK by it.
ACK_WORD: Final = (FrameType.ACK << 24) | _U64.size


def ack_frame(offset: int) -> bytes:
    """``Ack(offset).serialize()`` in one call, without building the frame: the session
    piggybacks one on nearly every small message it answers (docs/protocol.md, "When ACKs
    are sent")."""
    return _pack_u64_frame(ACK_WORD, offset)


# An ACK and then a DATA header, packed in one call: what a small message carries when it
# piggybacks an acknowledgement (docs/protocol.md, "When ACKs are sent").
_pack_ack_data_header: Final = struct.Struct("!IQIQ").pack


def ack_and_data_header(acked: int, offset: int, length: int) -> bytes:
    """``ack_frame(acked) + data_header(offset, length)`` in one call: a struct's pack
    costs about as much for two frames' fields as for one's, and nearly every small
    message piggybacks an ACK (issue 12, B2)."""
    return _pack_ack_data_header(ACK_WORD, acked, _DATA_WORD | (8 + length), offset)


_PING_WORD: Final = (FrameType.PING << 24) | _U64.size
_PONG_WORD: Final = (FrameType.PONG << 24) | _U64.size


def ping_frame(token: int) -> bytes:
    """``Ping(token).serialize()`` in one call, without building the frame: a session's
    keepalive tick sends one (docs/protocol.md, "Keepalive")."""
    return _pack_u64_frame(_PING_WORD, token)


def pong_frame(token: int) -> bytes:
    """``Pong(token).serialize()`` in one call: the answer to every PING received."""
    return _pack_u64_frame(_PONG_WORD, token)


def _check_reason(reason: str) -> bytes:
    raw = reason.encode("utf-8", "replace")
    if len(raw) > MAX_REASON_BYTES:
        raw = raw[:MAX_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")
    return raw


@dataclass(frozen=True, slots=True)
class Setup:
    """Client asks for a new session. ``window`` is its replay buffer size in bytes;
    ``token`` its credential (empty when it has none)."""

    client_public: bytes
    window: int
    keepalive_ms: int
    token: bytes = b""

    def serialize(self) -> bytes:
        fixed = _SETUP.pack(self.client_public, self.window, self.keepalive_ms)
        return _frame(FrameType.SETUP, fixed + bytes((len(self.token),)) + self.token)


@dataclass(frozen=True, slots=True)
class Accept:
    """Server created the session; ``confirm`` proves it derived the same secret."""

    session_id: bytes
    server_public: bytes
    window: int
    timeout_ms: int
    keepalive_ms: int
    confirm: bytes

    def fields(self) -> bytes:
        """Everything but ``confirm``, as on the wire: part of what ``confirm`` covers."""
        return _ACCEPT_FIELDS.pack(
            self.session_id, self.server_public, self.window, self.timeout_ms, self.keepalive_ms
        )

    def serialize(self) -> bytes:
        return _frame(FrameType.ACCEPT, self.fields() + self.confirm)


@dataclass(frozen=True, slots=True)
class Resume:
    """Client asks to resume ``session_id``; ``proof`` is an HMAC over the server nonce."""

    session_id: bytes
    client_nonce: bytes
    received: int
    window: int
    keepalive_ms: int
    proof: bytes

    def serialize(self) -> bytes:
        return _frame(
            FrameType.RESUME,
            _RESUME.pack(
                self.session_id,
                self.client_nonce,
                self.received,
                self.window,
                self.keepalive_ms,
                self.proof,
            ),
        )


@dataclass(frozen=True, slots=True)
class Route:
    """Version 3: the session a resume is for, sent in the client's first bytes so that a
    gateway can route the link before the server speaks (docs/protocol.md, "Routing")."""

    session_id: bytes

    def serialize(self) -> bytes:
        return _frame(FrameType.ROUTE, self.session_id)


@dataclass(frozen=True, slots=True)
class Resumed:
    """Server accepted the resume; ``received`` is where the client must retransmit from."""

    received: int
    proof: bytes

    def serialize(self) -> bytes:
        return _frame(FrameType.RESUMED, _RESUMED.pack(self.received, self.proof))


@dataclass(frozen=True, slots=True)
class Reject:
    """Server refused the setup or the resume."""

    code: CloseCode
    reason: str = ""

    def serialize(self) -> bytes:
        return _frame(FrameType.REJECT, _CODE.pack(self.code) + _check_reason(self.reason))


@final
class Data:
    """Stream bytes starting at stream ``offset``.

    One of the three per-message value classes (with :class:`Ack` and
    ``events.DataReceived``) written out rather than frozen dataclasses (CONTRIBUTING.md
    F1, D6): compiled, a dataclass's generated ``__init__`` still runs interpreted. The
    same contract: read-only fields (``Final``: mypy, and the compiled class), equality and
    ``repr`` by field."""

    __slots__ = ("offset", "payload")

    def __init__(self, offset: int, payload: bytes | memoryview) -> None:
        self.offset: Final = offset
        self.payload: Final = payload

    def __repr__(self) -> str:
        return f"Data(offset={self.offset!r}, payload={self.payload!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Data):
            return NotImplemented
        return self.offset == other.offset and self.payload == other.payload

    def __hash__(self) -> int:
        return hash((self.offset, self.payload))

    def serialize(self) -> bytes:
        return data_header(self.offset, len(self.payload)) + self.payload


@final
class Ack:
    """Every stream byte (and the EOF) below ``offset`` has been received. Written out
    as :class:`Data` is."""

    __slots__ = ("offset",)

    def __init__(self, offset: int) -> None:
        self.offset: Final = offset

    def __repr__(self) -> str:
        return f"Ack(offset={self.offset!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ack):
            return NotImplemented
        return self.offset == other.offset

    def __hash__(self) -> int:
        return hash((self.offset,))

    def serialize(self) -> bytes:
        return _frame(FrameType.ACK, _U64.pack(self.offset))


@dataclass(frozen=True, slots=True)
class Eof:
    """The sender will send nothing more; the EOF itself occupies stream ``offset``."""

    offset: int

    def serialize(self) -> bytes:
        return _frame(FrameType.EOF, _U64.pack(self.offset))


@dataclass(frozen=True, slots=True)
class Ping:
    """Keepalive probe; the peer answers with a PONG carrying the same ``token``."""

    token: int

    def serialize(self) -> bytes:
        return _frame(FrameType.PING, _U64.pack(self.token))


@dataclass(frozen=True, slots=True)
class Pong:
    token: int

    def serialize(self) -> bytes:
        return _frame(FrameType.PONG, _U64.pack(self.token))


NO_DEADLINE: Final = 0xFFFFFFFF  # DRAINING: the server sets no time limit on its sessions


@dataclass(frozen=True, slots=True)
class Draining:
    """Version 4, server to client: the server is draining (docs/protocol.md, "Drain"). The
    session goes on; the server takes no new sessions, and ends this one within
    ``deadline_ms`` milliseconds if it has not ended by then (``NO_DEADLINE``: no limit)."""

    deadline_ms: int

    def serialize(self) -> bytes:
        return _frame(FrameType.DRAINING, _U32.pack(self.deadline_ms))


@dataclass(frozen=True, slots=True)
class Close:
    """The session ends now, in both directions, for ``code``."""

    code: CloseCode
    reason: str = ""

    def serialize(self) -> bytes:
        return _frame(FrameType.CLOSE, _CODE.pack(self.code) + _check_reason(self.reason))


ControlFrame = (
    Setup | Accept | Resume | Route | Resumed | Reject | Ack | Eof | Ping | Pong | Close | Draining
)

# Keyed by FrameType, looked up by the header's plain int (an IntEnum hashes and compares
# as its value): no enum conversion per frame on the per-message path.
_FIXED: Final[dict[int, struct.Struct]] = {  # Final: CONTRIBUTING.md D6
    FrameType.ACCEPT: _ACCEPT,
    FrameType.RESUME: _RESUME,
    FrameType.RESUMED: _RESUMED,
    FrameType.ROUTE: _ROUTE,
    FrameType.ACK: _U64,
    FrameType.EOF: _U64,
    FrameType.PING: _U64,
    FrameType.PONG: _U64,
    FrameType.DRAINING: _U32,
}
_CLASSES: Final[dict[int, type]] = {
    FrameType.ACCEPT: Accept,
    FrameType.RESUME: Resume,
    FrameType.RESUMED: Resumed,
    FrameType.ROUTE: Route,
    FrameType.ACK: Ack,
    FrameType.EOF: Eof,
    FrameType.PING: Ping,
    FrameType.PONG: Pong,
    FrameType.DRAINING: Draining,
}


def parse_control(ftype: int, payload: bytes) -> ControlFrame:
    """Parse a complete control frame payload; raise ProtocolError when malformed."""
    layout = _FIXED.get(ftype)
    if layout is not None:
        if len(payload) != layout.size:
            raise ProtocolError(
                f"{FrameType(ftype).name} frame of {len(payload)} bytes, expected {layout.size}"
            )
        frame: ControlFrame = _CLASSES[ftype](*layout.unpack(payload))
        return frame
    try:
        kind = FrameType(ftype)
    except ValueError:
        raise ProtocolError(f"unknown frame type 0x{ftype:02x}") from None
    if kind is FrameType.SETUP:
        if len(payload) <= _SETUP.size or len(payload) != _SETUP.size + 1 + payload[_SETUP.size]:
            raise ProtocolError(f"SETUP frame of {len(payload)} bytes")
        public, window, keepalive_ms = _SETUP.unpack_from(payload)
        return Setup(public, window, keepalive_ms, payload[_SETUP.size + 1 :])
    if kind in (FrameType.REJECT, FrameType.CLOSE):
        if len(payload) < 2 or len(payload) > 2 + MAX_REASON_BYTES:
            raise ProtocolError(f"{kind.name} frame of {len(payload)} bytes")
        (code,) = _CODE.unpack_from(payload)
        reason = payload[2:].decode("utf-8", "replace")
        cls = Reject if kind is FrameType.REJECT else Close
        return cls(CloseCode.from_wire(code), reason)
    raise ProtocolError(f"{kind.name} is not a control frame")


def client_hello(
    min_version: int = MIN_PROTOCOL_VERSION, max_version: int = PROTOCOL_VERSION
) -> bytes:
    return MAGIC + bytes((min_version, max_version))


def parse_client_hello(raw: bytes) -> tuple[int, int]:
    """Return (min_version, max_version); raise ProtocolError if not a tether hello."""
    if len(raw) != CLIENT_HELLO_SIZE or not check_magic(raw, "client"):
        raise ProtocolError("not a tether client hello")
    lo, hi = raw[len(MAGIC)], raw[len(MAGIC) + 1]
    return lo, hi


def server_hello(version: int, nonce: bytes) -> bytes:
    return MAGIC + bytes((version,)) + nonce


def parse_server_hello(raw: bytes) -> tuple[int, bytes]:
    """Return (version, server_nonce); raise ProtocolError if not a tether server."""
    if len(raw) != SERVER_HELLO_SIZE or not check_magic(raw, "server"):
        raise ProtocolError("not a tether server hello")
    return raw[len(MAGIC)], raw[len(MAGIC) + 1 :]
