"""Incremental frame reader (docs/protocol.md, "Frames" and "Limits").

Feed it bytes as they arrive; it returns the frames they complete. DATA payloads
are never buffered: each piece of a DATA frame is returned as soon as it arrives,
as a zero-copy ``memoryview`` slice of the input, wrapped in a :class:`Data` that
carries its own stream offset. Those views are the input's bytes: whoever feeds a
buffer it reuses must not read into it again while any of them is alive (the reader
itself keeps none: what it holds between calls is copied). An input of ``bytes``
under :data:`COPY_BELOW` (a small message, as the event loop's plain path reads it) is
sliced as it is: its payloads are ``bytes``, copies of a few bytes, which cost less
than a view of the input and a view per payload. Control frames are
buffered until whole, and no frame may claim more than its limit, so the reader holds
at most ``FRAME_HEADER_SIZE + MAX_CONTROL_PAYLOAD`` bytes between calls.

:func:`take_control_frame` reads exactly one control frame off the front of a
buffer: the handshakes use it, so that the bytes after their one frame stay raw for
the session's own reader.
"""

from __future__ import annotations

import struct
from typing import Final

from ..errors import ProtocolError
from .frames import (
    ACK_WORD,
    FRAME_HEADER_SIZE,
    MAX_CONTROL_PAYLOAD,
    MAX_DATA_CHUNK,
    Ack,
    ControlFrame,
    Data,
    FrameType,
    check_header,
    parse_control,
)

__all__ = ["FrameReader", "take_control_frame"]

_HEADER: Final = struct.Struct("!I")
_U64: Final = struct.Struct("!Q")
# Bound once: compiled code (setup.py) calls them directly rather than looking the method
# or the builtin up at every use (CONTRIBUTING.md D6).
_unpack_header: Final = _HEADER.unpack_from
# A header word and the u64 after it: a DATA frame's offset, or a whole ACK's payload.
_unpack_word_u64: Final = struct.Struct("!IQ").unpack_from
# Two of them: an ACK and the DATA header after it (a struct's unpack costs about as much
# for four fields as for two).
_unpack_two_prefixes: Final = struct.Struct("!IQIQ").unpack_from
_memoryview: Final = memoryview
_DATA: Final = int(FrameType.DATA)
_OFFSET_SIZE: Final = _U64.size  # a DATA payload starts with its stream offset
_DATA_PREFIX: Final = FRAME_HEADER_SIZE + _OFFSET_SIZE
# docs/protocol.md, "Limits": a DATA frame's length counts its offset and 1..MAX_DATA_CHUNK
_MIN_DATA_LENGTH: Final = _OFFSET_SIZE
_MAX_DATA_LENGTH: Final = _OFFSET_SIZE + MAX_DATA_CHUNK
# A whole ACK (frames.ACK_WORD, then its offset): the control frame piggybacked on nearly
# every small message (docs/protocol.md, "When ACKs are sent").
_ACK_SIZE: Final = FRAME_HEADER_SIZE + _OFFSET_SIZE
_TWO_PREFIXES: Final = 2 * _DATA_PREFIX
# An input of bytes shorter than this is sliced as it is (copies), not through a view: a
# memoryview of the input and one per payload cost about 1,200 instructions per message,
# a copy of a few bytes a few dozen (issue 12, B2). As aio/link.py's JOIN_WRITES_BELOW.
COPY_BELOW: Final = 4096


class FrameReader:
    """Turn a byte stream into frames. Raises ProtocolError on malformed input."""

    __slots__ = ("_data_offset", "_data_remaining", "_partial", "unread")

    def __init__(self) -> None:
        self._partial = bytearray()
        self._data_remaining = 0  # bytes of the current DATA payload still to come
        self._data_offset = 0  # stream offset of the next of those bytes
        # Bytes at the end of the last feed() left unread by its ``limit``: the caller
        # feeds them again (and nothing else before them).
        self.unread = 0

    def feed(
        self, data: bytes | bytearray | memoryview, limit: int = 0
    ) -> list[ControlFrame | Data]:
        """The frames (and DATA pieces) ``data`` completes, in order. With ``limit``, stop
        once that many have been returned: :attr:`unread` says how many bytes at the end
        of ``data`` were not looked at (a read of tiny frames is then handled in parts,
        docs/design.md "Dense reads")."""
        out: list[ControlFrame | Data] = []
        # Payloads of a small bytes input are small copies (module docstring).
        view: bytes | memoryview = (
            data if type(data) is bytes and len(data) < COPY_BELOW else _memoryview(data)
        )
        pos = 0
        end = len(view)
        while pos < end:
            if limit and len(out) >= limit:
                self.unread = end - pos
                return out
            if self._data_remaining:
                take = self._data_remaining
                if take > end - pos:
                    take = end - pos
                out.append(Data(self._data_offset, view[pos : pos + take]))
                self._data_offset += take
                self._data_remaining -= take
                pos += take
                continue
            partial = self._partial
            if partial:
                # Complete the header, then whatever the header says must be whole.
                need = self._needed(partial) - len(partial)
                take = min(need, end - pos)
                partial += view[pos : pos + take]
                pos += take
                if len(partial) < self._needed(partial):
                    continue
                frame = self._complete(memoryview(bytes(partial)), 0)
                partial.clear()
                if frame is not None:
                    out.append(frame)
                continue
            if end - pos < FRAME_HEADER_SIZE:
                partial += view[pos:end]
                break
            # A whole header: check_header's two accepting cases, inlined (a small message
            # is one DATA frame and often an ACK: this is the per-message path). Anything
            # else goes to check_header, which words the error. With 12 bytes or more
            # left, the u64 that follows comes in the same call: DATA's offset, ACK's.
            # Declared int: what unpack_from returns is untyped, and compiled code would
            # otherwise do every operation below on boxed objects (CONTRIBUTING.md D6).
            word: int
            first: int
            if end - pos >= _TWO_PREFIXES:
                next_word: int
                next_first: int
                word, first, next_word, next_first = _unpack_two_prefixes(view, pos)
                if word == ACK_WORD:
                    # An ACK, and the header of the frame after it from the same call: a
                    # message of one DATA frame piggybacks its ACK before it
                    # (frames.ack_and_data_header). The ACK case below, inlined.
                    out.append(Ack(first))
                    pos += _ACK_SIZE
                    if limit and len(out) >= limit:
                        self.unread = end - pos
                        return out
                    word, first = next_word, next_first
            elif end - pos >= _DATA_PREFIX:
                word, first = _unpack_word_u64(view, pos)
            else:
                (word,) = _unpack_header(view, pos)
                first = 0  # not read: fewer than 12 bytes left
            ftype = word >> 24
            length = word & 0xFFFFFF
            if ftype == _DATA:
                if not _MIN_DATA_LENGTH < length <= _MAX_DATA_LENGTH:
                    check_header(word)  # raises
                start = pos + _DATA_PREFIX
                if start > end:
                    partial += view[pos:end]
                    break
                offset = first
                stop = start + length - _OFFSET_SIZE
                if stop > end:  # the rest of the payload comes in later reads
                    self._data_offset = offset + (end - start)
                    self._data_remaining = stop - end
                    stop = end
                if stop > start:
                    out.append(Data(offset, view[start:stop]))
                pos = stop
                continue
            if word == ACK_WORD and pos + _ACK_SIZE <= end:
                # parse_control's ACK case, inlined: no copy of its payload, no dispatch.
                # It runs before the message it came with is delivered (issue 12, B2).
                out.append(Ack(first))
                pos += _ACK_SIZE
                continue
            if length > MAX_CONTROL_PAYLOAD:
                check_header(word)  # raises
            stop = pos + FRAME_HEADER_SIZE + length
            if stop > end:
                partial += view[pos:end]
                break
            out.append(parse_control(ftype, bytes(view[pos + FRAME_HEADER_SIZE : stop])))
            pos = stop
        self.unread = 0
        return out

    @staticmethod
    def _needed(partial: bytearray) -> int:
        """Bytes the frame starting in ``partial`` needs before it can be handled."""
        if len(partial) < FRAME_HEADER_SIZE:
            return FRAME_HEADER_SIZE
        return check_header(_HEADER.unpack_from(partial)[0])[2]

    def _complete(self, view: memoryview, pos: int) -> ControlFrame | None:
        """Handle a frame whose header (and, for control frames, payload) is at ``pos``."""
        ftype, length, _ = check_header(_HEADER.unpack_from(view, pos)[0])
        if ftype == FrameType.DATA:
            (self._data_offset,) = _U64.unpack_from(view, pos + FRAME_HEADER_SIZE)
            self._data_remaining = length - 8
            return None
        start = pos + FRAME_HEADER_SIZE
        return parse_control(ftype, bytes(view[start : start + length]))


def take_control_frame(
    buf: bytearray, expected: tuple[FrameType, ...], peer: str
) -> ControlFrame | None:
    """Remove one whole control frame of an ``expected`` type from the front of ``buf``;
    None while it is incomplete. Raises ProtocolError for any other type, as soon as the
    header shows it."""
    if len(buf) < FRAME_HEADER_SIZE:
        return None
    ftype, _, total = check_header(_HEADER.unpack_from(buf)[0])
    if ftype not in expected:
        names = " or ".join(kind.name for kind in expected)
        raise ProtocolError(f"expected {names} from the {peer}, got frame type 0x{ftype:02x}")
    if len(buf) < total:
        return None
    payload = bytes(buf[FRAME_HEADER_SIZE:total])
    del buf[:total]
    return parse_control(ftype, payload)
