"""glibc's allocator: tuned at start, and given back what a burst of connections left.

Outside the sans-I/O core on purpose (it calls into libc). Both rules are for glibc on
Linux only (the trim reads ``mallinfo2``, or ``mallinfo`` before glibc 2.33), and both are
off with ``TETHER_NO_MALLOC_TUNING=1``; ``TETHER_NO_HEAP_TRIM=1`` turns off the second
alone:

- :func:`tune`, at start: raise malloc's mmap and trim thresholds, so that the data
  path's read buffers (64 KiB-1 MiB) are reused rather than mapped and unmapped per read
  (CONTRIBUTING.md D3; docs/benchmarks.md measures it).
- :class:`HeapTrimmer`, while a service runs (:func:`trimming`): give back to the system
  the free memory glibc keeps inside its heap. Each TLS connection's event-loop layer
  (uvloop's and asyncio's ``SSLProtocol``) allocates a 256 KiB read buffer, under the
  raised threshold as under glibc's own sliding one, so it comes from the heap; after a
  burst of connections ends, the freed buffers are holes between small allocations still
  alive, and glibc returns only the top of its heap by itself. A process that once held a
  few hundred TLS connections kept 100 MiB or more it no longer used, and kept growing
  under churn (docs/fuzzing.md, F7). ``malloc_trim`` releases the whole pages inside free
  chunks (``madvise``), wherever they are; it takes a few milliseconds on such a heap, so
  it runs only when enough has been freed since the last one, at most once per
  :data:`TRIM_INTERVAL`, on the event loop (a trim from another thread would hold the
  arena's lock against the loop's own allocations all the same).

Mapping those buffers instead (a threshold under 256 KiB) also ends the growth, but maps
and unmaps the data path's larger objects too (the TLS ciphertext of each write among
them): 4-18 % more CPU per GiB of bulk (docs/fuzzing.md, F7).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

__all__ = [
    "TRIM_INTERVAL",
    "TRIM_MIN",
    "HeapTrimmer",
    "running",
    "trim_periodically",
    "trimming",
    "tune",
]

MMAP_THRESHOLD: Final = 4 * 1024 * 1024  # above the largest read buffer (1 MiB)
TRIM_THRESHOLD: Final = 32 * 1024 * 1024  # free memory kept at the top of the heap
M_TRIM_THRESHOLD: Final = -1  # <malloc.h>
M_MMAP_THRESHOLD: Final = -3

TRIM_INTERVAL: Final = 5.0  # seconds between two looks at the heap (a look: tens of us)
# Resident bytes freed since the last trim (measured from their lowest point) that make a
# trim worth its few milliseconds: well above what one session's churn frees.
TRIM_MIN: Final = 16 * 1024 * 1024
# A trim this slow stalls every session of the process noticeably: said once, at WARNING.
TRIM_SLOW: Final = 0.1

log = logging.getLogger("tether")


_FIELDS = (
    "arena",  # bytes of the arenas' heaps
    "ordblks",
    "smblks",
    "hblks",
    "hblkhd",  # bytes in chunks mapped one by one
    "usmblks",
    "fsmblks",
    "uordblks",  # bytes allocated
    "fordblks",  # bytes free, in bins and at the tops of the arenas
    "keepcost",  # bytes free at the top of the main arena
)


class _Mallinfo2(ctypes.Structure):
    """``struct mallinfo2`` (glibc 2.33 and later): every field a ``size_t``."""

    _fields_ = [(name, ctypes.c_size_t) for name in _FIELDS]


class _Mallinfo(ctypes.Structure):
    """``struct mallinfo``, all ``int``: what glibc before 2.33 has. Read unsigned, so a
    count up to 4 GiB reads right; past that it wraps."""

    _fields_ = [(name, ctypes.c_uint) for name in _FIELDS]


# What the trimmer reads of the allocator: the bytes it has handed out (in use in the heap,
# plus chunks mapped one by one), and the bytes free outside the main heap's top.
Counts = Callable[[], tuple[int, int]]


def _counts(libc: ctypes.CDLL, *, legacy: bool = False) -> Counts | None:
    """The allocator's counts through ``mallinfo2``, else (or if ``legacy``) through
    ``mallinfo``, whose counts wrap at 4 GiB; None if libc has neither."""
    info: Any = None if legacy else getattr(libc, "mallinfo2", None)
    struct: type[ctypes.Structure] = _Mallinfo2
    if info is None:
        info, struct = getattr(libc, "mallinfo", None), _Mallinfo
        if info is None:
            return None
    info.restype = struct
    info.argtypes = []

    def counts() -> tuple[int, int]:
        got = info()
        return int(got.uordblks + got.hblkhd), max(0, int(got.fordblks - got.keepcost))

    return counts


def _glibc() -> ctypes.CDLL | None:
    """libc, when it is glibc on Linux and tuning is not turned off; else None."""
    if os.environ.get("TETHER_NO_MALLOC_TUNING") or not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc's own: musl, bionic... are left alone)
    except (OSError, AttributeError):
        return None
    return libc


def tune() -> None:
    """Keep glibc from mapping and unmapping memory for every large read buffer.

    Each 64 KiB-1 MiB object the data path allocates is above glibc's default mmap
    threshold, so it costs an mmap, page faults and an munmap; raising the thresholds
    lets freed chunks be reused (CONTRIBUTING.md, "Data path" D3).
    """
    libc = _glibc()
    if libc is None:
        return
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


class HeapTrimmer:
    """Calls ``malloc_trim(0)`` when the process holds :data:`TRIM_MIN` bytes or more of
    resident memory it has freed since the last trim (:meth:`tick`, once per
    :data:`TRIM_INTERVAL`).

    glibc cannot say which free chunks are resident, so the trimmer watches the excess of
    the RSS over the bytes the allocator has handed out (:data:`Counts`): memory freed while
    resident raises it (the RSS stays, the bytes in use fall), memory reused lowers it
    again. A trim when the excess has grown by :data:`TRIM_MIN` since its lowest point since
    the last trim, and the heap holds at least that much free outside its top (whose return
    is glibc's, by the trim threshold). A free chunk reused, touched and freed again between
    two looks counts again, as it should: its pages are resident again. Growth that is not
    the heap's (Python's own arenas, libraries paged in) is not trimmed for unless the heap
    also holds that much free, and then costs one trim that gives back little; the excess
    after each trim is the new starting point. A look reads ``mallinfo2`` (a walk of glibc's
    free lists: tens of microseconds for thousands of free chunks, no system call;
    ``mallinfo`` before glibc 2.33, whose counts wrap past 4 GiB, so that a heap that large
    may trim when it need not, or not when it should) and ``/proc/self/statm``; a look that
    cannot read the RSS is skipped."""

    __slots__ = ("_counts", "_trim", "floor", "released", "seconds", "slow_said", "trims")

    def __init__(self, counts: Counts, trim: Callable[[int], object], floor: int) -> None:
        self._counts = counts
        self._trim = trim
        self.floor = floor  # the lowest excess since the last trim
        self.trims = 0  # trims made
        self.released = 0  # bytes of resident memory the trims gave back (RSS before - after)
        self.seconds = 0.0  # time the trims took, on the event loop
        self.slow_said = False

    @classmethod
    def for_process(cls, *, legacy: bool = False) -> HeapTrimmer | None:
        """A trimmer for this process's allocator, or None where there is none to trim:
        not glibc on Linux, no ``/proc/self/statm``, or ``TETHER_NO_MALLOC_TUNING=1`` or
        ``TETHER_NO_HEAP_TRIM=1``. ``legacy``: read ``mallinfo`` even where there is
        ``mallinfo2`` (what glibc before 2.33 gets)."""
        libc = _glibc()
        if libc is None or os.environ.get("TETHER_NO_HEAP_TRIM"):
            return None
        counts = _counts(libc, legacy=legacy)
        trim = getattr(libc, "malloc_trim", None)
        if counts is None or trim is None:
            return None
        trim.restype = ctypes.c_int
        trim.argtypes = [ctypes.c_size_t]
        rss = resident_bytes()
        if rss is None:
            return None
        return cls(counts, trim, rss - counts()[0])

    def tick(self) -> bool:
        """Trim if enough resident memory was freed since the last trim; True if it did."""
        used, free = self._counts()
        before = resident_bytes()
        if before is None:
            return False
        excess = before - used  # resident bytes beyond what the allocator has handed out
        if excess < self.floor:
            self.floor = excess
            return False
        if excess - self.floor < TRIM_MIN or free < TRIM_MIN:
            return False
        started = time.perf_counter()
        self._trim(0)
        took = time.perf_counter() - started
        after = resident_bytes()
        self.trims += 1
        self.seconds += took
        released = max(0, before - after) if after is not None else 0
        self.released += released
        self.floor = after - used if after is not None else excess
        if took >= TRIM_SLOW and not self.slow_said:
            self.slow_said = True
            log.warning(
                "heap trim took %.0f ms (%.0f MiB free inside the heap): every session waited "
                "that long; TETHER_NO_HEAP_TRIM=1 turns it off (said once)",
                took * 1000,
                free / 2**20,
            )
        else:
            log.debug(
                "heap trim: %.1f MiB given back in %.1f ms (%.1f MiB free inside the heap)",
                released / 2**20,
                took * 1000,
                free / 2**20,
            )
        return True


def resident_bytes() -> int | None:
    """This process's resident memory (``/proc/self/statm``), None if unreadable (no
    procfs, or no descriptor left to open it)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


_running: list[HeapTrimmer] = []  # the trimmers trim_periodically() runs (the admin reads it)


def running() -> HeapTrimmer | None:
    """The trimmer this process runs, if any."""
    return _running[-1] if _running else None


async def trim_periodically(trimmer: HeapTrimmer, interval: float = TRIM_INTERVAL) -> None:
    """Tick ``trimmer`` every ``interval`` seconds until cancelled. A tick that fails is
    logged with its traceback and ends the trimming (it is a saving, not a duty: the
    process goes on without it)."""
    _running.append(trimmer)
    try:
        while True:
            await asyncio.sleep(interval)
            try:
                trimmer.tick()
            except Exception:  # a containment boundary (CONTRIBUTING.md E4)
                log.warning("heap trim failed: turned off", exc_info=True)
                return
    finally:
        _running.remove(trimmer)


@contextlib.asynccontextmanager
async def trimming(interval: float = TRIM_INTERVAL) -> AsyncIterator[HeapTrimmer | None]:
    """While the body runs, :func:`trim_periodically` runs this process's trimmer in a task
    group of its own (nothing where there is none to trim). An error of the body leaves as
    itself, not wrapped in the group's ``ExceptionGroup`` (as ``Service.__aexit__``)."""
    trimmer = HeapTrimmer.for_process()
    if trimmer is None:
        yield None
        return
    error: Exception | None = None
    async with asyncio.TaskGroup() as group:
        task = group.create_task(trim_periodically(trimmer, interval), name="tether heap trim")
        await asyncio.sleep(0)  # started, so running() answers from the body's first line
        try:
            yield trimmer
        except Exception as exc:
            error = exc
        finally:
            task.cancel()
    if error is not None:
        raise error
