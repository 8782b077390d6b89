"""The loop's shared ticker (aio/ticker.py): slots are never early and late by a bounded
slack; relays due together wake in one pass; moves, cancels and a failing relay."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from tether.aio.ticker import MAX_SLACK, SLACK_SHARE, Ticker, slot_for


class Relay:
    def __init__(self, log: list[tuple[str, float]], name: str, fail: bool = False) -> None:
        self._timer_slot: float | None = None
        self._timer_due = 0.0
        self.log = log
        self.name = name
        self.fail = fail
        self.failed: Exception | None = None

    def _on_timer(self) -> None:
        self.log.append((self.name, asyncio.get_running_loop().time()))
        if self.fail:
            raise RuntimeError("bug")

    def _timer_failed(self, exc: Exception) -> None:
        self.failed = exc


@given(
    now=st.floats(min_value=0, max_value=1e7, allow_nan=False),
    delay=st.floats(min_value=0, max_value=1e5, allow_nan=False),
)
def test_slot_is_never_early_and_late_by_its_slack_at_most(now: float, delay: float) -> None:
    when = now + delay
    slot = slot_for(when, now)
    assert slot >= when
    assert slot - when <= max(min(MAX_SLACK, (when - now) / SLACK_SHARE), 1e-9 * when)


def test_relays_due_together_share_one_slot_and_wake_in_order() -> None:
    async def main() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        ticker = Ticker.of(loop)
        assert Ticker.of(loop) is ticker
        log: list[tuple[str, float]] = []
        relays = [Relay(log, f"r{i}") for i in range(5)]
        now = loop.time()
        slot = slot_for(now + 0.2, now)  # a step of 1/128 s: deadlines just before it share it
        for i, relay in enumerate(relays):
            ticker.schedule(relay, slot - i * 0.0001)
        assert len({r._timer_slot for r in relays}) == 1
        assert len(ticker) == 5
        ticker.cancel(relays[1])
        for _ in range(100):
            if len(log) == 4:
                break
            await asyncio.sleep(0.05)
        assert len(ticker) == 0
        return log

    log = asyncio.run(main())
    assert [name for name, _ in log] == ["r0", "r2", "r3", "r4"]


def test_an_earlier_deadline_moves_a_relay_a_later_one_does_not() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        ticker = Ticker.of(loop)
        log: list[tuple[str, float]] = []
        relay = Relay(log, "r")
        now = loop.time()
        ticker.schedule(relay, now + 1.0)
        first = relay._timer_slot
        assert first is not None
        ticker.schedule(relay, now + 2.0)  # later: stays, wakes early
        assert relay._timer_slot == first
        ticker.schedule(relay, now + 0.05)  # earlier: moves
        assert relay._timer_slot is not None and relay._timer_slot < first
        for _ in range(100):
            if log:
                break
            await asyncio.sleep(0.02)
        assert [name for name, _ in log] == ["r"]
        assert log[0][1] >= now + 0.05
        await asyncio.sleep(0)
        assert len(ticker) == 0  # the old slot fires empty

    asyncio.run(main())


def test_a_failing_relay_costs_itself_only() -> None:
    async def main() -> tuple[list[tuple[str, float]], list[Relay]]:
        loop = asyncio.get_running_loop()
        ticker = Ticker.of(loop)
        log: list[tuple[str, float]] = []
        relays = [Relay(log, "a"), Relay(log, "b", fail=True), Relay(log, "c")]
        now = loop.time()
        for relay in relays:
            ticker.schedule(relay, now + 0.1)
        for _ in range(100):
            if len(log) == 3:
                break
            await asyncio.sleep(0.02)
        return log, relays

    log, relays = asyncio.run(main())
    assert [name for name, _ in log] == ["a", "b", "c"]
    assert isinstance(relays[1].failed, RuntimeError)
    assert relays[0].failed is None and relays[2].failed is None
