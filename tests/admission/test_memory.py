"""MemoryBudget: the sum of replay buffers never exceeds the budget; windows shrink as it
fills; above the high-water mark the largest sessions are stopped, never dropped; bytes
held for a local side that is not reading count against new sessions, not their holder."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tether.errors import InvalidState
from tether.protocol.admission import Account, MemoryBudget

KiB = 1024
MiB = 1024 * KiB


def test_full_window_while_plenty_is_free_then_shrinking_to_the_floor() -> None:
    budget = MemoryBudget(total=64 * MiB, floor=64 * KiB)
    first = budget.grant(4 * MiB)
    assert first is not None
    assert (first.window, first.reserved, first.used) == (4 * MiB, 64 * KiB, 0)
    # Fill three quarters of the budget with one session's bytes: a quarter is free.
    big = budget.grant(64 * MiB)
    assert big is not None and big.window == 64 * MiB
    big.charge(48 * MiB)
    assert budget.free == 16 * MiB - 64 * KiB
    window = budget.window_for(4 * MiB)
    assert window is not None
    assert window == 4 * MiB * 2 * budget.free // budget.total  # about half: 2 MiB
    assert 64 * KiB < window < 4 * MiB
    big.charge(big.capacity())
    assert budget.free == 0  # all used, but for the first session's reservation...
    assert first.capacity() == 64 * KiB  # ...which it can still fill
    assert budget.window_for(4 * MiB) is None  # no new session fits
    assert budget.grant(4 * MiB) is None
    assert budget.statistics().refused_total == 1
    big.credit(200 * KiB)  # some free room: the window is the floor
    assert budget.window_for(4 * MiB) == 64 * KiB
    assert budget.window_for(2 * KiB) == 2 * KiB  # never above what was asked


def test_max_window_caps_the_grant() -> None:
    budget = MemoryBudget(total=64 * MiB, floor=64 * KiB, max_window=1 * MiB)
    account = budget.grant(4 * MiB)
    assert account is not None and account.window == 1 * MiB


def test_capacity_is_the_hard_limit() -> None:
    budget = MemoryBudget(total=1 * MiB, floor=64 * KiB, high_water=1.0)
    a = budget.grant(4 * MiB)
    b = budget.grant(4 * MiB)
    assert a is not None and b is not None
    assert a.window == 1 * MiB  # a window beyond the whole budget could never be used
    assert a.capacity() == 1 * MiB - 64 * KiB  # b's reservation is not a's to take
    a.charge(a.capacity())
    assert a.capacity() == 0
    assert b.capacity() == 64 * KiB  # b can still use its reservation
    with pytest.raises(InvalidState):
        a.charge(1)  # nothing was charged by the refused call
    assert budget.used == 1 * MiB - 64 * KiB
    b.charge(64 * KiB)
    assert budget.used == budget.committed == budget.total
    with pytest.raises(InvalidState):
        b.charge(1)


def test_window_bounds_one_session() -> None:
    budget = MemoryBudget(total=16 * MiB, floor=64 * KiB)
    account = budget.grant(256 * KiB)
    assert account is not None
    assert account.capacity() == 256 * KiB
    account.charge(200 * KiB)
    assert account.capacity() == 56 * KiB
    with pytest.raises(InvalidState):
        account.charge(57 * KiB)
    account.set_used(256 * KiB)
    assert account.capacity() == 0
    account.set_used(10)
    assert (account.used, budget.used, budget.committed) == (10, 10, 64 * KiB)


def test_over_share_stops_the_largest_above_high_water() -> None:
    budget = MemoryBudget(total=1 * MiB, floor=16 * KiB, high_water=0.9)
    hog = budget.grant(1 * MiB)
    small = budget.grant(1 * MiB)
    assert hog is not None and small is not None
    assert budget.fair_share() == 512 * KiB
    hog.charge(600 * KiB)  # committed = 616 KiB < 90 %: no share rule yet
    assert not budget.over_share(hog)
    assert hog.capacity() == 1 * MiB - 600 * KiB - 16 * KiB
    small.charge(340 * KiB)  # committed = 940 KiB > 921.6 KiB
    assert budget.over_share(hog)
    assert hog.capacity() == 0
    assert not budget.over_share(small)
    assert small.capacity() == 1 * MiB - 940 * KiB  # may still grow up to its fair share
    hog.credit(100 * KiB)  # the hog's own acknowledgements resume it
    assert budget.committed == 840 * KiB
    assert not budget.over_share(hog)
    assert hog.capacity() > 0


def test_reserved_bytes_are_never_over_share() -> None:
    budget = MemoryBudget(total=100 * KiB, floor=8 * KiB, high_water=0.5)
    accounts = [budget.grant(64 * KiB) for _ in range(12)]
    assert all(a is not None for a in accounts)
    live = [a for a in accounts if a is not None]
    assert budget.fair_share() == 100 * KiB // 12 > 8 * KiB
    for a in live:
        a.charge(8 * KiB)  # 96 KiB used: above high water, every session at its reservation
    assert budget.committed == 96 * KiB
    assert not any(budget.over_share(a) for a in live)
    assert budget.grant(64 * KiB) is None  # 4 KiB left: not even the floor


def test_held_bytes_count_against_new_sessions_and_the_high_water_mark_not_the_holder() -> None:
    budget = MemoryBudget(total=4 * MiB, floor=64 * KiB, high_water=0.9)
    holder = budget.grant(4 * MiB)
    other = budget.grant(4 * MiB)
    assert holder is not None and other is not None
    assert holder.window == 4 * MiB and budget.committed == 128 * KiB
    alone = 4 * MiB - 128 * KiB + 64 * KiB  # what either could take before anything is held
    assert holder.capacity() == other.capacity() == alone
    holder.hold(2 * MiB)  # a backend that is not reading holds 2 MiB of the peer's
    assert (budget.held, holder.held, budget.used) == (2 * MiB, 2 * MiB, 0)
    assert budget.committed == 128 * KiB  # the replay buffers' own figure is untouched
    assert budget.free == 4 * MiB - 128 * KiB - 2 * MiB  # less than half: windows shrink
    window = budget.window_for(4 * MiB)
    assert window is not None and window == 4 * MiB * 2 * budget.free // budget.total
    assert holder.capacity() == other.capacity() == alone  # below high water: no cut
    holder.hold(4 * MiB)  # more than the budget: never refused, they have arrived
    assert budget.free < 0
    assert budget.window_for(64 * KiB) is None and budget.grant(64 * KiB) is None
    # Above the high-water mark every session, the holder too, may still fill its fair
    # share (never less than its reservation): its reads of its own backend go on.
    assert holder.capacity() == other.capacity() == budget.fair_share() == 2 * MiB
    holder.charge(2 * MiB)
    assert not budget.over_share(holder) and holder.capacity() == 0  # at its share
    holder.credit(2 * MiB)  # its peer's acknowledgements, whatever it holds
    assert holder.capacity() == 2 * MiB
    holder.hold(0)  # the backend took them
    assert budget.held == 0 and budget.free == 4 * MiB - 128 * KiB
    assert holder.capacity() == alone
    holder.hold(1 * MiB)
    holder.close()  # an end returns what was held too
    assert (budget.held, budget.committed, budget.sessions) == (0, 64 * KiB, 1)
    holder.hold(5)  # after the end: nothing
    assert budget.held == 0
    with pytest.raises(ValueError):
        other.hold(-1)


def test_close_returns_everything_and_is_idempotent() -> None:
    budget = MemoryBudget(total=1 * MiB, floor=64 * KiB)
    account = budget.grant(512 * KiB)
    assert account is not None
    account.charge(100 * KiB)
    account.close()
    account.close()
    assert (budget.committed, budget.used, budget.sessions) == (0, 0, 0)
    assert account.capacity() == 0 and not budget.over_share(account)
    with pytest.raises(InvalidState):
        account.charge(1)
    with pytest.raises(InvalidState):
        account.credit(0)


def test_misuse() -> None:
    budget = MemoryBudget(total=1 * MiB)
    account = budget.grant(512 * KiB)
    assert account is not None
    with pytest.raises(InvalidState):
        account.credit(1)
    with pytest.raises(ValueError):
        account.charge(-1)
    with pytest.raises(ValueError):
        budget.window_for(0)
    assert budget.used == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"total": 1000, "floor": 0},
        {"total": 1000, "floor": 2000},
        {"total": 1000, "floor": 10, "max_window": 0},
        {"total": 1000, "floor": 10, "high_water": 0.0},
        {"total": 1000, "floor": 10, "high_water": 1.5},
    ],
)
def test_bad_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        MemoryBudget(**kwargs)  # type: ignore[arg-type]


@given(
    total=st.integers(1, 10_000),
    floor=st.integers(1, 2_000),
    requested=st.integers(1, 20_000),
    committed=st.integers(0, 10_000),
)
def test_window_for_is_bounded(total: int, floor: int, requested: int, committed: int) -> None:
    if floor > total:
        return
    budget = MemoryBudget(total, floor)
    budget._committed = min(committed, total)  # the window depends only on this
    window = budget.window_for(requested)
    free = budget.free
    cap = min(requested, total)
    if window is None:
        assert free < min(floor, cap)
    else:
        assert min(floor, cap) <= window <= cap
        if 2 * free >= total:
            assert window == cap


class BudgetMachine(RuleBasedStateMachine):
    """Any sequence of grant / charge / credit / close keeps every invariant."""

    def __init__(self) -> None:
        super().__init__()
        self.budget = MemoryBudget(total=1_000_000, floor=10_000, high_water=0.8)
        self.open: list[Account] = []

    @rule(requested=st.integers(1, 2_000_000))
    def grant(self, requested: int) -> None:
        expected = self.budget.window_for(requested)
        account = self.budget.grant(requested)
        if account is None:
            assert expected is None
            assert self.budget.free < min(self.budget.floor, requested)
        else:
            assert account.window == expected
            assert account.reserved == min(self.budget.floor, account.window)
            self.open.append(account)

    @precondition(lambda self: bool(self.open))
    @rule(data=st.data(), fraction=st.floats(0, 1))
    def charge_within_capacity(self, data: st.DataObject, fraction: float) -> None:
        account = data.draw(st.sampled_from(self.open))
        n = int(account.capacity() * fraction)
        account.charge(n)  # never raises within capacity()

    @precondition(lambda self: bool(self.open))
    @rule(data=st.data(), extra=st.integers(1, 100_000))
    def charge_beyond_capacity_is_refused(self, data: st.DataObject, extra: int) -> None:
        account = data.draw(st.sampled_from(self.open))
        before = (account.used, self.budget.committed, self.budget.used)
        hard = min(  # held bytes do not refuse a charge: the replay buffers' own bound
            account.window - account.used,
            self.budget.total - self.budget.committed + max(0, account.reserved - account.used),
        )
        n = max(account.capacity(), hard) + extra
        with pytest.raises(InvalidState):
            account.charge(n)
        assert (account.used, self.budget.committed, self.budget.used) == before

    @precondition(lambda self: bool(self.open))
    @rule(data=st.data(), fraction=st.floats(0, 1))
    def credit(self, data: st.DataObject, fraction: float) -> None:
        account = data.draw(st.sampled_from(self.open))
        account.credit(int(account.used * fraction))

    @precondition(lambda self: bool(self.open))
    @rule(data=st.data(), held=st.integers(0, 2_000_000))
    def hold(self, data: st.DataObject, held: int) -> None:
        account = data.draw(st.sampled_from(self.open))
        account.hold(held)  # never refused, whatever the budget holds
        assert account.held == held

    @precondition(lambda self: bool(self.open))
    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        account = data.draw(st.sampled_from(self.open))
        self.open.remove(account)
        account.close()
        account.close()  # idempotent

    @invariant()
    def sum_never_exceeds_total(self) -> None:
        budget = self.budget
        used = sum(a.used for a in self.open)
        committed = sum(max(a.used, a.reserved) for a in self.open)
        assert 0 <= used == budget.used <= committed == budget.committed <= budget.total
        assert budget.sessions == len(self.open)
        held = sum(a.held for a in self.open)
        assert held == budget.held and budget.free == budget.total - committed - held

    @invariant()
    def every_session_can_use_its_reservation(self) -> None:
        for account in self.open:
            assert 0 <= account.used <= account.window
            if account.used < account.reserved:
                assert account.capacity() > 0
            if self.budget.over_share(account):
                assert account.capacity() == 0

    def teardown(self) -> None:
        for account in self.open:
            account.close()
        budget = self.budget
        assert (budget.committed, budget.used, budget.held, budget.sessions) == (0, 0, 0, 0)


TestBudgetMachine = BudgetMachine.TestCase
TestBudgetMachine.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
