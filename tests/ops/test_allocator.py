"""The allocator's rules (tether.allocator): the heap trimmer gives back what a burst of
connections freed inside glibc's heap, once, and only when enough was freed.

Each case runs in a fresh interpreter: it fragments the heap on purpose, with libc's own
malloc (256 KiB buffers, as the event loop's TLS layer allocates per connection,
between small allocations that outlive them), and reads its own RSS."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap

import pytest


def has_mallinfo2() -> bool:
    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallinfo2")
    except OSError:
        return False


pytestmark = pytest.mark.skipif(
    not has_mallinfo2(), reason="the heap trimmer needs glibc 2.33 or later on Linux"
)

FRAGMENT = textwrap.dedent(
    """
    import asyncio, ctypes, json, sys
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

    out = {}
    trimmer = allocator.HeapTrimmer.for_process()
    out["none"] = trimmer is None
    if trimmer is not None:
        kept = burst(1)  # below TRIM_MIN
        out["small_burst"] = trimmer.tick()
        kept += burst(400)  # 100 MiB
        before = allocator.resident_bytes()
        out["trimmed"] = trimmer.tick()
        out["given_back"] = before - allocator.resident_bytes()
        out["again"] = trimmer.tick()  # nothing freed since
        kept += burst(160)  # 40 MiB more: the free memory grows past the floor again
        out["after_second_burst"] = trimmer.tick()
        out["trims"] = trimmer.trims

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


def fragment(**env: str) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if k != "TETHER_NO_MALLOC_TUNING"}
    proc = subprocess.run(
        [sys.executable, "-c", FRAGMENT],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def test_a_trim_gives_back_what_a_burst_freed_once() -> None:
    out = fragment()
    assert out["none"] is False
    assert out["small_burst"] is False  # 256 KiB freed: not worth a trim
    assert out["trimmed"] is True
    # 100 MiB of resident buffers freed inside the heap: most of it given back
    assert isinstance(out["given_back"], int) and out["given_back"] >= 64 * 2**20
    assert out["again"] is False  # the same free memory is not trimmed twice
    assert out["after_second_burst"] is True
    assert out["trims"] == 2


def test_a_service_trims_on_its_own() -> None:
    out = fragment()
    assert out["service_trims"] == 1


def test_no_malloc_tuning_turns_the_trimmer_off() -> None:
    out = fragment(TETHER_NO_MALLOC_TUNING="1")
    assert out == {"none": True}
