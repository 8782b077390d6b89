"""Takeover (issue 11, "upgrade without losing a session"; docs/deployment.md, "Takeover"):
the messages a running ``tether server`` and its successor exchange over the control
socket, a Unix socket in the server's state directory.

The successor (``tether server --takeover``) connects and asks; the running server checks
that the asker runs as its own user (``SO_PEERCRED``) with the same TLS identity, closes
every link (a TLS link's state lives in its OpenSSL object and cannot move: the clients
resume, on the same listening socket), waits for every backend to have taken the bytes
already acknowledged to the client, and sends its listening sockets and each session's
backend socket (``SCM_RIGHTS``, at most :data:`MAX_FDS` per message) with the session's
state (``Session.export_state``). The successor answers :data:`ACK` once it holds all of
it; the old server answers :data:`BYE` and is committed: it closes its copies (which sends
nothing to anyone: the successor holds the same sockets) and exits. Until the BYE the old
server may still carry on, and the successor serves nothing before it, so a session is
never owned by both (docs/design.md, "Takeover").

Messages from the old server: a header ``kind u8 | payload length u32 | descriptors
u32`` sent with its descriptors, then the payload. The successor's ACK and the old
server's BYE are one byte each. The I/O here is blocking with a deadline: the callers
run it in a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..protocol.frames import MAX_WINDOW
from ..protocol.session import STATE_SLACK
from .listener import ListenError
from .util import describe

__all__ = [
    "ACK",
    "BYE",
    "CONTROL_SOCKET",
    "END",
    "HELLO",
    "SESSIONS",
    "Handed",
    "Inherited",
    "TakeoverError",
    "TakeoverRequest",
    "bind_control",
    "build_batches",
    "control_path",
    "hello",
    "peer_uid",
    "read_request",
    "receive",
    "recv_byte",
    "send_byte",
    "send_message",
    "send_refusal",
]

CONTROL_SOCKET = "takeover.sock"  # in the server's state directory
REQUEST_MAGIC = b"TTAKEOV1"
_REQUEST = struct.Struct("!8sIB")  # magic | the asker's pid | fingerprint length, then it
_HEADER = struct.Struct("!BII")  # kind | payload length | descriptors sent with it
_HELLO = struct.Struct("!III")  # the old server's pid | listening sockets | sessions
_RECORD = struct.Struct("!BBBI")  # source length | peer length | has a backend | state length
HELLO, SESSIONS, END, REFUSED = 1, 2, 3, 4
ACK, BYE = b"K", b"B"
MAX_FDS = 250  # descriptors per message (Linux takes at most 253, SCM_MAX_FD)
BATCH_BYTES = 16 * 1024 * 1024  # a message holds sessions up to this many bytes of state
# One message: a batch, or one session alone whose state is larger (its window at most).
MAX_MESSAGE = BATCH_BYTES + MAX_WINDOW + STATE_SLACK
MAX_FINGERPRINT = 128
REQUEST_TIMEOUT = 5.0  # seconds for the asker to say what it wants
TAKEOVER_TIMEOUT = 60.0  # seconds for the whole hand-over, from either side


class TakeoverError(ListenError):
    """A takeover could not be done: ``tether: error: --takeover PATH: why`` (exit 1, the
    listening sockets could not be had)."""

    option = "--takeover"


@dataclass(frozen=True, slots=True)
class TakeoverRequest:
    pid: int
    fingerprint: str  # the asker's TLS certificate, "" in clear text


@dataclass(slots=True)
class Handed:
    """One session as it crosses: its router source, its last peer, its state and its
    backend's socket (None when the backend connection had already been closed)."""

    source: str
    peer: str
    state: bytes
    backend: socket.socket | None = None  # as received
    fd: int = -1  # as sent: the backend socket's descriptor in the old server, or -1


@dataclass(slots=True)
class Inherited:
    """What a successor received: the old server's pid, listening sockets and sessions."""

    pid: int
    listening: list[socket.socket] = field(default_factory=list)
    sessions: list[Handed] = field(default_factory=list)

    def close(self) -> None:
        """Close every descriptor received (a takeover that failed): the old server holds
        the same sockets, so nothing is sent to anyone."""
        for sock in self.listening:
            sock.close()
        for handed in self.sessions:
            if handed.backend is not None:
                handed.backend.close()


def control_path(state_dir: Path) -> Path:
    return state_dir / CONTROL_SOCKET


def bind_control(path: Path, *, replace: bool = False) -> socket.socket | None:
    """A non-blocking Unix socket listening at ``path`` (mode 0600), or None when another
    live server holds the path (its control socket answers). A stale socket file is
    replaced; with ``replace`` any file is (a successor, once the old server let go)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if replace:
        path.unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # nobody answers: a server that did not clean up
        else:
            return None
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(4)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def peer_uid(conn: socket.socket) -> tuple[int, int]:
    """The (pid, uid) of the process at the other end of a Unix socket (SO_PEERCRED)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    return pid, uid


def read_request(conn: socket.socket) -> TakeoverRequest | None:
    """The asker's request (blocking, within :data:`REQUEST_TIMEOUT`), or None when it is
    not one."""
    deadline = time.monotonic() + REQUEST_TIMEOUT
    try:
        head = _read_exactly(conn, _REQUEST.size, deadline)
        magic, pid, size = _REQUEST.unpack(head)
        if magic != REQUEST_MAGIC or size > MAX_FINGERPRINT:
            return None
        fingerprint = _read_exactly(conn, size, deadline).decode("ascii")
    except (OSError, UnicodeDecodeError, _Short):
        return None
    return TakeoverRequest(pid, fingerprint)


def send_message(
    conn: socket.socket, kind: int, payload: bytes, fds: list[int], deadline: float
) -> None:
    _timeout(conn, deadline)
    header = _HEADER.pack(kind, len(payload), len(fds))
    if fds:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = conn.sendmsg([header], ancillary)
        if sent != len(header):  # a Unix socket takes 9 bytes at once, or raises
            raise OSError("short write of a takeover header")
    else:
        conn.sendall(header)
    if payload:
        _timeout(conn, deadline)
        conn.sendall(payload)


def send_refusal(conn: socket.socket, why: str) -> None:
    with contextlib.suppress(OSError):
        send_message(conn, REFUSED, why.encode(), [], time.monotonic() + REQUEST_TIMEOUT)


def send_byte(conn: socket.socket, byte: bytes, deadline: float) -> None:
    _timeout(conn, deadline)
    conn.sendall(byte)


def recv_byte(conn: socket.socket, deadline: float) -> bytes:
    """One byte, or b"" when the other end closed."""
    _timeout(conn, deadline)
    return conn.recv(1)


def hello(pid: int, listening: int, sessions: int) -> bytes:
    return _HELLO.pack(pid, listening, sessions)


def build_batches(sessions: list[Handed]) -> list[tuple[bytes, list[int]]]:
    """SESSIONS payloads with their descriptors: at most :data:`MAX_FDS` descriptors and
    about :data:`BATCH_BYTES` of state each."""
    batches: list[tuple[bytes, list[int]]] = []
    parts: list[bytes] = []
    fds: list[int] = []
    size = 0
    for handed in sessions:
        source, peer = handed.source.encode()[:255], handed.peer.encode()[:255]
        record = _RECORD.pack(len(source), len(peer), handed.fd >= 0, len(handed.state))
        grows = len(record) + len(source) + len(peer) + len(handed.state)
        if parts and (len(fds) >= MAX_FDS or size + grows > BATCH_BYTES):
            batches.append((b"".join(parts), fds))
            parts, fds, size = [], [], 0
        parts += [record, source, peer, handed.state]
        size += grows
        if handed.fd >= 0:
            fds.append(handed.fd)
    if parts:
        batches.append((b"".join(parts), fds))
    return batches


def receive(path: Path, fingerprint: str) -> Inherited:
    """Ask the server whose control socket is at ``path`` for everything it serves, and
    take it (blocking, within :data:`TAKEOVER_TIMEOUT`). Returns once the old server has
    said BYE: from then on the caller owns every socket. Raises :class:`TakeoverError`,
    with nothing received left open."""
    deadline = time.monotonic() + TAKEOVER_TIMEOUT
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    inherited = Inherited(0)
    try:
        try:
            _timeout(conn, deadline)
            conn.connect(str(path))
        except OSError as exc:
            raise _error(path, f"no server to take over there ({describe(exc)})") from None
        old_pid, uid = peer_uid(conn)
        if uid != os.getuid():
            raise _error(path, f"the server there (pid {old_pid}) runs as another user")
        code = fingerprint.encode("ascii")
        conn.sendall(_REQUEST.pack(REQUEST_MAGIC, os.getpid(), len(code)) + code)
        kind, payload, fds = _recv_message(conn, deadline)
        inherited.listening += [socket.socket(fileno=fd) for fd in fds]
        if kind == REFUSED:
            raise _error(path, f"refused: {payload.decode(errors='replace')}")
        if kind != HELLO or len(payload) != _HELLO.size:
            raise _error(path, "not a takeover answer")
        inherited.pid, listening, count = _HELLO.unpack(payload)
        if len(fds) != listening or not listening:
            raise _error(path, f"{len(fds)} listening sockets received, {listening} announced")
        while True:
            kind, payload, fds = _recv_message(conn, deadline)
            if kind == END:
                break
            if kind == REFUSED:  # the old server gave up half way: it carries on
                raise _error(path, f"refused: {payload.decode(errors='replace')}")
            if kind != SESSIONS:
                _close_fds(fds)
                raise _error(path, f"unexpected message {kind}")
            _parse_sessions(inherited, payload, fds, path)
        if len(inherited.sessions) != count:
            raise _error(path, f"{len(inherited.sessions)} sessions received, {count} announced")
        send_byte(conn, ACK, deadline)
        if recv_byte(conn, deadline) != BYE:
            raise _error(path, f"the server there (pid {inherited.pid}) did not let go")
    except TakeoverError:
        inherited.close()
        raise
    except (OSError, _Short) as exc:
        inherited.close()
        why = "the server there stopped answering" if isinstance(exc, _Short) else describe(exc)
        raise _error(path, why) from None
    finally:
        conn.close()
    return inherited


def _parse_sessions(inherited: Inherited, payload: bytes, fds: list[int], path: Path) -> None:
    sockets = [socket.socket(fileno=fd) for fd in fds]
    at, used = 0, 0
    try:
        while at < len(payload):
            if at + _RECORD.size > len(payload):
                raise _error(path, "a truncated session record")
            source_size, peer_size, has_backend, size = _RECORD.unpack_from(payload, at)
            at += _RECORD.size
            end = at + source_size + peer_size + size
            if end > len(payload) or (has_backend and used >= len(sockets)):
                raise _error(path, "a truncated session record")
            source = payload[at : at + source_size].decode(errors="replace")
            peer = payload[at + source_size : at + source_size + peer_size].decode(errors="replace")
            state = payload[at + source_size + peer_size : end]
            backend = None
            if has_backend:
                backend, used = sockets[used], used + 1
            inherited.sessions.append(Handed(source, peer, state, backend))
            at = end
        if used != len(sockets):
            raise _error(path, f"{len(sockets)} backend sockets for {used} sessions")
    except TakeoverError:
        for sock in sockets[used:]:
            sock.close()
        raise


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _recv_message(conn: socket.socket, deadline: float) -> tuple[int, bytes, list[int]]:
    """One message and the descriptors that came with its header (close-on-exec)."""
    fds: list[int] = []
    header = b""
    space = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
    try:
        while len(header) < _HEADER.size:
            _timeout(conn, deadline)
            data, ancillary, flags, _ = conn.recvmsg(
                _HEADER.size - len(header), space, socket.MSG_CMSG_CLOEXEC
            )
            for level, kind, raw in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(raw[: len(raw) - len(raw) % got.itemsize])
                    fds += got
            if flags & socket.MSG_CTRUNC:
                raise OSError("descriptors lost in transit (truncated)")
            if not data:
                raise _Short
            header += data
        kind, size, count = _HEADER.unpack(header)
        if size > MAX_MESSAGE or count != len(fds):
            raise OSError(f"a message of {size} bytes with {len(fds)} of {count} descriptors")
        payload = _read_exactly(conn, size, deadline)
    except BaseException:
        _close_fds(fds)
        raise
    return kind, payload, fds


class _Short(Exception):
    """The other end closed in the middle of a message."""


def _read_exactly(conn: socket.socket, size: int, deadline: float) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    at = 0
    while at < size:
        _timeout(conn, deadline)
        n = conn.recv_into(view[at:])
        if not n:
            raise _Short
        at += n
    return bytes(buffer)


def _timeout(conn: socket.socket, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    conn.settimeout(left)


def _error(path: Path, why: str) -> TakeoverError:
    return TakeoverError(0, why, str(path))
