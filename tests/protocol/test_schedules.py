"""Property: any schedule of faults delivers every byte exactly once, in order, both ways,
or ends the session with a reason; it never silently loses or duplicates.

A schedule mixes application writes both ways (up to 200 KiB, past the 64 KiB frame limit
and past the replay window, so backpressure bites), EOFs, partial transfers (a number of
bytes or of whole writes, so links break between any two frames of a handshake: before the
server hello, after it, after SETUP, after ACCEPT was sent but not received, mid RESUME),
losses of in-flight bytes with a cut, silent path death (blackhole: keepalive notices),
reconnects, clock advances (keepalive, handshake timeout, expiry), links whose write buffer
is full for a while (``link_writable``) and rare aborts. Then the
path is healed and the pair is given time to settle, and each side must have received a
prefix of what the other sent: the whole of it, EOF included, unless the session ended
with a code other than NORMAL, and such a code must have a cause in the schedule.
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tether.protocol.codes import CloseCode
from tether.protocol.events import SessionEstablished
from tether.protocol.session import ORPHANED, SessionConfig, SessionState

from .pair import Pair

KEEPALIVE = 2.0
TIMEOUT = 40.0
HANDSHAKE = 5.0
WINDOW = 128 * 1024
CONFIG = SessionConfig(
    window=WINDOW, keepalive=KEEPALIVE, timeout=TIMEOUT, handshake_timeout=HANDSHAKE
)
MAX_STREAM = 3 * 1024 * 1024  # bytes per direction in one schedule

_rng = random.Random(20240501)
UP = _rng.randbytes(MAX_STREAM)
DOWN = _rng.randbytes(MAX_STREAM)

sizes = st.one_of(st.integers(1, 2000), st.integers(60_000, 70_000), st.integers(100_000, 200_000))
partial = st.one_of(st.none(), st.integers(0, 3000))
# How often each operation comes up, out of the sum.
WEIGHTS = {
    "client_write": 6,
    "server_write": 6,
    "deliver": 5,
    "deliver_writes": 4,
    "transfer": 3,
    "advance": 3,
    "cut": 3,
    "reconnect": 4,
    "blackhole": 1,
    "client_eof": 2,
    "server_eof": 2,
    "expire": 1.5,
    "client_abort": 0.2,
    "server_abort": 0.2,
    "writable": 3,
}
ARGUMENTS: dict[str, list[st.SearchStrategy[Any]]] = {
    "client_write": [sizes],
    "server_write": [sizes],
    "deliver": [partial, partial],
    "deliver_writes": [st.integers(0, 3), st.integers(0, 3)],
    "advance": [st.sampled_from([0.3, KEEPALIVE, 2 * KEEPALIVE, HANDSHAKE])],
    "writable": [st.sampled_from(["client", "server"]), st.booleans()],
}
# Repeating a branch of one_of weights it; each op is a plain tuple, so a falsifying
# schedule prints as a readable list.
operations = st.one_of(
    [
        st.tuples(st.just(kind), *ARGUMENTS.get(kind, []))
        for kind, weight in WEIGHTS.items()
        for _ in range(round(weight * 5))
    ]
)
schedules = st.lists(operations, min_size=10, max_size=50)


def write(p: Pair, side: str, size: int) -> None:
    end = p.app if side == "client" else p.backends.get(p.client.session_id)
    if end is None or end.session.closed or end.eof_sent:
        return
    size = min(size, end.session.send_capacity(), MAX_STREAM - len(end.sent))
    if size <= 0:
        return  # backpressure: the driver stops reading its source
    source = UP if side == "client" else DOWN
    at = len(end.sent)
    if side == "client":
        p.client_send(source[at : at + size])
    else:
        p.server_send(source[at : at + size])


def run(p: Pair, op: tuple[Any, ...], causes: set[CloseCode]) -> None:
    kind = op[0]
    backend = p.backends.get(p.client.session_id)
    server_open = backend is not None and not backend.session.closed
    if kind in ("client_write", "server_write"):
        write(p, kind.split("_")[0], op[1])
    elif kind == "deliver":
        p.deliver(to_server=op[1], to_client=op[2])
    elif kind == "deliver_writes":
        p.deliver_writes(op[1], op[2])
    elif kind == "advance":
        p.advance(op[1])
    elif kind == "transfer":
        p.transfer()
    elif kind == "cut":
        p.cut()
    elif kind == "reconnect":
        p.reconnect()
    elif kind == "blackhole":
        p.blackhole()
    elif kind == "client_eof" and not p.client.closed and not p.app.eof_sent:
        p.client_eof()
    elif kind == "server_eof" and server_open and backend is not None and not backend.eof_sent:
        p.server_eof()
    elif kind == "expire":
        p.advance(TIMEOUT + 1)
        causes |= {CloseCode.EXPIRED, CloseCode.RESUME_FAILED}
    elif kind == "client_abort" and not p.client.closed:
        p.client.close(CloseCode.APPLICATION_RESET, "test")
        causes.add(CloseCode.APPLICATION_RESET)
        p.pump()
    elif kind == "writable":
        set_writable(p, op[1], op[2])
    elif kind == "server_abort" and server_open and backend is not None:
        backend.session.close(CloseCode.BACKEND_RESET, "test")
        causes.add(CloseCode.BACKEND_RESET)
        p.pump()


def set_writable(p: Pair, side: str, writable: bool) -> None:
    """The driver's word on one end's link: its write buffer is full, or drained."""
    end = p.app if side == "client" else p.backends.get(p.client.session_id)
    if end is not None and not end.session.closed:
        end.session.link_writable(writable)
        p.pump()


def settled(p: Pair) -> bool:
    if p.client.closed:
        return True
    backend = p.backends.get(p.client.session_id)
    if backend is None or p.client.state is not SessionState.ATTACHED:
        return False
    return (
        p.client.statistics().replay_buffered == 0
        and backend.session.statistics().replay_buffered == 0
        and all(link.in_flight() == 0 for link in p.links)
    )


def heal(p: Pair) -> None:
    """The network comes back for good: reconnect, move everything, let timers settle."""
    set_writable(p, "client", True)
    set_writable(p, "server", True)
    for _ in range(12):
        p.reconnect()
        p.transfer()
        if settled(p) and all(not link.blackholed or not link.client_open for link in p.links):
            p.advance(KEEPALIVE)  # the last delayed acknowledgements
            if settled(p):
                return
        else:
            p.advance(KEEPALIVE)


def check(p: Pair, causes: set[CloseCode]) -> None:
    app = p.app
    ends = [end.ended for end in (app, *p.backends.values()) if end.ended is not None]
    for ended in ends:
        assert ended.code not in (CloseCode.PROTOCOL_ERROR, CloseCode.BAD_PROOF), ended
    # Every server session ever created got a prefix of the client's stream (orphans: none).
    for sid, end in p.backends.items():
        assert app.sent.startswith(end.received), "the backend got bytes the client never sent"
        if sid != p.client.session_id:
            assert not end.received, "an orphan session got application bytes"
    backend = p.backends.get(p.client.session_id)
    if backend is None:
        # Never established: the client must have given up, with a reason.
        assert app.ended is not None and not app.received, app.events
        assert app.ended.code in causes | {CloseCode.RESUME_FAILED}, app.ended
        return
    assert backend.sent.startswith(app.received), "the application got bytes never sent"
    assert not app.eof or (app.received == backend.sent and backend.eof_sent)
    assert not backend.eof or (backend.received == app.sent and app.eof_sent)
    codes = {ended.code for ended in (app.ended, backend.ended) if ended is not None}
    if backend.ended is not None and backend.ended.reason == ORPHANED:
        # The schedule kept the client silent from the ACCEPT until the link died, then
        # away for ORPHAN_GRACE: the server released the session (docs/protocol.md, "Limits").
        causes = causes | {CloseCode.EXPIRED}
    for code in codes - {CloseCode.NORMAL}:
        if code is CloseCode.UNKNOWN_SESSION:
            assert backend.ended is not None, "UNKNOWN_SESSION for a session the server holds"
        else:
            assert code in causes, f"{code.name} without a cause in the schedule"
    if not codes - {CloseCode.NORMAL, CloseCode.UNKNOWN_SESSION} and (
        backend.ended is None or backend.ended.code is CloseCode.NORMAL
    ):
        # Nothing ended the session early: every byte and every EOF arrived, once, in order.
        assert bytes(backend.received) == bytes(app.sent), (
            len(backend.received),
            len(app.sent),
        )
        assert bytes(app.received) == bytes(backend.sent), (len(app.received), len(backend.sent))
        assert backend.eof == app.eof_sent and app.eof == backend.eof_sent
    if CloseCode.NORMAL in codes:
        assert backend.received == app.sent and app.received == backend.sent
        assert app.eof and backend.eof


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(schedules)
# Each link handshake step, written out so that every run breaks a link there: a setup cut
# before the server hello, after it, after ACCEPT was sent but not received (an orphan
# session on the server); a resume cut before its hello, after RESUME was sent, after it
# reached the server but before RESUMED arrived.
@example([("client_write", 5000), ("cut",), ("reconnect",), ("transfer",)])
@example([("deliver_writes", 1, 0), ("cut",), ("reconnect",), ("client_write", 10), ("transfer",)])
@example([("deliver_writes", 2, 1), ("cut",), ("reconnect",), ("client_write", 10), ("transfer",)])
@example(
    [
        *[("transfer",), ("server_write", 70_000), ("client_write", 3), ("cut",), ("reconnect",)],
        *[("deliver_writes", 1, 0), ("cut",), ("reconnect",), ("deliver_writes", 1, 1), ("cut",)],
        *[("reconnect",), ("deliver_writes", 1, 1), ("deliver_writes", 1, 0), ("cut",)],
    ]
)
@example(
    [
        *[("transfer",), ("client_write", 200_000), ("server_eof",), ("deliver", 3000, None)],
        *[("blackhole",), ("advance", 2 * KEEPALIVE), ("reconnect",), ("deliver_writes", 2, 2)],
        *[("cut",), ("client_eof",), ("expire",)],
    ]
)
def test_any_fault_schedule_delivers_once_in_order_or_ends_with_a_reason(
    schedule: list[tuple[Any, ...]],
) -> None:
    p = Pair(CONFIG)
    causes: set[CloseCode] = set()
    p.connect()
    for op in schedule:
        run(p, op, causes)
    heal(p)
    if not p.client.closed:
        assert p.app.of_type(SessionEstablished)
        assert settled(p), "the healed pair did not settle"
    check(p, causes)


def test_the_schedules_reach_the_interesting_places() -> None:
    """A sanity check of the generator: resumes, expiry and normal ends all occur."""
    seen = {"resumed": 0, "expired": 0, "normal": 0}

    @settings(max_examples=150, deadline=None, database=None, derandomize=True)
    @given(schedules)
    def probe(schedule: list[tuple[Any, ...]]) -> None:
        p = Pair(CONFIG)
        causes: set[CloseCode] = set()
        p.connect()
        for op in schedule:
            run(p, op, causes)
        heal(p)
        seen["resumed"] += p.client.statistics().resumes > 0
        codes = [e.ended.code for e in (p.app, *p.backends.values()) if e.ended]
        seen["expired"] += CloseCode.EXPIRED in codes
        seen["normal"] += CloseCode.NORMAL in codes

    probe()
    assert all(seen.values()), seen
