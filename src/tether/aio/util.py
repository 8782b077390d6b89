"""Small helpers the drivers share."""

from __future__ import annotations

import os
import socket

__all__ = ["describe", "describe_lookup", "format_peer", "lookup_is_final"]

# getaddrinfo's answers that mean the name has no address (not that the resolver could not
# be asked): EAI_NONAME, EAI_NODATA (glibc only), EAI_FAIL.
_FINAL_LOOKUP = frozenset(
    code
    for code in (
        getattr(socket, "EAI_NONAME", None),
        getattr(socket, "EAI_NODATA", None),
        getattr(socket, "EAI_FAIL", None),
    )
    if code is not None
)


def describe(exc: BaseException) -> str:
    """A short, readable reason: "Connection refused", not "[Errno 111] Connect call failed"."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, socket.gaierror):  # its errno is an EAI_ code, not an errno
        return describe_lookup(exc)
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # asyncio's text hides it ("Connect call failed")
    return str(exc) or type(exc).__name__


def format_peer(address: object) -> str:
    """``HOST:PORT`` of a socket address, IPv6 hosts in brackets."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address) or "?"


def lookup_is_final(exc: socket.gaierror) -> bool:
    """Does the failed lookup say the name has no address, rather than that the resolver
    could not answer now (``EAI_AGAIN``: no network, no reachable name server)?"""
    return exc.errno in _FINAL_LOOKUP


def describe_lookup(exc: socket.gaierror) -> str:
    """A failed name lookup as one: "name does not resolve", not "Unknown error -2"."""
    if lookup_is_final(exc):
        return "name does not resolve"
    if exc.errno == getattr(socket, "EAI_AGAIN", None):
        return "name does not resolve now (no name server answered)"
    return f"name lookup failed ({exc.strerror or exc})"
