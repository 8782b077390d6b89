"""A plain TCP splice: bytes from one transport written to another, with backpressure
both ways and half-closes kept. The client's fallback uses it (a direct connection
with no reliability); anything that must pass a stream through untouched can.
"""

from __future__ import annotations

import asyncio
from typing import cast

__all__ = ["Splice", "splice_to"]


class Splice(asyncio.Protocol):
    """The protocol of one transport whose bytes go to ``target``."""

    # One pair per fallback and per gateway session: no per-instance dict (CONTRIBUTING.md
    # N4). A subclass declares its own attributes.
    __slots__ = ("done", "target", "transport")

    def __init__(self, target: asyncio.Transport | None = None) -> None:
        self.target = target
        self.transport: asyncio.Transport | None = None
        self.done = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.target is not None:
            self.target.write(data)

    def eof_received(self) -> bool:
        if self.target is not None and self.target.can_write_eof():
            self.target.write_eof()
        return True  # a half-close is not a close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.target is not None:
            if exc is None:
                self.target.close()
            else:
                self.target.abort()
        self.done.set()

    # The target's write buffer is full: stop reading this side (and start again).
    def pause_writing(self) -> None:
        if self.target is not None:
            self.target.pause_reading()

    def resume_writing(self) -> None:
        if self.target is not None and not self.target.is_closing():
            self.target.resume_reading()


async def splice_to(
    local: asyncio.Transport,
    host: str,
    port: int,
    early: list[memoryview],
    early_eof: bool,
) -> tuple[Splice, Splice]:
    """Connect to ``host:port`` and splice ``local`` to it both ways: ``early`` (bytes
    ``local`` sent before) goes first. ``local``'s protocol is swapped with
    ``set_protocol()``; it must be paused for reading by the caller, and is resumed
    here. Returns (local's splice, the remote's). Raises OSError when the connection
    fails."""
    loop = asyncio.get_running_loop()
    inbound = Splice(local)  # remote -> local
    await loop.create_connection(lambda: inbound, host, port)
    remote = inbound.transport
    assert remote is not None
    for piece in early:
        remote.write(piece)
    if early_eof:
        remote.write_eof()
    outbound = Splice(remote)  # local -> remote
    outbound.transport = local
    local.set_protocol(outbound)
    if local.is_closing():
        remote.close()  # the local side went away while we connected
    else:
        local.resume_reading()
    return outbound, inbound
