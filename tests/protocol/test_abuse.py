"""A peer that abuses the established link, and a link the driver cannot write to,
through the core alone (tests/protocol/pair.py; no event loop, no clock).

- PING floods: at most one PONG pending; control frames beyond the per-link rate drop
  the link (not the session) with a stated reason (docs/protocol.md, "Keepalive").
- A link that is not writable (``link_writable(False)``, the driver's
  ``pause_writing``): nothing new is framed for it; everything goes out when it drains.
- Tiny DATA frames: one read costs one event, whatever the number of frames in it.
- Keepalive: silence in an interval during which receiving was paused at any time is
  not death, and the peer of a side that does not read keeps hearing from it.
"""

from __future__ import annotations

from tether.protocol.codes import CloseCode
from tether.protocol.events import DataReceived, LinkLost
from tether.protocol.frames import (
    MAX_DATA_CHUNK,
    Ack,
    Data,
    Eof,
    Ping,
    Pong,
    data_header,
)
from tether.protocol.reader import FrameReader
from tether.protocol.session import (
    CONTROL_BURST,
    CONTROL_FLOOD,
    CONTROL_RATE,
    Session,
    SessionConfig,
    SessionState,
)

from .pair import Pair

KEEPALIVE = 3.0
CONFIG = SessionConfig(window=256 * 1024, keepalive=KEEPALIVE, timeout=60.0)
PING = Ping(5).serialize()
READ = 1024 * 1024  # one read of the link, as the drivers do them (aio/link.py)


def established() -> Pair:
    p = Pair(CONFIG)
    p.establish()
    return p


def frames(chunks: list[bytes | memoryview]) -> list[object]:
    reader = FrameReader()
    return [frame for chunk in chunks for frame in reader.feed(bytes(chunk))]


def events(session: Session) -> list[object]:
    return list(iter(session.next_event, None))


def pongs(chunks: list[bytes | memoryview]) -> list[Pong]:
    return [f for f in frames(chunks) if isinstance(f, Pong)]


# -- PING floods -------------------------------------------------------------------------------


def test_a_read_full_of_pings_is_answered_once() -> None:
    p = established()
    server = p.server
    server.receive_data(PING * 100, p.now)  # within the burst: no one is dropped
    out = server.data_to_send()
    assert len(pongs(out)) == 1, "one PONG for a read of 100 PINGs"
    assert sum(map(len, out)) <= 2 * len(PING)
    assert server.state is SessionState.ATTACHED


def test_no_pong_while_the_link_is_not_writable_then_one() -> None:
    p = established()
    server = p.server
    server.link_writable(False)  # the peer does not read what we write
    for token in range(1, 60):
        server.receive_data(Ping(token).serialize(), p.now + token / CONTROL_RATE)
        assert server.data_to_send() == []
    server.link_writable(True)
    (pong,) = pongs(server.data_to_send())
    assert pong.token == 59  # the newest
    assert server.data_to_send() == []


def test_a_ping_flood_drops_the_link_not_the_session() -> None:
    p = established()
    p.client_send(b"before")
    p.transfer()
    server = p.server
    flood = PING * (READ // len(PING))
    server.receive_data(flood, p.now)
    # The read stopped being processed at the limit: the link is dropped with a reason.
    lost = [e for e in events(server) if isinstance(e, LinkLost)]
    assert lost == [LinkLost(CONTROL_FLOOD, CloseCode.LINK_LOST)]
    assert server.state is SessionState.DETACHED and not server.closed
    assert server.data_to_send() == []
    # The session's owner may resume it; the stream carries on.
    p.pump()
    p.cut()
    p.reconnect()
    p.transfer()
    p.client_send(b" after")
    p.transfer()
    assert bytes(p.backend.received) == b"before after"


def test_the_limit_counts_pings_pongs_and_empty_acks_and_refills_with_time() -> None:
    for frame in (Ping(1), Pong(1), Ack(0)):
        p = established()
        server = p.server
        raw = frame.serialize()
        server.receive_data(raw * int(CONTROL_BURST), p.now)
        assert server.state is SessionState.ATTACHED, frame
        server.receive_data(raw * int(CONTROL_RATE), p.now + 1.0)  # a second's worth
        assert server.state is SessionState.ATTACHED, frame
        server.receive_data(raw, p.now + 1.0)
        assert server.state is SessionState.DETACHED, frame
        assert LinkLost(CONTROL_FLOOD, CloseCode.LINK_LOST) in events(server)


def test_acks_that_acknowledge_something_are_not_limited() -> None:
    p = established()
    client, server = p.client, p.server
    n = int(CONTROL_BURST) * 4
    p.server_send(b"d" * n)
    p.transfer()
    assert server.state is SessionState.ATTACHED
    # One ACK per byte, all at once: each is progress, so none costs a token.
    server.receive_data(b"".join(Ack(offset).serialize() for offset in range(1, n + 1)), p.now)
    assert server.state is SessionState.ATTACHED
    assert server.statistics().bytes_acked == n
    assert client.state is SessionState.ATTACHED


def test_a_fast_pinging_honest_peer_is_never_dropped() -> None:
    """The fastest keepalive a peer may use (0.05 s) against the slowest (1 hour), both
    ways, for a minute: every PING answered, nobody dropped."""
    for fast, slow in ((0.05, 3600.0), (3600.0, 0.05)):
        p = Pair(SessionConfig(keepalive=fast), SessionConfig(keepalive=slow))
        p.establish()
        for _ in range(600):
            p.advance(0.1)
        assert p.client.state is p.server.state is SessionState.ATTACHED
        assert not p.app.link_losses and not p.backend.link_losses


# -- a link that is not writable -----------------------------------------------------------


def test_nothing_new_is_framed_for_a_link_that_is_not_writable() -> None:
    for side in ("client", "server"):
        p = established()
        link = p.link
        assert link is not None
        session = p.client if side == "client" else p.server
        send = p.client_send if side == "client" else p.server_send
        eof = p.client_eof if side == "client" else p.server_eof
        receiver = p.backend if side == "client" else p.app
        session.link_writable(False)
        for i in range(8):
            send(bytes([i]) * 30_000)
        eof()
        assert link.in_flight() == 0, side  # kept in the replay buffer, not framed
        assert session.statistics().replay_buffered == 240_000
        assert session.send_capacity() < 30_000  # so the local side gets paused
        session.link_writable(True)
        p.pump()
        assert link.in_flight() > 240_000
        p.transfer()
        assert bytes(receiver.received) == b"".join(bytes([i]) * 30_000 for i in range(8))
        assert receiver.eof


def test_acknowledgements_wait_for_a_writable_link() -> None:
    p = established()
    server = p.server
    server.link_writable(False)
    p.client_send(b"a" * CONFIG.window)  # past the ACK threshold
    p.client_eof()
    p.transfer()
    assert len(p.backend.received) == CONFIG.window and p.backend.eof
    assert p.client.send_capacity() <= 0  # nothing acknowledged yet
    p.advance(KEEPALIVE * 1.5)  # the server's tick neither
    assert p.client.send_capacity() <= 0
    server.link_writable(True)
    p.pump()
    p.transfer()
    assert p.client.send_capacity() == CONFIG.window


def test_a_new_link_starts_writable() -> None:
    p = established()
    p.client.link_writable(False)
    p.client_send(b"queued while not writable")
    p.cut()
    p.reconnect()
    p.transfer()
    assert bytes(p.backend.received) == b"queued while not writable"


def test_the_final_ack_and_close_go_out_whatever_the_link() -> None:
    p = established()
    p.client_eof()
    p.transfer()
    p.server.link_writable(False)
    p.server_eof()  # not framed: the link is not writable
    p.transfer()
    assert not p.app.eof
    p.server.link_writable(True)
    p.pump()
    p.client.link_writable(False)
    p.transfer()  # the client ends on the server's EOF, its final ACK goes out anyway
    assert p.app.ended is not None and p.backend.ended is not None
    assert p.app.ended.code is p.backend.ended.code is CloseCode.NORMAL
    q = established()
    q.server.link_writable(False)
    q.server.close(CloseCode.BACKEND_RESET, "gone")
    q.pump()
    q.transfer()
    assert q.app.ended is not None and q.app.ended.code is CloseCode.BACKEND_RESET


# -- tiny frames -------------------------------------------------------------------------------


def tiny_frames(offset: int, count: int) -> bytes:
    return b"".join(data_header(offset + i, 1) + bytes([(offset + i) % 251]) for i in range(count))


def test_a_read_of_tiny_frames_costs_one_event_and_at_most_one_ack() -> None:
    p = established()
    server = p.server
    count = READ // 13  # a whole read of one-byte DATA frames
    received: list[DataReceived] = []
    out: list[bytes | memoryview] = []
    for n in range(4):
        server.receive_data(tiny_frames(n * count, count), p.now)
        got = events(server)
        assert len(got) == 1, f"{len(got)} events for one read"
        received += [e for e in got if isinstance(e, DataReceived)]
        sent = server.data_to_send()
        assert len(frames(sent)) <= 1  # an ACK, at most
        out += sent
    assert b"".join(bytes(e.data) for e in received) == bytes(i % 251 for i in range(4 * count))
    assert server.statistics().bytes_received == 4 * count


def test_a_read_of_tiny_frames_is_taken_in_parts_with_max_frames() -> None:
    """With ``max_frames``, a read of many frames is handled that many at a time: the
    core returns how many bytes it left, and the stream is whole once they are fed again
    (the driver does so on the event loop's next turn: docs/design.md, "Dense reads")."""
    p = established()
    server = p.server
    count = 10_000
    data = memoryview(tiny_frames(0, count))
    parts = 0
    got: list[bytes] = []
    while data:
        left = server.receive_data(data, p.now, 1024)
        parts += 1
        got += [bytes(e.data) for e in events(server) if isinstance(e, DataReceived)]
        assert server.statistics().bytes_received == min(count, 1024 * parts)
        assert left == len(data) - 13 * 1024 or (left == 0 and len(data) <= 13 * 1024)
        data = data[len(data) - left :] if left else data[:0]
    assert parts == -(-count // 1024)
    assert b"".join(got) == bytes(i % 251 for i in range(count))
    assert server.receive_data(tiny_frames(count, 5000), p.now) == 0  # no limit: all of it
    assert server.statistics().bytes_received == count + 5000


def test_acks_between_tiny_frames_do_not_split_the_reads_event() -> None:
    """An ACK reports no event, so the DATA on both sides of it are one run: one event for
    the read, and every ACK taken (the replay buffer shrinks to the last one)."""
    p = established()
    server = p.server
    server.send(b"s" * 100)
    server.data_to_send()
    count = 50
    read = b"".join(
        data_header(i, 1) + bytes([i]) + Ack(2 * (i + 1)).serialize() for i in range(count)
    )
    server.receive_data(read, p.now)
    got = events(server)
    assert len(got) == 1 and isinstance(got[0], DataReceived)
    assert bytes(got[0].data) == bytes(range(count))
    assert server.statistics().bytes_acked == 2 * count
    assert server.state is SessionState.ATTACHED


def test_large_frames_are_still_delivered_as_views_of_the_read() -> None:
    p = established()
    server = p.server
    payload = bytes(range(256)) * (MAX_DATA_CHUNK // 256)
    read = b"".join(data_header(i * MAX_DATA_CHUNK, MAX_DATA_CHUNK) + payload for i in range(4))
    server.receive_data(read, p.now)
    got = events(server)
    assert len(got) == 4
    for event in got:
        assert isinstance(event, DataReceived) and isinstance(event.data, memoryview)
        assert event.data.obj is read and bytes(event.data) == payload  # no copy


def test_small_frames_between_control_frames_keep_their_order() -> None:
    p = established()
    server = p.server
    read = tiny_frames(0, 10) + PING + tiny_frames(10, 10) + Eof(20).serialize()
    server.receive_data(read, p.now)
    got = events(server)
    kinds = [type(e).__name__ for e in got]
    assert kinds == ["DataReceived", "DataReceived", "EofReceived"]
    assert b"".join(bytes(e.data) for e in got if isinstance(e, DataReceived)) == bytes(range(20))


def test_a_protocol_error_after_data_delivers_the_data_first() -> None:
    p = established()
    server = p.server
    server.receive_data(tiny_frames(0, 5) + Data(99, b"x").serialize(), p.now)
    got = events(server)
    assert isinstance(got[0], DataReceived) and bytes(got[0].data) == bytes(range(5))
    assert server.closed and server.close_code is CloseCode.PROTOCOL_ERROR


# -- keepalive while receiving is paused now and then ---------------------------------------


def test_paused_at_any_time_since_the_last_tick_is_not_silence() -> None:
    """Receiving is paused for most of each interval and resumed just before each tick,
    and nothing arrives (the peer's bytes wait): the link must not be declared dead."""
    for side in ("client", "server"):
        p = established()
        session, other = (p.client, p.server) if side == "client" else (p.server, p.client)
        other.pause_receiving(True)  # not under test here
        for _ in range(6):
            deadline = session.next_timer()
            assert deadline is not None
            session.pause_receiving(True)
            p.advance(deadline - p.now - 0.01, transfer=False)
            session.pause_receiving(False)
            p.advance(0.02, transfer=False)
            assert session.state is SessionState.ATTACHED, side
        assert not p.app.link_losses and not p.backend.link_losses
        other.pause_receiving(False)
        p.transfer()
        p.advance(KEEPALIVE * 2)
        assert p.client.state is p.server.state is SessionState.ATTACHED


def test_a_receiver_that_stops_reading_keeps_its_peer_hearing_from_it() -> None:
    """The server's backend is slow, so it reads nothing from the link for many
    intervals while the client keeps uploading: the client hears the server's PINGs
    (sent while it does not read) and does not declare the link dead."""
    p = established()
    p.server.pause_receiving(True)
    for _ in range(40):
        p.client_send(b"u" * 1000)
        p.advance(KEEPALIVE / 4, transfer=False)
        p.deliver(to_server=0)  # toward the client only: the server reads nothing
    assert p.client.state is p.server.state is SessionState.ATTACHED
    assert not p.app.link_losses and not p.backend.link_losses
    p.server.pause_receiving(False)
    p.transfer()
    assert len(p.backend.received) == 40_000
