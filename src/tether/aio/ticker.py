"""One timer for many sessions: the tick an event loop shares among its session relays.

Each core says when it next needs ``handle_timer`` (``next_timer()``, CONTRIBUTING.md L2).
A TimerHandle per session would make 10,000 idle sessions 10,000 separate wake-ups of
the event loop per keepalive interval, each a turn of the loop with its own PING or PONG
write (B4 in docs/benchmarks.md). Instead, a relay's deadline goes into a slot: the
deadline rounded up to a grid whose step is at most 1/16 of the time left until it, and
at most :data:`MAX_SLACK`. All relays due in one slot wake in one pass from one loop
timer, so sessions whose ticks fall close together cost one wake-up, and their PINGs
(or PONGs) leave in one turn of the loop, which lets the peer's reads batch too.

A slot is never earlier than the deadline it holds: the core's timer fires late by less
than 1/16 of its distance (125 ms at most), never early. That is the whole departure from
one timer per session (docs/design.md, "One tick for many sessions").
"""

from __future__ import annotations

import asyncio
import logging
import math
import weakref
from typing import Final, Protocol

__all__ = ["MAX_SLACK", "Ticker", "slot_for"]

logger: Final = logging.getLogger("tether.ticker")

MAX_SLACK: Final = 0.125  # seconds a timer may fire late, at most (a power of two: exact floats)
SLACK_SHARE: Final = 16  # ... and at most 1/16 of the time left until it
MIN_STEP: Final = 1.0 / 1024  # below this, no rounding (about 1 ms, the loop's own resolution)


class Timed(Protocol):
    """What the ticker wakes: a relay that remembers the slot it is in."""

    _timer_slot: float | None
    _timer_due: float

    def _on_timer(self) -> None: ...

    def _timer_failed(self, exc: Exception) -> None: ...


def slot_for(when: float, now: float) -> float:
    """``when`` rounded up to the grid of its slack: the largest power-of-two step no
    greater than ``min(MAX_SLACK, (when - now) / SLACK_SHARE)``."""
    slack = (when - now) / SLACK_SHARE
    if slack >= MAX_SLACK:
        step = MAX_SLACK
    elif slack >= MIN_STEP:
        step = 2.0 ** math.floor(math.log2(slack))
    else:
        return when
    return math.ceil(when / step) * step


class Ticker:
    """The timer slots of one event loop; :meth:`of` gives the loop's one ticker."""

    __slots__ = ("_loop", "_slots")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._slots: dict[float, dict[Timed, None]] = {}  # slot time -> relays, in order

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Ticker:
        ticker = _tickers.get(loop)
        if ticker is None:
            ticker = _tickers[loop] = cls(loop)
        return ticker

    def schedule(self, timed: Timed, when: float) -> None:
        """Wake ``timed`` (its ``_on_timer``) at ``when`` or up to its slack later, unless
        it is already in a slot no later than that. The relay remembers the slot
        (``_timer_slot``) and the deadline it was chosen for (``_timer_due``): a later
        deadline keeps that slot, so it may fire up to that deadline's slack late."""
        loop = self._loop
        slot = slot_for(when, loop.time())
        current = timed._timer_slot
        if current is not None:
            if current <= slot:
                if when < timed._timer_due:
                    timed._timer_due = when  # the slot is no later than this one's
                return  # wakes early: handle_timer is a no-op then, and it re-arms
            members = self._slots.get(current)
            if members is not None:
                members.pop(timed, None)
        timed._timer_slot = slot
        timed._timer_due = when
        members = self._slots.get(slot)
        if members is None:
            members = self._slots[slot] = {}
            loop.call_at(slot, self._fire, slot)
        members[timed] = None

    def cancel(self, timed: Timed) -> None:
        current = timed._timer_slot
        if current is not None:
            timed._timer_slot = None
            members = self._slots.get(current)
            if members is not None:
                members.pop(timed, None)

    def _fire(self, slot: float) -> None:
        members = self._slots.pop(slot, None)
        if not members:
            return
        for timed in members:
            if timed._timer_slot != slot:
                continue  # moved to another slot meanwhile (by another's wake-up)
            timed._timer_slot = None
            try:
                timed._on_timer()
            except Exception as exc:  # a bug must cost its session only, not the whole slot
                timed._timer_failed(exc)

    def __len__(self) -> int:
        """Relays waiting in a slot (for tests)."""
        return sum(
            1
            for slot, members in self._slots.items()
            for timed in members
            if timed._timer_slot == slot
        )


_tickers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Ticker] = weakref.WeakKeyDictionary()
