"""What the host gives the server: memory for replay buffers and file descriptors.

Outside the sans-I/O core on purpose: it asks the operating system (``os.sysconf``,
``resource.getrlimit``, the cgroup files). Everything here is read once at start-up;
nothing runs per connection.

File descriptors: the server counts the sockets it owns itself, with an :class:`FdGuard`,
rather than asking the kernel per accept (``len(os.listdir('/proc/self/fd'))`` costs a
directory read of every open descriptor, tens of milliseconds at 100k connections). The
guard refuses a new socket while ``open + n > limit - reserve``; the reserve covers what
the driver does not count (the listening sockets, stdio, log files, the resolver, the
event loop's own descriptors) and the socket that ``accept()`` already created before the
driver could refuse it.

A small slice of the reserve (:func:`default_refusal_slice`: a quarter of it, at most 64)
is lent to links that will only be refused: a TLS server must finish the TLS handshake
before its ``REJECT(OVERLOADED)`` can be read (the client trusts no byte before it has
verified the server), so such a link holds its descriptor for up to a handshake. Past the
slice a new connection is closed at once; the slice cannot be exhausted into a hang.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidState

if sys.platform != "win32":
    import resource

__all__ = [
    "FALLBACK_FD_LIMIT",
    "FALLBACK_MEMORY_BUDGET",
    "MEMORY_BUDGET_FRACTION",
    "FdGuard",
    "FdStatistics",
    "cgroup_memory_limit",
    "default_fd_reserve",
    "default_memory_budget",
    "default_refusal_slice",
    "fd_limit",
    "physical_memory",
]

MEMORY_BUDGET_FRACTION = 4  # replay buffers may take a quarter of the machine's memory
FALLBACK_MEMORY_BUDGET = 1 << 30  # when the memory size cannot be read
FALLBACK_FD_LIMIT = 1024  # when the limit cannot be read (the usual Linux soft default)
UNLIMITED_FD_LIMIT = 1 << 20  # what RLIM_INFINITY counts as (Linux's default fs.nr_open)
MIN_FD_RESERVE = 32
REFUSAL_SLICE_FRACTION = 4  # of the reserve, lent to links that are only told REJECT(OVERLOADED)
MAX_REFUSAL_SLICE = 64  # each holds a descriptor for up to a handshake timeout; 64 is plenty

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


def physical_memory() -> int | None:
    """Bytes of physical memory (``SC_PHYS_PAGES * SC_PAGE_SIZE``), or None if unknown."""
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
        page_size = os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None
    if pages <= 0 or page_size <= 0:
        return None
    return pages * page_size


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        value = int(text)  # "max" (cgroup v2, no limit) is not a number
    except ValueError:
        return None
    return value if value > 0 else None


def _limits_up_from(base: Path, relative: str, filename: str) -> list[int]:
    """Every numeric ``filename`` from ``base/relative`` up to ``base`` (a parent's limit
    binds its children)."""
    limits = []
    node = base / relative.strip().lstrip("/")
    while True:
        limit = _read_limit(node / filename)
        if limit is not None:
            limits.append(limit)
        if node == base or base not in node.parents:
            return limits
        node = node.parent


def cgroup_memory_limit(
    root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP
) -> int | None:
    """The memory limit of this process's cgroup (a container's limit), or None.

    The smallest limit on the path from this process's cgroup (``/proc/self/cgroup``) up to
    the hierarchy's root: ``memory.max`` under cgroup v2 (``max`` is no limit),
    ``memory/.../memory.limit_in_bytes`` under v1 (no limit reads as about 2^63; the caller
    takes the minimum with physical memory).
    """
    try:
        lines = proc_self_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    limits: list[int] = []
    v1_seen = False
    for line in lines:
        _, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if line.startswith("0::"):  # the v2 unified hierarchy
            limits += _limits_up_from(root, path, "memory.max")
        elif "memory" in controllers.split(","):
            v1_seen = True
            limits += _limits_up_from(root / "memory", path, "memory.limit_in_bytes")
    if not v1_seen:  # no /proc (or no v1 line): the hierarchy's root still tells
        limit = _read_limit(root / "memory" / "memory.limit_in_bytes")
        if limit is not None:
            limits.append(limit)
    return min(limits) if limits else None


def default_memory_budget() -> int:
    """The default replay-buffer budget: a quarter of the memory this process may use
    (physical memory, or its cgroup's limit if smaller); 1 GiB if neither can be read."""
    known = [m for m in (physical_memory(), cgroup_memory_limit()) if m is not None]
    if not known:
        return FALLBACK_MEMORY_BUDGET
    return min(known) // MEMORY_BUDGET_FRACTION


def fd_limit() -> int:
    """The soft limit on open file descriptors (``RLIMIT_NOFILE``); 1024 if unknown,
    2^20 if unlimited."""
    if sys.platform == "win32":
        return FALLBACK_FD_LIMIT
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return FALLBACK_FD_LIMIT
    if soft == resource.RLIM_INFINITY:
        return UNLIMITED_FD_LIMIT
    return soft if soft > 0 else FALLBACK_FD_LIMIT


def default_fd_reserve(limit: int) -> int:
    """Descriptors to keep out of the guard's reach: 1/16 of the limit, at least 32 (but
    never more than half the limit)."""
    return min(max(MIN_FD_RESERVE, limit // 16), limit // 2)


def default_refusal_slice(reserve: int) -> int:
    """Descriptors of the reserve lent to links that will only be refused: a quarter of
    it, at most 64."""
    return min(reserve // REFUSAL_SLICE_FRACTION, MAX_REFUSAL_SLICE)


@dataclass(frozen=True, slots=True)
class FdStatistics:
    limit: int
    reserve: int
    open: int
    refused_total: int
    refusing: int = 0  # links held from the refusal slice, to be told REJECT(OVERLOADED)
    refusal_slice: int = 0


class FdGuard:
    """Decides whether the server may own ``n`` more sockets, by its own count.

    The driver calls :meth:`acquire` before it owns a new descriptor (right after an accept,
    before connecting to the backend) and :meth:`release` once it has closed one. A refused
    backend connection is answered REJECT OVERLOADED. A refused accept may borrow from the
    refusal slice (:meth:`acquire_refusal`, given back with :meth:`release_refusal`) for as
    long as it takes to tell the client REJECT OVERLOADED; past the slice it is closed at
    once. Borrowed descriptors count against :meth:`acquire` too, so the total never passes
    ``limit - reserve + refusal_slice``.
    """

    __slots__ = ("_open", "_refused", "_refusing", "limit", "refusal_slice", "reserve")

    def __init__(self, limit: int, reserve: int, refusal_slice: int | None = None) -> None:
        """``refusal_slice``: descriptors of the reserve lent to refused links
        (:func:`default_refusal_slice` of the reserve when None)."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if not 0 <= reserve < limit:
            raise ValueError("reserve must be within [0, limit)")
        if refusal_slice is None:
            refusal_slice = default_refusal_slice(reserve)
        if not 0 <= refusal_slice <= reserve // 2:
            raise ValueError("refusal_slice must be within [0, reserve / 2]")
        self.limit = limit
        self.reserve = reserve
        self.refusal_slice = refusal_slice
        self._open = 0
        self._refused = 0
        self._refusing = 0

    @classmethod
    def from_system(cls, reserve: int | None = None) -> FdGuard:
        """A guard over this process's ``RLIMIT_NOFILE``."""
        limit = fd_limit()
        return cls(limit, default_fd_reserve(limit) if reserve is None else reserve)

    @property
    def open(self) -> int:
        """Descriptors the driver holds by its own count."""
        return self._open

    @property
    def refusing(self) -> int:
        """Descriptors borrowed from the refusal slice now."""
        return self._refusing

    @property
    def available(self) -> int:
        return self.limit - self.reserve - self._open - self._refusing

    def acquire(self, n: int = 1) -> bool:
        """Count ``n`` more descriptors if they fit; False (nothing counted) if not."""
        if n < 0:
            raise ValueError("acquire() of a negative count")
        if self._open + self._refusing + n > self.limit - self.reserve:
            self._refused += 1
            return False
        self._open += n
        return True

    def acquire_refusal(self) -> bool:
        """Borrow one descriptor from the refusal slice for a link that will only be
        told REJECT(OVERLOADED); False when the slice is taken (close the link at once)."""
        if self._refusing >= self.refusal_slice:
            return False
        self._refusing += 1
        return True

    def release_refusal(self) -> None:
        """A borrowed descriptor was closed."""
        if self._refusing < 1:
            raise InvalidState("release_refusal() with nothing borrowed")
        self._refusing -= 1

    def release(self, n: int = 1) -> None:
        """``n`` counted descriptors were closed."""
        if n < 0:
            raise ValueError("release() of a negative count")
        if n > self._open:
            raise InvalidState(f"release({n}) with only {self._open} descriptors counted")
        self._open -= n

    def statistics(self) -> FdStatistics:
        return FdStatistics(
            limit=self.limit,
            reserve=self.reserve,
            open=self._open,
            refused_total=self._refused,
            refusing=self._refusing,
            refusal_slice=self.refusal_slice,
        )
