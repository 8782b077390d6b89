"""A draining server tells its sessions (docs/protocol.md, "Drain"): DRAINING in version 4,
on the live link, on every link that resumes the session, and on the first link of a
session whose setup was admitted before the drain. The session itself goes on."""

from __future__ import annotations

import pytest

from tether.errors import ProtocolError
from tether.protocol.codes import CloseCode
from tether.protocol.events import ServerDraining, SessionResumed
from tether.protocol.frames import (
    NO_DEADLINE,
    Draining,
    FrameType,
    parse_control,
)
from tether.protocol.handshake import ClientHandshake
from tether.protocol.session import Session, SessionConfig

from .pair import Pair


def _drain(pair: Pair, deadline: float | None) -> None:
    pair.router.drain(pair.now, deadline)
    pair.pump()
    pair.transfer()


def test_a_live_session_is_told_and_goes_on() -> None:
    pair = Pair()
    pair.establish()
    _drain(pair, pair.now + 300)
    told = pair.app.of_type(ServerDraining)
    assert told == [ServerDraining(300.0)]
    assert pair.client.draining and pair.server.draining
    pair.client_send(b"still here")
    pair.server_send(b"so am I")
    pair.transfer()
    assert bytes(pair.backend.received) == b"still here"
    assert bytes(pair.app.received) == b"so am I"
    assert pair.app.ended is None


def test_no_deadline_is_said_as_none() -> None:
    pair = Pair()
    pair.establish()
    _drain(pair, None)
    assert pair.app.of_type(ServerDraining) == [ServerDraining(None)]


def test_draining_twice_tells_once() -> None:
    pair = Pair()
    pair.establish()
    _drain(pair, pair.now + 60)
    _drain(pair, pair.now + 60)
    assert len(pair.app.of_type(ServerDraining)) == 1


def test_a_resume_during_the_drain_is_told_again_with_the_time_left() -> None:
    pair = Pair()
    pair.establish()
    _drain(pair, pair.now + 300)
    pair.client_send(b"known")  # the server session is confirmed: not an orphan
    pair.transfer()
    pair.cut()
    pair.advance(100.0, transfer=False)  # well inside the session-reliability timeout
    assert pair.reconnect() is not None
    pair.transfer()
    assert pair.app.of_type(SessionResumed)
    told = pair.app.of_type(ServerDraining)
    assert len(told) == 2
    within = told[1].within  # type: ignore[attr-defined]
    assert within is not None and 195 <= within <= 205


def test_a_setup_admitted_before_the_drain_is_told_on_its_first_link() -> None:
    config = SessionConfig()
    pair = Pair()
    client = Session.client(config, 0.0)
    chs = ClientHandshake(client, 0.0)
    shs = pair.router.open_link(0.0)
    shs.receive_data(b"".join(bytes(b) for b in chs.data_to_send()))
    shs.next_event()
    assert pair.router.admit_setup(shs) is None
    pair.router.drain(0.0, 30.0)  # while its backend is being connected
    server = pair.router.accept_setup(shs, 1.0)
    wire = b"".join(bytes(b) for b in shs.data_to_send())
    wire += b"".join(bytes(b) for b in server.data_to_send())
    chs.receive_data(wire)
    assert chs.done and not chs.failed
    events = list(iter(client.next_event, None))
    assert ServerDraining(29.0) in events


def test_a_version_3_session_is_not_told() -> None:
    pair = Pair()
    pair.establish()
    pair.client.version = pair.server.version = 3  # as a setup with a v3 client leaves it
    _drain(pair, pair.now + 300)
    assert not pair.app.of_type(ServerDraining)
    assert pair.server.draining and not pair.client.draining
    pair.client_send(b"x")
    pair.transfer()
    assert bytes(pair.backend.received) == b"x"


def test_draining_from_the_client_is_a_protocol_error() -> None:
    pair = Pair()
    pair.establish()
    pair.server.receive_data(Draining(1000).serialize(), pair.now)
    pair.pump()
    ended = pair.backend.ended
    assert ended is not None and ended.code is CloseCode.PROTOCOL_ERROR


def test_draining_in_a_version_3_session_is_a_protocol_error() -> None:
    pair = Pair()
    pair.establish()
    pair.client.version = 3
    pair.client.receive_data(Draining(1000).serialize(), pair.now)
    pair.pump()
    assert not pair.app.of_type(ServerDraining)
    ended = pair.app.ended
    assert ended is not None and ended.code is CloseCode.PROTOCOL_ERROR


def test_a_flood_of_draining_frames_costs_the_link() -> None:
    pair = Pair()
    pair.establish()
    pair.client.receive_data(Draining(1000).serialize() * 1000, pair.now)
    pair.pump()
    assert len(pair.app.of_type(ServerDraining)) == 1  # once per link
    assert pair.app.link_losses  # past the control-frame budget
    assert pair.app.ended is None  # the link, not the session


def test_wire_form() -> None:
    frame = Draining(300_000).serialize()
    assert frame == bytes((FrameType.DRAINING, 0, 0, 4)) + (300_000).to_bytes(4, "big")
    assert parse_control(FrameType.DRAINING, frame[4:]) == Draining(300_000)
    assert parse_control(FrameType.DRAINING, NO_DEADLINE.to_bytes(4, "big")) == Draining(
        NO_DEADLINE
    )
    with pytest.raises(ProtocolError):
        parse_control(FrameType.DRAINING, bytes(8))


def test_a_client_session_cannot_drain() -> None:
    with pytest.raises(Exception, match="client"):
        Session.client(SessionConfig(), 0.0).drain(0.0, None)


def test_the_documented_example_is_what_the_core_writes() -> None:
    """docs/protocol.md, "Drain": its example (300 s left) is DRAINING as serialized here."""
    from pathlib import Path

    from .test_vectors import hexdump

    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    section = doc[doc.index("\n## Drain\n") : doc.index("\n## Acknowledgement and replay\n")]
    assert f"```\n{hexdump(Draining(300_000).serialize())}\n```" in section
