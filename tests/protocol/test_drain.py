"""A draining router (docs/operations.md, "Drain"): a SETUP is refused GOING_AWAY, which
the client reads as transient; a resume of a session it holds is still admitted."""

from __future__ import annotations

from tether.protocol.codes import CloseCode
from tether.protocol.events import HandshakeFailed, SessionResumed
from tether.protocol.handshake import TRANSIENT_REJECTS, ClientHandshake
from tether.protocol.router import Router
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
