"""The fuzz targets of fuzz/targets.py under hypothesis: random bytes, mixed with valid
frames so the fuzzer gets past the first check, into every input of the core."""

from __future__ import annotations

import pytest
from fuzz.targets import (
    CLIENT_STATES,
    VICTIM_ID,
    client_target,
    reader_target,
    server_handshake_target,
    server_session_target,
    state_target,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.protocol.frames import NONCE_SIZE, Data, Resume, Setup, client_hello, server_hello

from . import strategies as fs

victim_resumes = st.builds(
    Resume, st.just(VICTIM_ID), fs.nonce, st.integers(0, 10), st.integers(0, 2**20), fs.u32, fs.key
)
# All-zero and other low-order X25519 points make the key agreement fail: a classic input.
low_order_keys = st.sampled_from([bytes(32), b"\x01" + bytes(31), b"\xe0\xeb\x7a\x7c" + bytes(28)])
good_setups = st.builds(
    Setup, st.one_of(low_order_keys, fs.key), st.integers(1024, 2**20), st.integers(0, 10_000)
)
small_data = st.builds(Data, st.integers(0, 3), st.binary(min_size=1, max_size=20))
pieces = st.one_of(
    st.binary(max_size=64),
    fs.control_frames.map(lambda f: f.serialize()),
    small_data.map(lambda f: f.serialize()),
    victim_resumes.map(lambda f: f.serialize()),
    good_setups.map(lambda f: f.serialize()),
    st.just(client_hello()),
    st.builds(server_hello, st.integers(0, 3), st.binary(min_size=NONCE_SIZE, max_size=NONCE_SIZE)),
)


@st.composite
def streams(draw: st.DrawFn) -> list[bytes]:
    """A stream of pieces, then cut into chunks at random places (or flipped bits)."""
    raw = b"".join(draw(st.lists(pieces, max_size=8)))
    if raw and draw(st.booleans()):
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([raw[at] ^ (1 << draw(st.integers(0, 7)))]) + raw[at + 1 :]
    return draw(fs.splits(raw))


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(streams())
def test_reader(chunks: list[bytes]) -> None:
    reader_target(chunks)


@FUZZ
@given(st.lists(st.binary(max_size=300), max_size=5))
def test_reader_random_bytes(chunks: list[bytes]) -> None:
    reader_target(chunks)


@FUZZ
@given(streams())
def test_server_handshake(chunks: list[bytes]) -> None:
    server_handshake_target(chunks)


@FUZZ
@given(streams().map(lambda chunks: [client_hello(), *chunks]))
def test_server_handshake_after_a_good_hello(chunks: list[bytes]) -> None:
    server_handshake_target(chunks)


@pytest.mark.parametrize("state", CLIENT_STATES)
@FUZZ
@given(chunks=streams())
def test_client_session(state: str, chunks: list[bytes]) -> None:
    client_target(state, chunks)


@FUZZ
@given(streams())
def test_server_session(chunks: list[bytes]) -> None:
    server_session_target(chunks)


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_session_state(chunks: list[bytes]) -> None:
    state_target(chunks)
