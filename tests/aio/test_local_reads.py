"""Local reads handed over whole are recycled (aio/link.py ``_next_read_buffer``): a
buffer is read into again only once no view of it is alive, and the spare ones are
bounded. Driven by hand through ``LocalProtocol``'s buffer protocol, as an event loop
does it (``get_buffer``, then what ``buffer_updated`` takes from it); what the relay keeps
stands in for the replay buffer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import pytest

from tether.aio import link
from tether.aio.link import READ_SIZE, RECYCLE_MAX, LocalProtocol, SessionRelay
from tether.protocol.codes import CloseCode
from tether.protocol.session import Role, Session, SessionConfig


class _Keeper(SessionRelay):
    """Stands in for a relay: keeps each read's view (what ``buffer_updated`` would hand
    it), as the replay buffer does until the peer acknowledges it. A SessionRelay (not a
    look-alike), as the compiled link.py checks (setup.py); its core's empty replay buffer
    always has room for a read (``get_buffer`` asks)."""

    __slots__ = ("got",)

    def __init__(self) -> None:  # no event loop here: SessionRelay.__init__ is not run
        self.core = Session(Role.CLIENT, SessionConfig(), 0.0)
        self.got: list[bytes | memoryview] = []


@pytest.fixture(autouse=True)
def _fresh_pool() -> Iterator[None]:
    saved = list(link._handed)
    link._handed.clear()
    yield
    link._handed.clear()
    link._handed.extend(saved)


def _protocol() -> tuple[LocalProtocol, _Keeper]:
    protocol = LocalProtocol(CloseCode.APPLICATION_RESET)
    keeper = _Keeper()
    protocol.relay = keeper
    return protocol, keeper


def _read(protocol: LocalProtocol, fill: int) -> bytearray:
    """One whole-buffer read of byte ``fill``; returns the buffer it went into."""
    view = protocol.get_buffer(-1)
    view[:] = bytes([fill]) * len(view)
    target = cast(bytearray, view.obj)
    keeper = cast(_Keeper, protocol.relay)
    size = len(view)
    del view  # the loop drops its view once buffer_updated returns
    keeper.got.append(link._take_local_read(size))  # what buffer_updated hands the relay
    return target


def test_a_buffer_is_reused_only_after_its_views_are_gone() -> None:
    protocol, keeper = _protocol()
    first = _read(protocol, 1)
    second = _read(protocol, 2)
    assert second is not first  # the first is still held (the keeper's view)
    assert bytes(keeper.got[0]) == b"\x01" * READ_SIZE
    del keeper.got[0]  # "acknowledged": the last view of the first buffer is gone
    _read(protocol, 3)  # hands the current buffer over and takes the oldest free one
    fourth = _read(protocol, 4)
    assert fourth is first
    assert len(fourth) == READ_SIZE
    # every byte still held is intact: reuse never wrote into a held buffer
    assert [bytes(v[:1]) for v in keeper.got] == [b"\x02", b"\x03", b"\x04"]
    assert all(bytes(v) == bytes(v[:1]) * READ_SIZE for v in keeper.got)


def test_spare_buffers_are_bounded() -> None:
    protocol, keeper = _protocol()
    for i in range(RECYCLE_MAX + 10):  # every read still held: none can be reused
        _read(protocol, i % 256)
    assert len(link._handed) == RECYCLE_MAX
    assert len(keeper.got) == RECYCLE_MAX + 10  # the ones let go are still the keeper's


def test_unheld_sees_any_view_and_leaves_the_buffer_as_it_was() -> None:
    buf = bytearray(b"abc")
    view = memoryview(buf)[1:]
    slice_of_slice = view[1:]
    del view
    assert not link.unheld(buf)  # a slice of a dropped slice still holds it
    del slice_of_slice
    assert link.unheld(buf)
    assert buf == b"abc"[:2] + b"\x00"  # its last byte is not kept: contents do not matter
    assert len(buf) == 3


def test_small_reads_are_copied_and_hand_nothing_over() -> None:
    protocol, keeper = _protocol()
    view = protocol.get_buffer(-1)
    view[:5] = b"hello"
    del view
    keeper.got.append(link._take_local_read(5))
    # a copy of its own (a bytearray slice), not a view of the shared buffer
    assert keeper.got == [b"hello"] and isinstance(keeper.got[0], bytearray)
    link._local_reads.buf[:5] = b"world"  # the next read overwrites the shared buffer
    assert keeper.got == [b"hello"]
    assert not link._handed
