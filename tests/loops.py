"""Running a test's coroutine on asyncio's loop or uvloop's (the two loops tether runs on)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

try:
    import uvloop
except ImportError:  # pragma: no cover - the test extra installs it
    uvloop = None  # type: ignore[assignment]

__all__ = ["LOOPS", "Run", "runner"]

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]
LOOPS = ["asyncio", "uvloop"]  # fixture params: the tests run once on each


def runner(kind: str, limit: float) -> Run[Any]:
    """A function that runs a coroutine to completion on a new loop of ``kind`` (skips
    when uvloop is not installed), bounded by ``limit`` seconds (CONTRIBUTING.md T6)."""
    if kind == "uvloop" and uvloop is None:
        pytest.skip("uvloop is not installed")
    factory = uvloop.new_event_loop if kind == "uvloop" else None

    def run(coro: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=factory) as loop_runner:
            return loop_runner.run(asyncio.wait_for(coro, limit))

    return run
