"""The server's memory budget and orphaned setups, through the core alone
(tests/protocol/pair.py: the router, the fake links and the fake clock; issue 9).

- The router grants each new session its window from a :class:`MemoryBudget` (smaller as
  it fills), refuses a setup OVERLOADED only when not even the floor fits, and never
  touches an established session to make room.
- A session charges its replay buffer to its account, and what its slow local side holds
  while it says so, reports the account's capacity as its own (a session past its fair
  share stops its sender until its peer acknowledges), and closes the account when it
  ends: nothing leaks.
- A session never heard from after its ACCEPT is an orphan: when its setup link dies it is
  released after ORPHAN_GRACE, not the session timeout (docs/protocol.md, "Limits").
"""

from __future__ import annotations

from tether.protocol.admission import DEFAULT_FLOOR, MemoryBudget
from tether.protocol.codes import CloseCode
from tether.protocol.events import HandshakeFailed
from tether.protocol.frames import data_header
from tether.protocol.handshake import ClientHandshake
from tether.protocol.router import Router
from tether.protocol.session import (
    ORPHAN_GRACE,
    ORPHANED,
    Session,
    SessionConfig,
    SessionState,
)

from .pair import Pair

KiB = 1024
MiB = 1024 * KiB
KEEPALIVE = 3.0
TIMEOUT = 60.0
CONFIG = SessionConfig(window=1 * MiB, keepalive=KEEPALIVE, timeout=TIMEOUT)


def budgeted(total: int, *, high_water: float = 0.9) -> Router:
    return Router(CONFIG, max_sessions=1 << 20, memory=MemoryBudget(total, high_water=high_water))


def joined(router: Router) -> Pair:
    """A client set up against ``router`` (several pairs may share one server)."""
    p = Pair(CONFIG)
    p.router = router
    p.establish()
    return p


def refused(router: Router) -> list[HandshakeFailed]:
    p = Pair(CONFIG)
    p.router = router
    p.connect()
    p.transfer()
    return p.handshake_failures


# -- the memory budget ---------------------------------------------------------------------


def test_the_server_advertises_the_window_its_budget_grants() -> None:
    router = budgeted(4 * MiB)
    first = joined(router)
    assert first.server.config.window == 1 * MiB  # plenty free: the configured window
    assert router.memory is not None and router.memory.sessions == 1
    # The server's window is what the client paces its acknowledgements by.
    assert first.client._peer_window == 1 * MiB
    held = [first]
    for _ in range(3):  # clients that do not acknowledge: all their bytes are held
        held[-1].blackhole()
        held[-1].server_send(bytes(held[-1].server.config.window))
        held.append(joined(router))
    # 3 MiB of 4 held, a quarter free: the window shrinks, never below the floor.
    fourth = held[-1]
    assert DEFAULT_FLOOR <= fourth.server.config.window < 1 * MiB
    assert fourth.client._peer_window == fourth.server.config.window


def test_the_replay_buffer_is_charged_and_the_account_closed_when_the_session_ends() -> None:
    router = budgeted(8 * MiB)
    budget = router.memory
    assert budget is not None
    p = joined(router)
    p.blackhole()  # nothing reaches the client
    p.server_send(bytes(300 * KiB))
    assert budget.used == p.server.replay_buffered == 300 * KiB
    assert budget.committed == 300 * KiB  # above its reservation: the bytes themselves
    p.server.close(CloseCode.BACKEND_RESET, "gone")
    p.pump()
    assert (budget.used, budget.committed, budget.sessions) == (0, 0, 0)  # no leak


def test_acknowledgements_credit_the_account() -> None:
    router = budgeted(8 * MiB)
    budget = router.memory
    assert budget is not None
    p = joined(router)
    p.server_send(bytes(200 * KiB))
    assert budget.used == 200 * KiB
    p.transfer()
    p.advance(KEEPALIVE)  # the client's delayed acknowledgement
    assert p.server.replay_buffered == budget.used == 0
    assert budget.committed == DEFAULT_FLOOR  # its reservation stays while it lives


def test_what_a_slow_local_side_holds_is_charged_until_it_is_writable_or_the_end() -> None:
    router = budgeted(8 * MiB)
    budget = router.memory
    assert budget is not None
    p = joined(router)
    p.server.local_writable(False)
    p.server.local_held(300 * KiB)
    assert (budget.held, budget.used) == (300 * KiB, 0)
    assert budget.free == 8 * MiB - DEFAULT_FLOOR - 300 * KiB
    p.server.local_writable(True)  # it took them
    assert budget.held == 0
    p.server.local_writable(False)
    p.server.local_held(1 * MiB)
    p.server.close(CloseCode.BACKEND_RESET, "gone")
    p.pump()
    assert (budget.held, budget.committed, budget.sessions) == (0, 0, 0)  # no leak


def test_a_session_past_its_fair_share_stops_its_sender_until_acknowledged() -> None:
    config = SessionConfig(window=4 * MiB, keepalive=KEEPALIVE, timeout=TIMEOUT)
    router = Router(config, max_sessions=16, memory=MemoryBudget(2 * MiB))
    budget = router.memory
    assert budget is not None
    big, small = Pair(config), Pair(config)
    for p in (big, small):
        p.router = router
        p.establish()
    big.blackhole()  # an attacker that never reads or acknowledges
    for _ in range(64):
        room = big.server.send_capacity()
        if room <= 0:
            break
        big.server_send(bytes(min(room, 256 * KiB)))
    # Past the high-water mark and its fair share (half the budget) it is stopped, well
    # short of its window: what is left is the small session's to use.
    assert budget.committed > budget.high_water
    assert big.server.send_capacity() <= 0 and big.server.replay_buffered < 2 * MiB
    assert big.server.replay_buffered > budget.fair_share()
    assert small.server.send_capacity() > 0
    small.server_send(bytes(64 * KiB))
    small.transfer()
    assert len(small.app.received) == 64 * KiB
    assert budget.used <= budget.total and budget.committed <= budget.total
    # Its own client's acknowledgements start it again; nothing was dropped.
    big.blackhole(False)
    big.transfer()
    big.advance(KEEPALIVE)
    assert big.server.send_capacity() > 0
    assert len(big.app.received) == big.server.statistics().bytes_sent


def test_only_when_not_even_the_floor_fits_is_a_setup_refused_and_established_ones_go_on() -> None:
    router = budgeted(1 * MiB, high_water=1.0)
    budget = router.memory
    assert budget is not None
    honest = joined(router)
    hog = joined(router)
    hog.blackhole()
    while (room := hog.server.send_capacity()) > 0:
        hog.server_send(bytes(min(room, 256 * KiB)))
    assert budget.free < DEFAULT_FLOOR
    failures = refused(router)
    assert [f.code for f in failures] == [CloseCode.OVERLOADED]
    assert budget.statistics().refused_total == 1
    assert router.admission.sessions == 2  # the refused setup holds no place
    # The established sessions are untouched, and the honest one still has its floor.
    assert not hog.server.closed and not honest.server.closed
    assert honest.server.send_capacity() > 0
    honest.server_send(b"still served")
    honest.client_send(b"and heard")
    honest.transfer()
    assert bytes(honest.app.received) == b"still served"
    assert bytes(honest.backend.received) == b"and heard"
    # Once the hog's client acknowledges (or the hog ends), setups fit again.
    hog.server.close(CloseCode.BACKEND_RESET, "gone")
    hog.pump()
    assert refused(router) == []


def test_a_cancelled_setup_returns_its_grant_and_says_what_was_reserved() -> None:
    router = budgeted(4 * MiB)
    budget = router.memory
    assert budget is not None
    p = Pair(CONFIG)
    p.router = router
    hs = router.open_link(0.0)
    client_hs = ClientHandshake(p.client, 0.0)
    for chunk in client_hs.data_to_send():
        hs.receive_data(chunk)
    for chunk in hs.data_to_send():
        client_hs.receive_data(chunk)
    for chunk in client_hs.data_to_send():
        hs.receive_data(chunk)
    assert hs.request is not None
    assert router.reserved_for(hs) is None  # not admitted yet: nothing reserved
    assert router.admit_setup(hs, "192.0.2.1") is None
    assert budget.sessions == 1 and budget.committed == DEFAULT_FLOOR
    # what a backend that speaks first may be read of before the session is accepted
    assert router.reserved_for(hs) == DEFAULT_FLOOR
    router.cancel_setup("192.0.2.1", hs)  # the backend was down
    assert (budget.sessions, budget.committed) == (0, 0)
    assert router.admission.sessions == 0
    assert router.reserved_for(hs) is None


# -- orphaned setups -------------------------------------------------------------------------


def test_a_setup_never_heard_from_after_its_accept_is_released_after_the_grace() -> None:
    p = Pair(CONFIG)
    p.establish()  # the client got its ACCEPT, and has said nothing since
    p.cut()
    assert p.server.state is SessionState.DETACHED
    assert p.server.next_timer() == p.now + ORPHAN_GRACE
    assert ORPHAN_GRACE < TIMEOUT
    p.advance(ORPHAN_GRACE - 0.5, transfer=False)
    assert not p.server.closed
    p.advance(1, transfer=False)
    assert p.backend.ended is not None
    assert (p.backend.ended.code, p.backend.ended.reason) == (CloseCode.EXPIRED, ORPHANED)
    assert p.client.session_id not in p.sessions
    # A client that did get the ACCEPT and comes back late is told why.
    p.reconnect()
    p.transfer()
    assert p.app.ended is not None and p.app.ended.code is CloseCode.EXPIRED


def test_a_client_heard_after_the_accept_gets_the_full_timeout() -> None:
    p = Pair(CONFIG)
    p.establish()
    p.client_send(b"x")
    p.transfer()
    p.cut()
    assert p.server.next_timer() == p.now + TIMEOUT


def test_a_resumed_session_is_no_orphan() -> None:
    p = Pair(CONFIG)
    p.establish()
    p.cut()
    p.advance(1, transfer=False)
    p.reconnect()  # the resume proves the client knows the session
    p.transfer()
    assert p.server.state is SessionState.ATTACHED and p.server.statistics().resumes == 1
    p.cut()
    assert p.server.next_timer() == p.now + TIMEOUT


def test_bytes_sent_with_the_setup_do_not_confirm_it() -> None:
    """An attacker's SETUP with DATA pipelined behind it, in one write, proves nothing."""
    router = Router(CONFIG, max_sessions=4)
    hs = router.open_link(0.0)
    client_hs = ClientHandshake(Session.client(CONFIG, 0.0), 0.0)
    for chunk in client_hs.data_to_send():
        hs.receive_data(chunk)
    assert hs.request is not None
    hs.receive_data(data_header(0, 5) + b"early")  # before any ACCEPT was sent
    assert router.admit_setup(hs) is None
    server = router.accept_setup(hs, 0.0)
    assert [type(e).__name__ for e in iter(server.next_event, None)] == [
        "SessionEstablished",
        "DataReceived",
    ]
    server.link_lost(1.0)
    assert server.next_timer() == 1.0 + ORPHAN_GRACE
