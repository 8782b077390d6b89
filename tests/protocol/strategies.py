"""Hypothesis strategies for frames (shared by the unit tests and the fuzzers)."""

from __future__ import annotations

import itertools

from hypothesis import strategies as st

from tether.protocol.codes import LOCAL_ONLY, CloseCode
from tether.protocol.frames import (
    MAX_DATA_CHUNK,
    NONCE_SIZE,
    SESSION_ID_SIZE,
    Accept,
    Ack,
    Close,
    Data,
    Eof,
    Ping,
    Pong,
    Reject,
    Resume,
    Resumed,
    Route,
    Setup,
)

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
key = st.binary(min_size=32, max_size=32)
session_id = st.binary(min_size=SESSION_ID_SIZE, max_size=SESSION_ID_SIZE)
nonce = st.binary(min_size=NONCE_SIZE, max_size=NONCE_SIZE)
codes = st.sampled_from([code for code in CloseCode if code not in LOCAL_ONLY])  # on the wire
# At most 64 characters of at most 4 UTF-8 bytes each: within MAX_REASON_BYTES, so exact.
reasons = st.text(st.characters(exclude_categories=("Cs",)), max_size=64)

setups = st.builds(Setup, key, u32, u32)
accepts = st.builds(Accept, session_id, key, u32, u32, u32, key)
resumes = st.builds(Resume, session_id, nonce, u64, u32, u32, key)
resumeds = st.builds(Resumed, u64, key)
routes = st.builds(Route, session_id)
rejects = st.builds(Reject, codes, reasons)
acks = st.builds(Ack, u64)
eofs = st.builds(Eof, u64)
pings = st.builds(Ping, u64)
pongs = st.builds(Pong, u64)
closes = st.builds(Close, codes, reasons)
control_frames = st.one_of(
    setups, accepts, resumes, routes, resumeds, rejects, acks, eofs, pings, pongs, closes
)
data_frames = st.builds(
    Data,
    st.integers(0, 2**64 - 1 - MAX_DATA_CHUNK),
    st.one_of(
        st.binary(min_size=1, max_size=300),
        st.integers(1, MAX_DATA_CHUNK).map(
            lambda n: bytes(range(256)) * (n // 256) + b"x" * (n % 256)
        ),
    ),
)
frames = st.one_of(control_frames, data_frames)


@st.composite
def splits(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at random places."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]
