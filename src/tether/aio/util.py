"""Small helpers the drivers share."""

from __future__ import annotations

import os

__all__ = ["describe"]


def describe(exc: BaseException) -> str:
    """A short, readable reason: "Connection refused", not "[Errno 111] Connect call failed"."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # asyncio's text hides it ("Connect call failed")
    return str(exc) or type(exc).__name__
