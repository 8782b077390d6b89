"""Resumable streams for asyncio applications: a tether session used directly, with
no local TCP hop. The same sessions and the same relay as the CLI, behind a small
stream API (read, write, drain, write_eof, close).

Client::

    async with tether.connect("server.example:2598") as stream:
        stream.write(b"hello")
        await stream.drain()
        reply = await stream.read(65536)

Server: ``TetherServer(config, handler=serve)`` calls ``await serve(stream)`` for each
new session instead of opening a backend connection.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from ..errors import SessionClosed
from ..protocol.codes import CloseCode
from ..protocol.session import SessionStatistics

if TYPE_CHECKING:
    from .link import SessionRelay

__all__ = ["TetherStream"]

READ_LIMIT = 256 * 1024  # bytes buffered for the application before acknowledging waits


class _ReaderFlow(asyncio.ReadTransport):
    """What the stream's StreamReader calls when its buffer is too full or drained
    again: the relay's local side stops (or starts) taking bytes, so the session holds
    back (or sends) its acknowledgements (docs/protocol.md, "Flow control")."""

    __slots__ = ("_stream",)

    def __init__(self, stream: TetherStream) -> None:
        super().__init__()
        self._stream = stream

    def pause_reading(self) -> None:
        relay = self._stream._relay
        if relay is not None:
            relay.local_pause_writing()

    def resume_reading(self) -> None:
        relay = self._stream._relay
        if relay is not None:
            relay.local_resume_writing()


class _LocalEnd:
    """The stream's side of the relay: the relay's ``LocalTransport``."""

    __slots__ = ("_closing", "_stream")

    def __init__(self, stream: TetherStream) -> None:
        self._stream = stream
        self._closing = False

    # what the relay writes: bytes from the peer, for the application to read
    def write(self, data: bytes | memoryview) -> None:
        self._stream._reader.feed_data(data)
        self._stream._fed(len(data))

    def writelines(self, pieces: list[bytes | memoryview]) -> None:
        size = 0
        for piece in pieces:
            self._stream._reader.feed_data(piece)
            size += len(piece)
        self._stream._fed(size)

    def get_write_buffer_size(self) -> int:
        # feed_data() copies: no view the relay hands over is held. What the application
        # has not read yet is bounded by TetherStream._fed instead.
        return 0

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if not self._stream._reader.at_eof():
            self._stream._reader.feed_eof()

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """The session ended: a normal end reads as EOF, any other as an error."""
        self._closing = True
        code = self._stream.close_code
        if code is None or code is CloseCode.NORMAL:
            self.write_eof()
        else:
            self._stream._reader.set_exception(SessionClosed(code, "the session ended"))
        self._stream._writable.set()

    def abort(self) -> None:
        self._closing = True
        code = self._stream.close_code
        self._stream._reader.set_exception(
            ConnectionResetError(f"tether session ended: {code.name if code else 'reset'}")
        )
        self._stream._writable.set()

    # what the relay calls for backpressure: its replay buffer is full
    def pause_reading(self) -> None:
        self._stream._writable.clear()

    def resume_reading(self) -> None:
        self._stream._writable.set()


class TetherStream:
    """One end of a tether session as a byte stream. Made by tether, not by users."""

    # One per session (CONTRIBUTING.md N4): no per-instance dict.
    __slots__ = ("_reader", "_relay", "_unread", "_writable", "local_end")

    def __init__(self) -> None:
        self._reader = asyncio.StreamReader(limit=READ_LIMIT)
        self._reader.set_transport(_ReaderFlow(self))
        self.local_end = _LocalEnd(self)
        self._writable = asyncio.Event()
        self._writable.set()
        self._relay: SessionRelay | None = None
        self._unread = 0  # bytes fed to the reader and not yet read

    def _fed(self, size: int) -> None:
        """The relay handed the application ``size`` more bytes. While the application is
        behind (the reader paused the relay), the link is read only while the session
        waits for the peer's ACKs, and the peer sends at most a window more: what it
        has not read is held for it as by a local transport (``SessionRelay.local_holds``:
        charged to a server's memory budget, and past the window and HOLD_SLACK the
        link is not read whatever the window)."""
        self._unread += size
        relay = self._relay
        if relay is not None and relay._local_writing_paused:
            relay.local_holds(self._unread)

    def bind(self, relay: SessionRelay) -> None:
        """Become ``relay``'s local side (tether calls this once)."""
        self._relay = relay
        relay.local = self.local_end

    @property
    def session_id(self) -> bytes:
        return self._relay.core.session_id if self._relay else b""

    @property
    def close_code(self) -> CloseCode | None:
        """Why the session ended, once it has."""
        return self._relay.close_code if self._relay else None

    def statistics(self) -> SessionStatistics:
        assert self._relay is not None
        return self._relay.core.statistics()

    # -- reading ---------------------------------------------------------------------

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all until EOF if ``n`` < 0); b"" at the peer's EOF."""
        data = await self._reader.read(n)
        self._unread -= len(data)
        return data

    async def readexactly(self, n: int) -> bytes:
        data = await self._reader.readexactly(n)
        self._unread -= len(data)
        return data

    def at_eof(self) -> bool:
        return self._reader.at_eof()

    # -- writing ---------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        relay = self._relay
        if relay is None or relay.core.closed:
            raise SessionClosed(
                self.close_code or CloseCode.NORMAL, "write() on a finished session"
            )
        relay.local_data(bytes(data))

    async def drain(self) -> None:
        """Wait while the replay buffer is full (backpressure, never growth)."""
        await self._writable.wait()
        code = self.close_code
        if code is not None and code is not CloseCode.NORMAL:
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
