"""The asyncio pumps around the core: one link, one session (CONTRIBUTING.md, "Layers" L3:
feed the core, write what it returns, dispatch its events, re-arm its timer).

- :class:`LinkProtocol` is one link transport on either side. Its handshake
  (``ServerHandshake`` or ``ClientHandshake``) owns it first: handshake events go to
  the link's :class:`LinkOwner` (the server or the client session), which decides.
  Once the handshake has handed the link to a session, :meth:`LinkProtocol.hand_over`
  gives it to that session's relay and every later byte goes straight there.
- :class:`SessionRelay` drives one core ``Session`` between its local transport (the
  application on the client, the backend on the server) and its current link.
- :class:`LocalProtocol` is the local connection of a relay.

Flow control, end to end:
- local -> session: ``send()`` into the replay buffer; at ``send_capacity() <= 0``
  the local transport stops being read until acknowledgements free room;
- session -> link: when the link's write buffer is full (``pause_writing``), the core
  is told (``link_writable(False)``) and frames nothing new for it; the bytes wait in
  the replay buffer, which then fills and pauses the local side as above;
- session -> local: when the local transport's write buffer is full
  (``pause_writing``), the core is told (``local_writable(False)``) and acknowledges
  nothing new, so the peer sends at most a window more, and the link stops being read, so
  TCP pushes back on the peer; but while this side's own window is spent (its local side
  paused above), the link is read all the same, for the peer's acknowledgements of our
  bytes travel on it behind its data. Read so, the local transport may come to hold up to
  the window; past it and HOLD_SLACK (a peer that does not keep to the window) the link
  stops being read whatever the window (docs/design.md, "Flow control").
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import sys
import weakref
from collections.abc import Callable
from typing import Final, Protocol, cast

from mypy_extensions import mypyc_attr

from ..protocol.codes import CloseCode
from ..protocol.events import (
    DataReceived,
    EofReceived,
    Event,
    LinkLost,
    ServerDraining,
    SessionEnded,
    SessionEstablished,
    SessionResumed,
)
from ..protocol.handshake import ClientHandshake, HandshakeStage, ServerHandshake
from ..protocol.session import Role, Session, SessionState
from .ticker import Ticker
from .util import describe

__all__ = [
    "LinkOwner",
    "LinkProtocol",
    "LinkReads",
    "LocalProtocol",
    "LocalTransport",
    "SessionRelay",
]

logger: Final = logging.getLogger("tether.link")

_RESET_CODES: Final = frozenset(
    {CloseCode.BACKEND_RESET, CloseCode.APPLICATION_RESET, CloseCode.PROTOCOL_ERROR}
)


class LocalTransport(Protocol):
    """What a relay uses of its local side: an ``asyncio.Transport``, or a TetherStream's
    end for library users."""

    def write(self, data: bytes | memoryview) -> None: ...
    def writelines(self, pieces: list[bytes | memoryview]) -> None: ...
    def get_write_buffer_size(self) -> int: ...
    def can_write_eof(self) -> bool: ...
    def write_eof(self) -> None: ...
    def is_closing(self) -> bool: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


# A link write of fewer bytes than this (a keystroke's DATA frame, its ACK, a PONG) goes out
# joined, as one bytes object: uvloop sends a single buffer straight with write(2), while a
# list costs a memoryview cast per piece and a write context around writev(2). Larger ones
# go out as the list, payloads uncopied (CONTRIBUTING.md D2).
JOIN_WRITES_BELOW: Final = 4096

# A link read is handled at most this many frames at a time; the rest waits for the event
# loop's next turn with the link not read meanwhile, so that a read of tiny frames (a 1 MiB
# read holds 80,000 one-byte DATA frames) cannot keep every other session on the loop
# waiting. A bulk read has 16 (CONTRIBUTING.md D7; docs/design.md, "Dense reads").
FRAMES_PER_TURN: Final = 1024

# What a slow local side may hold past the session's window before the link stops being
# read: the transport's high-water mark and one link read's delivery (LINK_READ_SIZE),
# twice over. A peer that keeps to the window never reaches it (docs/design.md, "Flow
# control"); one that does not is pushed back on by TCP.
HOLD_SLACK: Final = 2 * 1024 * 1024


# This module may be compiled with mypyc (setup.py); the roles (aio/client.py, aio/server.py)
# subclass SessionRelay and LocalProtocol in plain Python, which mypyc_attr allows. Without
# mypyc the decorator does nothing.
@mypyc_attr(allow_interpreted_subclasses=True)
class SessionRelay:
    """Drives one core session between a local transport and a link transport."""

    # One per session, so no per-instance dict (B4, idle memory per session). A subclass
    # declares its own attributes in its own __slots__; an attribute added here needs
    # its name here.
    __slots__ = (
        "_deferred",
        "_ended",
        "_ended_event",
        "_frozen",
        "_link_held",
        "_link_stopped",
        "_local_reading_paused",
        "_local_writing_paused",
        "_ticker",
        "_timer_due",
        "_timer_slot",
        "core",
        "detached_at",
        "lingering",
        "link",
        "local",
        "local_address",
        "log",
        "loop",
        "peer",
        "started_at",
    )

    def __init__(self, core: Session, log: logging.Logger) -> None:
        self.core = core
        self.log = log
        self.loop = asyncio.get_running_loop()
        self.local: LocalTransport | None = None
        self.link: asyncio.Transport | None = None
        # The link of a session that ended, still read until the peer closes it (_close_link).
        self.lingering: asyncio.Transport | None = None
        self._local_reading_paused = False  # by us, for a full replay buffer
        self._frozen = False  # a takeover: neither side is read, no timer runs
        self._local_writing_paused = False  # the local side cannot take more
        self._link_held = False  # ... and holds more than HOLD_SLACK past the window: not read
        self._link_stopped = False  # the link is not read, for either reason (_steer_link)
        # The end of a link read the core left for the loop's next turn (FRAMES_PER_TURN).
        self._deferred: memoryview | None = None
        # The core's next deadline waits in a slot of the loop's shared ticker (ticker.py).
        self._ticker = Ticker.of(self.loop)
        self._timer_slot: float | None = None
        self._timer_due = 0.0  # the deadline that slot was chosen for
        # ``ended``'s Event, made only when someone waits for the end: an asyncio.Event
        # and its deque of waiters are about 0.8 KiB, which no idle session needs.
        self._ended = False
        self._ended_event: asyncio.Event | None = None
        # For operators (the admin endpoint): set by the roles, read by aio/service.py.
        self.started_at = self.loop.time()
        self.detached_at: float | None = None  # when the current outage began
        self.peer = "?"  # the other tether: the server's client, the client's server
        self.local_address = "?"  # the server's backend, or the client's application

    @property
    def close_code(self) -> CloseCode | None:
        return self.core.close_code

    @property
    def ended(self) -> asyncio.Event:
        """Set once the session is over (made on first use)."""
        event = self._ended_event
        if event is None:
            event = self._ended_event = asyncio.Event()
            if self._ended:
                event.set()
        return event

    # -- hooks for the roles -----------------------------------------------------

    def on_established(self, event: SessionEstablished) -> None:
        """The setup completed."""

    def on_resumed(self, event: SessionResumed) -> None:
        """A new link carries the session."""

    def on_link_lost(self, reason: str) -> None:
        """The link is gone (the core gave up on it, or its transport died)."""

    def on_server_draining(self, event: ServerDraining) -> None:
        """Client: the server said it is draining (the session goes on)."""

    def on_ended(self, event: SessionEnded) -> None:
        """The session is over; everything has been closed already (its link may linger:
        :attr:`lingering`)."""

    def on_lingered(self, unconfirmed: str | None) -> None:
        """The link that outlived the session's end (:attr:`lingering`) is closed: by the
        peer (None: it read the end), or not (why: lost, or the linger ran out)."""

    # -- local side --------------------------------------------------------------

    def local_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the local side (``_local_data``)."""
        _local_data(self, data)

    def local_eof(self) -> None:
        if not self.core.closed:
            self.core.send_eof()
            _pump(self)

    def local_lost(self, exc: Exception | None, code: CloseCode) -> None:
        self.local = None
        if not self.core.closed:
            if exc is None and self.core.eof_sent:
                # We closed it ourselves after its EOF; the session goes on, and nothing
                # waits for this side to take bytes any more.
                if self._local_writing_paused:
                    self.local_resume_writing()
                return
            # A client's session detached from its server tells the server on its next link
            # (Session.close: deliver), rather than leave it its backend until expiry.
            self.core.close(code, str(exc) if exc else "connection closed", deliver=True)
            _pump(self)

    def local_pause_writing(self) -> None:
        self._local_writing_paused = True
        self.core.local_writable(False)
        self._steer_link()

    def local_resume_writing(self) -> None:
        self._local_writing_paused = False
        self._link_held = False
        self.core.local_writable(True)
        self._steer_link()
        _pump(self)  # the acknowledgement held back meanwhile

    def local_holds(self, held: int) -> None:
        """The slow local side (paused, ``local_pause_writing``) holds ``held`` bytes it
        has not taken, after a link read: the core charges them to the session's memory
        account, if it has one (docs/design.md, "Flow control"), and past the window and
        HOLD_SLACK the link is not read until the local side has drained
        (``local_resume_writing``), whatever the window."""
        self.core.local_held(held)
        if held > self.core.config.window + HOLD_SLACK and not self._link_held:
            self._link_held = True
            self._steer_link()

    def _steer_link(self) -> None:
        """Read the link or not (docs/design.md, "Flow control"). Not while the local side
        is slow: TCP pushes back on the peer and nothing piles up here; unless this side
        waits for the peer's ACKs (its window is spent, its local side paused), which
        travel behind the peer's data: then read, with the peer held to a window by the
        ACKs we hold back, until the hold. The core hears of every stop (keepalive)."""
        stop = self._link_held or (self._local_writing_paused and not self._local_reading_paused)
        if stop == self._link_stopped:
            return
        self._link_stopped = stop
        self.core.pause_receiving(stop)
        link = self.link
        if link is not None and not link.is_closing() and self._deferred is None:
            # (with a rest of a read pending, _take_deferred decides once it is taken)
            if stop:
                link.pause_reading()
            else:
                link.resume_reading()

    # -- link side ---------------------------------------------------------------

    def set_link(self, transport: asyncio.Transport, *, writable: bool = True) -> None:
        """Make ``transport`` the session's link, closing the one it replaces.
        ``writable``: its write buffer is below its high-water mark."""
        old, self.link = self.link, transport
        if old is not transport:
            self._deferred = None  # the end of a read of an old link: sent again on this one
            if old is not None:
                old.abort()  # superseded by a newer resume of the same session
        if self._link_stopped:
            transport.pause_reading()
        if not writable:
            self.core.link_writable(False)

    def link_data(
        self, transport: asyncio.Transport | None, data: bytes | bytearray | memoryview
    ) -> None:
        """Bytes read from ``transport`` (``_link_data``)."""
        _link_data(self, transport, data)

    def _take_deferred(self, transport: asyncio.Transport) -> None:
        """The loop's next turn after ``_feed`` left a rest: the next part of it, or, once
        none is left, reading the link again."""
        link = self.link
        if transport is not link or transport.is_closing():
            if link is None or link is transport:
                self._deferred = None  # its link is gone: the peer sends them again on the next
            return  # (else a newer link's own rest, with its own call)
        try:
            rest = self._deferred
            if rest is not None:
                self._deferred = None
                if _feed(self, transport, rest):
                    return  # more left: the next call is due
            if not self._link_stopped and transport is self.link and not transport.is_closing():
                transport.resume_reading()
        except Exception as exc:  # not in a transport's callback, which would close the link
            self._bug("handling a link read", exc)

    def link_writable(self, transport: asyncio.Transport, writable: bool) -> None:
        """The link's write buffer went above its high-water mark, or drained below the
        low one: the core stops, or resumes, producing for it."""
        if transport is self.link and not self.core.closed:
            self.core.link_writable(writable)
            if writable:
                _pump(self)

    def link_closed(self, transport: asyncio.Transport, exc: Exception | None = None) -> None:
        if transport is self.link:
            self.link = None
            self.core.link_lost(self.loop.time())
            self.on_link_lost(describe(exc) if exc is not None else "connection closed")
            _pump(self)
        elif transport is self.lingering:
            self.lingering = None
            self.on_lingered(None if exc is None else f"the link was lost ({describe(exc)})")

    # -- the pump ----------------------------------------------------------------

    def pump(self) -> None:
        """Write what the core has for the link, and act on its events (``_pump``)."""
        _pump(self)

    def _finish(self, event: SessionEnded) -> None:
        reset = event.code in _RESET_CODES
        link, local = self.link, self.local
        if link is not None:
            _close_link(self, link, event)
        if local is not None:
            if reset:
                local.abort()
            else:
                local.close()
        self.link = None
        self._ticker.cancel(self)
        self._ended = True
        if self._ended_event is not None:
            self._ended_event.set()
        self.on_ended(event)

    def _arm(self, when: float | None) -> None:
        slot = self._timer_slot
        if when is None:
            if slot is not None:
                self._ticker.cancel(self)
        elif slot is None or when < self._timer_due:
            self._ticker.schedule(self, when)
        # else: the slot comes first; handle_timer is a no-op then, and it re-arms

    def _on_timer(self) -> None:
        """The ticker's wake-up (it has taken the relay out of its slot)."""
        self.core.handle_timer(self.loop.time())
        _pump(self)

    def _timer_failed(self, exc: Exception) -> None:
        """``_on_timer`` raised: a bug. It costs this session only (CONTRIBUTING.md E4),
        never the other sessions woken by the same tick."""
        self._bug("timer", exc)

    def _bug(self, what: str, exc: Exception) -> None:
        """``what`` raised, in a callback of ours (a transport's own would close its
        transport): a bug, which costs this session only (CONTRIBUTING.md E4)."""
        self.log.error(
            "session %s: %s failed (a bug), ending it with INTERNAL_ERROR",
            self.core.session_id.hex()[:12],
            what,
            exc_info=exc,
        )
        self.abort(CloseCode.INTERNAL_ERROR, "internal error")

    def freeze(self) -> None:
        """A takeover (docs/design.md, "Takeover"): drop the link (the client resumes, on
        whichever process then holds the listening socket) and stop reading the local
        side, so that the session's stream stays as it is until it is exported, or until
        :meth:`thaw`. Bytes already written to the local side keep draining; a detached
        session's only timer is its expiry, which both processes would agree on."""
        self._frozen = True
        local = self.local
        if local is not None and not local.is_closing():
            local.pause_reading()
        link, self.link = self.link, None
        if link is not None:
            link.abort()
            self.core.link_lost(self.loop.time())
        _pump(self)

    def thaw(self) -> None:
        """The takeover failed: carry on (the link is gone; the client resumes here)."""
        self._frozen = False
        local = self.local
        if local is not None and not local.is_closing() and not self._local_reading_paused:
            local.resume_reading()
        _pump(self)

    def abort(self, code: CloseCode, reason: str) -> None:
        if not self.core.closed:
            self.core.close(code, reason)
            _pump(self)


# The relay's per-message path, as module functions rather than methods: a class that
# allows interpreted subclasses (SessionRelay) has every call of a method of its own go
# through the method's lookup by name, in case a subclass overrides it (about 360
# instructions a call, five or six calls a message), while a call of a module function is
# a direct C call in compiled code (CONTRIBUTING.md D6). The methods of the same names
# call them; a subclass does not override them.


def _local_data(relay: SessionRelay, data: bytes | bytearray | memoryview) -> None:
    """``SessionRelay.local_data``."""
    core = relay.core
    if core.state is SessionState.CLOSED:  # core.closed, without the property's call
        return
    core.send(data)
    if core.send_capacity() <= 0 and relay.local is not None:
        relay._local_reading_paused = True
        relay.local.pause_reading()
        if relay._local_writing_paused:
            relay._steer_link()  # this side now waits for the peer's ACKs: read them
    _pump(relay)


def _link_data(
    relay: SessionRelay, transport: asyncio.Transport | None, data: bytes | bytearray | memoryview
) -> None:
    """``SessionRelay.link_data``."""
    if transport is relay.link:
        deferred = relay._deferred
        if deferred is not None:
            # Not seen: transports stop calling once paused. Kept in order all the same,
            # and _take_deferred, already due, resumes reading if this takes it all.
            data = b"".join((deferred, data))
            relay._deferred = None
        _feed(relay, transport, data)


def _feed(
    relay: SessionRelay, transport: asyncio.Transport | None, data: bytes | bytearray | memoryview
) -> bool:
    """Hand ``data`` to the core; True when it left the end of it for the loop's next
    turn (FRAMES_PER_TURN): then the link is not read until that is taken
    (docs/design.md, "Dense reads")."""
    left = relay.core.receive_data(data, relay.loop.time(), FRAMES_PER_TURN)
    _pump(relay)
    if relay._local_writing_paused:
        local = relay.local
        # A paused transport holds more than its low-water mark; a stream's local end
        # says 0 (its reader copies) and tells what its reader holds itself (stream.py).
        held = local.get_write_buffer_size() if local is not None else 0
        if held:
            relay.local_holds(held)
    if left and transport is not None and transport is relay.link:
        # A view: the bytes stay whoever's they were (the link's read buffer is not
        # read over while a view of it lives).
        view = memoryview(data)
        relay._deferred = view[len(view) - left :]
        transport.pause_reading()
        relay.loop.call_soon(relay._take_deferred, transport)
        return True
    return False


def _pump(relay: SessionRelay) -> None:
    """``SessionRelay.pump``."""
    core = relay.core
    out = core.data_to_send()
    link = relay.link
    if out and link is not None and not link.is_closing():
        if len(out) == 1:
            link.write(out[0])
        else:
            size = 0
            for piece in out:  # a few pieces (headers, payloads, an ACK): compiled, a loop
                size += len(piece)  # is cheaper than sum(map(len, out)) (D6)
            if size < JOIN_WRITES_BELOW:
                link.write(b"".join(out))  # CONTRIBUTING.md D2: small, so one copy is cheaper
            else:
                link.writelines(out)
    # A read's events in one call; a hook (not a DataReceived) may make the core report
    # more, which are taken before the pump returns, as with next_event() one by one.
    batch = core.next_events()
    while batch:
        received: list[bytes | memoryview] = []
        hooks = False
        for event in batch:
            if type(event) is DataReceived:
                received.append(event.data)  # written below in one gathering write
                continue
            hooks = True
            if received:
                _deliver(relay, received)
                received = []
            if isinstance(event, EofReceived):
                local = relay.local
                if local is not None and not local.is_closing() and local.can_write_eof():
                    local.write_eof()
            elif isinstance(event, SessionEstablished):
                _check_local_path(relay)
                relay.on_established(event)
            elif isinstance(event, SessionResumed):
                _check_local_path(relay)
                relay.on_resumed(event)
            elif isinstance(event, LinkLost):
                if relay.log.isEnabledFor(logging.DEBUG):
                    stats = core.statistics()
                    relay.log.debug(
                        "session %s: core gave up the link (%s): %d bytes sent, %d acked, "
                        "%d held for replay, %d received",
                        stats.session_id[:12],
                        event.reason,
                        stats.bytes_sent,
                        stats.bytes_acked,
                        stats.replay_buffered,
                        stats.bytes_received,
                    )
                if relay.link is not None:
                    relay.link.abort()
                    relay.link = None
                relay.on_link_lost(event.reason)
            elif isinstance(event, SessionEnded):
                relay._finish(event)
            elif isinstance(event, ServerDraining):
                relay.on_server_draining(event)
        if received:
            _deliver(relay, received)
        batch = core.next_events() if hooks else []
    if (
        relay._local_reading_paused
        and not relay._frozen
        and core.send_capacity() > 0
        and not core.closed
    ):
        relay._local_reading_paused = False
        if relay.local is not None:
            relay.local.resume_reading()
        if relay._local_writing_paused:
            relay._steer_link()  # ACKs came: the slow local side stops the link again
    # Re-arm only when the core's deadline moved earlier than the one its slot was
    # chosen for: a message on a busy session costs one call and two comparisons.
    when: float | None = core.next_timer()  # mypyc infers None in the else below without it
    if when is None or relay._timer_slot is None or when < relay._timer_due:
        if when is not None:
            relay._ticker.schedule(relay, when)  # _arm's case after every tick, inlined
        else:
            relay._arm(None)


def _deliver(relay: SessionRelay, pieces: list[bytes | memoryview]) -> None:
    """Stream bytes for the local side: the pieces of one read of the link (up to
    sixteen 64 KiB DATA frames per 1 MiB) go out in one writev under uvloop."""
    local = relay.local
    if local is not None and not local.is_closing():
        if local.get_write_buffer_size():
            # The local side is behind, so what it is handed now waits in its transport:
            # copied, one join, so that a stalled local side holds the bytes it was sent
            # and not the link's read buffers (a byte of DATA among filler frames would
            # otherwise keep a quarter of a 1 MiB buffer per read). CONTRIBUTING.md D3.
            local.write(b"".join(pieces))
        elif len(pieces) == 1:
            local.write(pieces[0])
        else:
            local.writelines(pieces)


def unheld(buf: bytearray) -> bool:
    """True when no view of ``buf`` is alive, so it may be read into again. A bytearray
    with a live view refuses to resize: ``pop()`` raises ``BufferError`` then, in O(1),
    whoever holds the view (the replay buffer, a transport's write queue, an event);
    ``append`` puts the byte back, within the allocation. The one test of "held" for
    every reused read buffer (CONTRIBUTING.md D3)."""
    try:
        buf.pop()
    except BufferError:
        return False
    buf.append(0)
    return True


# One read from the local side, at most. 1 MiB rather than 256 KiB (B1's peer, socat -b
# 262144): a quarter of the reads per byte, and of the system calls, wake-ups and Python
# calls that go with each read; bulk gains 9-18% (issue 12; docs/benchmarks.md, "Issue
# 12, sixth round"). Only a read
# that fills half of it is kept whole (LocalProtocol), and a session's replay buffer bounds
# what it reads, so a larger buffer costs memory only while bytes stream.
READ_SIZE: Final = 1024 * 1024


class LocalReads:
    """The read buffer the local connections of the process share (``_local_reads``): one
    event loop reads one socket at a time. An object rather than a module global, which
    compiled code would look up in the module's dict at every read (D6).

    ``view`` is a memoryview of ``buf`` made once and offered to every read, rather than
    a new one per read. When ``buf`` is handed over, the view is dropped with it: freed
    once the event loop lets go of the read (uvloop holds it until ``buffer_updated``
    returns), so that :func:`unheld` then sees only the views handed on."""

    __slots__ = ("buf", "view")

    def __init__(self) -> None:
        self.buf = bytearray(READ_SIZE)
        self.view = memoryview(self.buf)

    def hand_over(self, nbytes: int) -> memoryview:
        """The first ``nbytes`` of ``buf`` as a view for the replay buffer, and a buffer
        in its place: the oldest handed over whose views are gone, else a new one."""
        data = self.view[:nbytes]
        full = self.buf
        if len(_handed) >= RECYCLE_MAX:
            _handed.popleft()
        _handed.append(full)
        self.buf = _next_read_buffer()
        self.view = memoryview(self.buf)
        return data


_local_reads: Final = LocalReads()
# Read buffers handed over whole (to the replay buffer, as views), oldest first, to be used
# again once :func:`unheld` (CONTRIBUTING.md D3): a new bytearray is zero-filled (a 1 MiB
# memset per read) and freed once its bytes are acknowledged; a recycled one costs neither.
# At most RECYCLE_MAX are kept: past that the oldest is let go and its last holder frees
# it, so a process keeps at most RECYCLE_BYTES of spare read buffers.
RECYCLE_BYTES: Final = 8 * 1024 * 1024
# 8: more than one session's default window of full reads (4) in flight
RECYCLE_MAX: Final = RECYCLE_BYTES // READ_SIZE
_handed: Final[collections.deque[bytearray]] = collections.deque()


def _local_get_buffer(protocol: LocalProtocol) -> memoryview:
    """``LocalProtocol.get_buffer``: the shared read buffer, cut to the session's room (before
    ``bind()``, to what is left of ``early_max``)."""
    size = READ_SIZE
    relay = protocol.relay
    if relay is not None:
        capacity = relay.core.send_capacity()
        if capacity < size:
            # A read already due when the replay buffer (or the server's memory
            # budget) has no room: one byte, then the reader is paused.
            size = capacity if capacity > 0 else 1
    else:
        room = protocol._early_room  # before bind(): a server's backend, bounded
        if 0 <= room < size:
            size = room if room > 0 else 1
    view = _local_reads.view
    return view if size == READ_SIZE else view[:size]


def _local_buffer_updated(protocol: LocalProtocol, nbytes: int) -> None:
    """``LocalProtocol.buffer_updated``: a read on the buffered path."""
    data = _take_local_read(nbytes)
    relay = protocol.relay
    if relay is None:
        _keep_early(protocol, data)
        return
    _local_data(relay, data)
    protocol._small_reads = small = _count_small_read(protocol._small_reads, nbytes)
    if small >= SMALL_READS_TO_PLAIN:
        protocol._small_reads = 0  # counted again, whether or not the plain path fits
        if _plain_fits(relay.core):
            _read_path(protocol, protocol.transport, False)


def _count_small_read(count: int, nbytes: int) -> int:
    """Reads under SMALL_READ in a row on the buffered path, after one of ``nbytes`` (with
    ``count`` before it): SMALL_READS_TO_PLAIN of them move a connection back to the
    plain path. The one count for local sides and links (a helper of two ints: the
    protocols' attributes, read through a union, would be looked up by name, D6)."""
    return count + 1 if nbytes < SMALL_READ else 0


def _keep_early(protocol: LocalProtocol, data: bytes | bytearray | memoryview) -> None:
    """Bytes read before ``bind()``, kept for it; with a bound (``early_max``), the reader
    is paused once they reach it, until ``bind()``."""
    protocol._early.append(data)
    room = protocol._early_room
    if room >= 0:
        room -= len(data)
        protocol._early_room = room if room > 0 else 0
        if room <= 0 and protocol.transport is not None:
            protocol.transport.pause_reading()


def _take_local_read(nbytes: int) -> bytearray | memoryview:
    """The ``nbytes`` a local read put in the shared buffer, as ``LocalProtocol`` hands them
    on: half a buffer or more is handed over whole, less is copied out (its docstring)."""
    reads = _local_reads
    if nbytes >= READ_SIZE // 2:
        return reads.hand_over(nbytes)
    # A slice of the bytearray, as LinkProtocol.take_read: one copy in one call, where
    # view[:n].tobytes() made a view first and then called a method by name (about 400
    # instructions against 1,200 per read). A new bytearray nobody else holds: the replay
    # buffer and the link's writes keep it as they keep bytes.
    return reads.buf[:nbytes]


def _next_read_buffer() -> bytearray:
    """A read buffer for the next large local read: the oldest handed over, if unheld."""
    if _handed and unheld(_handed[0]):
        return _handed.popleft()
    return bytearray(READ_SIZE)


# Reads in two modes (docs/design.md, "Two read paths"). A connection (but a server's
# backend, bounded until bind(): ``LocalProtocol``'s ``early_max``) starts on the event
# loop's plain path (``data_received``: the loop reads into its own buffer and hands over
# bytes), which costs about 1,300 instructions less per read than the buffered one (no
# ``get_buffer`` call, no second hold of the interpreter's lock, no copy of ours), so a
# small message takes it. A read of BULK_READ or more moves it to the buffered path
# (``BulkReads``: 1 MiB reads into our buffers, handed on without a copy), and
# SMALL_READS_TO_PLAIN reads in a row under SMALL_READ move it back.
BULK_READ: Final = 64 * 1024
SMALL_READ: Final = 4096
SMALL_READS_TO_PLAIN: Final = 8
# A plain read takes what the event loop's buffer holds (256 KiB: uvloop's and asyncio's),
# whatever the session has room for; the buffered path's reads are cut to that room
# (``LocalProtocol.get_buffer``). So the local side reads on the plain path only while its
# replay buffer has room for a whole plain read, and never when it is charged to a server's
# memory budget, whose room shrinks as other sessions use it (``_plain_fits``): a session
# never takes more than its bound.
PLAIN_READ_MAX: Final = 256 * 1024


class BulkReads(asyncio.BufferedProtocol):
    """The buffered read path of a ``LocalProtocol`` or ``LinkProtocol`` (``protocol``),
    set on its transport while it reads in bulk (``set_protocol``). Everything but the
    reads themselves goes to that protocol."""

    __slots__ = ("protocol",)

    def __init__(self, protocol: LocalProtocol | LinkProtocol) -> None:
        self.protocol = protocol

    # The reads go to module functions for a LocalProtocol, whose methods a call would look
    # up by name (it allows interpreted subclasses, D6); a LinkProtocol's are called directly.

    def get_buffer(self, sizehint: int) -> memoryview:
        protocol = self.protocol
        if isinstance(protocol, LinkProtocol):
            return protocol.get_buffer(sizehint)
        return _local_get_buffer(protocol)

    def buffer_updated(self, nbytes: int) -> None:
        protocol = self.protocol
        if isinstance(protocol, LinkProtocol):
            protocol.buffer_updated(nbytes)
        else:
            _local_buffer_updated(protocol, nbytes)

    def eof_received(self) -> bool | None:
        return self.protocol.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        self.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.protocol.resume_writing()


def protocol_of(transport: asyncio.BaseTransport) -> object:
    """The protocol of ``transport``, whichever read path it is on."""
    protocol = transport.get_protocol()
    return protocol.protocol if isinstance(protocol, BulkReads) else protocol


def _read_path(
    protocol: LocalProtocol | LinkProtocol, transport: asyncio.Transport | None, bulk: bool
) -> None:
    """Put ``transport`` on the buffered read path (``bulk``) or back on the plain one;
    nothing if it is closing or no longer ``protocol``'s (a fallback spliced it)."""
    protocol._small_reads = 0
    if transport is None or transport.is_closing():
        return
    current = transport.get_protocol()
    reads = protocol._bulk
    if bulk and current is protocol:
        reads = protocol._bulk = BulkReads(protocol)
        transport.set_protocol(reads)
    elif not bulk and reads is not None and current is reads:
        protocol._bulk = None  # and no cycle between them is left
        transport.set_protocol(protocol)


# How long a client's link is kept open and read after the session's end, waiting for the
# server to close it (_close_link).
LINGER: Final = 2.0


def _close_link(relay: SessionRelay, link: asyncio.Transport, end: SessionEnded) -> None:
    """Close the link of a session that ended. A client that ended the session itself
    (``Session.ended_on_link``: it aborted, or it finished), not shutting down,
    lingers: a TCP socket closed with the peer's bytes unread (a replay, a download, a
    keepalive) makes Linux send a reset, which throws away what it had not sent yet, its
    CLOSE or its last acknowledgement among it, and may reach the server first; the
    client, which forgets the session, could not tell it again, and the server would keep
    it until expiry (docs/design.md, limitation 1). So the link is read, what arrives
    dropped, until the server closes it (it does once its session ended), for at most
    LINGER seconds from here (not from when the write buffer has drained): a clear-text
    link half-closed first, a TLS link left open (asyncio's TLS close fails on data that
    follows its close_notify, and aborts); then it is aborted. Meanwhile it is
    ``relay.lingering``, which a client's session task waits for (so that leaving the
    client's ``async with``, its task group, waits too). A server does not linger (a
    client whose end from the server is lost learns it from the REJECT of its resume)."""
    core = relay.core
    if (
        not core.ended_on_link
        or end.code is CloseCode.GOING_AWAY
        or core.role is not Role.CLIENT
        or link.is_closing()
    ):
        link.close()
        return
    if link.can_write_eof():
        try:
            link.write_eof()
        except OSError:  # the connection is gone already (asyncio's transport raises)
            link.abort()
            return
    link.resume_reading()
    relay.lingering = link
    relay.loop.call_later(LINGER, _linger_over, relay, link)


def _linger_over(relay: SessionRelay, link: asyncio.Transport) -> None:
    """LINGER after the end, the server has not closed the link: give up on it."""
    if relay.lingering is link:  # (else closed already)
        relay.lingering = None
        link.abort()
        relay.on_lingered(f"the server did not close the link within {LINGER:.0f} s")


def _check_local_path(relay: SessionRelay) -> None:
    """The session was established or resumed: the peer's window, now known, may leave less
    room than a plain read (``_plain_fits``), with no read of the local side to notice it."""
    local = relay.local
    if local is None or _plain_fits(relay.core):
        return
    get_protocol = getattr(local, "get_protocol", None)  # a library stream's end has none
    protocol = get_protocol() if get_protocol is not None else None
    if isinstance(protocol, LocalProtocol):
        _read_path(protocol, protocol.transport, True)


def _plain_fits(core: Session) -> bool:
    """The local side may read on the plain path: room for a whole plain read, known to
    stay there until the next read (no shared budget). docs/design.md, obligation 9."""
    return not core.charged and core.send_capacity() >= PLAIN_READ_MAX


@mypyc_attr(allow_interpreted_subclasses=True)
class LocalProtocol(asyncio.Protocol):
    """The application (client) or the backend (server) connection of one session.

    Reads go into a buffer no larger than the replay buffer's remaining capacity, so a
    session never holds more than its bound (the rest waits in the kernel). The read
    buffer is shared; a read of half a buffer or more is handed over whole (no copy)
    and another takes its place (the oldest handed over whose views are all gone, else a
    new one: ``_next_read_buffer``), a smaller one is copied out (so a few bytes never
    pin 1 MiB). Idle connections therefore hold no read buffer at all.
    """

    # One per session (B4): no per-instance dict. A subclass declares its own attributes.
    __slots__ = (
        "_bulk",
        "_early",
        "_early_eof",
        "_early_room",
        "_lost",
        "_lost_exc",
        "_reset_code",
        "_small_reads",
        "relay",
        "transport",
    )

    def __init__(self, reset_code: CloseCode, early_max: int | None = None) -> None:
        """``early_max``: at most this many bytes are read before :meth:`bind` (reads cut
        to it, then the reader paused until then); None: no bound (a client's application,
        bound at once). A server's backend may speak first, in the turns of the loop
        before its session is accepted and bound (docs/design.md, obligation 9)."""
        self.relay: SessionRelay | None = None
        self.transport: asyncio.Transport | None = None
        self._reset_code = reset_code
        self._early: list[bytes | bytearray | memoryview] = []
        self._early_eof = False
        self._early_room = -1 if early_max is None else early_max  # -1: unbounded
        self._lost = False
        self._lost_exc: Exception | None = None
        self._bulk: BulkReads | None = None  # set on the transport while reading in bulk
        self._small_reads = 0  # buffered reads under SMALL_READ in a row

    def get_buffer(self, sizehint: int) -> memoryview:
        return _local_get_buffer(self)

    def buffer_updated(self, nbytes: int) -> None:
        """A read on the buffered path (``BulkReads``)."""
        _local_buffer_updated(self, nbytes)

    def bind(self, relay: SessionRelay) -> None:
        """Attach to a relay, handing it anything that arrived before."""
        self.relay = relay
        relay.local = self.transport
        for chunk in self._early:
            relay.local_data(chunk)
        self._early.clear()
        if not _plain_fits(relay.core):  # before its first read, not after it
            _read_path(self, self.transport, True)
        if self._early_room == 0 and not relay._local_reading_paused:
            transport = self.transport  # paused at early_max: the session's room rules now
            if transport is not None and not transport.is_closing():
                transport.resume_reading()
        self._early_room = -1
        if self._early_eof:
            relay.local_eof()
        if self._lost:
            relay.local_lost(self._lost_exc, self._reset_code)
            self._let_go()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self._early_room >= 0:
            # Bounded before bind(): the buffered path from the first read, whose reads
            # get_buffer() cuts to the bound (a plain read is whatever the loop read).
            _read_path(self, self.transport, True)

    def data_received(self, data: bytes | memoryview) -> None:
        """A read on the plain path: the event loop's bytes, kept as they are."""
        relay = self.relay
        if relay is not None:
            _local_data(relay, data)
            if len(data) >= BULK_READ or not _plain_fits(relay.core):
                _read_path(self, self.transport, True)
        else:
            _keep_early(self, data)

    def eof_received(self) -> bool:
        if self.relay is not None:
            self.relay.local_eof()
        else:
            self._early_eof = True
        return True  # keep our direction open: a half-close is not a close

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost, self._lost_exc = True, exc
        self._bulk = None  # (whether or not a relay is told: a takeover lets go of it first)
        if self.relay is not None:
            self.relay.local_lost(exc, self._reset_code)
            self._let_go()

    def _let_go(self) -> None:
        """The connection is gone and the relay told: drop the references that made the
        relay, this protocol and the transport a cycle (the relay keeps the transport), so
        that an ended session is freed when it ends, not by the cyclic collector."""
        self.relay = None
        self.transport = None
        self._bulk = None

    def pause_writing(self) -> None:
        if self.relay is not None:
            self.relay.local_pause_writing()

    def resume_writing(self) -> None:
        if self.relay is not None:
            self.relay.local_resume_writing()


class LinkOwner(Protocol):
    """Who decides for a link while its handshake owns it: the server, or a client
    session."""

    def link_event(self, link: LinkProtocol, event: Event) -> None:
        """A handshake event: SetupRequested, ResumeRequested or HandshakeFailed."""

    def link_ready(self, link: LinkProtocol) -> None:
        """The handshake handed the link to its session by itself (the client side)."""

    def link_lost(self, link: LinkProtocol, exc: Exception | None) -> None:
        """The transport died before it joined a session."""


TCP_RTO_MAX_MS: Final = 44  # <linux/tcp.h>, Linux 6.15 and later
LINK_RTO_MAX_MS: Final = 1000
MAX_EARLY_LINK_BYTES: Final = 64 * 1024  # bytes a peer may send before our handshake starts

LINK_READ_SIZE: Final = 1024 * 1024  # one read from a link, at most (as READ_SIZE, and why)
# A link read of at least this many bytes is handed on as a view of the read buffer; a
# smaller one is copied out (as the event loop itself would have), so that a few bytes a
# slow local side holds never pin the buffer: only reads of a quarter of it or more do.
# The rest of a held buffer is read into while at least this much is left, and no less: a
# read into a smaller rest could only be copied, and the rest would never be used up while
# a view of the buffer lives.
LINK_VIEW_FROM: Final = LINK_READ_SIZE // 4


class LinkReads:
    """The read buffer the links of one event loop share (:meth:`of`): the loop reads
    one transport at a time, and a read is handled before the next one starts.
    ``LinkProtocol.get_buffer`` offers ``buf[start:]``; its ``buffer_updated`` hands a
    read of :data:`LINK_VIEW_FROM` bytes or more on as a view (and moves ``start`` past
    it), a smaller one as a copy (the buffer stays free).

    Ownership (docs/design.md, "The path of one byte"): the core's ``FrameReader``
    returns DATA payloads as views of what it is fed, and a local transport that cannot
    write them at once keeps them (uvloop does not copy), so bytes handed on as views
    must not be read over while any view of them is alive (:func:`unheld` tells). So
    before a read that follows views, :meth:`reclaim` tries the buffer: free, it is
    read into from its start again; still held, the next read goes after the bytes
    handed out (while :data:`LINK_VIEW_FROM` remain), else into a fresh buffer, and the
    held one is freed
    with its last view.
    """

    __slots__ = ("buf", "start", "view")

    def __init__(self) -> None:
        self.buf = bytearray(LINK_READ_SIZE)
        # Made once and offered to every read (as LocalReads.view); released by reclaim()
        # before unheld() looks, since it would otherwise always see the buffer held.
        self.view = memoryview(self.buf)
        self.start = 0  # bytes at the front handed out as views since it was last free

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> LinkReads:
        reads = _link_reads.get(loop)
        if reads is None:
            reads = _link_reads[loop] = cls()
        return reads

    def reclaim(self) -> None:
        """Before a read, when views were handed out (``start > 0``; the event loop has
        let go of the last read's buffer by then)."""
        self.view.release()
        if unheld(self.buf):
            self.start = 0
        elif LINK_READ_SIZE - self.start < LINK_VIEW_FROM:
            self.buf = bytearray(LINK_READ_SIZE)
            self.start = 0
        self.view = memoryview(self.buf)


_link_reads: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LinkReads] = (
    weakref.WeakKeyDictionary()
)


class LinkProtocol(asyncio.Protocol):
    """One link transport, on either side. Its handshake owns it until :meth:`hand_over`.

    Reads go into the loop's :class:`LinkReads` buffer, not into a new ``bytes`` per
    read (under TLS too: the TLS layer decrypts straight into it)."""

    # One per session (B4): no per-instance dict; an attribute added needs its name here.
    __slots__ = (
        "_bulk",
        "_early",
        "_reads",
        "_small_reads",
        "_timer",
        "_writing_paused",
        "handshake",
        "lost",
        "on_closed",
        "opened_at",
        "owner",
        "peer",
        "relay",
        "settled",
        "source",
        "transport",
        "why",
    )

    def __init__(
        self, owner: LinkOwner, handshake: ServerHandshake | ClientHandshake | None = None
    ) -> None:
        self.owner = owner
        self.handshake = handshake
        self.transport: asyncio.Transport | None = None
        self.relay: SessionRelay | None = None
        self.peer = "?"
        self.source = "?"  # the peer's address, without the port (admission counts by it)
        self.why = ""  # for the log, when it says more than the peer is told
        # Called once when the link stops being a handshake (joined a session, failed, or
        # died): the server's handshake admission frees its place then.
        self.settled: Callable[[], None] | None = None
        # Called once when the transport is gone (the server's FdGuard counts it closed).
        self.on_closed: Callable[[], None] | None = None
        self.lost = False
        # Made once TCP is connected, before TLS: a resume's duration is counted from here.
        loop = asyncio.get_running_loop()
        self.opened_at = loop.time()
        self._reads = LinkReads.of(loop)
        self._early = bytearray()  # bytes before start(): a server that speaks first
        self._timer: asyncio.TimerHandle | None = None
        self._writing_paused = False  # the transport's write buffer is above its limit
        self._bulk: BulkReads | None = None  # set on the transport while reading in bulk
        self._small_reads = 0  # buffered reads under SMALL_READ in a row

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            # Interned: every link from one host shares one string (B4).
            host = self.source = sys.intern(peer[0])
            self.peer = f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
        # Cap TCP's retransmission backoff on links at 1 s (default 120 s): after a
        # short outage the link's own retransmission, not a resume, carries on at once.
        # Kernels without the option keep their default.
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS, LINK_RTO_MAX_MS)
        if logger.isEnabledFor(logging.DEBUG):
            tls = transport.get_extra_info("ssl_object")
            if tls is not None:
                cipher = tls.cipher()
                logger.debug(
                    "link %s: connected, TLS handshake done (%s, %s)",
                    self.peer,
                    tls.version(),
                    cipher[0] if cipher else "?",
                )
            else:
                logger.debug("link %s: connected (clear text)", self.peer)
        if self.handshake is not None:
            self.pump_handshake()

    def has_early_bytes(self) -> bool:
        """Did the peer send anything before :meth:`start`?"""
        return bool(self._early)

    def start(self, handshake: ClientHandshake) -> None:
        """Begin ``handshake`` on this (already connected) link."""
        self.handshake = handshake
        if self._early:
            early, self._early = bytes(self._early), bytearray()
            handshake.receive_data(early)
        self.pump_handshake()

    def get_buffer(self, sizehint: int) -> memoryview:
        reads = self._reads
        if reads.start:
            reads.reclaim()
        start = reads.start
        return reads.view if start == 0 else reads.view[start:]

    def buffer_updated(self, nbytes: int) -> None:
        """A read on the buffered path (``BulkReads``)."""
        data = self.take_read(nbytes)
        relay = self.relay
        if relay is not None:
            _link_data(relay, self.transport, data)
            self._small_reads = small = _count_small_read(self._small_reads, nbytes)
            if small >= SMALL_READS_TO_PLAIN:
                _read_path(self, self.transport, False)  # (which counts again)
        else:
            self._handshake_data(data)

    def take_read(self, nbytes: int) -> bytearray | memoryview:
        """The ``nbytes`` a read put where :meth:`get_buffer` said, as they are handed on."""
        reads = self._reads
        start = reads.start
        if nbytes < LINK_VIEW_FROM:  # copied: a few bytes never pin the whole buffer
            # A slice of the bytearray: one copy, where bytes(view[...]) made a view
            # first and then went through bytes()'s constructor (about 900 instructions
            # against 300; the core takes a bytearray as it takes bytes).
            return reads.buf[start : start + nbytes]
        # handed on as is: LinkReads.reclaim() sees whether views of it remain
        reads.start = start + nbytes
        return reads.view[start : start + nbytes]

    def data_received(self, data: bytes | bytearray | memoryview) -> None:
        """A read on the plain path. The handshake and ``_early`` copy what they keep;
        the relay's core returns views of them."""
        relay = self.relay
        if relay is not None:
            _link_data(relay, self.transport, data)
            if len(data) >= BULK_READ:
                _read_path(self, self.transport, True)
            return
        self._handshake_data(data)

    def _handshake_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes before the link is handed over: the handshake's, or ``_early``."""
        handshake = self.handshake
        if handshake is None:
            self._early += data
            if len(self._early) > MAX_EARLY_LINK_BYTES and self.transport is not None:
                self.transport.abort()
            return
        handshake.receive_data(data)
        self.pump_handshake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._cancel_timer()
        self._settle()
        closed, self.on_closed = self.on_closed, None
        if closed is not None:
            closed()
        if self.relay is not None and self.transport is not None:
            self.relay.link_closed(self.transport, exc)
        elif self.handshake is None or not self.handshake.failed:
            self.owner.link_lost(self, exc)
        # A TLS transport and its protocol refer to each other (uvloop's and asyncio's
        # SSLProtocol keep the application protocol): let go of ours, so that the pair,
        # its TLS state and buffers are freed now rather than by the cyclic collector
        # (tests/aio/test_cycles.py).
        self.transport = None
        self._bulk = None

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self.relay is not None and self.transport is not None:
            self.relay.link_writable(self.transport, False)

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.relay is not None and self.transport is not None:
            self.relay.link_writable(self.transport, True)

    def hand_over(self, relay: SessionRelay) -> None:
        """The handshake gave the link to ``relay``'s session (its answer is first in
        the session's output): from now on the relay pumps it."""
        assert self.transport is not None and self.handshake is not None
        assert self.handshake.stage is HandshakeStage.DONE
        self._cancel_timer()
        self._settle()
        # Done with: about 1.4 KiB (its buffers, frames, keys, event deque) that an idle
        # session would otherwise keep for as long as the link lives (B4).
        self.handshake = None
        self.relay = relay
        relay.set_link(self.transport, writable=not self._writing_paused)
        _pump(relay)

    def close(self) -> None:
        """Send what the handshake still has (a REJECT) and close."""
        transport = self.transport
        self._cancel_timer()
        if transport is not None and not transport.is_closing():
            self._write_handshake()
            transport.close()

    def abort(self) -> None:
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()

    def _write_handshake(self) -> None:
        handshake, transport = self.handshake, self.transport
        if handshake is not None and transport is not None and not transport.is_closing():
            out = handshake.data_to_send()
            if out:
                transport.writelines(out)

    def pump_handshake(self) -> None:
        """Write what the handshake has to send and hand its events to the owner."""
        handshake = self.handshake
        assert handshake is not None
        self._write_handshake()
        while (event := handshake.next_event()) is not None:
            self.owner.link_event(self, event)
        if self.relay is not None or self.lost:
            return
        if handshake.stage is HandshakeStage.DONE:
            self.owner.link_ready(self)
        elif handshake.failed:
            self._settle()
        else:
            self._arm()

    def _settle(self) -> None:
        settled, self.settled = self.settled, None
        if settled is not None:
            settled()

    def _arm(self) -> None:
        when = self.handshake.next_timer() if self.handshake is not None else None
        if when is not None and self._timer is None:
            self._timer = asyncio.get_running_loop().call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.handshake is not None and self.relay is None:
            self.handshake.handle_timer(asyncio.get_running_loop().time())
            self.pump_handshake()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
