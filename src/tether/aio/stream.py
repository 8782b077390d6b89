"""Resumable streams for asyncio applications: a tether session used directly, with
no local TCP hop. The same sessions and the same relay as the CLI, behind a small
stream API (read, write, drain, write_eof, close).

Client::

    async with tether.aio.connect("server.example:2598") as stream:
        stream.write(b"hello")
        await stream.drain()
        reply = await stream.read(65536)

Server: ``TetherServer(config, handler=serve)`` calls ``await serve(stream)`` for each
new session instead of opening a backend connection.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, cast

from ..errors import SessionClosed
from ..protocol.codes import CloseCode
from ..protocol.session import SessionStatistics

if TYPE_CHECKING:
    from .link import SessionRelay

__all__ = ["TetherStream"]

READ_LIMIT = 256 * 1024  # bytes buffered for the application before the link is paused


class _ReaderFlow:
    """What a StreamReader calls when its buffer is too full or drained again."""

    def __init__(self, stream: TetherStream) -> None:
        self.stream = stream

    def pause_reading(self) -> None:
        relay = self.stream._relay
        if relay is not None:
            relay.local_pause_writing()

    def resume_reading(self) -> None:
        relay = self.stream._relay
        if relay is not None:
            relay.local_resume_writing()


class _LocalEnd:
    """The stream's side of the relay, shaped like the transport the relay expects."""

    def __init__(self, stream: TetherStream) -> None:
        self.stream = stream
        self.closing = False

    # what the relay writes: bytes from the peer, for the application to read
    def write(self, data: bytes | memoryview) -> None:
        self.stream._reader.feed_data(data)

    def writelines(self, pieces: list[bytes | memoryview]) -> None:
        for piece in pieces:
            self.stream._reader.feed_data(piece)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if not self.stream._reader.at_eof():
            self.stream._reader.feed_eof()

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True
        relay = self.stream._relay
        code = relay.core.close_code if relay is not None else None
        if code is None or code is CloseCode.NORMAL:
            self.write_eof()
        else:
            self.stream._reader.set_exception(SessionClosed(code, "the session ended"))
        self.stream._writable.set()

    def abort(self) -> None:
        self.closing = True
        reason = self.stream._relay.core.close_code if self.stream._relay else None
        self.stream._reader.set_exception(
            ConnectionResetError(f"tether session ended: {reason.name if reason else 'reset'}")
        )
        self.stream._writable.set()

    # what the relay calls for backpressure: its replay buffer is full
    def pause_reading(self) -> None:
        self.stream._writable.clear()

    def resume_reading(self) -> None:
        self.stream._writable.set()


class TetherStream:
    """One end of a tether session as a byte stream. Made by tether, not by users."""

    def __init__(self) -> None:
        self._reader = asyncio.StreamReader(limit=READ_LIMIT)
        self._reader.set_transport(cast(asyncio.ReadTransport, _ReaderFlow(self)))
        self._local = _LocalEnd(self)
        self._writable = asyncio.Event()
        self._writable.set()
        self._relay: SessionRelay | None = None

    def _bind(self, relay: SessionRelay) -> None:
        self._relay = relay
        relay.local = cast(asyncio.Transport, self._local)

    @property
    def session_id(self) -> bytes:
        return self._relay.core.session_id if self._relay else b""

    def statistics(self) -> SessionStatistics:
        assert self._relay is not None
        return self._relay.core.statistics()

    # -- reading ---------------------------------------------------------------------

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all until EOF if ``n`` < 0); b"" at the peer's EOF."""
        return await self._reader.read(n)

    async def readexactly(self, n: int) -> bytes:
        return await self._reader.readexactly(n)

    def at_eof(self) -> bool:
        return self._reader.at_eof()

    # -- writing ---------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        relay = self._relay
        if relay is None or relay.core.closed:
            raise SessionClosed(
                relay.core.close_code if relay and relay.core.close_code else CloseCode.NORMAL,
                "write() on a finished session",
            )
        relay.local_data(bytes(data))

    async def drain(self) -> None:
        """Wait while the replay buffer is full (backpressure, never growth)."""
        await self._writable.wait()
        relay = self._relay
        if (
            relay is not None
            and relay.core.closed
            and relay.core.close_code is not CloseCode.NORMAL
        ):
            code = relay.core.close_code or CloseCode.INTERNAL_ERROR
            raise SessionClosed(code, "the session ended")

    def write_eof(self) -> None:
        if self._relay is not None:
            self._relay.local_eof()

    def close(self, code: CloseCode = CloseCode.NORMAL, reason: str = "closed") -> None:
        """End the session. Unfinished directions are aborted with ``code``."""
        if self._relay is not None:
            self._relay.abort(code, reason)

    async def wait_closed(self) -> None:
        if self._relay is not None:
            await self._relay.ended.wait()

    async def __aenter__(self) -> TetherStream:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()
