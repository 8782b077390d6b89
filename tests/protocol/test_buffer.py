"""The replay buffer: bytes kept until acknowledged, addressed by stream offset."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.protocol.buffer import ReplayBuffer


def contents(buffer: ReplayBuffer, offset: int, piece: int = 7) -> bytes:
    out = bytearray()
    at = offset
    for start, view in buffer.views(offset, piece):
        assert start == at and 0 < len(view) <= piece
        out += view
        at += len(view)
    assert at == buffer.end
    return bytes(out)


def test_empty() -> None:
    buffer = ReplayBuffer()
    assert (buffer.start, buffer.end, len(buffer)) == (0, 0, 0)
    assert list(buffer.views(0, 10)) == []
    buffer.append(b"")
    assert buffer.end == 0


def test_append_discard_and_views() -> None:
    buffer = ReplayBuffer()
    buffer.append(b"hello ")
    buffer.append(memoryview(b"big world"))
    assert (buffer.start, buffer.end, len(buffer)) == (0, 15, 15)
    assert contents(buffer, 0) == b"hello big world"
    assert contents(buffer, 8) == b"g world"
    buffer.discard_until(3)  # into the middle of the first chunk
    assert (buffer.start, len(buffer)) == (3, 12)
    assert contents(buffer, 3) == b"lo big world"
    buffer.discard_until(6)  # exactly a chunk boundary
    assert contents(buffer, 6) == b"big world"
    assert contents(buffer, 15) == b""
    buffer.discard_until(15)
    assert (buffer.start, buffer.end, len(buffer)) == (15, 15, 0)
    buffer.append(b"!")
    assert contents(buffer, 15) == b"!"


def test_out_of_range_offsets() -> None:
    buffer = ReplayBuffer()
    buffer.append(b"abcdef")
    buffer.discard_until(2)
    for offset in (1, 7):
        with pytest.raises(ValueError):
            buffer.discard_until(offset)
        with pytest.raises(ValueError):
            list(buffer.views(offset, 4))
    buffer.discard_until(2)  # acknowledging again is harmless
    assert buffer.start == 2


def test_views_do_not_copy() -> None:
    chunk = bytearray(b"abcdef")
    buffer = ReplayBuffer()
    buffer.append(memoryview(chunk))
    chunk[0:1] = b"X"
    assert contents(buffer, 0) == b"Xbcdef"


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.binary(max_size=40)),
            st.tuples(st.just("discard"), st.floats(0, 1)),
        ),
        max_size=30,
    ),
    st.integers(1, 50),
)
def test_model(ops: list[tuple[str, object]], piece: int) -> None:
    buffer = ReplayBuffer()
    stream = bytearray()
    start = 0
    for op, arg in ops:
        if op == "append":
            assert isinstance(arg, bytes)
            buffer.append(arg)
            stream += arg
        else:
            assert isinstance(arg, float)
            start += int((len(stream) - start) * arg)
            buffer.discard_until(start)
        assert (buffer.start, buffer.end, len(buffer)) == (start, len(stream), len(stream) - start)
        for offset in {start, (start + len(stream)) // 2, len(stream)}:
            assert contents(buffer, offset, piece) == stream[offset:]


def test_a_small_tail_left_by_an_ack_does_not_pin_its_read_buffer() -> None:
    """An ACK just short of a chunk's end: the few bytes left are copied, so the large
    read buffer the chunk was a view of is free again (a bytearray with a live view
    refuses to resize); a large tail stays a view (no copy)."""
    read_buffer = bytearray(b"r" * 1000)
    buffer = ReplayBuffer()
    buffer.append(memoryview(read_buffer)[:800])
    buffer.discard_until(300)  # 500 of the buffer's 1000 bytes left: still a view
    with pytest.raises(BufferError):
        read_buffer.pop()
    buffer.discard_until(790)  # 10 left
    read_buffer.pop()  # nothing holds it any more
    assert contents(buffer, 790) == b"r" * 10
    buffer.discard_until(800)
    assert len(buffer) == 0
