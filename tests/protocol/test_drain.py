"""A draining router (docs/operations.md, "Drain"): a SETUP is refused GOING_AWAY, which
the client reads as transient; a resume of a session it holds is still admitted; a health
probe hears version 0 (docs/protocol.md, "Health probe")."""

from __future__ import annotations

from tether.protocol.codes import CloseCode
from tether.protocol.events import HandshakeFailed, SessionResumed
from tether.protocol.frames import (
    FRAME_HEADER_SIZE,
    HEALTH_PROBE_VERSION,
    MAGIC,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    SERVER_HELLO_SIZE,
    Reject,
    client_hello,
    parse_control,
)
from tether.protocol.handshake import TRANSIENT_REJECTS, ClientHandshake
from tether.protocol.router import Router
from tether.protocol.routing import health_answer
from tether.protocol.session import Session, SessionConfig

from .pair import Pair

CONFIG = SessionConfig(keepalive=3.0, timeout=60.0)


def test_a_draining_router_refuses_a_setup_going_away_and_the_client_may_retry() -> None:
    router = Router(CONFIG, max_sessions=4)
    router.draining = True
    hs = router.open_link(0.0)
    client = Session.client(CONFIG, 0.0)
    client_hs = ClientHandshake(client, 0.0)
    for chunk in client_hs.data_to_send():
        hs.receive_data(chunk)
    for chunk in hs.data_to_send():
        client_hs.receive_data(chunk)
    for chunk in client_hs.data_to_send():
        hs.receive_data(chunk)
    refusal = router.admit_setup(hs, "192.0.2.1")
    assert refusal is not None
    assert (refusal.code, refusal.reason) == (CloseCode.GOING_AWAY, "server draining")
    assert refusal.code in TRANSIENT_REJECTS
    assert router.admission.sessions == 0  # nothing held for it
    hs.reject(refusal.code, refusal.reason)
    for chunk in hs.data_to_send():
        client_hs.receive_data(chunk)
    failed = [e for e in iter(client_hs.next_event, None) if isinstance(e, HandshakeFailed)]
    assert failed and failed[0].code is CloseCode.GOING_AWAY
    assert "refused for now" in failed[0].reason
    assert not client.closed  # transient: the session is not ended, a later link retries


def test_a_draining_router_still_resumes_its_sessions() -> None:
    p = Pair(CONFIG)
    p.establish()
    p.router.draining = True
    p.cut()
    p.reconnect()
    p.transfer()
    assert p.server.statistics().resumes == 1
    assert p.app.of_type(SessionResumed)


def _probe_answer(draining: bool) -> tuple[bytes, list[object]]:
    router = Router(CONFIG, max_sessions=4)
    router.draining = draining
    hs = router.open_link(0.0)
    hs.receive_data(client_hello(HEALTH_PROBE_VERSION, PROTOCOL_VERSION))
    return b"".join(hs.data_to_send()), list(iter(hs.next_event, None))


def test_a_health_probe_is_answered_as_any_hello_while_serving() -> None:
    answer, events = _probe_answer(draining=False)
    assert health_answer(answer[:SERVER_HELLO_SIZE]) is True
    assert answer[len(MAGIC)] == PROTOCOL_VERSION and not events


def test_a_draining_server_answers_a_health_probe_version_0_and_going_away() -> None:
    answer, events = _probe_answer(draining=True)
    assert answer[:SERVER_HELLO_SIZE] == MAGIC + bytes(1 + NONCE_SIZE)
    assert health_answer(answer[:SERVER_HELLO_SIZE]) is False
    rest = answer[SERVER_HELLO_SIZE:]
    reject = parse_control(rest[0], rest[FRAME_HEADER_SIZE:])
    assert isinstance(reject, Reject)
    assert (reject.code, reject.reason) == (CloseCode.GOING_AWAY, "server draining")
    assert [type(e) for e in events] == [HandshakeFailed]


def test_a_draining_server_answers_a_clients_hello_as_usual() -> None:
    """Resumes must get through: only the probe's hello (lowest version 0) hears it."""
    router = Router(CONFIG, max_sessions=4)
    router.draining = True
    hs = router.open_link(0.0)
    hs.receive_data(client_hello())
    answer = b"".join(hs.data_to_send())
    assert len(answer) == SERVER_HELLO_SIZE and answer[len(MAGIC)] == PROTOCOL_VERSION
