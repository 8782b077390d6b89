"""TokenBucket: rate and burst, with an injected clock."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.protocol.ratelimit import TokenBucket


def test_burst_then_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(100.4)  # 0.8 tokens
    assert bucket.take(100.5)  # 1.0
    assert not bucket.take(100.5)
    assert bucket.tokens(200.0) == 3.0  # never more than the burst


def test_take_many_and_never_more_than_burst() -> None:
    bucket = TokenBucket(rate=10.0, burst=5.0)
    assert not bucket.take(0.0, 6)
    assert bucket.tokens(0.0) == 5.0  # a refused take costs nothing
    assert bucket.take(0.0, 5)
    assert bucket.delay(0.0, 2) == pytest.approx(0.2)
    assert bucket.delay(0.0, 6) == math.inf


def test_delay_is_exact_enough_to_take() -> None:
    bucket = TokenBucket(rate=3.0, burst=1.0)
    now = 7.0
    assert bucket.take(now)
    for _ in range(100):
        wait = bucket.delay(now)
        assert wait > 0
        assert not bucket.take(now + wait * 0.99)
        now += wait
        assert bucket.take(now)


def test_a_clock_going_backwards_adds_nothing() -> None:
    bucket = TokenBucket(rate=1.0, burst=2.0)
    assert bucket.take(10.0, 2)
    assert not bucket.take(5.0)
    assert bucket.tokens(10.5) == pytest.approx(0.5)


def test_rate_zero_never_refills() -> None:
    bucket = TokenBucket(rate=0.0, burst=1.0)
    assert bucket.take(0.0)
    assert not bucket.take(1e9)
    assert bucket.delay(1e9) == math.inf


@pytest.mark.parametrize(
    ("rate", "burst"), [(-1.0, 1.0), (math.inf, 1.0), (1.0, 0.0), (1.0, math.nan)]
)
def test_bad_parameters(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


@given(
    st.floats(0.1, 100),
    st.floats(1, 50),
    st.lists(st.floats(0, 2), min_size=1, max_size=200),
)
def test_never_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: float, gaps: list[float]
) -> None:
    bucket = TokenBucket(rate, burst)
    now, taken = 0.0, 0
    for gap in gaps:
        now += gap
        while bucket.take(now):
            taken += 1
        assert 0 <= bucket.tokens(now) < 1 + 1e-6
    elapsed = now - gaps[0]  # the first call sets the origin, with the bucket full
    assert taken <= burst + rate * elapsed + 1e-6
    if max(gaps[1:], default=0) * rate + 1 <= burst:  # never overflowed: no refill lost
        assert taken >= math.floor(burst + rate * elapsed - 1e-6)
