"""A server session handed to another process (docs/design.md, "Takeover"):
``Session.export_state`` and ``Router.adopt`` with the fake link and clock of pair.py.
The state crosses a process boundary, so a malformed one is refused with StateError,
never half restored."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.errors import InvalidState, StateError
from tether.protocol.admission import MemoryBudget
from tether.protocol.codes import CloseCode
from tether.protocol.router import Router
from tether.protocol.session import (
    _STATE_BODY,
    _STATE_HEAD,
    ORPHAN_GRACE,
    STATE_SLACK,
    Session,
    SessionConfig,
    SessionState,
)

from .pair import Endpoint, Pair

CONFIG = SessionConfig(window=64 * 1024, timeout=60.0)


def _take_over(pair: Pair, *, memory: MemoryBudget | None = None, later: float = 0.0) -> Router:
    """Every server session of ``pair`` moves to a new router ("the new process"), as a
    takeover does: exported at ``pair.now``, restored ``later`` seconds on by its clock."""
    old = pair.router
    router = Router(old.config, max_sessions=1 << 30, memory=memory)
    for sid, session in list(old.sessions.items()):
        state = session.export_state(pair.now)
        adopted = router.adopt(state, pair.now + later, source="192.0.2.7")
        end = pair.backends[sid]
        pair.backends[sid] = Endpoint(adopted, sent=end.sent, received=end.received)
    pair.router = router
    pair.now += later
    return router


def test_a_session_taken_over_mid_stream_delivers_every_byte_once_in_order() -> None:
    pair = Pair(CONFIG)
    pair.establish()
    pair.client_send(b"a" * 50_000)
    pair.server_send(b"b" * 70_000)
    pair.deliver(to_server=20_000, to_client=30_000)  # part in flight, unacknowledged
    pair.cut()  # the old process closes every link
    old = pair.server
    assert old.state is SessionState.DETACHED and old.replay_buffered > 0
    router = _take_over(pair, later=1.5)
    new = pair.server
    assert new is not old and new.state is SessionState.DETACHED
    assert (new.session_id, new.secret, new.received) == (old.session_id, old.secret, old.received)
    assert new.replay_buffered == old.replay_buffered
    assert router.admission.sessions == 1
    pair.reconnect()  # the client resumes, on the new process
    pair.transfer()
    assert pair.server.state is SessionState.ATTACHED
    pair.client_send(b"c" * 10_000)
    pair.server_send(b"d" * 10_000)
    pair.client_eof()
    pair.server_eof()
    pair.transfer()
    assert bytes(pair.backend.received) == b"a" * 50_000 + b"c" * 10_000
    assert bytes(pair.app.received) == b"b" * 70_000 + b"d" * 10_000
    assert pair.app.ended is not None and pair.app.ended.code is CloseCode.NORMAL
    assert pair.backend.ended is not None and pair.backend.ended.code is CloseCode.NORMAL


def test_an_attached_session_is_exported_as_if_its_link_were_lost_now() -> None:
    pair = Pair(CONFIG)
    pair.establish()
    pair.client_send(b"x")
    pair.transfer()
    state = pair.server.export_state(pair.now)  # still attached
    session = Session.restore(state, CONFIG, now=100.0)
    assert session.state is SessionState.DETACHED
    assert session.expires_at == 100.0 + CONFIG.timeout
    assert session.detached_since == 100.0


def test_the_time_left_and_the_outage_so_far_carry_over() -> None:
    pair = Pair(CONFIG)
    pair.establish()
    pair.client_send(b"x")
    pair.transfer()
    pair.cut()
    pair.advance(20.0)
    state = pair.server.export_state(pair.now)
    session = Session.restore(state, CONFIG, now=1000.0)
    assert session.expires_at == pytest.approx(1000.0 + CONFIG.timeout - 20.0)
    assert session.detached_since == pytest.approx(1000.0 - 20.0)
    session.handle_timer(1000.0 + CONFIG.timeout - 20.0)
    assert session.closed and session.close_code is CloseCode.EXPIRED


def test_an_orphaned_setup_keeps_its_grace() -> None:
    pair = Pair(CONFIG)
    pair.establish()  # the client never speaks after the ACCEPT
    pair.cut()
    session = Session.restore(pair.server.export_state(pair.now), CONFIG, now=0.0)
    assert session.expires_at == pytest.approx(pair.now + ORPHAN_GRACE)


def test_eofs_and_window_carry_over() -> None:
    pair = Pair(CONFIG)
    pair.establish()
    pair.client_send(b"up")
    pair.client_eof()
    pair.server_send(b"down")
    pair.server_eof()
    pair.deliver(to_server=None, to_client=0)  # the server has the client's EOF
    pair.cut()
    old = pair.server
    other = SessionConfig(window=4 * 1024 * 1024)
    new = Session.restore(old.export_state(pair.now), other, now=pair.now)
    assert new.eof_sent and new.eof_received
    assert new.config.window == CONFIG.window  # what its client was told, not the new default
    pair.router.sessions[old.session_id] = new
    pair.backends[old.session_id] = Endpoint(new, sent=pair.backend.sent)
    pair.reconnect()
    pair.transfer()
    assert bytes(pair.app.received) == b"down" and pair.app.eof
    assert pair.app.ended is not None and pair.app.ended.code is CloseCode.NORMAL


def test_the_router_counts_and_charges_adopted_sessions_past_its_limits() -> None:
    pair = Pair(CONFIG)
    pair.establish()
    pair.server_send(b"z" * 30_000)
    pair.cut()
    budget = MemoryBudget(64 * 1024, floor=16 * 1024)
    router = Router(CONFIG, max_sessions=1, memory=budget)
    state = pair.server.export_state(pair.now)
    session = router.adopt(state, pair.now, source="192.0.2.7")
    assert router.admission.sessions_from("192.0.2.7") == 1
    assert budget.sessions == 1 and budget.used == 30_000
    with pytest.raises(StateError, match="twice"):
        router.adopt(state, pair.now, source="192.0.2.7")
    session.close(CloseCode.GOING_AWAY)
    router.forget(session)
    assert router.admission.sessions == 0 and budget.sessions == 0 and budget.used == 0


def test_only_a_live_server_session_is_exported() -> None:
    pair = Pair(CONFIG)
    with pytest.raises(InvalidState):
        pair.client.export_state(0.0)
    pair.establish()
    with pytest.raises(InvalidState):
        pair.client.export_state(0.0)
    pair.server.close(CloseCode.GOING_AWAY)
    with pytest.raises(InvalidState):
        pair.server.export_state(0.0)


def _state() -> bytes:
    pair = Pair(CONFIG)
    pair.establish()
    pair.server_send(b"q" * 1000)
    pair.cut()
    return pair.server.export_state(pair.now)


def _body(state: bytes) -> list[object]:
    return list(_STATE_BODY.unpack_from(state, _STATE_HEAD.size))


def _with(state: bytes, index: int, value: object, extra: bytes = b"") -> bytes:
    body = _body(state)
    body[index] = value
    fixed = _STATE_HEAD.size + _STATE_BODY.size
    return state[: _STATE_HEAD.size] + _STATE_BODY.pack(*body) + state[fixed:] + extra


def test_every_truncation_and_extension_is_refused() -> None:
    state = _state()
    Session.restore(state, CONFIG, 0.0)  # the whole one is fine
    for size in range(len(state)):
        with pytest.raises(StateError):
            Session.restore(state[:size], CONFIG, 0.0)
    with pytest.raises(StateError):
        Session.restore(state + b"!", CONFIG, 0.0)


@pytest.mark.parametrize(
    ("index", "value", "why"),
    [
        (0, 100, "window"),  # below MIN_WINDOW
        (1, 1 << 31, "peer window"),
        (2, float("nan"), "peer timeout"),
        (2, 0.0, "timeout"),
        (3, 5, "offsets"),  # buffer start no longer min(acked, end)
        (4, 1 << 40, "offsets"),  # acknowledged beyond what was sent
        (5, 1 << 40, "offsets"),  # sent beyond the stream
        (6, 1 << 63, "offsets"),
        (7, 0xFF, "flags"),
        (8, float("inf"), "expiry"),
        (8, -1.0, "expiry"),
        (9, 30 * 86400.0, "detached"),
    ],
)
def test_a_malformed_field_is_refused(index: int, value: object, why: str) -> None:
    with pytest.raises(StateError, match=why):
        Session.restore(_with(_state(), index, value), CONFIG, 0.0)


def test_a_foreign_header_or_an_oversized_buffer_is_refused() -> None:
    state = _state()
    with pytest.raises(StateError, match="format"):
        Session.restore(b"XXXX" + state[4:], CONFIG, 0.0)
    with pytest.raises(StateError, match="format"):
        Session.restore(state[:4] + b"\x09" + state[5:], CONFIG, 0.0)
    with pytest.raises(StateError, match="protocol version"):
        Session.restore(state[:5] + b"\x09" + state[6:], CONFIG, 0.0)
    size = CONFIG.window + STATE_SLACK + 1
    with pytest.raises(StateError, match="bytes held"):
        Session.restore(_with(state, 14, size, bytes(size - 1000)), CONFIG, 0.0)
    with pytest.raises(StateError):
        Session.restore(struct.pack("!I", 7) * 40, CONFIG, 0.0)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_mutated_state_restores_or_raises_state_error(data: st.DataObject) -> None:
    """Untrusted input (CONTRIBUTING.md T4): any mutation of a real state either restores a
    session that can go on, or raises StateError; nothing else."""
    state = bytearray(_STATE)
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(state) - 1))
        state[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(state)))
    try:
        session = Session.restore(bytes(state[:cut]), CONFIG, 0.0)
    except StateError:
        return
    assert session.state is SessionState.DETACHED
    assert session.can_resume_from(session.statistics().bytes_acked)
    session.handle_timer(1e9)  # it expires cleanly
    assert session.closed


_STATE = _state()
