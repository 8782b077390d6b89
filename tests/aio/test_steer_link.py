"""The relay's one decision about reading the link (aio/link.py ``SessionRelay._steer_link``;
docs/design.md, "Flow control"), step by step, on an established core, with transports that
record what they are told. The end-to-end tests (test_link_reads.py) show the outcomes; these
pin the transitions no end-to-end run reaches on purpose: the link stopped again once the
peer's ACKs have come, a resume onto a stopped link, and a stop decided while the rest of a
dense read waits for the loop's next turn."""

from __future__ import annotations

import asyncio
import logging

from tether.aio.link import FRAMES_PER_TURN, SessionRelay
from tether.protocol.frames import ack_frame, data_header
from tether.protocol.session import SessionConfig

from ..protocol.pair import Pair

WINDOW = 256 * 1024


class _Transport:
    """Records pause_reading / resume_reading; takes every write."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.written = 0
        self.backlog = 0  # what get_write_buffer_size() says

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")

    def write(self, data: bytes | memoryview) -> None:
        self.written += len(data)

    def writelines(self, pieces: list[bytes | memoryview]) -> None:
        self.written += sum(len(p) for p in pieces)

    def get_write_buffer_size(self) -> int:
        return self.backlog

    def is_closing(self) -> bool:
        return False

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def abort(self) -> None:
        self.calls.append("abort")

    def close(self) -> None:
        self.calls.append("close")


def _relay() -> tuple[SessionRelay, _Transport, _Transport]:
    """The server side of an established session, on recording transports."""
    pair = Pair(SessionConfig(window=WINDOW))
    pair.establish()
    relay = SessionRelay(pair.server, logging.getLogger("tests"))
    link, local = _Transport(), _Transport()
    relay.set_link(link)  # type: ignore[arg-type]
    relay.local = local
    return relay, link, local


def test_the_link_stops_again_once_the_acks_have_come() -> None:
    async def main() -> None:
        relay, link, local = _relay()
        relay.local_pause_writing()  # the backend is slow: stop reading the link
        assert link.calls == ["pause"]
        relay.local_data(b"x" * WINDOW)  # and this side's window is spent: read it for ACKs
        assert local.calls == ["pause"] and link.calls == ["pause", "resume"]
        relay.link_data(link, ack_frame(WINDOW))  # type: ignore[arg-type]
        # Room again: the backend is read, and the link, for the slow backend, is not.
        assert local.calls == ["pause", "resume"]
        assert link.calls == ["pause", "resume", "pause"]
        relay.local_resume_writing()
        assert link.calls == ["pause", "resume", "pause", "resume"]

    asyncio.run(main())


def test_a_new_link_for_a_stopped_session_starts_stopped() -> None:
    async def main() -> None:
        relay, link, _ = _relay()
        relay.local_pause_writing()
        new = _Transport()
        relay.set_link(new)  # type: ignore[arg-type]
        assert link.calls == ["pause", "abort"]  # the old one is superseded
        assert new.calls == ["pause"]
        relay.local_resume_writing()
        assert new.calls == ["pause", "resume"]

    asyncio.run(main())


def test_a_stop_decided_while_a_dense_reads_rest_waits_is_kept() -> None:
    """The rest of a read past FRAMES_PER_TURN is taken on the loop's next turn, with the
    link paused meanwhile; a stop decided in between must leave it paused once the rest is
    taken, and the link is read again only when the local side drains."""

    async def main() -> None:
        relay, link, _ = _relay()
        count = 2 * FRAMES_PER_TURN + 10
        read = b"".join(data_header(i, 1) + b"d" for i in range(count))
        relay.link_data(link, read)  # type: ignore[arg-type]
        assert link.calls == ["pause"]  # the rest waits for the next turn
        relay.local_pause_writing()  # decided now: nothing to tell the link yet
        assert link.calls == ["pause"]
        for _ in range(5):  # the turns that take the rest, part by part
            await asyncio.sleep(0)
        assert relay.core.statistics().bytes_received == count  # every part was taken
        assert set(link.calls) == {"pause"}  # (each part left a rest) and never read again
        relay.local_resume_writing()
        assert link.calls[-1] == "resume" and link.calls.count("resume") == 1

    asyncio.run(main())
