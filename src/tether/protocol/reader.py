"""Incremental frame reader (docs/protocol.md, "Frames" and "Limits").

Feed it bytes as they arrive; it returns the frames they complete. DATA payloads
are never buffered: each piece of a DATA frame is returned as soon as it arrives,
as a zero-copy ``memoryview`` slice of the input, wrapped in a :class:`Data` that
carries its own stream offset. Those views are the input's bytes: whoever feeds a
buffer it reuses must not read into it again while any of them is alive (the reader
itself keeps none: what it holds between calls is copied). Control frames are
buffered until whole, and no frame may claim more than its limit, so the reader holds
at most ``FRAME_HEADER_SIZE + MAX_CONTROL_PAYLOAD`` bytes between calls.

:func:`take_control_frame` reads exactly one control frame off the front of a
buffer: the handshakes use it, so that the bytes after their one frame stay raw for
the session's own reader.
"""

from __future__ import annotations

import struct

from ..errors import ProtocolError
from .frames import (
    FRAME_HEADER_SIZE,
    ControlFrame,
    Data,
    FrameType,
    check_header,
    parse_control,
)

__all__ = ["FrameReader", "take_control_frame"]

_HEADER = struct.Struct("!I")
_U64 = struct.Struct("!Q")


class FrameReader:
    """Turn a byte stream into frames. Raises ProtocolError on malformed input."""

    __slots__ = ("_data_offset", "_data_remaining", "_partial")

    def __init__(self) -> None:
        self._partial = bytearray()
        self._data_remaining = 0  # bytes of the current DATA payload still to come
        self._data_offset = 0  # stream offset of the next of those bytes

    def feed(self, data: bytes | bytearray | memoryview) -> list[ControlFrame | Data]:
        out: list[ControlFrame | Data] = []
        view = memoryview(data)
        pos = 0
        end = len(view)
        while pos < end:
            if self._data_remaining:
                take = min(self._data_remaining, end - pos)
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
            (word,) = _HEADER.unpack_from(view, pos)
            _, _, total = check_header(word)
            if end - pos < total:
                partial += view[pos:end]
                break
            frame = self._complete(view, pos)
            pos += total
            if frame is not None:
                out.append(frame)
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
