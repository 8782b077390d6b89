"""The session state machine and the server handshake, driven through a fake link
and a fake clock (tests/protocol/pair.py). No event loop anywhere."""

from __future__ import annotations

import os

import pytest

from tether.errors import InvalidState
from tether.protocol.codes import CloseCode
from tether.protocol.events import (
    DataReceived,
    EofReceived,
    HandshakeFailed,
    LinkLost,
    ResumeRequested,
    SessionEnded,
    SessionEstablished,
    SessionResumed,
    SetupRequested,
)
from tether.protocol.frames import (
    CLIENT_HELLO_SIZE,
    MAX_DATA_CHUNK,
    MIN_PROTOCOL_VERSION,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    Data,
    Eof,
    FrameType,
    Ping,
    Reject,
    Resume,
    Resumed,
    Route,
    Setup,
    client_hello,
    server_hello,
)
from tether.protocol.handshake import (
    MAX_EARLY_BYTES,
    ClientHandshake,
    HandshakeStage,
    ServerHandshake,
    refusal,
    refusal_version,
)
from tether.protocol.reader import FrameReader
from tether.protocol.session import (
    SERVER_TICK_LAG,
    Session,
    SessionConfig,
    SessionState,
)

from .pair import Pair

KEEPALIVE = 3.0
TIMEOUT = 60.0
CONFIG = SessionConfig(window=256 * 1024, keepalive=KEEPALIVE, timeout=TIMEOUT)


def pattern(n: int, seed: int = 0) -> bytes:
    """``n`` bytes that differ at every offset (a shifted or duplicated byte shows)."""
    block = bytes((i * 7 + seed) % 251 for i in range(251))
    return (block * (n // 251 + 1))[:n]


@pytest.fixture
def pair() -> Pair:
    p = Pair(CONFIG)
    p.establish()
    return p


def frames_sent(chunks: list[bytes]) -> list[object]:
    reader = FrameReader()
    return [frame for chunk in chunks for frame in reader.feed(chunk)]


# -- setup ------------------------------------------------------------------------------------


def test_setup() -> None:
    p = Pair(CONFIG)
    assert p.client.state is SessionState.NEW
    link = p.connect()
    assert p.client_handshake is not None
    assert p.client_handshake.stage is HandshakeStage.HELLO
    p.transfer()
    (established,) = p.app.of_type(SessionEstablished)
    assert isinstance(established, SessionEstablished)
    assert len(established.session_id) == 16
    assert p.client.session_id == p.server.session_id == established.session_id
    assert p.client.secret == p.server.secret and len(p.client.secret) == 32
    assert p.client.state is p.server.state is SessionState.ATTACHED
    assert p.client.state is p.server.state is SessionState.ATTACHED
    assert p.server_link(p.client.session_id) is link
    assert p.client.next_timer() == CONFIG.keepalive  # keepalive only: no expiry, no handshake
    # The server's ticks lag half an interval so that an idle link needs the client's only.
    assert p.server.next_timer() == CONFIG.keepalive * SERVER_TICK_LAG


def test_the_secret_never_crosses_the_wire() -> None:
    p = Pair(CONFIG)
    link = p.connect()
    wire = bytearray()
    while link.to_server or link.to_client:
        wire += b"".join(link.to_server) + b"".join(link.to_client)
        p.deliver()
    assert p.client.secret and p.client.secret not in wire


def test_sessions_get_distinct_ids_and_secrets() -> None:
    a, b = Pair(CONFIG), Pair(CONFIG)
    a.establish()
    b.establish()
    assert a.client.session_id != b.client.session_id
    assert a.client.secret != b.client.secret


def test_application_bytes_written_before_the_setup_are_sent_after_it() -> None:
    p = Pair(CONFIG)
    p.client_send(b"early")
    p.connect()
    p.transfer()
    assert p.backend.received == b"early"


# -- bulk transfer, EOF and completion ---------------------------------------------------


@pytest.mark.parametrize("size", [1, MAX_DATA_CHUNK, MAX_DATA_CHUNK + 1, 1_000_000])
def test_bulk_both_ways(pair: Pair, size: int) -> None:
    up, down = pattern(size, 1), pattern(size, 2)
    sent = 0
    while sent < size:  # respect backpressure like a driver
        step = max(1, min(pair.client.send_capacity(), 100_000, size - sent))
        pair.client_send(up[sent : sent + step])
        pair.server_send(down[sent : sent + step])
        sent += step
        pair.transfer()
    assert pair.backend.received == up
    assert pair.app.received == down
    assert pair.client.statistics().bytes_received == size
    assert pair.server.statistics().bytes_acked <= size


def test_many_small_writes_arrive_in_order(pair: Pair) -> None:
    for i in range(300):
        pair.client_send(b"%d," % i)
        if i % 7 == 0:
            pair.deliver(to_server=5)
    pair.transfer()
    assert pair.backend.received == b"".join(b"%d," % i for i in range(300))


def test_client_eof_half_close_other_direction_keeps_flowing(pair: Pair) -> None:
    pair.client_send(b"request")
    pair.client_eof()
    pair.transfer()
    assert pair.backend.received == b"request" and pair.backend.eof
    assert not pair.app.eof
    with pytest.raises(InvalidState):
        pair.client.send(b"more")
    pair.server_send(b"response 1")
    pair.transfer()
    pair.server_send(b", response 2")
    pair.transfer()
    assert pair.app.received == b"response 1, response 2"
    assert not pair.client.closed and not pair.server.closed
    pair.server_eof()
    pair.transfer()
    assert pair.app.eof
    assert pair.app.ended == SessionEnded(CloseCode.NORMAL, pair.app.ended.reason, False)


def test_server_eof_half_close_other_direction_keeps_flowing(pair: Pair) -> None:
    pair.server_send(b"banner")
    pair.server_eof()
    pair.transfer()
    assert pair.app.received == b"banner" and pair.app.eof and not pair.backend.eof
    pair.client_send(b"still talking")
    pair.transfer()
    assert pair.backend.received == b"still talking"
    assert not pair.client.closed
    pair.client_eof()
    pair.transfer()
    assert pair.backend.eof


def test_eof_arrives_after_every_byte_and_exactly_once(pair: Pair) -> None:
    pair.client_send(b"x" * 100_000)
    pair.client_eof()
    pair.client_eof()  # idempotent
    pair.transfer()
    events = pair.backend.events
    eof_at = next(i for i, e in enumerate(events) if isinstance(e, EofReceived))
    assert not any(isinstance(e, DataReceived) for e in events[eof_at:])
    assert len(pair.backend.received) == 100_000


def test_normal_completion_on_both_sides(pair: Pair) -> None:
    pair.client_send(b"ping")
    pair.server_send(b"pong")
    pair.client_eof()
    pair.server_eof()
    pair.transfer()
    for end in (pair.app, pair.backend):
        assert end.ended is not None
        assert (end.ended.code, end.ended.by_peer) == (CloseCode.NORMAL, False)
        assert end.session.closed and end.session.close_code is CloseCode.NORMAL
        assert end.session.next_timer() is None
        assert end.session.ended_on_link  # each ended it itself (link.py's linger)
    assert pair.app.received == b"pong" and pair.backend.received == b"ping"
    assert pair.client.session_id not in pair.sessions  # the server forgot it


# -- abort -----------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["client", "server"])
def test_abort_reaches_the_peer(pair: Pair, side: str) -> None:
    pair.client_send(b"a")
    pair.server_send(b"b")
    pair.transfer()
    closer, peer = (pair.app, pair.backend) if side == "client" else (pair.backend, pair.app)
    code = CloseCode.APPLICATION_RESET if side == "client" else CloseCode.BACKEND_RESET
    closer.session.close(code, "reset by peer")
    pair.pump()
    assert closer.ended == SessionEnded(code, "reset by peer", by_peer=False)
    pair.transfer()
    assert peer.ended == SessionEnded(code, "reset by peer", by_peer=True)
    assert closer.session.ended_on_link and not peer.session.ended_on_link  # (link.py's linger)
    with pytest.raises(InvalidState):
        closer.session.send(b"x")
    closer.session.close(CloseCode.GOING_AWAY)  # a second close changes nothing
    assert closer.session.close_code is code


def test_a_client_abort_while_detached_reaches_the_server_on_the_next_link(pair: Pair) -> None:
    """The application resets while the path is down: nothing can carry the CLOSE, so the
    client keeps the session and resumes it, then sends CLOSE and nothing else (what was in
    flight is dropped, as by any abort); the server ends it with the application's code,
    not at expiry (limitation 3)."""
    pair.client_send(b"before")
    pair.transfer()
    pair.cut()
    pair.client_send(b" queued")  # in the replay buffer, never on a link yet
    pair.client.close(CloseCode.APPLICATION_RESET, "reset by peer", deliver=True)
    pair.client.close(CloseCode.BACKEND_RESET, "a second word changes nothing", deliver=True)
    pair.pump()
    assert pair.client.state is SessionState.DETACHED and pair.client.close_pending
    assert pair.app.ended is None
    pair.advance(KEEPALIVE * 3, transfer=False)  # an outage, shorter than the timeout
    assert pair.server.state is SessionState.DETACHED and pair.backend.ended is None
    pair.reconnect()
    pair.transfer()
    assert pair.app.ended == SessionEnded(CloseCode.APPLICATION_RESET, "reset by peer", False)
    assert pair.backend.ended == SessionEnded(CloseCode.APPLICATION_RESET, "reset by peer", True)
    assert pair.backend.received == b"before"  # the queued bytes were dropped with the abort
    assert not pair.client.close_pending
    assert pair.client.ended_on_link  # on the new link: its CLOSE waits to be read


def test_a_client_abort_waiting_for_a_link_ends_with_the_servers_reject(pair: Pair) -> None:
    """Both ends aborted during the outage: the server's end is what the resume meets."""
    pair.cut()
    pair.client.close(CloseCode.APPLICATION_RESET, "reset", deliver=True)
    pair.server.close(CloseCode.BACKEND_RESET, "backend gone", deliver=True)  # a server: now
    pair.pump()
    assert pair.backend.ended == SessionEnded(CloseCode.BACKEND_RESET, "backend gone", False)
    pair.reconnect()
    pair.transfer()
    assert pair.app.ended is not None and pair.app.ended.code is CloseCode.BACKEND_RESET
    assert pair.app.ended.by_peer and not pair.client.close_pending


def test_a_client_abort_while_detached_that_never_reaches_a_server_expires(pair: Pair) -> None:
    pair.cut()
    pair.client.close(CloseCode.APPLICATION_RESET, "reset", deliver=True)
    pair.advance(TIMEOUT + KEEPALIVE, transfer=False)
    assert pair.app.ended is not None and pair.app.ended.code is CloseCode.EXPIRED
    assert not pair.client.close_pending


def test_a_shutdown_ends_a_session_whose_abort_waits_for_a_link(pair: Pair) -> None:
    pair.cut()
    pair.client.close(CloseCode.APPLICATION_RESET, "reset", deliver=True)
    pair.client.close(CloseCode.GOING_AWAY, "client shutting down")  # without deliver: now
    pair.pump()
    assert pair.app.ended == SessionEnded(CloseCode.GOING_AWAY, "client shutting down", False)


@pytest.mark.parametrize("state", ["attached", "server"])
def test_deliver_ends_at_once_when_a_link_is_there_or_on_a_server(pair: Pair, state: str) -> None:
    """Attached, the CLOSE goes on the link now; a server ends at once even detached (its
    client learns the code from the REJECT of its resume)."""
    if state == "server":
        pair.cut()
    closer = pair.app if state == "attached" else pair.backend
    code = CloseCode.APPLICATION_RESET if state == "attached" else CloseCode.BACKEND_RESET
    closer.session.close(code, "reset", deliver=True)
    pair.pump()
    assert closer.ended == SessionEnded(code, "reset", by_peer=False)
    assert not closer.session.close_pending


@pytest.mark.parametrize("side", ["client", "server"])
def test_close_before_both_directions_finished_reaches_the_peer(pair: Pair, side: str) -> None:
    """close() with its default code on an unfinished session is still an end the peer hears."""
    closer, peer = (pair.app, pair.backend) if side == "client" else (pair.backend, pair.app)
    closer.session.close()
    pair.transfer()
    assert peer.ended is not None and peer.ended.by_peer
    assert peer.session.closed


# -- keepalive --------------------------------------------------------------------------------


def test_a_quiet_healthy_link_stays_up(pair: Pair) -> None:
    pair.advance(KEEPALIVE * 20)
    assert pair.client.state is pair.server.state is SessionState.ATTACHED
    assert not pair.app.link_losses and not pair.backend.link_losses


def test_ping_after_one_silent_interval_link_lost_after_two(pair: Pair) -> None:
    link = pair.link
    assert link is not None
    pair.advance(KEEPALIVE - 0.01, transfer=False)  # nothing moves: silence
    assert not link.to_server
    pair.advance(0.01, transfer=False)
    assert [f for f in frames_sent(list(link.to_server)) if isinstance(f, Ping)]
    assert pair.client.state is SessionState.ATTACHED
    pair.advance(KEEPALIVE - 0.01, transfer=False)
    assert pair.client.state is SessionState.ATTACHED
    pair.advance(0.01, transfer=False)
    (lost,) = pair.app.link_losses
    assert isinstance(lost, LinkLost) and lost.code is CloseCode.LINK_LOST
    assert pair.client.state is SessionState.DETACHED
    assert pair.client.statistics().detached_since == pair.now
    assert pair.server.state is SessionState.ATTACHED  # its ticks lag by half an interval
    pair.advance(KEEPALIVE * (SERVER_TICK_LAG + 1) - 2 * KEEPALIVE, transfer=False)
    assert pair.server.state is SessionState.DETACHED  # the same rule ran there


def test_any_traffic_keeps_the_link_alive(pair: Pair) -> None:
    for _ in range(10):
        pair.client_send(b"k")
        pair.transfer()
        pair.advance(KEEPALIVE * 0.9)
    assert not pair.app.link_losses and not pair.backend.link_losses


# -- expiry -----------------------------------------------------------------------------------


def test_expiry_while_detached_on_both_sides(pair: Pair) -> None:
    pair.client_send(b"heard")  # the server knows the client got its ACCEPT
    pair.transfer()
    pair.client_send(b"unsent")
    pair.cut()
    assert pair.client.state is pair.server.state is SessionState.DETACHED
    assert pair.client.next_timer() == pair.now + TIMEOUT
    pair.advance(TIMEOUT - 0.5)
    assert not pair.client.closed and not pair.server.closed
    pair.advance(1)
    for end in (pair.app, pair.backend):
        assert end.ended is not None
        assert (end.ended.code, end.ended.by_peer) == (CloseCode.EXPIRED, False)
        assert end.session.statistics().replay_buffered == 0
        assert not end.session.ended_on_link  # no link to linger on
    assert pair.client.session_id not in pair.sessions
    pair.reconnect()  # a closed session does not reconnect
    assert len(pair.links) == 1


def test_a_client_that_never_reaches_a_server_gives_up() -> None:
    p = Pair(CONFIG)
    for _ in range(5):
        p.connect()
        p.blackhole()
        p.advance(CONFIG.handshake_timeout)
        assert p.app.link_losses[-1].code is CloseCode.HANDSHAKE_TIMEOUT
    p.advance(TIMEOUT)
    assert p.app.ended is not None and p.app.ended.code is CloseCode.RESUME_FAILED


# -- resume -----------------------------------------------------------------------------------


def test_resume_after_cut_loses_and_duplicates_nothing(pair: Pair) -> None:
    up, down = pattern(300_000, 3), pattern(200_000, 4)
    pair.client_send(up[:100_000])
    pair.server_send(down[:100_000])
    pair.deliver(to_server=30_000, to_client=50_000)  # some in flight
    pair.cut()
    pair.client_send(up[100_000:])  # queued during the outage
    pair.server_send(down[100_000:])
    pair.advance(5)
    link = pair.reconnect()
    assert link is not None
    pair.transfer()
    (resumed,) = pair.app.of_type(SessionResumed)
    assert isinstance(resumed, SessionResumed) and resumed.replayed > 0
    assert pair.backend.received == up and pair.app.received == down
    assert pair.server_link(pair.client.session_id) is link
    stats = pair.client.statistics()
    assert stats.resumes == 1 and stats.links == 2 and stats.bytes_replayed == resumed.replayed
    assert pair.server.statistics().resumes == 1


def test_resume_after_keepalive_death_supersedes_the_servers_stale_link() -> None:
    p = Pair(CONFIG, SessionConfig(window=256 * 1024, keepalive=30, timeout=TIMEOUT))
    p.establish()
    old = p.link
    p.client_send(b"before")
    p.transfer()
    p.blackhole()
    p.client_send(b" during")
    p.advance(2 * KEEPALIVE)
    assert p.client.state is SessionState.DETACHED
    assert p.server.state is SessionState.ATTACHED  # it has not noticed yet
    new = p.reconnect()
    p.transfer()
    assert p.server_link(p.client.session_id) is new
    assert old is not None and not old.server_open  # superseded
    p.client_send(b" after")
    p.transfer()
    assert p.backend.received == b"before during after"


def test_resume_repeatedly_with_eof_in_flight(pair: Pair) -> None:
    pair.client_send(b"last words")
    pair.client_eof()
    pair.server_send(b"reply")
    for _ in range(3):
        pair.deliver(to_server=3, to_client=3)
        pair.cut()
        pair.reconnect()
    pair.transfer()
    assert pair.backend.received == b"last words" and pair.backend.eof
    assert pair.app.received == b"reply" and not pair.app.eof
    pair.server_eof()
    pair.transfer()
    assert pair.app.eof
    assert pair.app.ended is not None and pair.app.ended.code is CloseCode.NORMAL
    assert pair.backend.ended is not None and pair.backend.ended.code is CloseCode.NORMAL


@pytest.mark.parametrize("cut_after", range(8))
def test_cut_at_every_handshake_step(pair: Pair, cut_after: int) -> None:
    """Cut the resume's link after each write: before the hello, after it, mid RESUME..."""
    pair.client_send(b"one")
    pair.server_send(b"two")
    pair.cut()
    link = pair.reconnect()
    assert link is not None
    for _ in range(cut_after):
        pair.deliver(
            to_server=len(link.to_server[0]) if link.to_server else 0,
            to_client=len(link.to_client[0]) if link.to_client else 0,
        )
    pair.cut()
    pair.reconnect()
    pair.transfer()
    assert pair.backend.received == b"one" and pair.app.received == b"two"


def test_cut_after_accept_sent_but_not_received() -> None:
    p = Pair(CONFIG)
    p.client_send(b"hello")
    link = p.connect()
    p.deliver(to_client=0)  # the client hello and SETUP reach the server, ACCEPT is queued
    assert len(p.backends) == 1 and link.to_client
    p.cut()
    p.reconnect()
    p.transfer()
    assert len(p.backends) == 2  # a fresh session; the orphan waits for its expiry
    assert p.backend.received == b"hello"
    p.advance(TIMEOUT + 1)
    orphan = next(end for sid, end in p.backends.items() if sid != p.client.session_id)
    assert orphan.ended is not None and orphan.ended.code is CloseCode.EXPIRED
    assert not p.client.closed


# -- authentication ---------------------------------------------------------------------------


def forge_resume(p: Pair, proof: bytes) -> list[object]:
    """Open a second link that claims the session with ``proof``; return its server's events."""
    hs = ServerHandshake(CONFIG, p.now)
    hs.receive_data(client_hello())
    out = b"".join(hs.data_to_send())
    assert len(out) == 41  # server hello with a nonce
    forged = Resume(p.client.session_id, os.urandom(NONCE_SIZE), 0, 65536, 3000, proof)
    hs.receive_data(forged.serialize())
    events: list[object] = []
    while (event := hs.next_event()) is not None:
        events.append(event)
        if isinstance(event, ResumeRequested):
            assert hs.accept_resume(p.sessions[event.session_id], p.now) is False
    events += [frames_sent(hs.data_to_send())]
    return events


def test_resume_with_a_wrong_proof_is_rejected_and_the_session_keeps_flowing(pair: Pair) -> None:
    pair.client_send(b"before ")
    pair.transfer()
    events = forge_resume(pair, os.urandom(32))
    assert events[0] == ResumeRequested(pair.client.session_id)
    assert isinstance(events[1], HandshakeFailed) and events[1].code is CloseCode.BAD_PROOF
    assert events[2] == [Reject(CloseCode.BAD_PROOF, "resume proof did not verify")]
    assert pair.server.statistics().resumes == 0
    assert pair.server.state is SessionState.ATTACHED
    pair.client_send(b"after")
    pair.server_send(b"untouched")
    pair.transfer()
    assert pair.backend.received == b"before after" and pair.app.received == b"untouched"
    assert not pair.app.link_losses and not pair.backend.link_losses


def test_a_replayed_resume_is_rejected(pair: Pair) -> None:
    """A RESUME captured on the wire is useless on another link: the server nonce is fresh."""
    pair.cut()
    link = pair.reconnect()
    assert link is not None
    pair.deliver(to_client=0)  # the client hello reaches the server, its hello is queued
    pair.deliver(to_server=0)  # the server hello reaches the client: RESUME is queued
    (raw,) = list(link.to_server)
    assert raw[0] == FrameType.RESUME
    pair.transfer()
    assert pair.app.of_type(SessionResumed)
    hs = ServerHandshake(CONFIG, pair.now)
    hs.receive_data(client_hello() + raw)
    assert hs.next_event() == ResumeRequested(pair.client.session_id)
    assert hs.accept_resume(pair.server, pair.now) is False
    assert hs.next_event() == HandshakeFailed(CloseCode.BAD_PROOF, "resume proof did not verify")
    pair.client_send(b"fine")
    pair.transfer()
    assert pair.backend.received == b"fine"


def test_an_impostor_session_with_the_right_id_and_wrong_secret(pair: Pair) -> None:
    """A second client Session that knows the id but not the secret cannot take over."""
    impostor = Pair(CONFIG)
    impostor.establish()
    thief = impostor.client
    thief.session_id = pair.client.session_id  # the id is not secret; the key is
    impostor.cut()
    hs = ServerHandshake(CONFIG, pair.now)
    thief_hs = ClientHandshake(thief, pair.now)
    hs.receive_data(b"".join(thief_hs.data_to_send()))
    thief_hs.receive_data(b"".join(hs.data_to_send()))
    hs.receive_data(b"".join(thief_hs.data_to_send()))
    assert hs.next_event() == ResumeRequested(pair.client.session_id)
    assert hs.accept_resume(pair.server, pair.now) is False
    thief_hs.receive_data(b"".join(hs.data_to_send()))
    ended = [e for e in iter(thief.next_event, None) if isinstance(e, SessionEnded)]
    assert ended == [SessionEnded(CloseCode.BAD_PROOF, "resume proof did not verify", True)]
    pair.server_send(b"still mine")
    pair.transfer()
    assert pair.app.received == b"still mine"


def test_resume_of_an_unknown_session() -> None:
    p = Pair(CONFIG)
    p.establish()
    p.cut()
    p.sessions.clear()  # the server restarted
    p.reconnect()
    p.transfer()
    assert p.app.ended is not None
    assert (p.app.ended.code, p.app.ended.by_peer) == (CloseCode.UNKNOWN_SESSION, True)
    assert p.handshake_failures[-1].code is CloseCode.UNKNOWN_SESSION


def test_the_client_adopts_a_shorter_server_timeout() -> None:
    p = Pair(CONFIG, SessionConfig(window=256 * 1024, keepalive=KEEPALIVE, timeout=10))
    p.establish()
    p.cut()
    p.advance(9.5)
    assert not p.client.closed and not p.server.closed
    p.advance(1)
    assert p.backend.ended is not None and p.backend.ended.code is CloseCode.EXPIRED
    # The client knows the server's timeout from ACCEPT: it expires too, instead of
    # learning of it later as an unknown session.
    assert p.app.ended is not None and p.app.ended.code is CloseCode.EXPIRED


def test_a_resume_cannot_claim_bytes_that_were_never_sent(pair: Pair) -> None:
    pair.client_send(b"x" * 1000)
    pair.transfer()
    pair.cut()
    pair.server_send(b"queued while detached")  # never on any link
    assert pair.server.can_resume_from(0)
    assert not pair.server.can_resume_from(len(b"queued while detached"))


# -- handshake failures -----------------------------------------------------------------------


def test_client_handshake_timeout() -> None:
    p = Pair(CONFIG)
    p.connect()
    p.blackhole()
    p.advance(CONFIG.handshake_timeout - 0.1)
    assert not p.app.link_losses
    p.advance(0.1)
    (lost,) = p.app.link_losses
    assert lost.code is CloseCode.HANDSHAKE_TIMEOUT and not lost.peer_is_tether
    assert p.client.state is SessionState.NEW and p.client_handshake is None
    p.blackhole(False)
    p.connect()
    p.transfer()
    assert p.app.of_type(SessionEstablished)


def test_a_mute_resume_is_abandoned_after_two_keepalive_intervals(pair: Pair) -> None:
    pair.cut()
    pair.reconnect()
    pair.blackhole()  # TCP is up, nothing gets through: the resume hangs
    losses = len(pair.app.link_losses)
    pair.advance(2 * KEEPALIVE - 0.1)
    assert len(pair.app.link_losses) == losses
    pair.advance(0.1)
    assert pair.app.link_losses[-1].code is CloseCode.HANDSHAKE_TIMEOUT
    assert CONFIG.handshake_timeout > 2 * KEEPALIVE  # a setup would still be waiting
    assert pair.client.state is SessionState.DETACHED


def test_server_handshake_timeout() -> None:
    hs = ServerHandshake(CONFIG, 100.0)
    assert hs.next_timer() == 100.0 + CONFIG.handshake_timeout
    hs.handle_timer(105.0)
    assert not hs.done
    hs.receive_data(client_hello())
    hs.handle_timer(100.0 + CONFIG.handshake_timeout)
    assert hs.failed and hs.next_timer() is None
    assert hs.next_event() == HandshakeFailed(
        CloseCode.HANDSHAKE_TIMEOUT, "link handshake timed out"
    )
    frames = frames_sent(hs.data_to_send()[1:])  # after the server hello
    assert frames == [Reject(CloseCode.HANDSHAKE_TIMEOUT, "too slow")]


def test_client_meets_a_peer_that_is_not_tether() -> None:
    client = Session.client(CONFIG, 0.0)
    hs = ClientHandshake(client, 0.0)
    hs.receive_data(b"SSH-2.0-OpenSSH_9.6\r\n")
    (lost,) = list(iter(hs.next_event, None))
    assert isinstance(lost, HandshakeFailed)
    assert not lost.peer_is_tether and lost.code is CloseCode.PROTOCOL_ERROR
    assert hs.failed and client.state is SessionState.NEW


def test_client_meets_a_peer_that_stops_after_a_partial_magic() -> None:
    client = Session.client(CONFIG, 0.0)
    hs = ClientHandshake(client, 0.0)
    hs.receive_data(b"\x89TETH")
    hs.handle_timer(CONFIG.handshake_timeout)
    (lost,) = list(iter(hs.next_event, None))
    assert isinstance(lost, HandshakeFailed) and not lost.peer_is_tether


def test_server_meets_a_client_that_is_not_tether() -> None:
    hs = ServerHandshake(CONFIG, 0.0)
    hs.receive_data(b"GET / HTTP/1.1\r\n")
    event = hs.next_event()
    assert isinstance(event, HandshakeFailed) and event.code is CloseCode.PROTOCOL_ERROR
    assert hs.data_to_send() == []  # not even a hello to a stranger


def test_version_mismatch_seen_by_the_server() -> None:
    hs = ServerHandshake(CONFIG, 0.0)
    hs.receive_data(client_hello(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 3))
    event = hs.next_event()
    assert isinstance(event, HandshakeFailed) and event.code is CloseCode.UNSUPPORTED_VERSION
    out = hs.data_to_send()
    client = Session.client(CONFIG, 0.0)
    client_hs = ClientHandshake(client, 0.0)
    client_hs.data_to_send()
    client_hs.receive_data(b"".join(out))
    events = list(iter(client.next_event, None))
    assert [type(e) for e in events] == [SessionEnded]
    assert isinstance(events[0], SessionEnded)
    assert events[0].code is CloseCode.UNSUPPORTED_VERSION and events[0].by_peer


def test_version_mismatch_seen_by_the_client() -> None:
    client = Session.client(CONFIG, 0.0)
    hello = server_hello(PROTOCOL_VERSION + 1, os.urandom(NONCE_SIZE))
    ClientHandshake(client, 0.0).receive_data(hello)
    ended = client.next_event()
    assert isinstance(ended, SessionEnded) and ended.code is CloseCode.UNSUPPORTED_VERSION


def _refusal(code: CloseCode, reason: str) -> bytes:
    """What a clear-text server refusing before the client's hello has arrived writes
    (aio/listener.py: out of handshakes or descriptors, or TLS only)."""
    return refusal(refusal_version(b""), code, reason)


@pytest.mark.parametrize(
    ("hello", "version"),
    [
        (client_hello(2, 4), 4),
        (client_hello(3, 3), 3),  # a session resumed at version 3 is answered in its own
        (client_hello(2, 2), 2),
        (client_hello(5, 9), PROTOCOL_VERSION),  # none in common: the server's own
        (client_hello(3, 3)[:9], MIN_PROTOCOL_VERSION),  # not all there yet
        (b"", MIN_PROTOCOL_VERSION),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03", MIN_PROTOCOL_VERSION),  # TLS, not tether
    ],
)
def test_a_refusals_version_is_the_clients_when_its_hello_is_known(
    hello: bytes, version: int
) -> None:
    """So that a client from before the refusal rule, which ends a resumed session on any
    version but its own, reads the REJECT when the refuser has seen its hello."""
    assert refusal_version(hello) == version


def test_a_busy_servers_refusal_leaves_a_session_resumed_at_a_later_version_detached(
    pair: Pair,
) -> None:
    """A resume offers only its session's version (4); the refusal's hello says 2, before
    the server has read the client's hello. Its REJECT decides: OVERLOADED is transient,
    so the session retries (it used to end UNSUPPORTED_VERSION, as 182 sessions did in
    B4's reconnect storm), and nothing more is sent on the refused link."""
    assert pair.client.version == PROTOCOL_VERSION > MIN_PROTOCOL_VERSION
    pair.cut()
    client = pair.client
    hs = ClientHandshake(client, pair.now)
    sent = b"".join(hs.data_to_send())
    hs.receive_data(_refusal(CloseCode.OVERLOADED, "server busy"))
    assert client.state is SessionState.DETACHED and not client.closed
    losses = [e for e in iter(hs.next_event, None) if isinstance(e, HandshakeFailed)]
    assert [loss.code for loss in losses] == [CloseCode.OVERLOADED]
    assert b"".join(hs.data_to_send()) == b""  # no RESUME after the hello and ROUTE
    assert len(sent) == CLIENT_HELLO_SIZE + len(Route(client.session_id).serialize())


def test_a_refusal_ends_a_session_when_its_reject_is_final(pair: Pair) -> None:
    pair.cut()
    client = pair.client
    ClientHandshake(client, pair.now).receive_data(
        _refusal(CloseCode.TLS_REQUIRED, "this server takes TLS links only")
    )
    assert client.closed and client.close_code is CloseCode.TLS_REQUIRED


def test_a_refusals_hello_followed_by_anything_but_a_reject_fails_the_link(pair: Pair) -> None:
    """A zero nonce cannot start a session: an ACCEPT or RESUMED after it is the peer
    breaking the protocol, not an answer."""
    pair.cut()
    client = pair.client
    hs = ClientHandshake(client, pair.now)
    hs.data_to_send()
    hs.receive_data(server_hello(PROTOCOL_VERSION, bytes(NONCE_SIZE)))
    assert hs.data_to_send() == []  # no RESUME to a refusal, even one in our version
    hs.receive_data(Resumed(0, bytes(32)).serialize())  # as if the resume were accepted
    losses = [e for e in iter(hs.next_event, None) if isinstance(e, HandshakeFailed)]
    assert [loss.code for loss in losses] == [CloseCode.PROTOCOL_ERROR]
    assert client.state is SessionState.DETACHED


def test_a_hello_of_no_common_version_still_ends_the_session(pair: Pair) -> None:
    """Version 0 (with its zero nonce) is the server saying it speaks none of ours: the
    refusal rule does not apply, whatever follows."""
    pair.cut()
    client = pair.client
    hs = ClientHandshake(client, pair.now)
    hs.receive_data(server_hello(0, bytes(NONCE_SIZE)))
    hs.receive_data(Reject(CloseCode.OVERLOADED, "server busy").serialize())
    assert client.closed and client.close_code is CloseCode.UNSUPPORTED_VERSION


def test_setup_rejected_by_the_server() -> None:
    q = Pair(CONFIG)
    q_link = q.connect()
    assert q_link.handshake is not None
    q_link.handshake.receive_data(b"".join(q_link.to_server))
    q_link.to_server.clear()
    assert q_link.handshake.next_event() == SetupRequested()
    q_link.handshake.reject(CloseCode.BACKEND_UNAVAILABLE, "backend down")
    q.pump()
    q.transfer()
    assert q.app.ended == SessionEnded(CloseCode.BACKEND_UNAVAILABLE, "backend down", True)


@pytest.mark.parametrize("chunks", [1, 3])
def test_a_client_may_send_max_early_bytes_before_the_answer_and_no_more(chunks: int) -> None:
    """What a client sends after its SETUP and before the server's answer is held for the
    session, up to MAX_EARLY_BYTES (docs/security.md, "Abuse"); one byte more fails the link
    PROTOCOL_ERROR, whether it comes in one read or several."""
    for extra in (MAX_EARLY_BYTES, MAX_EARLY_BYTES + 1):
        client_hs = ClientHandshake(Session.client(CONFIG, 0.0), 0.0)
        hs = ServerHandshake(CONFIG, 0.0)
        # The client's hello and SETUP (queued together), then ``extra`` bytes.
        sent = b"".join(client_hs.data_to_send()) + bytes(extra)
        step = -(-len(sent) // chunks)
        for start in range(0, len(sent), step):
            hs.receive_data(sent[start : start + step])
        events = list(iter(hs.next_event, None))
        if extra == MAX_EARLY_BYTES:
            assert events == [SetupRequested()]
        else:
            failed = [e for e in events if isinstance(e, HandshakeFailed)]
            assert [(e.code, e.reason) for e in failed] == [
                (CloseCode.PROTOCOL_ERROR, "client sent too much before the handshake finished")
            ]


def test_handshake_decisions_out_of_turn_are_caller_errors() -> None:
    hs = ServerHandshake(CONFIG, 0.0)
    with pytest.raises(InvalidState):
        hs.accept_setup(0.0)
    client = Session.client(CONFIG, 0.0)
    with pytest.raises(InvalidState):
        hs.accept_resume(client, 0.0)
    client.close()
    with pytest.raises(InvalidState):
        ClientHandshake(client, 0.0)  # a handshake is for a new or a detached session


# -- backpressure -----------------------------------------------------------------------------


def test_backpressure_and_recovery(pair: Pair) -> None:
    window = CONFIG.window
    assert pair.client.send_capacity() == window
    pair.blackhole()  # nothing is acknowledged
    pair.client_send(b"x" * (window - 10))
    assert pair.client.send_capacity() == 10
    pair.client_send(b"y" * 20)  # a driver may overshoot by one read; never refused
    assert pair.client.send_capacity() <= 0
    assert pair.client.statistics().replay_buffered == window + 10
    pair.cut()
    pair.reconnect()
    pair.transfer()
    assert pair.client.send_capacity() == window
    assert len(pair.backend.received) == window + 10


def test_capacity_recovers_on_acknowledgement(pair: Pair) -> None:
    pair.client_send(b"z" * CONFIG.window)
    assert pair.client.send_capacity() <= 0
    pair.transfer()
    assert pair.client.send_capacity() > 0
    pair.advance(KEEPALIVE)  # the delayed acknowledgement of the tail
    assert pair.client.send_capacity() == CONFIG.window


def test_a_slow_local_side_holds_back_acknowledgements_but_not_the_link(pair: Pair) -> None:
    """While the backend is slow (local_writable(False)) the server acknowledges nothing
    new, by threshold, timer or piggyback on its own DATA, so the client sends at most a
    window more; the server still reads the link: the client's acknowledgements of the
    server's bytes get through. Once the backend drains, one ACK covers everything."""
    pair.server.local_writable(False)
    window = CONFIG.window
    pair.client_send(b"u" * window)
    pair.server_send(b"d" * 1000)  # the server's DATA would carry an ACK
    pair.advance(KEEPALIVE * 3)  # ticks would send the delayed one
    assert pair.client.statistics().bytes_acked == 0
    assert pair.client.send_capacity() <= 0  # the client's window is spent: it stops
    assert len(pair.backend.received) == window  # every byte delivered all the same
    assert pair.server.statistics().bytes_acked == 1000  # the client's ACK got through
    assert pair.client.state is pair.server.state is SessionState.ATTACHED
    pair.server.local_writable(True)
    pair.transfer()
    assert pair.client.statistics().bytes_acked == window
    assert pair.client.send_capacity() == window


def test_the_peer_s_eof_is_acknowledged_even_for_a_slow_local_side(pair: Pair) -> None:
    """Nothing can follow an EOF, so acknowledging it holds nothing more back, and the
    session can finish."""
    pair.server.local_writable(False)
    pair.client_send(b"x" * 100)
    pair.client_eof()
    pair.server_eof()
    pair.transfer()
    assert pair.client.statistics().bytes_acked == 100
    for end in (pair.app, pair.backend):
        assert end.ended is not None and end.ended.code is CloseCode.NORMAL


def test_a_resume_frees_no_window_for_bytes_a_slow_local_side_has_not_taken(
    pair: Pair,
) -> None:
    """A resume tells the peer where this side is, which acknowledges: while the backend
    is slow the server tells only what it acknowledged, the client sends the rest again,
    and the server drops what it has: delivered once, and the client's window stays
    spent until the backend takes the bytes."""
    window = CONFIG.window
    pair.server.local_writable(False)
    pair.client_send(b"a" * (window // 2))
    pair.transfer()
    assert len(pair.backend.received) == window // 2
    for _ in range(3):
        pair.cut()
        pair.reconnect()
        pair.transfer()
        assert pair.client.statistics().resumes >= 1
        assert pair.client.statistics().bytes_acked == 0  # the resume acknowledged nothing
        assert pair.client.send_capacity() == window - window // 2
    pair.client_send(b"b" * 1000)  # after the sent-again bytes
    pair.transfer()
    assert pair.backend.received == b"a" * (window // 2) + b"b" * 1000  # each byte once
    pair.server.local_writable(True)
    pair.transfer()
    assert pair.client.statistics().bytes_acked == window // 2 + 1000
    assert pair.client.send_capacity() == window


@pytest.mark.parametrize("offset", [1, 4096, 8193])
def test_bytes_sent_again_must_start_where_the_resume_said(pair: Pair, offset: int) -> None:
    """After such a resume only the peer's bytes from the offset told (here 0) are taken
    as sent again, or the next new byte (8192); DATA from anywhere else is a protocol
    error, as ever."""
    pair.server.local_writable(False)
    pair.client_send(b"a" * 8192)
    pair.transfer()
    pair.cut()
    told = pair.server.resume_offset()
    assert told == 0
    pair.server.attach(pair.now, peer_received=0)
    pair.server.receive_data(Data(offset, b"x" * 10).serialize(), pair.now)
    assert pair.server.close_code is CloseCode.PROTOCOL_ERROR


def test_new_bytes_end_the_bytes_sent_again(pair: Pair) -> None:
    """DATA at the offset received (the peer skipped what we have) is taken as ever, and
    after it the bytes sent again are over: DATA from the offset told is an error."""
    pair.server.local_writable(False)
    pair.client_send(b"a" * 8192)
    pair.transfer()
    pair.cut()
    assert pair.server.resume_offset() == 0
    pair.server.attach(pair.now, peer_received=0)
    pair.server.receive_data(Data(8192, b"b" * 10).serialize(), pair.now)
    assert pair.server.close_code is None and pair.server.received == 8202
    pair.server.receive_data(Data(0, b"a" * 10).serialize(), pair.now)
    assert pair.server.close_code is CloseCode.PROTOCOL_ERROR


def test_a_sender_keeps_to_the_smaller_of_the_two_windows() -> None:
    """What a session holds unacknowledged is bounded by its own window and by the
    peer's, which bounds what the peer holds for a slow local side."""
    small = SessionConfig(window=64 * 1024, keepalive=KEEPALIVE, timeout=TIMEOUT)
    p = Pair(CONFIG, small)
    p.establish()
    assert p.client.send_capacity() == 64 * 1024  # the server's window, not the client's
    p = Pair(small, CONFIG)
    p.establish()
    assert p.server.send_capacity() == 64 * 1024  # the client's window, not the server's
    p.cut()
    p.reconnect()
    p.transfer()
    assert p.server.send_capacity() == 64 * 1024  # as the RESUME announced it again


def test_a_receiver_with_the_smaller_window_acknowledges_without_waiting_for_a_tick() -> None:
    """The client (4 MiB) uploads to a server granting 64 KiB: the server acknowledges a
    quarter of the 64 KiB the client may send, not a quarter of the client's window (1
    MiB, which 64 KiB in flight never reaches: one window per keepalive tick)."""
    small = 64 * 1024
    p = Pair(
        SessionConfig(window=4 * 1024 * 1024, keepalive=KEEPALIVE, timeout=TIMEOUT),
        SessionConfig(window=small, keepalive=KEEPALIVE, timeout=TIMEOUT),
    )
    p.establish()
    sent = 0
    for _ in range(64):  # 4 MiB, no time passing: no tick acknowledges anything
        step = p.client.send_capacity()
        assert step >= small // 2, "the client waits for an acknowledgement"
        p.client_send(b"u" * step)
        sent += step
        p.transfer()
    assert len(p.backend.received) == sent >= 64 * small // 2


# -- statistics -------------------------------------------------------------------------------


def test_statistics_snapshot(pair: Pair) -> None:
    pair.client_send(b"a" * 1000)
    pair.server_send(b"b" * 500)
    pair.transfer()
    pair.advance(KEEPALIVE * SERVER_TICK_LAG)  # acknowledgements settle
    client, server = pair.client.statistics(), pair.server.statistics()
    assert client.role == "client" and server.role == "server"
    assert client.state == server.state == "attached"
    assert client.session_id == server.session_id == pair.client.session_id.hex()
    assert (client.bytes_sent, client.bytes_received, client.bytes_acked) == (1000, 500, 1000)
    assert (server.bytes_sent, server.bytes_received, server.bytes_acked) == (500, 1000, 500)
    assert client.replay_buffered == server.replay_buffered == 0
    assert client.links == server.links == 1 and client.resumes == 0
    assert not client.eof_sent and not client.eof_received and client.detached_since is None
    with pytest.raises(AttributeError):
        client.bytes_sent = 0  # type: ignore[misc]
    pair.server_send(b"c" * 10)
    pair.cut()
    detached = pair.client.statistics()
    assert detached.state == "detached"
    assert detached.detached_since == pair.now
    assert pair.server.statistics().replay_buffered == 10
    pair.reconnect()
    pair.transfer()
    pair.client_eof()
    pair.server_eof()
    pair.transfer()
    final = pair.client.statistics()
    assert final.state == "closed" and final.eof_sent and final.eof_received
    assert (final.bytes_sent, final.bytes_received) == (1000, 510)
    assert final.links == 2 and final.resumes == 1 and final.bytes_replayed == 0
    assert pair.server.statistics().bytes_replayed == 10


# -- misuse -----------------------------------------------------------------------------------


def test_next_timer_reports_a_deadline_at_time_zero() -> None:
    client = Session.client(SessionConfig(timeout=5), -5.0)
    assert client.next_timer() == 0.0


def test_setup_with_a_low_order_public_key_fails_the_handshake_without_raising() -> None:
    """An all-zero X25519 key makes the exchange fail: a peer error, reported, never raised."""
    hs = ServerHandshake(CONFIG, 0.0)
    hs.receive_data(client_hello() + Setup(bytes(32), 65536, 3000).serialize())
    events = list(iter(hs.next_event, None))
    assert not any(isinstance(e, SetupRequested) for e in events)
    assert events == [HandshakeFailed(CloseCode.PROTOCOL_ERROR, "client public key is invalid")]
    assert frames_sent(hs.data_to_send()[1:]) == [
        Reject(CloseCode.PROTOCOL_ERROR, "client public key is invalid")
    ]


def test_silence_while_the_driver_holds_the_link_unread_is_not_death(pair: Pair) -> None:
    pair.client.pause_receiving(True)  # the application is slow: the link is not read
    pair.advance(KEEPALIVE * 5, transfer=False)
    assert pair.client.state is SessionState.ATTACHED
    assert not pair.app.link_losses
    pair.client.pause_receiving(False)
    # Reading again, and still silence: dead after two whole silent intervals (the one
    # in which reading resumed was paused for part of it and counts as heard).
    pair.advance(KEEPALIVE * 2, transfer=False)
    assert pair.client.state is SessionState.ATTACHED
    pair.advance(KEEPALIVE, transfer=False)
    assert pair.app.link_losses and pair.client.state is SessionState.DETACHED


@pytest.mark.parametrize(
    "code", [CloseCode.OVERLOADED, CloseCode.GOING_AWAY, CloseCode.HANDSHAKE_TIMEOUT]
)
def test_a_transient_reject_of_a_resume_leaves_the_session_detached(
    pair: Pair, code: CloseCode
) -> None:
    pair.cut()
    client = pair.client
    hs = ClientHandshake(client, pair.now)
    hs.data_to_send()
    hs.receive_data(server_hello(PROTOCOL_VERSION, os.urandom(NONCE_SIZE)))
    hs.receive_data(Reject(code, "busy").serialize())
    assert client.state is SessionState.DETACHED and not client.closed
    losses = [e for e in iter(hs.next_event, None) if isinstance(e, HandshakeFailed)]
    assert [loss.code for loss in losses] == [code]
    assert hs.failed


def test_a_final_reject_of_a_resume_ends_the_session(pair: Pair) -> None:
    pair.cut()
    client = pair.client
    hs = ClientHandshake(client, pair.now)
    hs.receive_data(server_hello(PROTOCOL_VERSION, os.urandom(NONCE_SIZE)))
    hs.receive_data(Reject(CloseCode.EXPIRED, "too late").serialize())
    assert client.closed and client.close_code is CloseCode.EXPIRED


def test_an_idle_session_is_kept_alive_by_the_client_alone(pair: Pair) -> None:
    pings = {"client": 0, "server": 0}
    for _ in range(400):  # 60 s of fake time in small steps
        pair.advance(0.15, transfer=False)
        link = pair.link
        assert link is not None
        pings["client"] += sum(isinstance(f, Ping) for f in frames_sent(list(link.to_server)))
        pings["server"] += sum(isinstance(f, Ping) for f in frames_sent(list(link.to_client)))
        pair.transfer()
    assert pair.client.state is pair.server.state is SessionState.ATTACHED
    # The client pings after each silent interval, about every other one; the server
    # hears those and never needs to ping back.
    assert 60 / (2 * KEEPALIVE) - 2 <= pings["client"] <= 60 / KEEPALIVE
    assert pings["server"] <= 1


def test_an_idle_server_wakes_once_per_client_ping(pair: Pair) -> None:
    deadlines = set()
    for _ in range(400):  # 60 s of fake time
        pair.advance(0.15)
        deadline = pair.server.next_timer()
        assert deadline is not None
        deadlines.add(deadline)
    assert pair.server.state is SessionState.ATTACHED
    # One tick per client PING (every 2 K), not one per K.
    assert len(deadlines) <= 60 / (2 * KEEPALIVE) + 2


def test_a_resume_whose_handshake_failed_after_asking_is_not_routed(pair: Pair) -> None:
    """hello + RESUME + more than 64 KiB in one write: the handshake fails on the extra
    bytes after reporting the RESUME; routing it then must not raise (it did: InvalidState)."""
    pair.cut()
    hs = pair.router.open_link(pair.now)
    forged = Resume(pair.client.session_id, os.urandom(NONCE_SIZE), 0, 65536, 3000, bytes(32))
    hs.receive_data(client_hello() + forged.serialize() + bytes(70 * 1024))
    events = list(iter(hs.next_event, None))
    assert isinstance(events[0], ResumeRequested) and isinstance(events[1], HandshakeFailed)
    assert pair.router.resume(hs, pair.now) is None
    assert pair.server.state is SessionState.DETACHED  # untouched


# -- the key confirmation covers the whole setup (issue 8: ACCEPT tampering) -----------------


def _tampered_setup(edit: str) -> Pair:
    """A setup in which an on-path attacker rewrote one field of SETUP or ACCEPT."""
    p = Pair(CONFIG)
    link = p.connect()
    _hello, setup = list(link.to_server)
    if edit == "setup-window":
        frame = Setup(setup[4:36], 1024, 3000)  # the client asked for 256 KiB
        link.to_server[1] = frame.serialize()
    p.deliver(to_client=0)  # the server reads hello and SETUP, answers hello and ACCEPT
    _server_hello_raw, accept_raw = list(link.to_client)[:2]
    assert accept_raw[0] == FrameType.ACCEPT
    if edit == "accept-timeout":  # timeout_ms = 1: reliability silently switched off
        fields = bytearray(accept_raw)
        fields[4 + 16 + 32 + 4 : 4 + 16 + 32 + 8] = (1).to_bytes(4, "big")
        link.to_client[1] = bytes(fields)
    p.transfer()
    return p


@pytest.mark.parametrize("edit", ["accept-timeout", "setup-window", "none"])
def test_tampering_with_setup_or_accept_fails_the_key_confirmation(edit: str) -> None:
    p = _tampered_setup(edit)
    if edit == "none":
        assert p.client.state is SessionState.ATTACHED
        return
    assert p.client.state is SessionState.NEW  # not established: the link failed
    (failure,) = p.app.link_losses
    assert isinstance(failure, HandshakeFailed)
    assert failure.reason == "server key confirmation failed"


# -- client credentials (issue 8) --------------------------------------------------------------


@pytest.mark.parametrize("token", [b"", b"wrong", b"tether_right"])
def test_only_a_client_with_an_accepted_token_gets_a_session(token: bytes) -> None:
    p = Pair(CONFIG)
    seen: list[bytes] = []

    def authorize(presented: bytes) -> bool:
        seen.append(presented)
        return presented == b"tether_right"

    p.router.authorize = authorize
    p.token = token
    p.connect()
    p.transfer()
    assert seen == [token]
    if token == b"tether_right":
        assert p.client.state is SessionState.ATTACHED and len(p.backends) == 1
        return
    assert not p.backends  # refused before anything was created
    assert p.app.ended == SessionEnded(CloseCode.UNAUTHORIZED, "not authorized", True)
    assert p.handshake_failures[-1].code is CloseCode.UNAUTHORIZED


@pytest.mark.parametrize("code", [CloseCode.OVERLOADED, CloseCode.GOING_AWAY])
def test_a_transient_reject_of_a_setup_leaves_the_session_new(code: CloseCode) -> None:
    """A busy server is no reason to end a new session (nor to fall back): retry."""
    client = Session.client(CONFIG, 0.0)
    hs = ClientHandshake(client, 0.0)
    hs.receive_data(server_hello(PROTOCOL_VERSION, os.urandom(NONCE_SIZE)))
    hs.receive_data(Reject(code, "busy").serialize())
    assert client.state is SessionState.NEW and not list(iter(client.next_event, None))
    (failure,) = list(iter(hs.next_event, None))
    assert isinstance(failure, HandshakeFailed) and failure.code is code
    assert failure.peer_is_tether  # so the driver does not fall back


def test_a_late_resume_of_a_session_that_ended_normally_is_told_normal() -> None:
    """NORMAL is 0: the router must not read it as "no code" (it answered INTERNAL_ERROR)."""
    p = Pair(CONFIG)
    p.establish()
    p.client_eof()
    p.server_eof()
    p.transfer()
    assert p.backend.ended is not None and p.backend.ended.code is CloseCode.NORMAL
    sid = p.client.session_id
    assert sid not in p.sessions
    assert p.router._ended[sid] is CloseCode.NORMAL


# -- events ----------------------------------------------------------------------------------


def test_next_events_takes_what_next_event_gives_one_by_one() -> None:
    # A read of DATA, a PING, more DATA and the EOF: three events, in order.
    raw = b"".join(frame.serialize() for frame in (Data(0, b"ab"), Ping(1), Data(2, b"cd"), Eof(4)))
    one, batch, mixed = Pair(CONFIG), Pair(CONFIG), Pair(CONFIG)
    for p in (one, batch, mixed):
        p.establish()
        p.client.receive_data(raw, 0.0)
    singly = list(iter(one.client.next_event, None))
    assert [type(e) for e in singly] == [DataReceived, DataReceived, EofReceived]
    assert batch.client.next_events() == singly
    assert batch.client.next_events() == [] and batch.client.next_event() is None
    # Taking the first one alone leaves the rest for next_events(), and nothing after.
    assert mixed.client.next_event() == singly[0]
    assert mixed.client.next_events() == singly[1:]
    assert mixed.client.next_events() == [] and mixed.client.next_event() is None
