"""SessionAdmission: a cap on sessions, globally and per source."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.errors import InvalidState
from tether.protocol.admission import Admission, SessionAdmission


def test_global_and_per_source_caps() -> None:
    policy = SessionAdmission(max_sessions=3, max_per_source=2)
    assert policy.admit("192.0.2.1") is Admission.ADMIT
    assert policy.admit("192.0.2.1") is Admission.ADMIT
    assert policy.admit("192.0.2.1") is Admission.PER_SOURCE
    assert policy.admit("2001:db8::1") is Admission.ADMIT
    assert policy.admit("198.51.100.1") is Admission.FULL
    assert policy.sessions == 3
    assert policy.sessions_from("192.0.2.1") == 2
    policy.release("192.0.2.1")
    assert policy.admit("198.51.100.1") is Admission.ADMIT
    stats = policy.statistics()
    assert (stats.sessions, stats.sources, stats.admitted_total) == (3, 3, 4)
    assert (stats.refused_full, stats.refused_per_source) == (1, 1)


def test_ipv6_sessions_share_their_64() -> None:
    policy = SessionAdmission(max_sessions=10, max_per_source=1)
    assert policy.admit("2001:db8:5:6::1").admitted
    assert policy.admit("2001:db8:5:6::2") is Admission.PER_SOURCE
    assert policy.admit("2001:db8:5:7::1").admitted


def test_release_is_checked() -> None:
    policy = SessionAdmission(max_sessions=10, max_per_source=1)
    with pytest.raises(InvalidState):
        policy.release("192.0.2.1")
    assert policy.sessions == 0


@pytest.mark.parametrize(("total", "per_source"), [(0, 1), (1, 0)])
def test_bad_parameters(total: int, per_source: int) -> None:
    with pytest.raises(ValueError):
        SessionAdmission(total, per_source)


@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 5)), max_size=150),
    st.integers(1, 6),
    st.integers(1, 3),
)
def test_counts_bounded_and_empty_after_release(
    steps: list[tuple[bool, int]], total: int, per_source: int
) -> None:
    policy = SessionAdmission(total, per_source)
    held: list[str] = []
    for admit, i in steps:
        source = f"192.0.2.{i}"
        if admit:
            answer = policy.admit(source)
            if answer.admitted:
                held.append(source)
            elif answer is Admission.FULL:
                assert len(held) == total
            else:
                assert held.count(source) == per_source
        elif source in held:
            held.remove(source)
            policy.release(source)
        assert policy.sessions == len(held) <= total
        assert all(held.count(s) <= per_source for s in held)
    for source in held:
        policy.release(source)
    assert policy.sessions == 0
    assert policy.statistics().sources == 0
