"""The worked examples of docs/protocol.md are test vectors, and this file keeps them true.

:func:`run_examples` plays the examples' story through the real sans-I/O core
(``Session``, ``ClientHandshake``, ``Router`` and its ``ServerHandshake``) with scripted
randomness and the RFC 7748 section 6.1 X25519 keys, and records every buffer each side
writes; the clear-text ``REJECT(TLS_REQUIRED)`` comes from the server's listener
(aio/listener.py) over a socket pair. The tests then check three things agree, value by
value:

1. what the core wrote (and what ``tether.protocol.resume`` computes);
2. the same values built independently from the formulas and layouts in the document:
   ``struct`` for the frames, ``hashlib``/``hmac`` for the transcript and the MACs, and
   HKDF written out as in RFC 5869;
3. the text of docs/protocol.md: every hex value and every hex dump of the "Worked
   examples" section appears there verbatim.

``python tests/protocol/test_vectors.py`` (with ``PYTHONPATH=src``) prints the values and
the dumps, to paste into the document when the wire changes on purpose.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import socket
import ssl
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tether.aio.listener import LinkListener, _Once
from tether.protocol import resume
from tether.protocol.admission import HandshakeAdmission
from tether.protocol.codes import CloseCode
from tether.protocol.events import SessionEnded, SetupRequested
from tether.protocol.frames import MAGIC, Close, Ping, Pong, Route, client_hello
from tether.protocol.handshake import ClientHandshake, ServerHandshake
from tether.protocol.router import Router
from tether.protocol.routing import FirstBytes, RouteTo, RoutingKey, parse_routing_key
from tether.protocol.session import Session, SessionConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"

# The inputs, as the document lists them.
CLIENT_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
SERVER_PRIVATE = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
# RFC 7748 section 6.1 publishes these too: the X25519 implementation is checked against them.
RFC_CLIENT_PUBLIC = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
RFC_SERVER_PUBLIC = "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
RFC_SHARED = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
SERVER_NONCE_1 = bytes(range(0x00, 0x20))
SESSION_ID = bytes.fromhex("5e551010101010101010101010101010")
SERVER_NONCE_2 = bytes(range(0x40, 0x60))
CLIENT_NONCE_2 = bytes(range(0xA0, 0xC0))
# Shaped like the tokens ``tether token new`` makes: "tether_" and 43 URL-safe base64
# characters of 256 bits (here the bytes 0xc0 to 0xdf).
TOKEN = b"tether_" + base64.urlsafe_b64encode(bytes(range(0xC0, 0xE0))).rstrip(b"=")

# "Routing": a site's key (the bytes 0x60 to 0x7f), server 3, and the id's random nonce.
ROUTING_KEY = bytes(range(0x60, 0x80))
ROUTING_KEY_FILE = base64.b64encode(ROUTING_KEY) + b"\n"
SERVER_ID = 3
ROUTE_NONCE = bytes(range(0xC0, 0xC8))

WINDOW = 4 * 1024 * 1024
KEEPALIVE_MS = 3000
TIMEOUT_MS = 180_000

# The labels of docs/protocol.md, "Security", written out again on purpose.
SECRET_INFO = b"tether v2 session secret"
ACCEPT_LABEL = b"tether v2 accept"
CLIENT_LABEL = b"tether v2 resume client"
SERVER_LABEL = b"tether v2 resume server"


# -- the story, through the real core ---------------------------------------------------


@dataclass
class Wire:
    """Every buffer each side wrote, named as the document names them."""

    client: dict[str, bytes] = field(default_factory=dict)
    server: dict[str, bytes] = field(default_factory=dict)
    ended: dict[str, SessionEnded] = field(default_factory=dict)


class _Script:
    """A ``random`` callable that hands out the given values in order, checking each size."""

    def __init__(self, *values: bytes) -> None:
        self._values = list(values)

    def __call__(self, n: int) -> bytes:
        value = self._values.pop(0)
        assert len(value) == n, f"the core asked for {n} random bytes, the script has {value!r}"
        return value

    @property
    def used_up(self) -> bool:
        return not self._values


class _FixedKeys:
    """Stands in for ``X25519PrivateKey`` in resume.py: ``generate()`` gives the fixed keys
    in order (the client's first, at ClientHandshake; the server's at its SETUP)."""

    def __init__(self, *private: bytes) -> None:
        self._keys = [X25519PrivateKey.from_private_bytes(key) for key in private]

    def generate(self) -> X25519PrivateKey:
        return self._keys.pop(0)


@contextmanager
def fixed_keys(*private: bytes) -> Iterator[_FixedKeys]:
    keys = _FixedKeys(*private)
    with mock.patch.object(resume, "X25519PrivateKey", keys):
        yield keys


def _take(endpoint: Session | ClientHandshake | ServerHandshake) -> bytes:
    return b"".join(bytes(piece) for piece in endpoint.data_to_send())


def _drain(session: Session) -> list[object]:
    out = []
    while (event := session.next_event()) is not None:
        out.append(event)
    return out


def run_examples() -> Wire:
    """Play "Worked examples" through the core; return what went over the wire."""
    config = SessionConfig()  # the defaults: window 4 MiB, keepalive 3 s, timeout 180 s
    client_random = _Script(CLIENT_NONCE_2)
    server_random = _Script(SERVER_NONCE_1, SESSION_ID, SERVER_NONCE_2)
    wire = Wire()
    with fixed_keys(CLIENT_PRIVATE, SERVER_PRIVATE) as keys:
        # Setup, at t=0.
        client = Session.client(config, 0.0)
        chs = ClientHandshake(client, 0.0, token=TOKEN, random=client_random)
        wire.client["hello+setup"] = _take(chs)
        router = Router(
            config, max_sessions=1, authorize=lambda t: t == TOKEN, random=server_random
        )
        shs = router.open_link(0.0)
        shs.receive_data(wire.client["hello+setup"])
        wire.server["hello1"] = _take(shs)
        assert isinstance(shs.next_event(), SetupRequested)
        assert router.admit_setup(shs) is None
        server = router.accept_setup(shs, 0.0)
        wire.server["accept"] = _take(server)
        chs.receive_data(wire.server["hello1"] + wire.server["accept"])
        assert chs.done and not chs.failed and client.session_id == SESSION_ID
        assert not keys._keys, "both key pairs were made"

        # Data and acknowledgement.
        client.send(b"hello\n")
        wire.client["data hello"] = _take(client)
        server.receive_data(wire.client["data hello"], 0.1)
        server.send(b"hi!\n")
        wire.server["data hi+ack"] = _take(server)
        client.receive_data(wire.server["data hi+ack"], 0.2)
        assert _take(client) == b""  # nothing owed yet: 4 bytes are below the ACK threshold
        client.handle_timer(3.0)  # the client's first keepalive tick
        wire.client["ack 4"] = _take(client)

        # The link is lost; the application writes on; a resume on a new link.
        client.link_lost(4.0)
        server.link_lost(4.0)
        client.send(b"queued")
        assert _take(client) == b""
        chs = ClientHandshake(client, 5.0, random=client_random)
        wire.client["hello2"] = _take(chs)
        shs = router.open_link(5.0)
        shs.receive_data(wire.client["hello2"])
        wire.server["hello2"] = _take(shs)
        chs.receive_data(wire.server["hello2"])
        wire.client["resume"] = _take(chs)
        shs.receive_data(wire.client["resume"])
        assert router.resume(shs, 5.1) is server
        wire.server["resumed"] = _take(server)
        chs.receive_data(wire.server["resumed"])
        assert chs.done and not chs.failed
        wire.client["replay"] = _take(client)
        server.receive_data(wire.client["replay"], 5.2)
        assert _take(server) == b""  # 6 bytes are below the ACK threshold

        # Half-closes and normal completion.
        client.send_eof()
        wire.client["eof 12"] = _take(client)
        server.receive_data(wire.client["eof 12"], 5.3)
        wire.server["ack 13"] = _take(server)
        client.receive_data(wire.server["ack 13"], 5.4)
        server.send_eof()
        wire.server["eof 4"] = _take(server)
        client.receive_data(wire.server["eof 4"], 5.5)
        wire.client["ack 5"] = _take(client)
        server.receive_data(wire.client["ack 5"], 5.6)
        assert _take(server) == b""
    for name, session in (("client", client), ("server", server)):
        ended = [e for e in _drain(session) if isinstance(e, SessionEnded)]
        wire.ended[name] = ended[-1]
    assert client_random.used_up and server_random.used_up

    # Other frames (the serializers, and the driver's answers built from them).
    wire.client["ping"] = Ping(1).serialize()
    wire.server["pong"] = Pong(1).serialize()
    wire.client["close"] = Close(CloseCode.APPLICATION_RESET, "reset").serialize()
    router = Router(config, max_sessions=1, authorize=lambda t: t == TOKEN, random=bytes)
    hs = router.open_link(6.0)
    hs.receive_data(client_hello(1, 1))  # a version-1 client
    wire.server["version"] = _take(hs)
    # A setup without a token, to a server with a clients file.
    with fixed_keys(CLIENT_PRIVATE, SERVER_PRIVATE):
        chs = ClientHandshake(Session.client(config, 6.0), 6.0, random=_Script())
        hs = router.open_link(6.0)
        hs.receive_data(_take(chs))
        refusal = router.admit_setup(hs)
        assert refusal is not None and refusal.code is CloseCode.UNAUTHORIZED
        hs.reject(refusal.code, refusal.reason)
        wire.server["unauthorized"] = _take(hs)[41:]  # after its hello
    wire.server["tls required"] = listener_answer(MAGIC[0])  # a clear-text client
    # Routing: server 3 makes a session id; the client's first bytes on its resume.
    key = parse_routing_key(ROUTING_KEY_FILE)
    routed_id = key.make(SERVER_ID, random=_Script(ROUTE_NONCE))
    wire.client["routed resume"] = client_hello(4, 4) + Route(routed_id).serialize()
    return wire


def listener_answer(first: int) -> bytes:
    """What aio/listener.py of a TLS server writes, before any TLS, to a connection whose
    first byte is ``first`` (over a socket pair: no network, no event loop)."""
    ours, theirs = socket.socketpair()
    with theirs:
        listener = LinkListener(
            lambda: pytest.fail("no link may start"),
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER),
            handshake_timeout=10.0,
            admission=HandshakeAdmission(1, 1),
            refused=lambda source, why: None,
            spawn=lambda coroutine: pytest.fail("no task may start"),
        )
        listener._start(
            ours,
            "?",
            first,
            _Once(lambda: None),
            _Once(lambda: None),
            lambda: pytest.fail("no link may start"),
            lambda source, why: None,
        )  # closes ``ours``
        theirs.settimeout(5)
        answer = b""
        while chunk := theirs.recv(4096):
            answer += chunk
    return answer


# -- the same values from the document's formulas -----------------------------------------


def hexdump(data: bytes) -> str:
    """The document's dump format: offset, 16 bytes in hex, printable ASCII."""
    lines = []
    for at in range(0, len(data), 16):
        chunk = data[at : at + 16]
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        lines.append(f"{at:04x}  {' '.join(f'{b:02x}' for b in chunk):<47}  {text}".rstrip())
    return "\n".join(lines)


DOC_MAGIC = bytes.fromhex("89 54 45 54 48 45 52 0a")  # as the document writes it


def _u16(n: int) -> bytes:
    return struct.pack("!H", n)


def _u32(n: int) -> bytes:
    return struct.pack("!I", n)


def _u64(n: int) -> bytes:
    return struct.pack("!Q", n)


def _frame(ftype: int, payload: bytes) -> bytes:
    return _u32(ftype << 24 | len(payload)) + payload


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869, written out: extract, then expand."""
    prk = _hmac(salt, ikm)
    okm, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = _hmac(prk, block + info + bytes((counter,)))
        okm += block
    return okm[:length]


def _public(private: bytes) -> bytes:
    key = X25519PrivateKey.from_private_bytes(private).public_key()
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass(frozen=True)
class Expected:
    """The examples' values from the document's formulas, without tether's code."""

    values: dict[str, bytes]  # the named values the document lists
    client: dict[str, bytes]  # what each side writes, as Wire names it
    server: dict[str, bytes]


def expected() -> Expected:
    client_public, server_public = _public(CLIENT_PRIVATE), _public(SERVER_PRIVATE)
    shared = X25519PrivateKey.from_private_bytes(SERVER_PRIVATE).exchange(
        X25519PublicKey.from_public_bytes(client_public)
    )
    hello = DOC_MAGIC + bytes((2, 4))  # min_version, max_version
    setup_payload = client_public + _u32(WINDOW) + _u32(KEEPALIVE_MS)
    setup = _frame(0x01, setup_payload + bytes((len(TOKEN),)) + TOKEN)
    hello1 = DOC_MAGIC + bytes((4,)) + SERVER_NONCE_1
    accept_fields = (
        SESSION_ID + server_public + _u32(WINDOW) + _u32(TIMEOUT_MS) + _u32(KEEPALIVE_MS)
    )
    transcript = hashlib.sha256(
        b"".join(_u32(len(m)) + m for m in (hello, setup, hello1, accept_fields))
    ).digest()
    secret = hkdf_sha256(
        shared, SERVER_NONCE_1, SECRET_INFO + SESSION_ID + client_public + server_public
    )
    confirm = _hmac(secret, ACCEPT_LABEL + transcript)
    resume_fields = _u64(4) + _u32(WINDOW) + _u32(KEEPALIVE_MS)  # the client has 4 bytes
    client_proof = _hmac(
        secret, CLIENT_LABEL + SESSION_ID + SERVER_NONCE_2 + CLIENT_NONCE_2 + resume_fields
    )
    server_proof = _hmac(
        secret, SERVER_LABEL + SESSION_ID + SERVER_NONCE_2 + CLIENT_NONCE_2 + _u64(6)
    )
    no_nonce = bytes(32)
    route_input = _u16(SERVER_ID) + ROUTE_NONCE
    route_tag = _hmac(ROUTING_KEY, route_input)[:6]
    routed_id = route_input + route_tag
    values = {
        "client_public": client_public,
        "server_public": server_public,
        "shared": shared,
        "session_id": SESSION_ID,
        "secret": secret,
        "transcript": transcript,
        "confirm": confirm,
        "client proof": client_proof,
        "server proof": server_proof,
        "routing key": ROUTING_KEY,
        "route tag": route_tag,
        "routed id": routed_id,
    }
    client = {
        "hello+setup": hello + setup,
        "data hello": _frame(0x10, _u64(0) + b"hello\n"),
        "ack 4": _frame(0x11, _u64(4)),
        # A resume (from version 3) offers only its session's version and names the session.
        "hello2": DOC_MAGIC + bytes((4, 4)) + _frame(0x06, SESSION_ID),
        "resume": _frame(0x03, SESSION_ID + CLIENT_NONCE_2 + resume_fields + client_proof),
        "replay": _frame(0x10, _u64(6) + b"queued"),
        "eof 12": _frame(0x12, _u64(12)),
        "ack 5": _frame(0x11, _u64(5)),
        "ping": _frame(0x13, _u64(1)),
        "close": _frame(0x15, _u16(8) + b"reset"),
        "routed resume": DOC_MAGIC + bytes((4, 4)) + _frame(0x06, routed_id),
    }
    server = {
        "hello1": hello1,
        "accept": _frame(0x02, accept_fields + confirm),
        "data hi+ack": _frame(0x11, _u64(6)) + _frame(0x10, _u64(0) + b"hi!\n"),
        "hello2": DOC_MAGIC + bytes((4,)) + SERVER_NONCE_2,
        "resumed": _frame(0x04, _u64(6) + server_proof),
        "ack 13": _frame(0x11, _u64(13)),
        "eof 4": _frame(0x12, _u64(4)),
        "pong": _frame(0x14, _u64(1)),
        "version": DOC_MAGIC
        + bytes((0,))
        + no_nonce
        + _frame(0x05, _u16(2) + b"client speaks versions 1..1, server 2..4"),
        "unauthorized": _frame(0x05, _u16(16) + b"not authorized"),
        "tls required": DOC_MAGIC
        + bytes((2,))
        + no_nonce
        + _frame(0x05, _u16(17) + b"this server takes TLS links only"),
    }
    return Expected(values, client, server)


# -- the tests ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wire() -> Wire:
    return run_examples()


@pytest.fixture(scope="module")
def want() -> Expected:
    return expected()


@pytest.fixture(scope="module")
def examples() -> str:
    text = DOC.read_text(encoding="utf-8")
    start = text.index("\n## Worked examples\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def test_x25519_is_rfc_7748(want: Expected) -> None:
    assert want.values["client_public"].hex() == RFC_CLIENT_PUBLIC
    assert want.values["server_public"].hex() == RFC_SERVER_PUBLIC
    assert want.values["shared"].hex() == RFC_SHARED


def test_hkdf_is_rfc_5869() -> None:
    """The written-out HKDF against RFC 5869's test case 1."""
    okm = hkdf_sha256(bytes([0x0B] * 22), bytes(range(13)), bytes(range(0xF0, 0xFA)), length=42)
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_resume_module_computes_the_formulas(want: Expected) -> None:
    v = want.values
    secret = resume.derive_secret(
        v["shared"], SESSION_ID, v["client_public"], v["server_public"], SERVER_NONCE_1
    )
    assert secret == v["secret"]
    assert resume.accept_confirm(secret, v["transcript"]) == v["confirm"]
    client_proof = resume.client_resume_proof(
        secret, SESSION_ID, SERVER_NONCE_2, CLIENT_NONCE_2, 4, WINDOW, KEEPALIVE_MS
    )
    assert client_proof == v["client proof"]
    server_proof = resume.server_resume_proof(secret, SESSION_ID, SERVER_NONCE_2, CLIENT_NONCE_2, 6)
    assert server_proof == v["server proof"]


def test_transcript_is_the_setup_as_sent(wire: Wire, want: Expected) -> None:
    hello_setup, hello1 = wire.client["hello+setup"], wire.server["hello1"]
    accept = wire.server["accept"]
    messages = (hello_setup[:10], hello_setup[10:], hello1, accept[4:64])
    assert resume.transcript(*messages) == want.values["transcript"]


def test_transcript_layout_is_in_the_document(wire: Wire, examples: str) -> None:
    hello_setup = wire.client["hello+setup"]
    for name, size in (("m1", 10), ("m2", len(hello_setup) - 10), ("m3", 41), ("m4", 60)):
        prefix = " ".join(f"{b:02x}" for b in _u32(size))
        assert f"{prefix}  {name}: " in examples, name


@pytest.mark.parametrize("side", ["client", "server"])
def test_core_writes_what_the_formulas_give(wire: Wire, want: Expected, side: str) -> None:
    got, exp = getattr(wire, side), getattr(want, side)
    assert got.keys() == exp.keys()
    for name in exp:
        assert got[name].hex() == exp[name].hex(), f"{side} {name}"


def test_story_ends_normally(wire: Wire) -> None:
    assert wire.ended["client"].code is CloseCode.NORMAL
    assert wire.ended["server"].code is CloseCode.NORMAL


def test_values_are_in_the_document(want: Expected, examples: str) -> None:
    for label, value in [
        ("client private key", CLIENT_PRIVATE),
        ("server private key", SERVER_PRIVATE),
        *want.values.items(),
    ]:
        line = re.compile(rf"^{re.escape(label)} +{value.hex()}\b", re.MULTILINE)
        assert line.search(examples), f"{label} {value.hex()} is not in the worked examples"
    assert re.search(rf"^token +{TOKEN.decode()}\b", examples, re.MULTILINE)


@pytest.mark.parametrize("side", ["client", "server"])
def test_dumps_are_in_the_document(wire: Wire, side: str, examples: str) -> None:
    for name, data in getattr(wire, side).items():
        dump = hexdump(data)
        assert f"```\n{dump}\n```" in examples, f"{side} {name}:\n{dump}"


def test_gateway_routes_the_example(wire: Wire, want: Expected) -> None:
    """The routed resume's first bytes, read by a gateway's FirstBytes, go to server 3,
    in one piece or byte by byte; the id's tag checks under the key only."""
    first = wire.client["routed resume"]
    assert first[14:16] == _u16(SERVER_ID) and first[14:30] == want.values["routed id"]
    for pieces in ([first], [first[i : i + 1] for i in range(len(first))]):
        reader = FirstBytes(RoutingKey(ROUTING_KEY), known=lambda server: server == SERVER_ID)
        for piece in pieces:
            reader.receive_data(piece)
        assert reader.decision == RouteTo(SERVER_ID)
        assert reader.first_bytes() == first
    assert RoutingKey(bytes(32)).server_of(want.values["routed id"]) is None


def test_document_states_the_v2_labels() -> None:
    text = DOC.read_text(encoding="utf-8")
    for label in (SECRET_INFO, ACCEPT_LABEL, CLIENT_LABEL, SERVER_LABEL):
        assert f'"{label.decode()}"' in text
    assert "tether v1" not in text


if __name__ == "__main__":
    w, e = run_examples(), expected()
    for label, value in e.values.items():
        print(f"{label:<20} {value.hex()}")
    print(f"{'token':<20} {TOKEN.decode()}")
    for side in ("client", "server"):
        for name, data in getattr(w, side).items():
            print(f"\n{side} {name} ({len(data)} bytes):\n```\n{hexdump(data)}\n```")
