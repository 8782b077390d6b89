"""Driver-level fuzzing: generated inputs against a running ``tether server`` and a
running ``tether client`` (issue 9; docs/fuzzing.md).

    PYTHONPATH=src:. python -m fuzz.driver --inputs 1000000 --seconds 1800 --target both

``--inputs`` is per target: a million against the server and a million against the client.

The campaign runs in phases, each against fresh processes started as the user starts
them (``python -m tether ...``, state and config in a temporary XDG directory):

- ``server-plain``: ``tether server --plaintext``; the fuzzer is many malicious clients.
- ``server-tls``: ``tether server`` in its default mode (TLS 1.3, a self-made identity);
  the fuzzer speaks TLS without verifying the server (it is the peer under test), and
  some of its connections throw raw bytes at the listener before any TLS.
- ``client-plain`` and ``client-tls``: ``tether client`` (``--plaintext``, or TLS with
  trust on first use) pointed at a malicious fake server run by the fuzzer, while the
  fuzzer also plays the applications that connect to the client.

One **input** is one generated piece of bytes that the fuzzer writes to the target on
one connection: a random blob, a mutated or field-fuzzed hello / SETUP / RESUME /
ACCEPT / RESUMED / REJECT, one post-authentication frame (or frame sequence: a PING
flood, a truncated frame), however many TCP writes it is split into. The bytes of a
real handshake that only get the fuzzer past authentication are not counted.

Checks (any failure makes the exit status 1, with a report): the target processes
stay alive; their stderr never shows ``Traceback`` or an ``ERROR`` entry (but the known
ones of ``KNOWN_ERRORS``, counted and reported); what they
send parses (a server's answer through the core's own handshake and session, a
client's request through the core's server handshake); a probe (a client hello) gets
a server hello within 2 s throughout; a fresh legitimate session works after the
campaign; every fuzz connection ends within its time bound; and afterwards the
process's open fds come back to within ``FD_SLACK`` of the baseline, its RSS comes
within ``RSS_BOUND`` of the baseline (both taken after a warm-up session; the RSS may take
``RSS_SETTLE``, a heap trim of the target's) and grows by
at most ``RSS_SLOPE_BOUND`` over the second half of the fuzzing.

Every connection's choices come from ``random.Random(f"{seed}:{phase}:{index}")``, so
``--replay PHASE:INDEX`` runs one connection again (verbosely) against fresh processes.
Every loop is bounded in count and in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether.allocator import TRIM_INTERVAL
from tether.errors import ProtocolError
from tether.logs import UVLOOP_CLOSED_WRITE_LINE
from tether.protocol.codes import CloseCode
from tether.protocol.events import (
    DataReceived,
    EofReceived,
    HandshakeFailed,
    ResumeRequested,
    SessionEnded,
    SetupRequested,
)
from tether.protocol.frames import (
    MAGIC,
    MAX_DATA_CHUNK,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    SERVER_HELLO_SIZE,
    SESSION_ID_SIZE,
    Accept,
    Ack,
    Close,
    Data,
    Eof,
    FrameType,
    Ping,
    Pong,
    Reject,
    Resume,
    Resumed,
    Setup,
    client_hello,
    server_hello,
)
from tether.protocol.handshake import ClientHandshake, HandshakeStage, ServerHandshake
from tether.protocol.reader import FrameReader
from tether.protocol.router import Router
from tether.protocol.session import Session, SessionConfig, SessionState

__all__ = ["PHASES", "Campaign", "main", "run_campaign"]

PHASES = ("server-plain", "server-tls", "client-plain", "client-tls")
# --inputs is per target (server, client): the share of each phase, and of --seconds.
INPUT_SHARES = {"server-plain": 0.8, "server-tls": 0.2, "client-plain": 0.8, "client-tls": 0.2}
TIME_SHARES = {"server-plain": 0.35, "server-tls": 0.15, "client-plain": 0.35, "client-tls": 0.15}

TARGET_TIMEOUT = 3.0  # --timeout given to the targets: detached sessions expire quickly
HANDSHAKE_TIMEOUT = 10.0  # the targets' link handshake timeout (their default)
KEEPALIVE = 3.0  # the targets' keepalive (their default)
CONN_LIMIT = 6.0  # one fuzz connection, from connect to close, seconds
LONG_HOLD_LIMIT = HANDSHAKE_TIMEOUT + 4.0  # the few that wait out the handshake timeout
PROBE_LIMIT = 2.0  # a client hello must get a server hello within this
PROBE_EVERY = 3.0
FD_SLACK = 3  # fds above the baseline still accepted after the settle time
SETTLE_LIMIT = HANDSHAKE_TIMEOUT + 2 * KEEPALIVE + TARGET_TIMEOUT + 10.0
RSS_BOUND = 64 * 1024 * 1024  # bytes above the baseline RSS accepted afterwards
# The targets give the memory their closed connections freed back at their next heap trim
# (tether.allocator: at most TRIM_INTERVAL later): once the fds settle, RSS may take that
# long (and a second) to come within its bound.
RSS_SETTLE = TRIM_INTERVAL + 1.0
# RSS growth accepted over the second half of a phase's fuzzing: by then the working set
# of the concurrent connections is in place, so steady growth there is a leak.
RSS_SLOPE_BOUND = 16 * 1024 * 1024
# The working set is in place only once the longest-lived fuzz connections (those waiting out
# the handshake timeout) and the detached sessions they leave (expiring after the keepalive
# detects the loss, plus the timeout) have started to leave: the mid-point sample is not
# taken before, so a short phase (the CI's) has no slope check, only the bound afterwards.
SLOPE_WARMUP = LONG_HOLD_LIMIT + 2 * KEEPALIVE + TARGET_TIMEOUT
# Core errors that depend on what the peer was sent, not on how it frames its output.
STATEFUL = ("ACK of offset", "DATA at offset", "EOF at offset", "DATA after EOF")
TRACE = False  # --replay: print every write and read of the fuzzer's connections
MAX_REPORTED = 20  # findings kept per kind
FAKE_SESSIONS = 512  # sessions the fake server's router keeps before forgetting old ones

U64_EDGES = (0, 1, 2, 255, 1023, 1024, 65535, 65536, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1,
             2**63, 2**64 - 2, 2**64 - 1)  # fmt: skip
U32_EDGES = (0, 1, 1023, 1024, 1025, 65536, 2**30 - 1, 2**30, 2**30 + 1, 2**31, 2**32 - 1)
U24_EDGES = (0, 1, 7, 8, 9, 2, 10, 511, 512, 513, 8 + MAX_DATA_CHUNK, 9 + MAX_DATA_CHUNK, 2**24 - 1)
LOW_ORDER_KEYS = (bytes(32), b"\x01" + bytes(31), b"\xe0\xeb\x7a\x7c" + bytes(28), b"\xff" * 32)
FRAME_TYPES = tuple(int(t) for t in FrameType)
ACCEPT_SIZE = len(Accept(bytes(16), bytes(32), 0, 0, 0, bytes(32)).serialize()) - 4


# -- generators ------------------------------------------------------------------------------


def rand_len(r: random.Random) -> int:
    x = r.random()
    if x < 0.3:
        return r.randint(0, 8)
    if x < 0.6:
        return r.randint(9, 64)
    if x < 0.85:
        return r.randint(65, 1024)
    if x < 0.97:
        return r.randint(1025, 8192)
    return r.randint(8193, 3 * MAX_DATA_CHUNK)


def rand_bytes(r: random.Random, n: int | None = None) -> bytes:
    n = rand_len(r) if n is None else n
    x = r.random()
    if x < 0.8:
        return r.randbytes(n)
    if x < 0.9:
        return bytes((r.getrandbits(8),)) * n
    return bytes(r.choice((0, 0xFF, 0x89, 0x16, 0x10, 0x13)) for _ in range(min(n, 4096)))


def u64(r: random.Random) -> int:
    return r.choice(U64_EDGES) if r.random() < 0.5 else r.getrandbits(64)


def u32(r: random.Random) -> int:
    return r.choice(U32_EDGES) if r.random() < 0.5 else r.getrandbits(32)


def reason(r: random.Random) -> str:
    x = r.random()
    if x < 0.4:
        return ""
    if x < 0.7:
        return "".join(chr(r.randint(32, 126)) for _ in range(r.randint(1, 40)))
    if x < 0.9:
        return "".join(chr(r.randint(0x80, 0x2FFFF)) for _ in range(r.randint(1, 100)))
    return "x" * r.randint(200, 400)  # cut to MAX_REASON_BYTES by serialize()


def raw_code_frame(r: random.Random, kind: FrameType) -> bytes:
    """A REJECT or CLOSE with any u16 code (unknown codes included) and any reason bytes."""
    payload = struct.pack("!H", r.getrandbits(16)) + r.randbytes(r.randint(0, 300))
    return frame(kind, payload)


def frame(kind: int, payload: bytes, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return struct.pack("!I", (kind << 24) | (n & 0xFFFFFF)) + payload


def key(r: random.Random) -> bytes:
    return r.choice(LOW_ORDER_KEYS) if r.random() < 0.2 else r.randbytes(32)


def any_control(r: random.Random, session_id: bytes | None = None) -> bytes:
    """A well-formed control frame of any type with random fields."""
    sid = session_id if session_id is not None and r.random() < 0.5 else r.randbytes(16)
    kind = r.randrange(12)
    if kind == 0:
        token = r.randbytes(r.choice((0, 1, 16, 255)))
        return Setup(key(r), u32(r), u32(r), token).serialize()
    if kind == 1:
        return Accept(sid, key(r), u32(r), u32(r), u32(r), r.randbytes(32)).serialize()
    if kind == 2:
        return Resume(sid, r.randbytes(32), u64(r), u32(r), u32(r), r.randbytes(32)).serialize()
    if kind == 3:
        return Resumed(u64(r), r.randbytes(32)).serialize()
    if kind == 4:
        return Reject(r.choice(list(CloseCode)), reason(r)).serialize()
    if kind == 5:
        return raw_code_frame(r, r.choice((FrameType.REJECT, FrameType.CLOSE)))
    if kind == 6:
        return Ack(u64(r)).serialize()
    if kind == 7:
        return Eof(u64(r)).serialize()
    if kind == 8:
        return Ping(u64(r)).serialize()
    if kind == 9:
        return Pong(u64(r)).serialize()
    if kind == 10:
        return Close(r.choice(list(CloseCode)), reason(r)).serialize()
    return frame(r.getrandbits(8), r.randbytes(r.randint(0, 64)))  # any type byte


def any_frame_header(r: random.Random) -> bytes:
    """A header with an edge length, and a payload that may not match it."""
    kind = r.choice(FRAME_TYPES) if r.random() < 0.8 else r.getrandbits(8)
    length = r.choice(U24_EDGES)
    payload = r.randbytes(min(length, r.choice((0, 8, 16, 600, 70000))))
    return frame(kind, payload, length)


def mutate(r: random.Random, data: bytes) -> bytes:
    """One to four byte-level mutations of ``data``."""
    buf = bytearray(data)
    for _ in range(r.randint(1, 4)):
        op = r.randrange(9)
        n = len(buf)
        if op == 0 and n:  # flip a bit
            buf[r.randrange(n)] ^= 1 << r.randrange(8)
        elif op == 1 and n:  # an interesting byte
            buf[r.randrange(n)] = r.choice((0, 1, 0x7F, 0x80, 0xFF, 0x10, 0x89))
        elif op == 2:  # insert
            at = r.randint(0, n)
            buf[at:at] = r.randbytes(r.randint(1, 16))
        elif op == 3 and n:  # delete
            at = r.randrange(n)
            del buf[at : at + r.randint(1, 16)]
        elif op == 4 and n:  # truncate
            del buf[r.randrange(n) :]
        elif op == 5 and n:  # duplicate a piece
            at = r.randrange(n)
            piece = buf[at : at + r.randint(1, 64)]
            buf[at:at] = piece
        elif op == 6 and n >= 4:  # rewrite a frame length (where a header may start)
            at = r.randrange(0, n - 3)
            struct.pack_into("!I", buf, at, (buf[at] << 24) | r.choice(U24_EDGES))
        elif op == 7 and n:  # rewrite a frame type
            buf[r.randrange(n)] = r.choice(FRAME_TYPES)
        else:  # append
            buf += r.randbytes(r.randint(1, 64))
    return bytes(buf)


def splits(r: random.Random, data: bytes) -> list[bytes]:
    """``data`` cut at random places (most often not at all)."""
    if len(data) < 2 or r.random() < 0.6:
        return [data]
    cuts = sorted(r.randrange(1, len(data)) for _ in range(r.randint(1, 6)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def benign_frame(r: random.Random, session: Session) -> bytes:
    """A valid input for an established link, through the core ``session`` (stream bytes
    of random sizes, its EOF, its ACKs) or a PING or PONG within the peer's rate limit."""
    attached = session.state is SessionState.ATTACHED
    x = r.random()
    if attached and not session.eof_sent and x < 0.75:
        if x < 0.74:
            session.send(rand_bytes(r, r.choice((1, 7, 100, 1000, 20000, 70000))))
        else:
            session.send_eof()
        return b"".join(session.data_to_send())
    if x < 0.85:
        return Ping(r.getrandbits(64)).serialize()
    if x < 0.9:
        return Pong(r.getrandbits(64)).serialize()
    return b"".join(session.data_to_send()) if attached else b""


def hostile_frame(r: random.Random, session: Session) -> bytes:
    """An input an established link must refuse or survive: frames with wrong offsets,
    a huge ACK, floods, CLOSE with any code, handshake frames mid-session, truncated,
    mutated or random bytes. Never the exact next DATA or EOF offset, so the core
    ``session`` stays right about what the peer acknowledges."""
    stats = session.statistics()
    sent, received = stats.bytes_sent, session.received
    x = r.random()
    if x < 0.08:
        return Ping(r.getrandbits(64)).serialize() * r.randint(50, 2000)  # a flood
    if x < 0.16:
        offset = r.choice((sent + 1, sent + 2**20, 2**64 - 1, u64(r)))
        return Ack(offset).serialize()  # beyond what was sent
    if x < 0.2:
        return Ack(r.randint(0, sent)).serialize()  # old news, or not
    if x < 0.3:
        offset = r.choice((sent + 1, sent + 1000, 2**63, u64(r), max(sent - 1, 0), received))
        payload = rand_bytes(r, r.randint(1, 3000)) or b"x"
        offset = min(offset, 2**64 - 1 - len(payload))
        if offset == sent:
            offset += 1
        return Data(offset, payload).serialize()  # a gap, an overlap, or past the end
    if x < 0.35:
        return frame(FrameType.DATA, r.randbytes(r.randint(0, 9)), r.choice(U24_EDGES))
    if x < 0.4:
        offset = u64(r)
        return Eof(offset if offset != sent else offset + 1).serialize()
    if x < 0.48:
        if r.random() < 0.5:
            return Close(r.choice(list(CloseCode)), reason(r)).serialize()
        return raw_code_frame(r, FrameType.CLOSE)
    if x < 0.56:
        return any_control(r, session.session_id)  # handshake frames mid-session
    if x < 0.64:
        good = Data(sent + 10**6, r.randbytes(40)).serialize()
        return (any_control(r) if r.random() < 0.5 else good)[: r.randint(1, 20)]  # truncated
    if x < 0.8:
        return mutate(r, any_control(r) if r.random() < 0.7 else Ack(0).serialize())
    if x < 0.88:
        return any_frame_header(r)
    return rand_bytes(r)


def fuzz_hello(r: random.Random) -> bytes:
    x = r.random()
    if x < 0.4:
        return client_hello(r.getrandbits(8), r.getrandbits(8))
    if x < 0.7:
        return mutate(r, client_hello())
    if x < 0.85:
        return MAGIC[: r.randint(0, len(MAGIC))] + rand_bytes(r, r.randint(0, 4))
    return client_hello(r.randint(0, 2), r.randint(2, 255))


def fuzz_request(r: random.Random, live: list[bytes]) -> bytes:
    """A SETUP or RESUME, field-fuzzed or mutated from a well-formed one."""
    sid = r.choice(live) if live and r.random() < 0.5 else r.randbytes(SESSION_ID_SIZE)
    if r.random() < 0.5:
        token = r.randbytes(r.choice((0, 0, 1, 32, 255)))
        window = r.choice((1024, 65536, 4 << 20, 1 << 30)) if r.random() < 0.6 else u32(r)
        base = Setup(key(r), window, u32(r), token).serialize()
    else:
        window = r.choice((1024, 4 << 20)) if r.random() < 0.6 else u32(r)
        base = Resume(sid, r.randbytes(32), u64(r), window, u32(r), r.randbytes(32)).serialize()
    x = r.random()
    if x < 0.5:
        return base
    if x < 0.85:
        return mutate(r, base)
    return any_control(r, sid)


# -- processes and measurements -------------------------------------------------------------


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# Log entries a peer can cause that are reported in docs/fuzzing.md ("Findings") and not
# fixed at their source: counted and reported, not failed, at whatever level they are
# logged. Each is (name, strings its entry contains).
KNOWN_ERRORS = (
    # (F2, a local-only code from the wire logged at ERROR, is fixed: it reads as
    # PROTOCOL_ERROR; such an entry is now a new error.)
    # F4: uvloop's SSL protocol writes to its closed TCP transport; the targets' loop
    # exception handler (logs.loop_exception_handler) logs it as one WARNING line. Were it
    # to reach the loop's default handler again (uvloop's traceback, at ERROR), it would be
    # a new error: the handler no longer matches it.
    ("F4-uvloop-ssl-write-after-close", (UVLOOP_CLOSED_WRITE_LINE,)),
)  # fmt: skip
ENTRY_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")  # a log line's timestamp


class LogWatch:
    """Scans a target's stderr log as it grows for ``Traceback``, ``ERROR`` and
    ``CRITICAL`` entries (an entry: a timestamped line and the lines up to the next)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pos = 0
        self._tail: list[str] = []  # the last entry, which may go on in the next scan
        self.hits: list[str] = []
        self.lines = 0
        self.known: dict[str, int] = {}

    def scan(self, final: bool = False) -> list[str]:
        with open(self.path, encoding="utf-8", errors="replace") as f:
            f.seek(self._pos)
            chunk = f.read(64 * 1024 * 1024)
            self._pos = f.tell()
        lines = chunk.split("\n")
        if self._tail and lines:
            lines[0] = self._tail.pop() + lines[0]  # the unfinished line
        lines = self._tail + lines
        self._tail = []
        if not final:
            # Keep the last entry (it may be unfinished) for the next scan.
            start = len(lines) - 1
            while start > 0 and not ENTRY_START.match(lines[start]):
                start -= 1
            lines, self._tail = lines[:start], lines[start:]
        new: list[str] = []
        entry: list[str] = []
        for line in [*lines, "0000-00-00 00:00:00 end"]:
            if ENTRY_START.match(line) or not entry:
                if entry:
                    self._check("\n".join(entry), new)
                entry = [line]
            else:
                entry.append(line)
        self.lines += max(len(lines), 0)
        self.hits += new
        return new

    def _check(self, entry: str, new: list[str]) -> None:
        for name, parts in KNOWN_ERRORS:
            if all(part in entry for part in parts):
                self.known[name] = self.known.get(name, 0) + 1
                # What follows it in the same entry (a traceback from Python's last-resort
                # handler has no timestamp of its own) is still checked.
                for part in parts:
                    entry = entry.replace(part, "")
                break
        if "Traceback" in entry or " ERROR " in entry or " CRITICAL " in entry:
            new.append(entry[:4000])


@dataclass
class Target:
    role: str
    popen: subprocess.Popen[bytes]
    address: tuple[str, int]
    log: LogWatch

    @property
    def pid(self) -> int:
        return self.popen.pid


def spawn_target(role: str, args: list[str], tmp: Path, log_path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["XDG_STATE_HOME"] = str(tmp / "state")
    env["XDG_CONFIG_HOME"] = str(tmp / "config")
    with open(log_path, "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "tether", role, *args],
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=env,
        )


async def start_target(role: str, args: list[str], tmp: Path, name: str) -> Target:
    log_path = tmp / f"{name}.log"
    popen = spawn_target(role, args, tmp, log_path)
    assert popen.stdout is not None
    loop = asyncio.get_running_loop()
    try:
        line = await asyncio.wait_for(loop.run_in_executor(None, popen.stdout.readline), 30)
    except TimeoutError:
        popen.kill()
        raise
    text = line.decode(errors="replace").strip()
    if not text.startswith("READY "):
        popen.kill()
        raise RuntimeError(f"tether {role} did not start: {text!r}\n{log_path.read_text()}")
    host, _, port = text.split()[1].rpartition(":")
    return Target(role, popen, (host.strip("[]"), int(port)), LogWatch(log_path))


def stop_target(target: Target) -> int | None:
    """SIGTERM, and the exit status within 10 s (None: it had to be killed)."""
    popen = target.popen
    try:
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
        try:
            return popen.wait(10)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
            return None
    finally:
        if popen.stdout is not None:
            popen.stdout.close()


# -- the fuzzer's side of a connection ---------------------------------------------------------


class Peer(asyncio.Protocol):
    """One fuzz connection: writes with flow control, hands what it reads to ``sink``."""

    def __init__(self, sink: Callable[[bytes], None] | None = None) -> None:
        self.sink = sink
        self.early = bytearray()
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.got_eof = False
        self.received = 0
        self._writable = asyncio.Event()
        self._writable.set()
        self.wakeup = asyncio.Event()  # set on every read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if TRACE:
            print(f"    <- {len(data)} bytes: {data[:48].hex()}", file=sys.stderr)
        if self.sink is not None:
            self.sink(data)
        elif len(self.early) < 1 << 20:
            self.early += data  # until a sink is set
        self.wakeup.set()

    def set_sink(self, sink: Callable[[bytes], None]) -> None:
        """Read into ``sink`` from now on, starting with what arrived before."""
        self.sink = sink
        early, self.early = bytes(self.early), bytearray()
        if early:
            sink(early)

    def eof_received(self) -> bool:
        self.got_eof = True
        self.wakeup.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._writable.set()
        self.wakeup.set()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    @property
    def dead(self) -> bool:
        return self.closed.done() or self.got_eof or self.transport is None

    async def send(self, r: random.Random, data: bytes) -> bool:
        """Write ``data`` in random pieces; False once the connection is gone."""
        if TRACE:
            print(f"    -> {len(data)} bytes: {data[:48].hex()}", file=sys.stderr)
        for piece in splits(r, data):
            if self.dead or self.transport is None or self.transport.is_closing():
                return False
            self.transport.write(piece)
            if not self._writable.is_set():
                await self._writable.wait()
            elif r.random() < 0.3:
                await asyncio.sleep(0)
        return not self.dead

    async def settle(self, seconds: float) -> None:
        """Read for up to ``seconds``, or until the peer closes."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.closed), seconds)

    async def wait_read(self, seconds: float) -> None:
        self.wakeup.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wakeup.wait(), seconds)

    def reset(self) -> None:
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):  # ValueError: already closed
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    async def end(self, r: random.Random, long_hold: bool = False) -> str:
        """Close the connection one random way; returns which."""
        x = r.random()
        if long_hold:
            await self.settle(LONG_HOLD_LIMIT - 1)  # the peer's handshake timeout decides
            how = "hold-long"
        elif x < 0.35:
            how = "fin"
        elif x < 0.7:
            how = "rst"
        elif x < 0.9:
            await self.settle(r.uniform(0, 0.3))
            how = "wait"
        else:
            await self.settle(r.uniform(0.3, 1.5))
            how = "hold"
        if how == "rst":
            self.reset()
        elif self.transport is not None:
            self.transport.close()
        return how

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


# -- findings and counting --------------------------------------------------------------------


@dataclass
class PhaseResult:
    phase: str
    inputs: int = 0
    connections: int = 0
    links: int = 0
    seconds: float = 0.0
    scenarios: dict[str, int] = field(default_factory=dict)
    endings: dict[str, int] = field(default_factory=dict)
    fd_baseline: int = 0
    fd_peak: int = 0
    fd_after: int = 0
    rss_baseline: int = 0
    rss_peak: int = 0
    rss_after: int = 0
    rss_mid: int = 0  # at half the phase (inputs or time), once past SLOPE_WARMUP
    rss_end: int = 0  # when its fuzzing ended
    cpu_seconds: float = 0.0  # the target's, during the campaign
    fuzzer_cpu_seconds: float = 0.0
    known_errors: dict[str, int] = field(default_factory=dict)
    probes: int = 0
    probe_max: float = 0.0
    log_lines: int = 0
    exit_status: int | None = None
    settle_seconds: float = 0.0
    findings: dict[str, list[str]] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0

    def find(self, kind: str, text: str) -> None:
        kept = self.findings.setdefault(kind, [])
        if len(kept) < MAX_REPORTED:
            kept.append(text)
        else:
            kept[-1] = f"(and more; last:) {text}"

    def as_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items()}
        out["inputs_per_second"] = round(self.rate, 1)
        return out


class Phase:
    """What every phase shares: the budget, the counters, the recent connections."""

    def __init__(self, name: str, seed: int, budget: int, seconds: float, verbose: bool) -> None:
        self.name = name
        self.seed = seed
        self.budget = budget
        self.deadline = time.monotonic() + seconds
        self.result = PhaseResult(name)
        self.recent: deque[str] = deque(maxlen=64)
        self.verbose = verbose
        self.indexes = itertools.count()
        self.stopping = False

    def rng(self, index: int) -> random.Random:
        return random.Random(f"{self.seed}:{self.name}:{index}")

    @property
    def done(self) -> bool:
        if self.stopping:
            return True
        if self.result.inputs >= self.budget or time.monotonic() >= self.deadline:
            self.stopping = True
        return self.stopping

    def count(self, n: int = 1) -> None:
        self.result.inputs += n

    def scenario(self, index: int, name: str) -> None:
        scenarios = self.result.scenarios
        scenarios[name] = scenarios.get(name, 0) + 1
        self.recent.append(f"{self.name}:{index} {name}")
        if self.verbose:
            print(f"  {self.name}:{index} {name}", file=sys.stderr)

    def ending(self, how: str) -> None:
        self.result.endings[how] = self.result.endings.get(how, 0) + 1


def known_error(exc: BaseException) -> bool:
    """Errors a fuzz connection is expected to meet (the target hung up, TLS refused)."""
    return isinstance(exc, OSError | EOFError | TimeoutError | ConnectionError | ssl.SSLError)


# -- server phases: the fuzzer as malicious clients -----------------------------------------


class ServerOutput:
    """Checks what a server sends on a link whose handshake the fuzzer mangled: a server
    hello, then a REJECT, or an ACCEPT (a fuzzed SETUP may well be valid) and well-formed
    frames after it."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.error = ""
        self.frames: FrameReader | None = None  # after an ACCEPT

    def feed(self, data: bytes) -> None:
        if self.error:
            return
        if self.frames is not None:
            try:
                self.frames.feed(data)
            except ProtocolError as exc:
                self.error = f"server sent a malformed frame after its ACCEPT: {exc}"
            return
        self.buf += data
        head = bytes(self.buf[: len(MAGIC)])
        if head != MAGIC[: len(head)]:
            self.error = f"server answer does not start with the magic: {bytes(self.buf[:16])!r}"
            return
        rest = bytes(self.buf[SERVER_HELLO_SIZE:])
        while len(rest) >= 4:
            (word,) = struct.unpack_from("!I", rest)
            kind, length = word >> 24, word & 0xFFFFFF
            if kind == FrameType.ACCEPT and length == ACCEPT_SIZE:
                self.frames = FrameReader()
                self.buf.clear()
                self.feed(rest[4 + length :])
                return
            if kind != FrameType.REJECT or not 2 <= length <= 258:
                self.error = f"server sent frame 0x{kind:02x} of {length} bytes before a session"
                return
            rest = rest[4 + length :]


class ServerCampaign(Phase):
    """Many malicious clients against one ``tether server``."""

    def __init__(self, *args: Any, tls: bool, concurrency: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tls = tls
        self.concurrency = concurrency
        self.address: tuple[str, int] = ("127.0.0.1", 0)
        self.context: ssl.SSLContext | None = None
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE  # the fuzzer is the peer, not a user
            self.context = context
        self.only = ""
        self.live: deque[bytes] = deque(maxlen=64)  # our own sessions' ids, to forge resumes
        # Sessions whose link carried a hostile frame: the server may have taken an
        # injected EOF or DATA as the stream's, so its offsets no longer match ours.
        self.tainted: set[int] = set()

    async def open(self, r: random.Random, raw: bool, sink: Callable[[bytes], None] | None) -> Peer:
        loop = asyncio.get_running_loop()
        peer = Peer(sink)
        ssl_ctx = None if raw else self.context
        await loop.create_connection(lambda: peer, *self.address, ssl=ssl_ctx)
        return peer

    async def worker(self) -> None:
        while not self.done:
            index = next(self.indexes)
            r = self.rng(index)
            long_hold = r.random() < 0.001
            limit = LONG_HOLD_LIMIT + 2 if long_hold else CONN_LIMIT
            try:
                async with asyncio.timeout(limit):
                    await self.connection(index, r, long_hold)
            except TimeoutError:
                self.result.find("hang", f"{self.name}:{index} took more than {limit}s")
            except Exception as exc:
                if not known_error(exc):
                    self.result.find(
                        "fuzzer-error", f"{self.name}:{index}: {traceback.format_exc()}"
                    )
            self.result.connections += 1

    async def connection(self, index: int, r: random.Random, long_hold: bool) -> None:
        x = r.random()
        if self.only:  # --only: one scenario, to find which one a finding comes from
            x = {"raw": 0.1, "request": 0.3, "session": 0.6, "resume": 0.9, "forge": 0.99}[
                self.only
            ]
        if x < 0.2:
            await self.raw(index, r, long_hold)
        elif x < 0.5:
            await self.request(index, r, long_hold)
        elif x < 0.88:
            await self.session(index, r, resume=False)
        elif x < 0.96:
            await self.session(index, r, resume=True)
        else:
            await self.forge(index, r)

    async def raw(self, index: int, r: random.Random, long_hold: bool) -> None:
        """Random bytes, with the prefixes the listener sniffs for; no tether link, so over
        TLS only after the TLS handshake."""
        raw = not self.tls or r.random() < 0.5
        self.scenario(index, "raw" + ("-tcp" if raw and self.tls else ""))
        peer = await self.open(r, raw, None)
        try:
            for _ in range(r.randint(1, 3)):
                blob = rand_bytes(r)
                y = r.random()
                if y < 0.15:
                    blob = MAGIC + blob
                elif y < 0.25:
                    blob = b"\x16\x03\x01" + blob
                elif y < 0.35:
                    blob = client_hello() + blob
                if not blob:
                    continue
                self.count()
                if not await peer.send(r, blob):
                    break
            self.ending(await peer.end(r, long_hold))
        finally:
            peer.abort()

    async def request(self, index: int, r: random.Random, long_hold: bool) -> None:
        """A hello (valid or fuzzed) and a fuzzed SETUP or RESUME, maybe more bytes."""
        self.scenario(index, "request")
        out = ServerOutput()
        raw = self.tls and r.random() < 0.1  # clear text to a TLS server: REJECT(TLS_REQUIRED)
        peer = await self.open(r, raw, out.feed)
        try:
            if r.random() < 0.7:
                hello = client_hello()
            else:
                hello = fuzz_hello(r)
                self.count()
            request = fuzz_request(r, list(self.live))
            self.count()
            extra = b""
            if r.random() < 0.3:
                extra = rand_bytes(r) if r.random() < 0.5 else any_control(r)
                self.count()
            if await peer.send(r, hello + request + extra):
                self.ending(await peer.end(r, long_hold))
            await peer.settle(0.05)
            if out.error and not raw:
                self.result.find("bad-answer", f"{self.name}:{index}: {out.error}")
        finally:
            peer.abort()

    async def handshake(
        self, r: random.Random, session: Session, peer_box: list[Peer], index: int
    ) -> bool:
        """Run a real setup or resume of ``session`` on a new connection (in ``peer_box``)."""
        loop = asyncio.get_running_loop()
        hs = ClientHandshake(session, loop.time())
        done = asyncio.Event()

        def sink(data: bytes) -> None:
            if hs.stage is HandshakeStage.DONE:
                self.from_server(session, data, index)
            else:
                hs.receive_data(data)
                if hs.done:
                    done.set()

        peer = await self.open(r, False, sink)
        peer_box.append(peer)
        assert peer.transport is not None
        peer.transport.write(b"".join(hs.data_to_send()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 3.0)
        if hs.stage is not HandshakeStage.DONE:
            event = hs.next_event()
            if isinstance(event, HandshakeFailed) and event.code not in (
                CloseCode.HANDSHAKE_TIMEOUT,
                CloseCode.OVERLOADED,
            ):
                self.result.find("handshake", f"{self.name}:{index}: {event}")
            return False
        assert peer.transport is not None
        out = session.data_to_send()
        if out:
            peer.transport.write(b"".join(out))
        return True

    def from_server(self, session: Session, data: bytes, index: int) -> None:
        """Server bytes after the handshake go through the core's own session: a
        protocol error found *there* means the server sent something malformed."""
        if session.state is not SessionState.ATTACHED:
            return
        session.receive_data(data, asyncio.get_running_loop().time())
        while (event := session.next_event()) is not None:
            if (
                isinstance(event, SessionEnded)
                and not event.by_peer
                and event.code is CloseCode.PROTOCOL_ERROR
                and not (id(session) in self.tainted and event.reason.startswith(STATEFUL))
            ):
                self.result.find("bad-output", f"{self.name}:{index}: {event.reason}")

    async def session(self, index: int, r: random.Random, *, resume: bool) -> None:
        """A real setup (and a real resume), then generated frames."""
        self.scenario(index, "resume" if resume else "session")
        loop = asyncio.get_running_loop()
        session = Session.client(SessionConfig(keepalive=3600), loop.time())
        peers: list[Peer] = []
        try:
            if not await self.handshake(r, session, peers, index):
                return
            self.live.append(session.session_id)
            peer = peers[-1]
            if resume:
                for _ in range(r.randint(0, 4)):
                    if session.state is not SessionState.ATTACHED:
                        break
                    session.send(rand_bytes(r, r.randint(1, 5000)))
                    await peer.send(r, b"".join(session.data_to_send()))
                await peer.settle(r.uniform(0, 0.05))
                if r.random() < 0.5:
                    peer.reset()
                else:
                    peer.abort()
                session.link_lost(loop.time())
                if session.state is not SessionState.DETACHED:
                    return  # the server ended it (its backend hung up)
                if not await self.handshake(r, session, peers, index):
                    return
                peer = peers[-1]
            await self.frames(r, session, peer, index)
            self.ending(await peer.end(r))
        finally:
            self.tainted.discard(id(session))
            for p in peers:
                p.abort()

    async def frames(self, r: random.Random, session: Session, peer: Peer, index: int) -> None:
        """Generated frames after authentication. Valid ones go through the core session
        (so its offsets, and its check of the server's answers, stay right); hostile
        ones are written around it. Each connection has its own share of hostile ones,
        so some sessions live long before they meet one."""
        hostile = r.choice((0.02, 0.1, 0.3, 0.7))
        for _ in range(r.randint(1, 200)):
            if peer.dead:
                return
            if r.random() < hostile:
                self.tainted.add(id(session))
                data = hostile_frame(r, session)
            else:
                data = benign_frame(r, session)
            if not data:
                continue
            self.count()
            if not await peer.send(r, data):
                return
            if r.random() < 0.2:
                await peer.wait_read(0.02)
            if session.state is SessionState.ATTACHED:
                out = session.data_to_send()  # ACKs, PONGs of the core
                if out and peer.transport is not None and not peer.dead:
                    peer.transport.write(b"".join(out))

    async def forge(self, index: int, r: random.Random) -> None:
        """A RESUME naming one of our live sessions, with a proof that cannot verify."""
        self.scenario(index, "forge")
        out = ServerOutput()
        peer = await self.open(r, False, out.feed)
        try:
            sid = self.live[-1] if self.live else r.randbytes(16)
            resume = Resume(sid, r.randbytes(32), u64(r), 4 << 20, 3000, r.randbytes(32))
            self.count()
            await peer.send(r, client_hello() + resume.serialize())
            await peer.settle(1.0)
            if out.error:
                self.result.find("bad-answer", f"{self.name}:{index}: {out.error}")
            self.ending("wait")
        finally:
            peer.abort()


class Backend:
    """The server's backend, in the fuzzer: echoes, swallows, or hangs up, by connection."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(f"{seed}:backend")
        self.server: asyncio.Server | None = None
        self.port = 0
        self.transports: set[asyncio.Transport] = set()
        self.echo_only = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._protocol, "127.0.0.1", 0, backlog=4096)
        self.port = self.server.sockets[0].getsockname()[1]

    def _protocol(self) -> asyncio.Protocol:
        backend = self
        mode = "echo" if self.echo_only else self.rng.choice(("echo", "echo", "sink", "hangup"))

        class _Conn(asyncio.Protocol):
            transport: asyncio.Transport | None = None

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport  # type: ignore[assignment]
                backend.transports.add(self.transport)
                if mode == "hangup":
                    asyncio.get_running_loop().call_later(
                        backend.rng.uniform(0, 0.5), self.transport.close
                    )

            def data_received(self, data: bytes) -> None:
                if mode == "echo" and self.transport is not None:
                    self.transport.write(data)

            def eof_received(self) -> bool:
                return False

            def connection_lost(self, exc: Exception | None) -> None:
                backend.transports.discard(self.transport)  # type: ignore[arg-type]

        return _Conn()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for transport in list(self.transports):
            transport.abort()
        await asyncio.sleep(0)


async def probe_server(address: tuple[str, int], context: ssl.SSLContext | None) -> float:
    """Seconds a client hello takes to get a whole, valid server hello (at most
    PROBE_LIMIT: raises TimeoutError past it)."""
    t0 = time.monotonic()
    async with asyncio.timeout(PROBE_LIMIT):
        reader, writer = await asyncio.open_connection(*address, ssl=context)
        try:
            writer.write(client_hello())
            hello = await reader.readexactly(SERVER_HELLO_SIZE)
        finally:
            writer.transport.abort()
    if hello[: len(MAGIC)] != MAGIC or hello[len(MAGIC)] != PROTOCOL_VERSION:
        raise ProtocolError(f"probe: not a server hello: {hello!r}")
    if hello[len(MAGIC) + 1 :] == bytes(NONCE_SIZE):  # a refusal's (busy), not an answer
        raise ProtocolError("probe: the server refused the link (a refusal's hello)")
    return time.monotonic() - t0


async def server_session_works(address: tuple[str, int], tls: bool, tmp: Path) -> str:
    """A fresh session through tether's own library: 256 KiB each way, echoed by the
    backend, then a graceful end. Returns "" or what went wrong."""
    from tether import ClientConfig, connect
    from tether.config import Address

    config = ClientConfig(
        plaintext=not tls, known_servers=tmp / "config" / "fuzzer-known-servers", connect_timeout=5
    )
    payload = random.Random(7).randbytes(256 * 1024)
    try:
        async with asyncio.timeout(20):
            async with connect(Address(*address), config=config) as stream:
                stream.write(payload)
                await stream.drain()
                got = await stream.readexactly(len(payload))
                stream.write_eof()
                if got != payload:
                    return "the echo differs from what was sent"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


# -- client phases: the fuzzer as a malicious server ---------------------------------------


class ClientCampaign(Phase):
    """A ``tether client`` pointed at a fake server that answers its links with generated
    bytes; the fuzzer also plays the applications whose connections make its sessions."""

    def __init__(self, *args: Any, tls: bool, concurrency: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tls = tls
        self.concurrency = concurrency
        self.client_address: tuple[str, int] = ("127.0.0.1", 0)
        config = SessionConfig(timeout=TARGET_TIMEOUT, keepalive=KEEPALIVE)
        self.router = Router(config, max_sessions=FAKE_SESSIONS * 4)
        self.order: deque[bytes] = deque()
        self.honest = False  # after the campaign: real setups, echo; resumes refused
        self.links = itertools.count()
        self.link_tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0
        self.apps = itertools.count()

    async def start_fake_server(self, tmp: Path) -> None:
        context = None
        if self.tls:
            from tether import tls

            identity, _ = tls.load_or_create_identity(tmp / "fake-server")
            context = tls.server_context(identity)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            self._link_protocol, "127.0.0.1", 0, ssl=context, backlog=4096
        )
        self.port = self.server.sockets[0].getsockname()[1]

    def _link_protocol(self) -> asyncio.Protocol:
        """A link from the client: its scenario starts once it is connected (with TLS,
        once the TLS handshake is done: one the client gives up is no link)."""
        campaign = self

        class _Link(Peer):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                task = asyncio.get_running_loop().create_task(campaign.link(self))
                campaign.link_tasks.add(task)
                task.add_done_callback(campaign.link_tasks.discard)

        return _Link()

    def remember(self, session: Session) -> None:
        self.order.append(session.session_id)
        while len(self.order) > FAKE_SESSIONS:
            old = self.router.sessions.get(self.order.popleft())
            if old is not None:
                if not old.closed:
                    old.close(CloseCode.GOING_AWAY, "forgotten")
                self.router.forget(old)

    async def link(self, peer: Peer) -> None:
        """One link from the client: a scenario (or, after the campaign, an honest server)."""
        index = next(self.links)
        self.result.links += 1
        try:
            async with asyncio.timeout(CONN_LIMIT):
                if self.honest:
                    await self.honest_link(peer, index)
                else:
                    await self.fuzz_link(peer, index, self.rng(index))
        except TimeoutError:
            self.result.find("hang", f"{self.name}:link {index} took more than {CONN_LIMIT}s")
        except Exception as exc:
            if not known_error(exc):
                self.result.find("fuzzer-error", f"{self.name}:{index}: {traceback.format_exc()}")
        finally:
            peer.abort()

    async def read_request(self, peer: Peer, hs: ServerHandshake, limit: float) -> bool:
        """Feed the client's bytes to our handshake until it parsed a request."""
        loop = asyncio.get_running_loop()

        def sink(data: bytes) -> None:
            hs.receive_data(data)

        peer.set_sink(sink)
        deadline = loop.time() + limit
        while hs.request is None and not hs.done and loop.time() < deadline and not peer.dead:
            await peer.wait_read(deadline - loop.time())
        return hs.request is not None and not hs.done

    async def fuzz_link(self, peer: Peer, index: int, r: random.Random) -> None:
        x = r.random()
        loop = asyncio.get_running_loop()
        if x < 0.03:
            self.scenario(index, "silent")
            self.ending(await peer.end(r))
            return
        if x < 0.15:
            self.scenario(index, "garbage")
            for _ in range(r.randint(1, 2)):
                blob = rand_bytes(r)
                if r.random() < 0.3:
                    blob = MAGIC[: r.randint(1, len(MAGIC))] + blob
                if blob:
                    self.count()
                    if not await peer.send(r, blob):
                        break
            self.ending(await peer.end(r))
            return
        if x < 0.25:
            self.scenario(index, "hello")
            hello = server_hello(PROTOCOL_VERSION, r.randbytes(NONCE_SIZE))
            hello = mutate(r, hello) if r.random() < 0.6 else server_hello(u32(r) & 0xFF, b"")
            extra = any_control(r) if r.random() < 0.5 else b""
            self.count(1 + bool(extra))
            await peer.send(r, hello + extra)
            self.ending(await peer.end(r))
            return
        hs = self.router.open_link(loop.time())
        if not await self.read_request(peer, hs, 3.0):
            failed = hs.next_event()
            if (
                isinstance(failed, HandshakeFailed)
                and failed.code is not CloseCode.HANDSHAKE_TIMEOUT
            ):
                self.result.find("bad-request", f"{self.name}:link {index}: {failed}")
            return
        event = hs.next_event()
        if x < 0.5:
            self.scenario(index, "answer")
            await self.fuzz_answer(peer, r, hs, event)
            self.ending(await peer.end(r))
            return
        self.scenario(index, "session")
        session = await self.accept(peer, hs, event, r)
        if session is None:
            self.ending(await peer.end(r))
            return
        await self.frames(peer, r, session)
        self.ending(await peer.end(r))

    async def fuzz_answer(
        self, peer: Peer, r: random.Random, hs: ServerHandshake, event: object
    ) -> None:
        """A valid server hello, then a generated answer: a real ACCEPT or RESUMED
        mutated, or a random ACCEPT / RESUMED / REJECT."""
        loop = asyncio.get_running_loop()
        hello = b"".join(hs.data_to_send())
        x = r.random()
        if x < 0.4 and isinstance(event, SetupRequested):
            session = hs.accept_setup(loop.time())  # not routed: the answer gets mangled
            answer = mutate(r, b"".join(session.data_to_send()))
        elif x < 0.4 and isinstance(event, ResumeRequested):
            request = hs.request
            sid = request.session_id if isinstance(request, Resume) else b""
            live = self.router.sessions.get(sid)
            answer = Resumed(u64(r), r.randbytes(32)).serialize()
            if live is not None and not live.closed and r.random() < 0.5:
                answer = Resumed(live.received, r.randbytes(32)).serialize()  # a wrong proof
        elif x < 0.65:
            codes = list(CloseCode)
            answer = Reject(r.choice(codes), reason(r)).serialize()
            if r.random() < 0.3:
                answer = raw_code_frame(r, FrameType.REJECT)
        elif x < 0.8:
            sid = r.randbytes(16)
            answer = Accept(sid, key(r), u32(r), u32(r), u32(r), r.randbytes(32)).serialize()
        else:
            answer = mutate(r, any_control(r))
        self.count()
        await peer.send(r, hello + answer)

    async def accept(
        self, peer: Peer, hs: ServerHandshake, event: object, r: random.Random
    ) -> Session | None:
        """A real answer: the setup accepted, or the resume routed (refused when we forgot
        the session: that ends the client's session, as a real server's would)."""
        loop = asyncio.get_running_loop()
        session: Session | None = None
        if isinstance(event, SetupRequested):
            refusal = self.router.admit_setup(hs)
            if refusal is not None:
                hs.reject(refusal.code, refusal.reason)
            else:
                session = self.router.accept_setup(hs, loop.time())
                self.remember(session)
        elif isinstance(event, ResumeRequested):
            session = self.router.resume(hs, loop.time())
        out = [*hs.data_to_send()]
        if session is not None:
            out += session.data_to_send()
        if peer.transport is not None and not peer.dead:
            peer.transport.write(b"".join(out))
        if session is None:
            return None
        live = session

        def sink(data: bytes) -> None:
            if live.state is SessionState.ATTACHED:
                live.receive_data(data, loop.time())
                while live.next_event() is not None:
                    pass

        peer.set_sink(sink)
        return session

    async def frames(self, peer: Peer, r: random.Random, session: Session) -> None:
        """Generated frames from the server after a real answer (see ServerCampaign)."""
        hostile = r.choice((0.02, 0.1, 0.3, 0.7))
        for _ in range(r.randint(1, 200)):
            if peer.dead:
                return
            make = hostile_frame if r.random() < hostile else benign_frame
            data = make(r, session)
            if not data:
                continue
            self.count()
            if not await peer.send(r, data):
                return
            if r.random() < 0.2:
                await peer.wait_read(0.02)

    async def honest_link(self, peer: Peer, index: int) -> None:
        """After the campaign: a real server that echoes; resumes are refused
        (UNKNOWN_SESSION), which ends the fuzzed sessions the client still holds."""
        loop = asyncio.get_running_loop()
        hs = self.router.open_link(loop.time())
        if not await self.read_request(peer, hs, 5.0):
            return
        event = hs.next_event()
        if isinstance(event, ResumeRequested):
            hs.reject(CloseCode.UNKNOWN_SESSION, "no such session")
            if peer.transport is not None:
                peer.transport.write(b"".join(hs.data_to_send()))
                peer.transport.close()
            return
        if not isinstance(event, SetupRequested):
            return
        session = hs.accept_setup(loop.time())
        done = asyncio.Event()

        def sink(data: bytes) -> None:
            session.receive_data(data, loop.time())
            while (ev := session.next_event()) is not None:
                if isinstance(ev, DataReceived):
                    session.send(bytes(ev.data))
                elif isinstance(ev, EofReceived):
                    session.send_eof()
                elif isinstance(ev, SessionEnded):
                    done.set()
            out = session.data_to_send()
            if out and peer.transport is not None and not peer.transport.is_closing():
                peer.transport.writelines(out)

        peer.set_sink(sink)
        assert peer.transport is not None
        peer.transport.writelines([*hs.data_to_send(), *session.data_to_send()])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), CONN_LIMIT - 1)

    async def app(self) -> None:
        """An application connection through the client: a few writes, reads everything,
        ends after a random lifetime (mostly a reset, so its session ends at once)."""
        index = next(self.apps)
        r = random.Random(f"{self.seed}:{self.name}:app:{index}")
        loop = asyncio.get_running_loop()
        peer = Peer()
        try:
            async with asyncio.timeout(CONN_LIMIT):
                await loop.create_connection(lambda: peer, *self.client_address)
                end = loop.time() + r.uniform(0.05, 2.5)
                while loop.time() < end and not peer.dead:
                    if r.random() < 0.5:
                        await peer.send(r, rand_bytes(r, r.choice((1, 100, 10000))))
                    await peer.settle(r.uniform(0.01, 0.3))
                if r.random() < 0.75:
                    peer.reset()
                elif peer.transport is not None:
                    peer.transport.close()
        except TimeoutError:
            self.result.find("hang", f"{self.name}:app {index} took more than {CONN_LIMIT}s")
        except Exception as exc:
            if not known_error(exc):
                self.result.find(
                    "fuzzer-error", f"{self.name}:app {index}: {traceback.format_exc()}"
                )
        finally:
            peer.abort()
        self.result.connections += 1

    async def worker(self) -> None:
        while not self.done:
            await self.app()


async def client_session_works(address: tuple[str, int]) -> str:
    """Through the client, with the fake server honest: 256 KiB echoed, then EOF both
    ways. Returns "" or what went wrong."""
    payload = random.Random(8).randbytes(256 * 1024)
    try:
        async with asyncio.timeout(20):
            reader, writer = await asyncio.open_connection(*address)
            try:
                writer.write(payload)
                got = await reader.readexactly(len(payload))
                writer.write_eof()
                rest = await reader.read()
                if got != payload or rest:
                    return "the echo differs from what was sent"
            finally:
                writer.close()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


# -- running a phase ------------------------------------------------------------------------


class Watch:
    """Samples a target during a phase: alive, logs, fds and RSS peaks."""

    def __init__(self, target: Target, result: PhaseResult) -> None:
        self.target = target
        self.result = result

    def check(self) -> bool:
        """False once the process has died."""
        target, result = self.target, self.result
        if target.popen.poll() is not None:
            result.find("died", f"tether {target.role} exited with {target.popen.returncode}")
            return False
        for hit in target.log.scan():
            result.find("log", hit)
        with contextlib.suppress(OSError, RuntimeError):
            result.fd_peak = max(result.fd_peak, fd_count(target.pid))
            result.rss_peak = max(result.rss_peak, rss_bytes(target.pid))
        return True


async def run_workers(
    phase: Phase,
    concurrency: int,
    worker: Callable[[], Awaitable[None]],
    watch: Watch,
    probe: Callable[[], Awaitable[float]] | None,
    progress: bool,
) -> None:
    result = phase.result
    t0 = time.monotonic()
    cpu0 = time.process_time()
    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    last_probe = 0.0
    last_print = t0
    try:
        while not all(t.done() for t in tasks):
            await asyncio.wait(tasks, timeout=0.5)
            if not watch.check():
                phase.stopping = True
            now = time.monotonic()
            half = result.inputs * 2 >= phase.budget or now * 2 >= phase.deadline + t0
            if half and now - t0 >= SLOPE_WARMUP and not result.rss_mid:
                with contextlib.suppress(OSError, RuntimeError):
                    result.rss_mid = rss_bytes(watch.target.pid)
            if probe is not None and now - last_probe >= PROBE_EVERY:
                last_probe = now
                try:
                    took = await probe()
                    result.probes += 1
                    result.probe_max = max(result.probe_max, took)
                except Exception as exc:
                    result.find("probe", f"no server hello within {PROBE_LIMIT}s: {exc!r}")
            if progress and now - last_print >= 10:
                last_print = now
                rate = result.inputs / (now - t0)
                pid = watch.target.pid
                with contextlib.suppress(OSError, RuntimeError):
                    print(
                        f"  {phase.name}: {result.inputs} inputs, {result.connections} conns, "
                        f"{rate:.0f}/s; target {fd_count(pid)} fds, "
                        f"RSS {rss_bytes(pid) / 2**20:.1f} MiB",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        phase.stopping = True
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    with contextlib.suppress(OSError, RuntimeError):
        result.rss_end = rss_bytes(watch.target.pid)
        if result.rss_mid and result.rss_end > result.rss_mid + RSS_SLOPE_BOUND:
            result.find(
                "rss-growth",
                f"RSS grew from {result.rss_mid / 2**20:.1f} MiB at mid-phase to "
                f"{result.rss_end / 2**20:.1f} MiB at the end of the fuzzing "
                f"(+{RSS_SLOPE_BOUND >> 20} MiB allowed): a leak",
            )
    result.seconds = time.monotonic() - t0
    result.fuzzer_cpu_seconds = time.process_time() - cpu0


async def settle(target: Target, result: PhaseResult, baseline: int) -> None:
    """Wait (bounded) for the target's fds to come back to the baseline, then for its RSS
    to come within its bound (RSS_SETTLE at most)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < SETTLE_LIMIT:
        if target.popen.poll() is not None:
            return
        if fd_count(target.pid) <= baseline + FD_SLACK:
            break
        await asyncio.sleep(0.25)
    result.settle_seconds = time.monotonic() - t0
    t1 = time.monotonic()
    while time.monotonic() - t1 < RSS_SETTLE and target.popen.poll() is None:
        if rss_bytes(target.pid) <= result.rss_baseline + RSS_BOUND:
            break
        await asyncio.sleep(0.25)


def finish(target: Target, result: PhaseResult) -> None:
    """The checks after the campaign and the settle time."""
    if target.popen.poll() is None:
        result.fd_after = fd_count(target.pid)
        result.rss_after = rss_bytes(target.pid)
        result.cpu_seconds = cpu_seconds(target.pid) - result.cpu_seconds
        if result.fd_after > result.fd_baseline + FD_SLACK:
            result.find(
                "fd-leak",
                f"{result.fd_after} fds after {result.settle_seconds:.1f}s, baseline "
                f"{result.fd_baseline} (+{FD_SLACK} allowed): {fd_list(target.pid)}",
            )
        if result.rss_after > result.rss_baseline + RSS_BOUND:
            result.find(
                "rss",
                f"RSS {result.rss_after >> 20} MiB after, baseline "
                f"{result.rss_baseline >> 20} MiB (+{RSS_BOUND >> 20} MiB allowed)",
            )
    else:
        result.find("died", f"tether {target.role} exited with {target.popen.returncode}")
    result.exit_status = stop_target(target)
    for hit in target.log.scan(final=True):
        result.find("log", hit)
    result.log_lines = target.log.lines
    result.known_errors = dict(target.log.known)
    if result.exit_status != 0:
        result.find("exit", f"tether {target.role} exited with {result.exit_status} on SIGTERM")


def fd_list(pid: int) -> str:
    kinds: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                what = os.readlink(f"/proc/{pid}/fd/{name}").split(":")[0]
                kinds[what] = kinds.get(what, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))


def baseline(target: Target, result: PhaseResult) -> None:
    result.fd_baseline = result.fd_peak = fd_count(target.pid)
    result.rss_baseline = result.rss_peak = rss_bytes(target.pid)
    result.cpu_seconds = cpu_seconds(target.pid)  # finish() takes the difference


async def server_phase(
    name: str, seed: int, budget: int, seconds: float, tmp: Path, opts: Options
) -> PhaseResult:
    tls = name == "server-tls"
    # TLS connections cost more memory each: half as many at once keeps the working set
    # (which glibc keeps after the peak) within RSS_BOUND.
    concurrency = max(1, opts.concurrency // 2) if tls else opts.concurrency
    phase = ServerCampaign(
        name, seed, budget, seconds, opts.verbose, tls=tls, concurrency=concurrency
    )
    phase.only = opts.only
    result = phase.result
    backend = Backend(seed)
    await backend.start()
    args = ["--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{backend.port}", "-q"]
    args += ["--timeout", f"{TARGET_TIMEOUT}s"]
    if not tls:
        args.append("--plaintext")
    target = await start_target("server", args, tmp, name)
    phase.address = target.address
    context = phase.context
    try:
        backend.echo_only = True
        broken = await server_session_works(target.address, tls, tmp)  # warm-up
        if broken:
            result.find("session", f"before the campaign: {broken}")
        await asyncio.sleep(0.5)
        baseline(target, result)
        backend.echo_only = False
        watch = Watch(target, result)

        async def probe() -> float:
            return await probe_server(target.address, context)

        phase.deadline = time.monotonic() + seconds
        await run_workers(phase, concurrency, phase.worker, watch, probe, opts.progress)
        watch.check()
        if target.popen.poll() is None:
            try:
                result.probe_max = max(result.probe_max, await probe())
            except Exception as exc:
                result.find("probe", f"after the campaign, no server hello: {exc!r}")
            backend.echo_only = True
            broken = await server_session_works(target.address, tls, tmp)
            if broken:
                result.find("session", f"after the campaign: {broken}")
            await settle(target, result, result.fd_baseline)
    finally:
        finish(target, result)
        await backend.close()
    return result


async def client_phase(
    name: str, seed: int, budget: int, seconds: float, tmp: Path, opts: Options
) -> PhaseResult:
    tls = name == "client-tls"
    apps = max(1, opts.apps // 2) if tls else opts.apps
    phase = ClientCampaign(name, seed, budget, seconds, opts.verbose, tls=tls, concurrency=apps)
    result = phase.result
    await phase.start_fake_server(tmp)
    args = ["--listen", "127.0.0.1:0", "--server", f"127.0.0.1:{phase.port}", "-q"]
    args += ["--timeout", f"{TARGET_TIMEOUT}s", "--require-reliability"]
    if not tls:
        args.append("--plaintext")
    target = await start_target("client", args, tmp, name)
    phase.client_address = target.address
    try:
        phase.honest = True
        broken = await client_session_works(target.address)  # warm-up (and TOFU)
        if broken:
            result.find("session", f"before the campaign: {broken}")
        await asyncio.sleep(0.5)
        baseline(target, result)
        phase.honest = False
        watch = Watch(target, result)
        phase.deadline = time.monotonic() + seconds
        await run_workers(phase, apps, phase.worker, watch, None, opts.progress)
        phase.honest = True
        watch.check()
        if target.popen.poll() is None:
            broken = await client_session_works(target.address)
            if broken:
                result.find("session", f"after the campaign: {broken}")
            await settle(target, result, result.fd_baseline)
    finally:
        finish(target, result)
        if phase.server is not None:
            phase.server.close()
        for task in list(phase.link_tasks):
            task.cancel()
        await asyncio.gather(*phase.link_tasks, return_exceptions=True)
    return result


# -- the campaign ---------------------------------------------------------------------------


@dataclass
class Options:
    inputs: int
    seconds: float
    target: str
    seed: int
    concurrency: int = 256
    apps: int = 192
    verbose: bool = False
    progress: bool = False
    phases: tuple[str, ...] = ()
    json_path: str | None = None
    keep: bool = False
    only: str = ""
    loop_errors: dict[str, int] = field(default_factory=dict)  # the fuzzer's own


@dataclass
class Campaign:
    options: Options
    results: list[PhaseResult]
    seconds: float

    @property
    def inputs(self) -> int:
        return sum(r.inputs for r in self.results)

    @property
    def findings(self) -> list[tuple[str, str, str]]:
        return [
            (r.phase, kind, text)
            for r in self.results
            for kind, texts in r.findings.items()
            for text in texts
        ]

    @property
    def ok(self) -> bool:
        return not self.findings

    def report(self) -> str:
        o = self.options
        lines = [
            f"tether driver fuzz: seed {o.seed}, phases {','.join(r.phase for r in self.results)}: "
            f"{self.inputs} inputs in "
            f"{self.seconds:.0f}s ({self.inputs / max(self.seconds, 1e-9):.0f}/s overall)",
            f"{'phase':<13} {'inputs':>9} {'conns':>8} {'in/s':>6} {'fd base/peak/after':>19} "
            f"{'RSS MiB base/mid/end/after':>26} {'probe max':>9} {'cpu s':>6} {'fuzzer':>6}",
        ]
        for r in self.results:
            fds = f"{r.fd_baseline}/{r.fd_peak}/{r.fd_after}"
            rss = "/".join(
                f"{x / 2**20:.0f}" for x in (r.rss_baseline, r.rss_mid, r.rss_end, r.rss_after)
            )
            probe = f"{r.probe_max:.3f}s" if r.probes else "-"
            conns = r.connections if r.phase.startswith("server") else r.links
            lines.append(
                f"{r.phase:<13} {r.inputs:>9} {conns:>8} {r.rate:>6.0f} {fds:>19} {rss:>26} "
                f"{probe:>9} {r.cpu_seconds:>6.1f} {r.fuzzer_cpu_seconds:>6.1f}"
            )
            if r.known_errors:
                lines.append(f"{'':<13} known (not failed): {r.known_errors}")
        if self.ok:
            lines.append(
                "OK: no traceback, no ERROR, no hang, no death; fds back to baseline, RSS bounded"
            )
        else:
            lines.append(f"FAILED: {len(self.findings)} findings")
            for phase, kind, text in self.findings:
                lines.append(f"- [{phase}] {kind}: {text}")
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {
            "seed": self.options.seed,
            "target": self.options.target,
            "command": " ".join(["python -m fuzz.driver", *sys.argv[1:]]),
            "python": sys.version.split()[0],
            "requested_inputs": self.options.inputs,
            "inputs": self.inputs,
            "seconds": round(self.seconds, 1),
            "ok": self.ok,
            "fuzzer_loop_errors": self.options.loop_errors,
            "phases": [r.as_json() for r in self.results],
        }


def plan(opts: Options) -> list[tuple[str, int, float]]:
    """(phase, inputs, seconds) for each phase the target asks for: --inputs for each
    target, --seconds for the whole campaign."""
    names = opts.phases or tuple(
        p for p in PHASES if opts.target == "both" or p.startswith(opts.target)
    )
    time_total = sum(TIME_SHARES[p] for p in names)
    return [
        (
            p,
            max(1, round(opts.inputs * INPUT_SHARES[p])),
            opts.seconds * TIME_SHARES[p] / time_total,
        )
        for p in names
    ]


def quiet_loop(counts: dict[str, int]) -> None:
    """The fuzzer's own transports meet every kind of abrupt end: count what asyncio or
    uvloop would report about them (docs/fuzzing.md), print it only with --verbose."""

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", "?"))
        counts[message] = counts.get(message, 0) + 1
        if TRACE:
            loop.default_exception_handler(context)

    asyncio.get_running_loop().set_exception_handler(handler)


async def run_campaign(opts: Options) -> Campaign:
    quiet_loop(opts.loop_errors)
    t0 = time.monotonic()
    results: list[PhaseResult] = []
    tmp = Path(tempfile.mkdtemp(prefix="tether-fuzz-"))
    try:
        if opts.keep:
            print(f"logs kept in {tmp}", file=sys.stderr)
        for name, budget, seconds in plan(opts):
            if opts.progress:
                print(f"phase {name}: {budget} inputs, at most {seconds:.0f}s", file=sys.stderr)
            run = server_phase if name.startswith("server") else client_phase
            results.append(await run(name, opts.seed, budget, seconds, tmp, opts))
    finally:
        if not opts.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return Campaign(opts, results, time.monotonic() - t0)


async def replay(opts: Options, which: str) -> Campaign:
    """Run one connection (PHASE:INDEX) again, verbosely, against fresh processes."""
    name, _, index_text = which.rpartition(":")
    if name not in PHASES:
        raise SystemExit(f"--replay: phase must be one of {', '.join(PHASES)}")
    index = int(index_text)
    global TRACE
    opts.verbose = TRACE = True
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tether-fuzz-") as tmpdir:
        tmp = Path(tmpdir)
        if name.startswith("server"):
            original = ServerCampaign.worker

            async def one(self: ServerCampaign) -> None:
                self.indexes = itertools.count(index)
                self.budget = 0  # stops after this connection
                r = self.rng(index)
                long_hold = r.random() < 0.001
                async with asyncio.timeout(LONG_HOLD_LIMIT + 2):
                    await self.connection(index, r, long_hold)
                self.stopping = True

            ServerCampaign.worker = one  # type: ignore[method-assign]
            try:
                opts.concurrency = 1
                result = await server_phase(name, opts.seed, 1, 60, tmp, opts)
            finally:
                ServerCampaign.worker = original  # type: ignore[method-assign]
        else:
            original_link = ClientCampaign.fuzz_link

            async def link(self: ClientCampaign, peer: Peer, i: int, r: random.Random) -> None:
                await original_link(self, peer, index, self.rng(index))

            ClientCampaign.fuzz_link = link  # type: ignore[method-assign]
            try:
                opts.apps = 1
                result = await client_phase(name, opts.seed, 1, 60, tmp, opts)
            finally:
                ClientCampaign.fuzz_link = original_link  # type: ignore[method-assign]
    return Campaign(opts, [result], time.monotonic() - t0)


def _run(coro: Awaitable[Campaign]) -> Campaign:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type,no-any-return]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fuzz.driver",
        description="Fuzz a running tether server and client with generated inputs.",
    )
    parser.add_argument(
        "--inputs", type=int, default=20_000, help="inputs for each target (default 20000)"
    )
    parser.add_argument(
        "--seconds", type=float, default=60, help="time limit of the fuzzing (default 60)"
    )
    parser.add_argument("--target", choices=("server", "client", "both"), default="both")
    parser.add_argument("--seed", type=int, default=None, help="default: random, printed")
    parser.add_argument(
        "--concurrency", type=int, default=256, help="parallel connections to a server (256)"
    )
    parser.add_argument(
        "--apps", type=int, default=192, help="parallel application connections to a client (192)"
    )
    parser.add_argument(
        "--phases", default="", help="comma-separated subset of " + ",".join(PHASES)
    )
    parser.add_argument("--json", dest="json_path", help="write the figures here as JSON")
    parser.add_argument("--replay", metavar="PHASE:INDEX", help="run one connection again")
    parser.add_argument(
        "--only",
        choices=("raw", "request", "session", "resume", "forge"),
        help="server phases: one kind of connection only (to narrow a finding down)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the logs (temp dir)")
    parser.add_argument("--progress", action="store_true", help="print progress to stderr")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every scenario")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    logging.getLogger("tether").setLevel(logging.ERROR)  # the fuzzer's own tether.connect
    # "SSL connection is closed": the fuzzer writes on after its TLS peer hung up, on purpose.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    phases = tuple(p for p in args.phases.split(",") if p)
    if any(p not in PHASES for p in phases):
        parser.error(f"--phases: choose from {', '.join(PHASES)}")
    opts = Options(
        args.inputs,
        args.seconds,
        args.target,
        seed,
        max(1, args.concurrency),
        apps=max(1, args.apps),
        verbose=args.verbose,
        progress=args.progress,
        phases=phases,
        json_path=args.json_path,
        keep=args.keep,
        only=args.only or "",
    )
    campaign = _run(replay(opts, args.replay) if args.replay else run_campaign(opts))
    print(campaign.report())
    if opts.json_path:
        Path(opts.json_path).write_text(json.dumps(campaign.as_json(), indent=2) + "\n")
    return 0 if campaign.ok else 1


if __name__ == "__main__":
    sys.exit(main())
