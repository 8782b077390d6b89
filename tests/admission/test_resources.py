"""resources: the memory budget and file-descriptor headroom the host allows."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tether import resources
from tether.errors import InvalidState
from tether.resources import (
    FALLBACK_MEMORY_BUDGET,
    FdGuard,
    cgroup_memory_limit,
    default_fd_reserve,
    default_memory_budget,
    default_refusal_slice,
    fd_limit,
)

GiB = 1 << 30


def test_a_quarter_of_physical_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {"SC_PHYS_PAGES": 2 * GiB // 4096, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(os, "sysconf", lambda name: values[name])
    monkeypatch.setattr(resources, "cgroup_memory_limit", lambda: None)
    assert default_memory_budget() == 512 << 20


def test_a_smaller_cgroup_limit_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources, "physical_memory", lambda: 64 * GiB)
    monkeypatch.setattr(resources, "cgroup_memory_limit", lambda: 1 * GiB)
    assert default_memory_budget() == GiB // 4


def test_fallback_when_memory_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_sysconf(name: str) -> int:
        raise ValueError(name)

    monkeypatch.setattr(os, "sysconf", no_sysconf)
    monkeypatch.setattr(resources, "cgroup_memory_limit", lambda: None)
    assert resources.physical_memory() is None
    assert default_memory_budget() == FALLBACK_MEMORY_BUDGET


def test_the_real_host() -> None:
    budget = default_memory_budget()
    physical = resources.physical_memory()
    assert physical is not None and 0 < budget <= physical // 4


def test_cgroup_v2_takes_the_tightest_ancestor(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    leaf = root / "system.slice" / "tether.service"
    leaf.mkdir(parents=True)
    (root / "system.slice" / "memory.max").write_text("2147483648\n")
    (leaf / "memory.max").write_text("max\n")
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text("0::/system.slice/tether.service\n")
    assert cgroup_memory_limit(root, proc) == 2 * GiB
    (leaf / "memory.max").write_text("1073741824\n")
    assert cgroup_memory_limit(root, proc) == GiB


def test_cgroup_v1_and_none(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    proc = tmp_path / "missing"
    assert cgroup_memory_limit(root, proc) is None
    (root / "memory").mkdir(parents=True)
    (root / "memory" / "memory.limit_in_bytes").write_text("536870912\n")
    assert cgroup_memory_limit(root, proc) == 512 << 20


def test_fd_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert fd_limit() == (resources.UNLIMITED_FD_LIMIT if soft == resource.RLIM_INFINITY else soft)
    monkeypatch.setattr(resource, "getrlimit", lambda _: (resource.RLIM_INFINITY, 10))
    assert fd_limit() == resources.UNLIMITED_FD_LIMIT
    monkeypatch.setattr(resource, "getrlimit", lambda _: (4096, 8192))
    assert fd_limit() == 4096
    assert FdGuard.from_system().limit == 4096
    assert FdGuard.from_system().reserve == default_fd_reserve(4096) == 256


@pytest.mark.parametrize(("limit", "reserve"), [(64, 32), (1024, 64), (100_000, 6250), (10, 5)])
def test_default_reserve(limit: int, reserve: int) -> None:
    assert default_fd_reserve(limit) == reserve


def test_guard_counts_what_the_driver_owns() -> None:
    guard = FdGuard(limit=10, reserve=4)
    assert guard.available == 6
    assert guard.acquire(2)  # a session: link and backend
    assert guard.acquire(4)
    assert not guard.acquire()
    assert guard.open == 6 and guard.available == 0
    guard.release()
    assert guard.acquire()
    guard.release(6)
    assert guard.open == 0
    with pytest.raises(InvalidState):
        guard.release()
    stats = guard.statistics()
    assert (stats.limit, stats.reserve, stats.open, stats.refused_total) == (10, 4, 0, 1)


@pytest.mark.parametrize(("limit", "reserve"), [(0, 0), (10, 10), (10, -1)])
def test_guard_bad_parameters(limit: int, reserve: int) -> None:
    with pytest.raises(ValueError):
        FdGuard(limit, reserve)


@pytest.mark.parametrize(("reserve", "refusal_slice"), [(32, 8), (64, 16), (6250, 64), (5, 1)])
def test_default_refusal_slice(reserve: int, refusal_slice: int) -> None:
    assert default_refusal_slice(reserve) == refusal_slice
    assert FdGuard(reserve * 2, reserve).refusal_slice == refusal_slice


def test_the_refusal_slice_is_bounded_and_counts_against_the_rest() -> None:
    """Links that will only be told REJECT(OVERLOADED) borrow from a slice of the reserve,
    never more than the slice, and what they hold is not free for new sessions."""
    guard = FdGuard(limit=64, reserve=32)  # slice 8
    assert guard.acquire(32)
    assert not guard.acquire()
    for _ in range(8):
        assert guard.acquire_refusal()
    assert not guard.acquire_refusal()  # past the slice: the driver closes at once
    assert guard.refusing == 8
    guard.release(2)  # a session ended while the refusals are still held
    assert not guard.acquire()  # the borrowed descriptors count: the total stays bounded
    for _ in range(8):
        guard.release_refusal()
    with pytest.raises(InvalidState):
        guard.release_refusal()
    assert guard.acquire(2)
    stats = guard.statistics()
    assert (stats.open, stats.refusing, stats.refusal_slice) == (32, 0, 8)


@pytest.mark.parametrize("refusal_slice", [-1, 17])
def test_guard_bad_refusal_slice(refusal_slice: int) -> None:
    with pytest.raises(ValueError):
        FdGuard(64, 32, refusal_slice)


def test_cgroup_v1_nested(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    leaf = root / "memory" / "jobs" / "job1"
    leaf.mkdir(parents=True)
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (root / "memory" / "jobs" / "memory.limit_in_bytes").write_text("805306368\n")
    (leaf / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text("5:cpu,cpuacct:/\n4:memory:/jobs/job1\n0::/\n")
    assert cgroup_memory_limit(root, proc) == 768 << 20
