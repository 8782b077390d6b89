"""Small helpers the drivers share."""

from __future__ import annotations

import os

__all__ = ["describe", "format_peer"]


def describe(exc: BaseException) -> str:
    """A short, readable reason: "Connection refused", not "[Errno 111] Connect call failed"."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # asyncio's text hides it ("Connect call failed")
    return str(exc) or type(exc).__name__


def format_peer(address: object) -> str:
    """``HOST:PORT`` of a socket address, IPv6 hosts in brackets."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address) or "?"
