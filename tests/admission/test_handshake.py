"""HandshakeAdmission: MaxStartups start:rate:full, per-source limits, bounded memory."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.errors import InvalidState
from tether.protocol.admission import Admission, HandshakeAdmission, source_key


class Dice:
    """Injected randomness: returns the queued values, and counts the calls."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.values.pop(0) if self.values else 0.5


def fill(policy: HandshakeAdmission, n: int) -> list[str]:
    sources = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(n)]
    for source in sources:
        assert policy.admit(source) is Admission.ADMIT
    return sources


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),  # dual-stack listener, IPv4 peer
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("/run/tether.sock", "/run/tether.sock"),
        ("?", "?"),
    ],
)
def test_source_key(address: str, key: str) -> None:
    assert source_key(address) == key


def test_source_key_prefixes() -> None:
    assert source_key("192.0.2.7", ipv4_prefix=24) == "192.0.2.0/24"
    assert source_key("2001:db8::1", ipv6_prefix=128) == "2001:db8::1"
    assert source_key("2001:db8:1:2:3::1", ipv6_prefix=48) == "2001:db8:1::/48"


def test_below_start_always_admits_without_dice() -> None:
    dice = Dice(0.0)
    policy = HandshakeAdmission(100, per_source=1000, start=10, rate=30, random=dice)
    fill(policy, 10)
    assert dice.calls == 0
    assert policy.in_flight == 10


def test_random_early_drop_probability_rises_linearly() -> None:
    policy = HandshakeAdmission(100, per_source=1000, start=10, rate=30, random=Dice())
    fill(policy, 10)
    assert policy.drop_percent() == pytest.approx(30.0)
    fill_more = [f"10.9.0.{i}" for i in range(1, 46)]
    for source in fill_more:
        policy._random = Dice(0.9999)  # never below p < 100: admitted
        assert policy.admit(source) is Admission.ADMIT
    assert policy.in_flight == 55
    assert policy.drop_percent() == pytest.approx(30 + 70 * 45 / 90)  # 65 %


@pytest.mark.parametrize(("roll", "refused"), [(0.0, True), (0.2999, True), (0.30, False)])
def test_at_start_refuses_with_rate_percent(roll: float, refused: bool) -> None:
    dice = Dice(roll)
    policy = HandshakeAdmission(100, per_source=1000, start=10, rate=30, random=dice)
    fill(policy, 10)
    expected = Admission.RANDOM_EARLY_DROP if refused else Admission.ADMIT
    assert policy.admit("198.51.100.1") is expected
    assert dice.calls == 1
    assert policy.in_flight == (10 if refused else 11)


def test_at_full_always_refuses() -> None:
    dice = Dice()
    policy = HandshakeAdmission(5, per_source=10, start=2, rate=0, random=dice)
    policy._random = lambda: 0.9999  # admit everything in the band
    fill(policy, 5)
    calls = dice.calls
    assert policy.admit("198.51.100.1") is Admission.FULL
    assert dice.calls == calls  # the hard limit needs no dice
    assert policy.drop_percent() == 100.0


def test_rate_100_refuses_the_whole_band() -> None:
    policy = HandshakeAdmission(10, per_source=10, start=3, rate=100, random=lambda: 0.9999)
    fill(policy, 3)
    assert policy.admit("198.51.100.1") is Admission.RANDOM_EARLY_DROP


def test_no_start_means_a_hard_cap() -> None:
    policy = HandshakeAdmission(3, per_source=10, random=lambda: 0.0)
    fill(policy, 3)
    assert policy.admit("198.51.100.1") is Admission.FULL
    assert policy.statistics().refused_random == 0


def test_drop_fraction_matches_the_line() -> None:
    """Over many trials at a fixed occupancy, the refused fraction is close to p."""
    policy = HandshakeAdmission(100, 1000, start=10, rate=30, random=random.Random(9).random)
    fill(policy, 10)
    policy._random = lambda: 0.9999
    for i in range(40):  # 50 in flight: p = 30 + 70 * 40 / 90
        assert policy.admit(f"10.8.0.{i + 1}") is Admission.ADMIT
    policy._random = random.Random(9).random
    trials, refused = 20_000, 0
    for _ in range(trials):
        if policy.admit("203.0.113.1") is Admission.ADMIT:
            policy.release("203.0.113.1")
        else:
            refused += 1
    assert refused / trials == pytest.approx((30 + 70 * 40 / 90) / 100, abs=0.015)


def test_per_source_limit_and_ipv6_prefix() -> None:
    policy = HandshakeAdmission(100, per_source=2)
    assert policy.admit("2001:db8::1").admitted
    assert policy.admit("2001:db8::2").admitted  # same /64
    assert policy.admit("2001:db8::3") is Admission.PER_SOURCE
    assert policy.admit("2001:db8:0:1::1").admitted  # the next /64 is another source
    assert policy.admit("192.0.2.1").admitted
    assert policy.admit("::ffff:192.0.2.1").admitted  # the same IPv4 host, mapped
    assert policy.admit("192.0.2.1") is Admission.PER_SOURCE
    assert policy.in_flight_from("2001:db8::99") == 2
    policy.release("2001:db8::1")  # any address of the /64 releases its count
    assert policy.admit("2001:db8::3").admitted
    stats = policy.statistics()
    assert (stats.in_flight, stats.sources, stats.refused_per_source) == (5, 3, 2)


def test_per_source_refusal_comes_before_the_dice() -> None:
    dice = Dice()
    policy = HandshakeAdmission(10, per_source=1, start=0, rate=0, random=dice)
    policy._random = lambda: 0.9999
    assert policy.admit("192.0.2.1").admitted
    policy._random = dice
    assert policy.admit("192.0.2.1") is Admission.PER_SOURCE
    assert dice.calls == 0


def test_release_without_admit_is_misuse() -> None:
    policy = HandshakeAdmission(10, per_source=5)
    with pytest.raises(InvalidState):
        policy.release("192.0.2.1")
    assert policy.admit("192.0.2.1").admitted
    policy.release("192.0.2.1")
    with pytest.raises(InvalidState):
        policy.release("192.0.2.1")
    assert policy.in_flight == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_handshakes": 0, "per_source": 1},
        {"max_handshakes": 10, "per_source": 0},
        {"max_handshakes": 10, "per_source": 1, "start": 11},
        {"max_handshakes": 10, "per_source": 1, "start": -1},
        {"max_handshakes": 10, "per_source": 1, "rate": 101},
        {"max_handshakes": 10, "per_source": 1, "ipv6_prefix": 0},
    ],
)
def test_bad_parameters(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        HandshakeAdmission(**kwargs)  # type: ignore[arg-type]


ADDRESSES = st.sampled_from(
    ["192.0.2.1", "192.0.2.2", "::ffff:192.0.2.1", "2001:db8::1", "2001:db8::2", "2001:db8:1::1"]
)


@given(
    st.lists(st.tuples(st.booleans(), ADDRESSES, st.floats(0, 0.999999)), max_size=200),
    st.integers(1, 8),
    st.integers(1, 4),
    st.integers(0, 8),
)
def test_counts_stay_bounded_and_return_to_zero(
    steps: list[tuple[bool, str, float]], full: int, per_source: int, start: int
) -> None:
    rolls: list[float] = []
    policy = HandshakeAdmission(
        full, per_source, start=min(start, full), rate=30, random=lambda: rolls.pop()
    )
    held: list[str] = []
    for admit, address, roll in steps:
        if admit or not held:
            rolls[:] = [roll]
            if policy.admit(address).admitted:
                held.append(address)
        else:
            policy.release(held.pop(0))
        assert policy.in_flight == len(held) <= full
        keys = {source_key(a) for a in held}
        for key in keys:
            count = sum(1 for a in held if source_key(a) == key)
            assert count <= per_source
        assert policy.statistics().sources == len(keys)
    while held:
        policy.release(held.pop())
    assert policy.in_flight == 0
    assert policy.statistics().sources == 0
    assert policy._sources._counts == {}
