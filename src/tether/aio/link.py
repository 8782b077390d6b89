"""The pump between one core :class:`~tether.protocol.session.Session`, its local
transport (the application on the client, the backend on the server) and the
current link transport (STYLE.md item 2: feed the core, write what it returns,
dispatch its events, re-arm its timer).

Flow control, end to end:
- local -> session: ``send()`` into the replay buffer; at ``send_capacity() <= 0``
  the local transport stops being read until acknowledgements free room;
- session -> local: when the local transport's write buffer is full
  (``pause_writing``), the link stops being read, so TCP pushes back on the peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any, Self, cast

from ..protocol.codes import CloseCode
from ..protocol.events import (
    DataReceived,
    EofReceived,
    LinkLost,
    SessionEnded,
    SessionEstablished,
    SessionResumed,
)
from ..protocol.session import Session

__all__ = ["LinkProtocol", "LocalProtocol", "Service", "SessionRelay"]

_RESET_CODES = frozenset(
    {CloseCode.BACKEND_RESET, CloseCode.APPLICATION_RESET, CloseCode.PROTOCOL_ERROR}
)


class SessionRelay:
    """Drives one core session between a local transport and a link transport."""

    def __init__(self, core: Session, log: logging.Logger) -> None:
        self.core = core
        self.log = log
        self.loop = asyncio.get_running_loop()
        self.local: asyncio.Transport | None = None
        self.link: asyncio.Transport | None = None
        self._local_reading_paused = False  # by us, for a full replay buffer
        self._local_writing_paused = False  # the local side cannot take more
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self.ended = asyncio.Event()

    # -- hooks for the roles -----------------------------------------------------

    def on_established(self, event: SessionEstablished) -> None:
        """Client: the server accepted the session."""

    def on_resumed(self, event: SessionResumed) -> None:
        """A new link carries the session."""

    def on_link_lost(self, event: LinkLost | None) -> None:
        """The link is gone (event from the core, or None when the transport died)."""

    def on_ended(self, event: SessionEnded) -> None:
        """The session is over; everything has been closed already."""

    # -- local side --------------------------------------------------------------

    def local_data(self, data: bytes | memoryview) -> None:
        core = self.core
        if core.closed:
            return
        core.send(data)
        if core.send_capacity() <= 0 and self.local is not None:
            self._local_reading_paused = True
            self.local.pause_reading()
        self.pump()

    def local_eof(self) -> None:
        if not self.core.closed:
            self.core.send_eof()
            self.pump()

    def local_lost(self, exc: Exception | None, code: CloseCode) -> None:
        self.local = None
        if not self.core.closed:
            if exc is None and self.core.statistics().eof_sent:
                return  # we closed it ourselves after its EOF; the session goes on
            self.core.close(code, str(exc) if exc else "connection closed")
            self.pump()

    def local_pause_writing(self) -> None:
        self._local_writing_paused = True
        self.core.pause_receiving(True)
        if self.link is not None:
            self.link.pause_reading()

    def local_resume_writing(self) -> None:
        self._local_writing_paused = False
        self.core.pause_receiving(False)
        if self.link is not None and not self.link.is_closing():
            self.link.resume_reading()

    # -- link side ---------------------------------------------------------------

    def set_link(self, transport: asyncio.Transport | None) -> None:
        """Make ``transport`` the session's link, closing the one it replaces."""
        old, self.link = self.link, transport
        if old is not None and old is not transport:
            old.abort()
        if transport is not None and self._local_writing_paused:
            transport.pause_reading()

    def link_data(self, transport: asyncio.Transport, data: bytes) -> None:
        if transport is self.link:
            self.core.receive_data(data)
            self.pump()

    def link_closed(self, transport: asyncio.Transport) -> None:
        if transport is self.link:
            self.link = None
            self.core.link_lost(self.loop.time())
            self.on_link_lost(None)
            self.pump()

    # -- the pump ----------------------------------------------------------------

    def pump(self) -> None:
        core = self.core
        out = core.data_to_send()
        link = self.link
        if out and link is not None and not link.is_closing():
            link.writelines(out)
        received: list[bytes | memoryview] = []
        while (event := core.next_event()) is not None:
            if isinstance(event, DataReceived):
                received.append(event.data)  # written below in one gathering write
                continue
            if received:
                self._deliver(received)
                received = []
            if isinstance(event, EofReceived):
                local = self.local
                if local is not None and not local.is_closing() and local.can_write_eof():
                    local.write_eof()
            elif isinstance(event, SessionEstablished):
                self.on_established(event)
            elif isinstance(event, SessionResumed):
                self.on_resumed(event)
            elif isinstance(event, LinkLost):
                if self.link is not None:
                    self.link.abort()
                    self.link = None
                self.on_link_lost(event)
            elif isinstance(event, SessionEnded):
                self._finish(event)
        if received:
            self._deliver(received)
        if self._local_reading_paused and core.send_capacity() > 0 and not core.closed:
            self._local_reading_paused = False
            if self.local is not None:
                self.local.resume_reading()
        self._arm()

    def _deliver(self, pieces: list[bytes | memoryview]) -> None:
        """Stream bytes for the local side: the pieces of one read of the link (up to four
        64 KiB DATA frames per 256 KiB) go out in one writev under uvloop."""
        local = self.local
        if local is not None and not local.is_closing():
            if len(pieces) == 1:
                local.write(pieces[0])
            else:
                local.writelines(pieces)

    def _finish(self, event: SessionEnded) -> None:
        reset = event.code in _RESET_CODES
        for transport in (self.link, self.local):
            if transport is not None:
                if reset and transport is self.local:
                    transport.abort()
                else:
                    transport.close()
        self.link = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.ended.set()
        self.on_ended(event)

    def _arm(self) -> None:
        when = self.core.next_timer()
        timer = self._timer
        if when is None:
            if timer is not None:
                timer.cancel()
                self._timer = None
            return
        if timer is not None:
            if self._timer_when <= when:
                return  # fires early, handle_timer is a no-op then, and re-arms
            timer.cancel()
        self._timer_when = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.core.handle_timer(self.loop.time())
        self.pump()

    def abort(self, code: CloseCode, reason: str) -> None:
        if not self.core.closed:
            self.core.close(code, reason)
            self.pump()


READ_SIZE = 256 * 1024  # one read from the local side, at most
_scratch = bytearray(READ_SIZE)  # shared read buffer: one event loop reads one socket at a time


class LocalProtocol(asyncio.BufferedProtocol):
    """The application (client) or the backend (server) connection of one session.

    Reads go into a buffer no larger than the replay buffer's remaining capacity, so a
    session never holds more than its bound (the rest waits in the kernel). The read
    buffer is shared; a read of half a buffer or more is handed over whole (no copy)
    and a fresh buffer takes its place, a smaller one is copied out (so a few bytes
    never pin 256 KiB). Idle connections therefore hold no read buffer at all.
    """

    def __init__(self, reset_code: CloseCode) -> None:
        self.relay: SessionRelay | None = None
        self.transport: asyncio.Transport | None = None
        self._reset_code = reset_code
        self._early: list[bytes | memoryview] = []
        self._early_eof = False
        self._lost = False
        self._lost_exc: Exception | None = None

    def get_buffer(self, sizehint: int) -> memoryview:
        size = READ_SIZE
        relay = self.relay
        if relay is not None:
            capacity = relay.core.send_capacity()
            if 0 < capacity < size:
                size = capacity
        return memoryview(_scratch)[:size]

    def buffer_updated(self, nbytes: int) -> None:
        global _scratch
        data: bytes | memoryview
        if nbytes >= READ_SIZE // 2:
            data = memoryview(_scratch)[:nbytes]
            _scratch = bytearray(READ_SIZE)
        else:
            data = bytes(memoryview(_scratch)[:nbytes])
        self.data_received(data)

    def bind(self, relay: SessionRelay) -> None:
        """Attach to a relay, handing it anything that arrived before."""
        self.relay = relay
        relay.local = self.transport
        for chunk in self._early:
            relay.local_data(chunk)
        self._early.clear()
        if self._early_eof:
            relay.local_eof()
        if self._lost:
            relay.local_lost(self._lost_exc, self._reset_code)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes | memoryview) -> None:
        if self.relay is not None:
            self.relay.local_data(data)
        else:
            self._early.append(data)

    def eof_received(self) -> bool:
        if self.relay is not None:
            self.relay.local_eof()
        else:
            self._early_eof = True
        return True  # keep our direction open: a half-close is not a close

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost, self._lost_exc = True, exc
        if self.relay is not None:
            self.relay.local_lost(exc, self._reset_code)

    def pause_writing(self) -> None:
        if self.relay is not None:
            self.relay.local_pause_writing()

    def resume_writing(self) -> None:
        if self.relay is not None:
            self.relay.local_resume_writing()


TCP_RTO_MAX_MS = 44  # <linux/tcp.h>, Linux 6.15 and later
LINK_RTO_MAX_MS = 1000


class LinkProtocol(asyncio.Protocol):
    """A link transport; before it joins a session its bytes go to ``handshake_data``."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.relay: SessionRelay | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # Cap TCP's retransmission backoff on links at 1 s (default 120 s): after a
        # short outage the link's own retransmission, not a resume, carries on at once.
        # Kernels without the option keep their default.
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS, LINK_RTO_MAX_MS)

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        if relay is not None and self.transport is not None:
            relay.link_data(self.transport, data)
        else:
            self.handshake_data(data)

    def handshake_data(self, data: bytes) -> None:
        """Bytes before the link joins a session."""

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.relay is not None and self.transport is not None:
            self.relay.link_closed(self.transport)
        else:
            self.handshake_lost(exc)

    def handshake_lost(self, exc: Exception | None) -> None:
        """The transport died before it joined a session."""


class Service:
    """A server or client: an async context manager owning the TaskGroup of its sessions
    (STYLE.md item 8: every task lives in a group as long as its resource)."""

    _tasks: asyncio.TaskGroup | None = None

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        try:
            await self.start()
        except BaseException:
            await self._tasks.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()
        assert self._tasks is not None
        if exc_info[0] is not None and issubclass(exc_info[0], Exception):
            # The caller's own error: every session is closed, so the tasks end; let
            # the error propagate as itself rather than wrapped in an ExceptionGroup.
            exc_info = (None, None, None)
        await self._tasks.__aexit__(*exc_info)
