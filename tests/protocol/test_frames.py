"""Frames: every type round-trips; the reader gives the same frames however the bytes
are split, and rejects oversize, unknown and malformed frames with ProtocolError."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.errors import ProtocolError
from tether.protocol.codes import CloseCode
from tether.protocol.frames import (
    CLIENT_HELLO_SIZE,
    MAGIC,
    MAX_CONTROL_PAYLOAD,
    MAX_DATA_CHUNK,
    MAX_REASON_BYTES,
    NONCE_SIZE,
    SERVER_HELLO_SIZE,
    Ack,
    Close,
    ControlFrame,
    Data,
    FrameType,
    Ping,
    Pong,
    Reject,
    ack_and_data_header,
    ack_frame,
    check_header,
    client_hello,
    data_header,
    parse_client_hello,
    parse_control,
    parse_server_hello,
    ping_frame,
    pong_frame,
    server_hello,
)
from tether.protocol.reader import COPY_BELOW, FrameReader

from . import strategies as fs

Item = tuple[str, object, object]


def normalize(frames: list[ControlFrame | Data]) -> list[Item]:
    """Frames as comparable items; adjacent pieces of one DATA stream are joined."""
    out: list[Item] = []
    for frame in frames:
        if isinstance(frame, Data):
            payload = bytes(frame.payload)
            if out and out[-1][0] == "data":
                _, offset, previous = out[-1]
                assert isinstance(offset, int) and isinstance(previous, bytes)
                if offset + len(previous) == frame.offset:
                    out[-1] = ("data", offset, previous + payload)
                    continue
            out.append(("data", frame.offset, payload))
        else:
            out.append(("control", frame, None))
    return out


def read_all(chunks: list[bytes]) -> list[ControlFrame | Data]:
    reader = FrameReader()
    frames: list[ControlFrame | Data] = []
    for chunk in chunks:
        # Copy what the reader returned: its DATA pieces are views of the input.
        frames += [
            Data(f.offset, bytes(f.payload)) if isinstance(f, Data) else f
            for f in reader.feed(chunk)
        ]
    return frames


def header(ftype: int, length: int) -> bytes:
    return struct.pack("!I", (ftype << 24) | length)


# -- round trips -------------------------------------------------------------------------


@given(fs.control_frames)
def test_control_frame_round_trip(frame: ControlFrame) -> None:
    raw = frame.serialize()
    ftype, length = raw[0], int.from_bytes(raw[1:4], "big")
    assert length == len(raw) - 4 <= MAX_CONTROL_PAYLOAD
    assert parse_control(ftype, raw[4:]) == frame
    assert read_all([raw]) == [frame]


@pytest.mark.parametrize(
    "strategy",
    [
        fs.setups,
        fs.accepts,
        fs.resumes,
        fs.resumeds,
        fs.rejects,
        fs.acks,
        fs.eofs,
        fs.pings,
        fs.pongs,
        fs.closes,
    ],
    ids=lambda s: repr(s)[:40],
)
@settings(max_examples=30)
@given(data=st.data())
def test_each_frame_type_round_trips(
    strategy: st.SearchStrategy[ControlFrame], data: st.DataObject
) -> None:
    frame = data.draw(strategy)
    assert read_all([frame.serialize()]) == [frame]


@settings(max_examples=50)
@given(fs.data_frames)
def test_data_frame_round_trip(frame: Data) -> None:
    raw = frame.serialize()
    assert raw[0] == FrameType.DATA
    assert raw[:12] == data_header(frame.offset, len(frame.payload))
    assert normalize(read_all([raw])) == [("data", frame.offset, bytes(frame.payload))]


@given(fs.codes, st.text(min_size=MAX_REASON_BYTES // 2, max_size=400))
def test_long_reasons_are_cut_to_the_limit_on_a_character_boundary(
    code: CloseCode, reason: str
) -> None:
    for cls in (Close, Reject):
        raw = cls(code, reason).serialize()
        assert len(raw) - 4 <= 2 + MAX_REASON_BYTES
        parsed = parse_control(raw[0], raw[4:])
        assert isinstance(parsed, cls) and parsed.code == code
        assert (
            "\ufffd" not in parsed.reason
            or "\ufffd" in reason
            or any("\ud800" <= c <= "\udfff" for c in reason)
        )


def test_unknown_close_code_reads_as_protocol_error() -> None:
    raw = header(FrameType.CLOSE, 2) + struct.pack("!H", 999)
    assert read_all([raw]) == [Close(CloseCode.PROTOCOL_ERROR, "")]


def test_a_local_only_code_from_the_wire_reads_as_protocol_error() -> None:
    """F2 (docs/fuzzing.md): a peer cannot make an end report what only it decides."""
    for code in (CloseCode.LINK_LOST, CloseCode.RESUME_FAILED, CloseCode.UNTRUSTED_SERVER):
        for cls in (Close, Reject):
            raw = cls(code, "spoofed").serialize()
            assert parse_control(raw[0], raw[4:]) == cls(CloseCode.PROTOCOL_ERROR, "spoofed")


def test_hellos() -> None:
    hello = client_hello()
    assert len(hello) == CLIENT_HELLO_SIZE and hello.startswith(MAGIC)
    assert parse_client_hello(client_hello(1, 3)) == (1, 3)
    nonce = bytes(range(NONCE_SIZE))
    raw = server_hello(1, nonce)
    assert len(raw) == SERVER_HELLO_SIZE
    assert parse_server_hello(raw) == (1, nonce)
    for bad in (b"SSH-2.0-x\r\n", MAGIC[:-1] + b"X\x01\x01", hello[:-1]):
        with pytest.raises(ProtocolError):
            parse_client_hello(bad)
    with pytest.raises(ProtocolError):
        parse_server_hello(b"HTTP/1.1 400 Bad Request\r\n" + bytes(15))


# -- the reader, however the bytes are split ------------------------------------------------


@settings(max_examples=100)
@given(st.lists(fs.frames, max_size=8), st.data())
def test_reader_is_split_invariant(frames: list[ControlFrame | Data], data: st.DataObject) -> None:
    stream = b"".join(frame.serialize() for frame in frames)
    whole = normalize(read_all([stream]))
    assert whole == normalize(list(frames))
    assert normalize(read_all(data.draw(fs.splits(stream)))) == whole


@settings(max_examples=100)
@given(st.lists(fs.frames, max_size=12), st.data(), st.integers(1, 4))
def test_a_reader_with_a_limit_leaves_the_rest_and_reads_the_same(
    frames: list[ControlFrame | Data], data: st.DataObject, limit: int
) -> None:
    """``feed(chunk, limit)`` returns at most ``limit`` frames and says how many bytes it
    left unread; fed again, before the next chunk (as the driver does), the stream reads
    as it does without a limit (docs/design.md, "Dense reads")."""
    stream = b"".join(frame.serialize() for frame in frames)
    reader = FrameReader()
    got: list[ControlFrame | Data] = []
    for chunk in data.draw(fs.splits(stream)):
        for _ in range(len(chunk) + 1):  # each pass takes a frame or ends the chunk
            if not chunk:
                break
            out = reader.feed(chunk, limit)
            assert len(out) <= limit
            assert 0 <= reader.unread <= len(chunk)
            assert reader.unread == 0 or len(out) == limit  # stopped only by the limit
            got += [Data(f.offset, bytes(f.payload)) if isinstance(f, Data) else f for f in out]
            chunk = chunk[len(chunk) - reader.unread :] if reader.unread else b""
        assert not chunk
    assert normalize(got) == normalize(list(frames))


@pytest.mark.parametrize("payload", [b"hi", b"a 64-byte message" * 4, b"m" * COPY_BELOW])
def test_an_ack_before_a_data_frame_reads_as_two_frames(payload: bytes) -> None:
    """A small message's piggybacked ACK goes before its DATA (``ack_and_data_header``),
    and the reader takes both headers in one unpack: each is still a frame of its own,
    however the bytes are split, and a limit of one stops between them."""
    stream = ack_and_data_header(7, 3, len(payload)) + payload
    assert stream == Ack(7).serialize() + Data(3, payload).serialize()
    for cut in range(len(stream) + 1):
        got = read_all([stream[:cut], stream[cut:]])  # a payload cut in two comes in pieces
        assert normalize(got) == normalize([Ack(7), Data(3, payload)])
    reader = FrameReader()
    assert reader.feed(stream, 1) == [Ack(7)]
    assert reader.unread == len(stream) - len(Ack(7).serialize())
    rest = stream[len(stream) - reader.unread :]
    assert [Data(f.offset, bytes(f.payload)) for f in reader.feed(rest, 1)] == [
        Data(3, payload)
    ]  # (a Data here: only a DATA frame is left)
    assert reader.unread == 0


@settings(max_examples=20)
@given(
    st.lists(
        fs.frames.filter(lambda f: not isinstance(f, Data) or len(f.payload) < 2000), max_size=5
    )
)
def test_reader_byte_by_byte(frames: list[ControlFrame | Data]) -> None:
    stream = b"".join(frame.serialize() for frame in frames)
    one_by_one = read_all([stream[i : i + 1] for i in range(len(stream))])
    assert normalize(one_by_one) == normalize(list(frames))


def test_small_bytes_are_sliced_and_anything_else_is_viewed() -> None:
    """Payloads of a bytes input under COPY_BELOW are bytes (copies, cheaper than views of
    a message); of a larger one, or of a buffer that may be reused, views of the input."""
    small = Data(1, b"x" * 100).serialize()
    (got,) = FrameReader().feed(small)
    assert isinstance(got, Data) and type(got.payload) is bytes and got.payload == b"x" * 100
    large = Data(1, b"y" * COPY_BELOW).serialize()
    (got,) = FrameReader().feed(large)
    assert isinstance(got, Data) and isinstance(got.payload, memoryview)
    assert got.payload.obj is large
    reused = bytearray(small)  # the link's read buffer, say: never copied by slicing
    (got,) = FrameReader().feed(reused)
    assert isinstance(got, Data) and isinstance(got.payload, memoryview)
    assert got.payload.obj is reused


def test_reader_returns_data_as_it_arrives_without_buffering() -> None:
    reader = FrameReader()
    raw = Data(7, b"abcdef").serialize()
    assert reader.feed(raw[:12]) == []
    first = reader.feed(raw[12:15])
    assert [(f.offset, bytes(f.payload)) for f in first if isinstance(f, Data)] == [(7, b"abc")]
    rest = reader.feed(raw[15:])
    assert [(f.offset, bytes(f.payload)) for f in rest if isinstance(f, Data)] == [(10, b"def")]


# -- the reader's refusals --------------------------------------------------------------------

BAD_FRAMES = {
    "empty DATA": header(FrameType.DATA, 8) + bytes(8),
    "DATA without offset": header(FrameType.DATA, 4) + bytes(4),
    "oversize DATA": header(FrameType.DATA, 8 + MAX_DATA_CHUNK + 1),
    "oversize control": header(FrameType.PING, MAX_CONTROL_PAYLOAD + 1),
    "oversize unknown": header(0x7F, 0xFFFFFF),
    "unknown type": header(0x7F, 0),
    "type zero": header(0x00, 8) + bytes(8),
    "short ACK": header(FrameType.ACK, 7) + bytes(7),
    "long ACK": header(FrameType.ACK, 9) + bytes(9),
    "long PING": header(FrameType.PING, 9) + bytes(9),
    "short SETUP": header(FrameType.SETUP, 10) + bytes(10),
    "long RESUME": header(FrameType.RESUME, 200) + bytes(200),
    "CLOSE without code": header(FrameType.CLOSE, 1) + b"\x00",
    "REJECT reason too long": header(FrameType.REJECT, 2 + MAX_REASON_BYTES + 1)
    + bytes(2 + MAX_REASON_BYTES + 1),
}


@pytest.mark.parametrize("name", sorted(BAD_FRAMES))
def test_reader_rejects(name: str) -> None:
    raw = BAD_FRAMES[name]
    with pytest.raises(ProtocolError):
        FrameReader().feed(raw)
    reader = FrameReader()
    with pytest.raises(ProtocolError):  # the error comes at some byte
        for i in range(len(raw)):
            reader.feed(raw[i : i + 1])


@given(st.integers(0, 2**64 - 1))
def test_ack_frame_is_an_acks_serialization(offset: int) -> None:
    assert ack_frame(offset) == Ack(offset).serialize()


@given(st.integers(0, 2**64 - 1))
def test_ping_and_pong_frames_are_their_serializations(token: int) -> None:
    assert ping_frame(token) == Ping(token).serialize()
    assert pong_frame(token) == Pong(token).serialize()


@given(st.integers(0, 2**64 - 1), st.integers(0, 12), st.integers(1, 100))
def test_reader_reads_a_whole_ack_as_parse_control_does(offset: int, cut: int, size: int) -> None:
    """A whole ACK is read without parse_control (the reader's per-message path); it is
    the frame parse_control gives, after a DATA frame too, and so is one split anywhere."""
    raw = ack_frame(offset)
    expected = parse_control(FrameType.ACK, raw[4:])
    data = Data(5, bytes(size))
    assert normalize(FrameReader().feed(data.serialize() + raw + raw)) == normalize(
        [data, expected, expected]
    )
    reader = FrameReader()
    assert reader.feed(raw[:cut]) + reader.feed(raw[cut:]) == [expected]


@pytest.mark.parametrize(
    "word",
    [
        (FrameType.DATA << 24) | 8,
        (FrameType.DATA << 24) | (8 + MAX_DATA_CHUNK + 1),
        (FrameType.DATA << 24) | 0xFFFFFF,
        (FrameType.ACK << 24) | (MAX_CONTROL_PAYLOAD + 1),
        (0x7F << 24) | 0xFFFFFF,
    ],
)
def test_reader_refuses_a_whole_header_in_check_headers_words(word: int) -> None:
    """The reader inlines check_header's accepting cases for whole headers; what it
    refuses is still refused by check_header, with the same error."""
    with pytest.raises(ProtocolError) as direct:
        check_header(word)
    with pytest.raises(ProtocolError) as read:
        FrameReader().feed(struct.pack("!I", word) + bytes(16))
    assert str(read.value) == str(direct.value)


@pytest.mark.parametrize("length", [MAX_CONTROL_PAYLOAD + 1, 0xFFFFFF])
def test_oversize_is_refused_from_the_header_alone(length: int) -> None:
    with pytest.raises(ProtocolError):
        FrameReader().feed(header(FrameType.ACK, length))
    reader = FrameReader()
    reader.feed(header(FrameType.ACK, length)[:3])
    with pytest.raises(ProtocolError):
        reader.feed(header(FrameType.ACK, length)[3:])


def test_good_frames_before_a_bad_one_are_not_returned_twice() -> None:
    reader = FrameReader()
    ping = fs.Ping(1).serialize()
    assert reader.feed(ping) == [fs.Ping(1)]
    with pytest.raises(ProtocolError):
        reader.feed(header(0x7F, 0))


def test_per_message_classes_keep_the_frozen_dataclass_contract() -> None:
    """Data, Ack and DataReceived are written out (CONTRIBUTING.md F1, D6), not frozen
    dataclasses: equal by field and type, hashable alike, the same repr, and read-only
    where compiled (plain Python leaves that to mypy's Final)."""
    from tether.protocol.events import DataReceived

    payload = b"abc"
    cases: list[tuple[object, object, object, str]] = [
        (Data(1, payload), Data(1, memoryview(payload)), Data(2, payload), "Data(offset=1, "),
        (Ack(7), Ack(7), Ack(8), "Ack(offset=7)"),
        (DataReceived(payload), DataReceived(bytes(payload)), DataReceived(b""), "DataReceived("),
    ]
    for value, same, other, shown in cases:
        assert value == same and (value != same) is False
        assert value != other and value != shown
        assert repr(value).startswith(shown)
        assert hash(value) == hash(same)
        assert not hasattr(value, "__dict__")
    assert Data(1, b"x") != Ack(1) and Ack(1) != Data(1, b"")
    if not hasattr(Data.__init__, "__code__"):  # compiled: the fields refuse writes
        with pytest.raises(AttributeError):
            Ack(1).offset = 2  # type: ignore[misc]
