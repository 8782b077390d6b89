"""The replay buffer: bytes kept until the peer acknowledges them (docs/protocol.md,
"Acknowledgement and replay").

Bytes are addressed by 64-bit stream offset. The buffer holds ``[start, end)``:
``start`` is what the peer has acknowledged, ``end`` is everything the
application has written. Chunks are kept as the caller handed them (no copy);
acknowledging into the middle of a chunk keeps a memoryview of its tail, or a copy of it
when the tail is under a quarter of the object it would keep alive.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["ReplayBuffer"]

Chunk = bytes | bytearray | memoryview


class ReplayBuffer:
    """``start`` and ``end`` are plain attributes, not properties: the session reads them
    several times per message (a property is a Python call each time). Read them; only
    the buffer's own methods change them."""

    __slots__ = ("_chunks", "_head", "end", "start")

    def __init__(self) -> None:
        # A list with a moving head rather than a deque: an idle session's empty list
        # costs 56 bytes, a deque over 600 (B4 counts bytes per idle session).
        self._chunks: list[Chunk] = []
        self._head = 0  # index of the oldest chunk still held
        # Offset of the oldest byte still held (everything before it was acknowledged).
        self.start = 0
        self.end = 0  # offset one past the newest byte written

    def __len__(self) -> int:
        return self.end - self.start

    @classmethod
    def restored(cls, start: int, data: bytes) -> ReplayBuffer:
        """A buffer holding ``data`` at offsets ``[start, start + len(data))``: a session's
        unacknowledged bytes, handed over by another process (Session.restore)."""
        buffer = cls()
        buffer.start = buffer.end = start
        buffer.append(data)
        return buffer

    def append(self, data: Chunk) -> None:
        if data:
            self._chunks.append(data)
            self.end += len(data)

    def discard_until(self, offset: int) -> None:
        """Forget every byte below ``offset`` (start <= offset <= end)."""
        if not self.start <= offset <= self.end:
            raise ValueError(f"offset {offset} outside [{self.start}, {self.end}]")
        chunks = self._chunks
        head = self._head
        drop = offset - self.start
        while drop:
            chunk = chunks[head]
            if len(chunk) <= drop:
                chunks[head] = b""
                head += 1
                drop -= len(chunk)
            else:
                view = memoryview(chunk)
                tail = view[drop:]
                # A tail under a quarter of the object it keeps alive is copied (each copy
                # is at most a quarter of the last, so a chunk costs a third more at most):
                # an ACK just short of a chunk's end must not pin a whole read buffer (up
                # to 1 MiB) for a few bytes the memory budget counts as a few bytes.
                base = view.obj
                if isinstance(base, (bytes, bytearray)) and len(tail) * 4 < len(base):
                    chunks[head] = bytes(tail)
                else:
                    chunks[head] = tail
                drop = 0
        if head == len(chunks):
            chunks.clear()
            head = 0
        elif head > 64 and head * 2 > len(chunks):
            del chunks[:head]
            head = 0
        self._head = head
        self.start = offset

    def views(self, offset: int, max_piece: int) -> Iterator[tuple[int, memoryview]]:
        """Yield (offset, piece) covering ``[offset, end)``, each piece at most ``max_piece``."""
        if not self.start <= offset <= self.end:
            raise ValueError(f"offset {offset} outside [{self.start}, {self.end}]")
        at = self.start
        for index in range(self._head, len(self._chunks)):
            chunk = self._chunks[index]
            size = len(chunk)
            if at + size <= offset:
                at += size
                continue
            view = memoryview(chunk)
            skip = max(0, offset - at)
            for lo in range(skip, size, max_piece):
                piece = view[lo : lo + max_piece]
                yield at + lo, piece
            at += size
