"""The allocator's rules (tether.allocator): the heap trimmer gives back what a burst of
connections freed inside glibc's heap, once, and only when enough was freed.

Each case runs in a fresh interpreter: it fragments the heap on purpose, with libc's own
malloc (256 KiB buffers, as the event loop's TLS layer allocates per connection,
between small allocations that outlive them), and reads its own RSS."""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
from prometheus_client import CollectorRegistry

from tether import allocator
from tether.admin.metrics import HeapCollector


def glibc() -> bool:
    try:
        libc = ctypes.CDLL(None)
        return sys.platform.startswith("linux") and hasattr(libc, "gnu_get_libc_version")
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not glibc(), reason="the heap trimmer needs glibc, on Linux")

FRAGMENT = textwrap.dedent(
    """
    import asyncio, ctypes, json, mmap, sys
    from tether import allocator

    allocator.tune()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    BIG = 256 * 1024

    def burst(count):
        # count buffers, each followed by small allocations that outlive it, as a
        # connection's state outlives the buffers of connections that closed before it
        big, small = [], []
        for i in range(count):
            b = libc.malloc(BIG)
            libc.memset(b, 1, BIG)  # resident, as a buffer read into
            big.append(b)
            small.extend(libc.malloc(600 + 40 * j) for j in range(8))
        for b in big:
            libc.free(b)
        return small

    def touched_mapping(size):
        # resident memory outside the heap, as Python's own arenas or a library
        m = mmap.mmap(-1, size)
        for i in range(0, size, mmap.PAGESIZE):
            m[i] = 1
        return m

    # Take up the small free chunks the interpreter's start left, so that the small
    # allocations of a burst come from the heap's end, between its buffers (as in a
    # process that has served connections for a while), not from old holes below them.
    kept = [libc.malloc(700) for _ in range(5000)]
    out = {}
    legacy = "legacy" in sys.argv  # mallinfo, as glibc before 2.33 has it
    trimmer = allocator.HeapTrimmer.for_process(legacy=legacy)
    out["none"] = trimmer is None
    if trimmer is not None:
        outside = touched_mapping(32 << 20)
        out["outside_growth"] = trimmer.tick()  # the RSS grew, but the heap has little free
        # a trimmer that starts with that mapping, which then goes: its floor comes down,
        # so 20 MiB freed afterwards count from there
        second = allocator.HeapTrimmer.for_process(legacy=legacy)
        outside.close()
        out["after_unmap"] = second.tick()
        kept += burst(80)  # 20 MiB
        out["floor_lowered"] = second.tick()
        kept += burst(1)  # below TRIM_MIN
        out["small_burst"] = trimmer.tick()
        kept += burst(400)  # 100 MiB
        before = allocator.resident_bytes()
        out["trimmed"] = trimmer.tick()
        out["given_back"] = before - allocator.resident_bytes()
        out["again"] = trimmer.tick()  # nothing freed since
        kept += burst(160)  # 40 MiB more: the free memory grows past the floor again
        out["after_second_burst"] = trimmer.tick()
        out["trims"] = trimmer.trims
        out["released"] = trimmer.released

        async def service():
            async with allocator.trimming(interval=0.01) as running:
                burst(200)
                for _ in range(500):  # bounded: 5 s at most
                    if running.trims:
                        break
                    await asyncio.sleep(0.01)
                return running.trims

        out["service_trims"] = asyncio.run(service())
    print(json.dumps(out))
    """
)


def fragment(*args: str, **env: str) -> dict[str, object]:
    off = ("TETHER_NO_MALLOC_TUNING", "TETHER_NO_HEAP_TRIM")
    clean = {k: v for k, v in os.environ.items() if k not in off}
    proc = subprocess.run(
        [sys.executable, "-c", FRAGMENT, *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    return result


@pytest.mark.parametrize("counts", ["mallinfo2", "legacy"])
def test_a_trim_gives_back_what_a_burst_freed_once(counts: str) -> None:
    out = fragment(counts)
    assert out["none"] is False
    assert out["outside_growth"] is False  # not the heap's: nothing for a trim to give back
    assert out["after_unmap"] is False
    assert out["floor_lowered"] is True
    assert out["small_burst"] is False  # 256 KiB freed: not worth a trim
    assert out["trimmed"] is True
    # 100 MiB of resident buffers freed inside the heap: most of it given back
    assert isinstance(out["given_back"], int) and out["given_back"] >= 64 * 2**20
    assert out["again"] is False  # the same free memory is not trimmed twice
    assert out["after_second_burst"] is True
    assert out["trims"] == 2  # of the first trimmer
    # what it counts as given back (the admin's counter): the RSS it saw fall, as the test did
    assert isinstance(out["released"], int) and out["released"] >= 64 * 2**20


def test_a_service_trims_on_its_own() -> None:
    out = fragment()
    assert out["service_trims"] == 1


def test_no_malloc_tuning_turns_the_trimmer_off() -> None:
    assert fragment(TETHER_NO_MALLOC_TUNING="1") == {"none": True}
    assert fragment(TETHER_NO_HEAP_TRIM="1") == {"none": True}


def test_a_tick_that_fails_turns_the_trimming_off(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(allocator.HeapTrimmer):
        __slots__ = ()

        def tick(self) -> bool:
            raise RuntimeError("no heap")

    async def main() -> None:
        broken = Broken(lambda: (0, 0), lambda pad: 0, 0)
        async with asyncio.TaskGroup() as group:
            task = group.create_task(allocator.trim_periodically(broken, 0.001))
            await asyncio.wait_for(asyncio.shield(task), 10)  # ends by itself
        assert allocator.running() is None

    with caplog.at_level(logging.WARNING, logger="tether"):
        asyncio.run(main())
    assert "heap trim failed: turned off" in caplog.text
    assert "RuntimeError: no heap" in caplog.text


def test_the_trimming_ends_with_its_body_and_lets_its_errors_through() -> None:
    async def main() -> None:
        async with allocator.trimming(interval=3600) as trimmer:
            assert trimmer is not None
            assert allocator.running() is trimmer
        assert allocator.running() is None
        with pytest.raises(ValueError, match="the body's"):  # itself, not an ExceptionGroup
            async with allocator.trimming(interval=3600):
                raise ValueError("the body's")
        assert allocator.running() is None
        body = asyncio.get_running_loop().create_future()

        async def cancelled() -> None:
            async with allocator.trimming(interval=3600):
                body.set_result(None)
                await asyncio.sleep(3600)

        async with asyncio.TaskGroup() as group:
            task = group.create_task(cancelled())
            await body
            task.cancel()
        assert task.cancelled()
        assert allocator.running() is None

    asyncio.run(main())


def test_the_admin_counters_read_the_running_trimmer() -> None:
    async def main() -> None:
        trimmer = allocator.HeapTrimmer.for_process()
        assert trimmer is not None
        trimmer.trims, trimmer.released, trimmer.seconds = 3, 5 << 20, 0.25
        registry = CollectorRegistry()
        registry.register(HeapCollector())
        assert registry.get_sample_value("tether_heap_trims_total") is None  # none running
        async with asyncio.TaskGroup() as group:
            task = group.create_task(allocator.trim_periodically(trimmer, 3600))
            await asyncio.sleep(0)
            assert registry.get_sample_value("tether_heap_trims_total") == 3
            assert registry.get_sample_value("tether_heap_released_bytes_total") == 5 << 20
            assert registry.get_sample_value("tether_heap_trim_seconds_total") == 0.25
            task.cancel()
        assert registry.get_sample_value("tether_heap_trims_total") is None

    asyncio.run(main())
