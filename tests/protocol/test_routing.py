"""The routing field of session ids and a gateway's reading of a link's first bytes
(docs/protocol.md, "Routing"; protocol/routing.py). No event loop, no sockets (T1)."""

from __future__ import annotations

import base64
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.protocol.codes import CloseCode
from tether.protocol.events import HandshakeFailed, ResumeRequested, SessionEnded
from tether.protocol.frames import (
    NONCE_SIZE,
    PROTOCOL_VERSION,
    Route,
    Setup,
    client_hello,
    parse_server_hello,
    server_hello,
)
from tether.protocol.handshake import ClientHandshake
from tether.protocol.router import Router
from tether.protocol.routing import (
    ROUTED_PREFIX,
    SERVER_ID_AT,
    TAG_AT,
    FirstBytes,
    Refuse,
    RouteTo,
    RoutingKey,
    health_answer,
    parse_routing_key,
    session_ids,
)
from tether.protocol.session import Session, SessionConfig

KEY = RoutingKey(bytes(range(32)))


def _take(endpoint: object) -> bytes:
    return b"".join(bytes(p) for p in endpoint.data_to_send())  # type: ignore[attr-defined]


def test_ids_carry_their_server_and_verify() -> None:
    for server_id in (1, 2, 513, 0xFFFF):
        sid = KEY.make(server_id)
        assert len(sid) == 16 and int.from_bytes(sid[:2], "big") == server_id
        assert KEY.server_of(sid) == server_id
    assert KEY.make(7) != KEY.make(7)  # random nonces


def test_any_changed_byte_or_another_key_fails_the_tag() -> None:
    sid = KEY.make(5)
    for at in range(16):
        forged = bytearray(sid)
        forged[at] ^= 0x01
        assert KEY.server_of(bytes(forged)) is None, at
    assert RoutingKey(bytes(16) + b"x").server_of(sid) is None
    assert KEY.server_of(sid[:15]) is None


def test_server_id_zero_is_never_routed() -> None:
    nonce = bytes(8)
    unrouted = bytes(2) + nonce + KEY.tag(0, nonce)
    assert KEY.server_of(unrouted) is None
    with pytest.raises(ValueError, match="server id 0"):
        KEY.make(0)
    with pytest.raises(ValueError, match="server id 65536"):
        KEY.make(0x10000)


def test_key_file_is_base64_of_enough_bytes() -> None:
    key = parse_routing_key(base64.b64encode(bytes(range(32))) + b"\n")
    assert key.server_of(KEY.make(9)) == 9
    with pytest.raises(ValueError, match="base64"):
        parse_routing_key(b"not base64 !!")
    with pytest.raises(ValueError, match="at least 16"):
        parse_routing_key(base64.b64encode(bytes(15)))


def test_session_ids_without_a_key_are_random() -> None:
    make = session_ids(0, None, random=lambda n: b"\x42" * n)
    assert make() == b"\x42" * 16
    with pytest.raises(ValueError, match="needs a routing key"):
        session_ids(3, None)
    with pytest.raises(ValueError):
        session_ids(0, KEY)  # a key needs a server id
    assert KEY.server_of(session_ids(4, KEY)()) == 4


def _setup(router: Router, config: SessionConfig) -> tuple[Session, Session]:
    client = Session.client(config, 0.0)
    chs = ClientHandshake(client, 0.0)
    shs = router.open_link(0.0)
    shs.receive_data(_take(chs))
    shs.next_event()
    assert router.admit_setup(shs) is None
    server = router.accept_setup(shs, 0.0)
    chs.receive_data(_take(shs) + _take(server))
    assert chs.done and not chs.failed
    return client, server


def test_a_routed_server_and_a_routed_resume_end_to_end() -> None:
    config = SessionConfig()
    router = Router(config, max_sessions=4, session_ids=session_ids(3, KEY))
    client, server = _setup(router, config)
    assert client.version == server.version == PROTOCOL_VERSION
    assert KEY.server_of(client.session_id) == 3
    client.send(b"before")
    server.receive_data(_take(client), 0.1)
    client.link_lost(1.0)
    server.link_lost(1.0)
    chs = ClientHandshake(client, 2.0)
    first = _take(chs)
    assert len(first) == ROUTED_PREFIX
    assert first == client_hello(4, 4) + Route(client.session_id).serialize()
    assert first[SERVER_ID_AT:TAG_AT][:2] == b"\x00\x03"
    gateway = FirstBytes(KEY, known=lambda n: n == 3)
    gateway.receive_data(first)
    assert gateway.decision == RouteTo(3)
    shs = router.open_link(2.0)
    shs.receive_data(gateway.first_bytes())  # replayed by the gateway
    chs.receive_data(_take(shs))
    shs.receive_data(_take(chs))
    assert isinstance(shs.next_event(), ResumeRequested)
    assert router.resume(shs, 2.1) is server
    chs.receive_data(_take(server))
    assert chs.done and not chs.failed


def test_a_v2_session_resumes_without_route() -> None:
    config = SessionConfig()
    router = Router(config, max_sessions=4)
    client, server = _setup(router, config)
    client.version = 2  # as a setup with a version-2 server leaves it
    client.link_lost(1.0)
    server.link_lost(1.0)
    chs = ClientHandshake(client, 2.0)
    assert _take(chs) == client_hello(2, 2)


def test_a_v2_server_sets_up_a_v2_session() -> None:
    client = Session.client(SessionConfig(), 0.0)
    chs = ClientHandshake(client, 0.0)
    assert _take(chs).startswith(client_hello(2, PROTOCOL_VERSION))
    chs.receive_data(server_hello(2, os.urandom(NONCE_SIZE)))
    assert not chs.failed  # version 2 is in the offer; ACCEPT would follow


def test_a_v3_session_resumes_with_route() -> None:
    """A version-3 session (set up with a version-3 server) still names itself in ROUTE."""
    config = SessionConfig()
    router = Router(config, max_sessions=4, session_ids=session_ids(3, KEY))
    client, server = _setup(router, config)
    client.version = server.version = 3
    client.link_lost(1.0)
    server.link_lost(1.0)
    chs = ClientHandshake(client, 2.0)
    assert _take(chs) == client_hello(3, 3) + Route(client.session_id).serialize()


def test_resume_must_name_the_routed_session() -> None:
    config = SessionConfig()
    router = Router(config, max_sessions=4, session_ids=session_ids(3, KEY))
    client, server = _setup(router, config)
    client.link_lost(1.0)
    server.link_lost(1.0)
    chs = ClientHandshake(client, 2.0)
    hello = _take(chs)[:10]
    shs = router.open_link(2.0)
    shs.receive_data(hello + Route(KEY.make(3)).serialize())  # another session
    chs.receive_data(_take(shs))
    shs.receive_data(_take(chs))
    failed = shs.next_event()
    assert isinstance(failed, HandshakeFailed) and failed.code is CloseCode.PROTOCOL_ERROR


def test_gateway_reads_a_setup_at_once() -> None:
    reader = FirstBytes(KEY, known=lambda n: True)
    first = client_hello() + Setup(bytes(32), 65536, 3000).serialize()
    reader.receive_data(first[:13])
    assert reader.decision is None
    reader.receive_data(first[13:])
    assert reader.decision == RouteTo(None)
    assert reader.first_bytes() == first


@pytest.mark.parametrize(
    ("first", "answered"),
    [
        (b"GET / HTTP/1.1\r\n", False),  # not tether: nothing said
        (b"\x89TETHER\n\x02\x03\x15\x00\x00\x02\x00\x00", True),  # CLOSE first: refused
        (b"\x89TETHER\n\x03\x03\x06\x00\x00\x10" + bytes(16), True),  # bad tag
        (b"\x89TETHER\n\x03\x03\x06\x00\x00\x08" + bytes(8), True),  # bad ROUTE length
    ],
)
def test_gateway_refuses_what_it_cannot_route(first: bytes, answered: bool) -> None:
    reader = FirstBytes(KEY, known=lambda n: True)
    reader.receive_data(first)
    decision = reader.decision
    assert isinstance(decision, Refuse)
    assert bool(decision.answer) is answered


def test_unknown_server_is_unknown_session_to_the_client() -> None:
    config = SessionConfig()
    router = Router(config, max_sessions=4, session_ids=session_ids(9, KEY))
    client, _ = _setup(router, config)
    client.link_lost(1.0)
    chs = ClientHandshake(client, 2.0)
    reader = FirstBytes(KEY, known=lambda n: n != 9)  # a gateway that does not know 9
    reader.receive_data(_take(chs))
    decision = reader.decision
    assert isinstance(decision, Refuse)
    assert parse_server_hello(decision.answer[:41])[0] == PROTOCOL_VERSION
    chs.receive_data(decision.answer)
    ended = [e for e in iter(client.next_event, None) if isinstance(e, SessionEnded)]
    assert ended and ended[-1].code is CloseCode.UNKNOWN_SESSION


def test_health_answer() -> None:
    assert health_answer(server_hello(3, bytes(32))[:20]) is None
    assert health_answer(server_hello(3, os.urandom(32))) is True
    assert health_answer(server_hello(0, bytes(32))) is False
    assert health_answer(b"SSH-2.0-OpenSSH") is False


@given(st.lists(st.binary(max_size=40), max_size=6), st.booleans())
def test_gateway_reader_never_raises(chunks: list[bytes], routed: bool) -> None:
    """Any bytes (after a real hello and ROUTE prefix, or not): a decision or none, never an
    exception (CONTRIBUTING.md E3, T4), and every byte kept for the replay."""
    prefix = client_hello(3, 3) + Route(KEY.make(2)).serialize()[:5] if routed else b""
    reader = FirstBytes(KEY, known=lambda n: n == 2)
    for chunk in [prefix, *chunks]:
        reader.receive_data(chunk)
    assert reader.decision is None or isinstance(reader.decision, RouteTo | Refuse)
    assert reader.first_bytes() == b"".join([prefix, *chunks])
