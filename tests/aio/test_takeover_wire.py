"""The takeover's exchange over the control socket (aio/takeover.py), with real Unix
sockets and real descriptors passed with SCM_RIGHTS, in batches of at most 250: every
session arrives with its own backend socket, and a message whose descriptors do not match
what it announces is refused with nothing left open."""

from __future__ import annotations

import array
import contextlib
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tether.aio import takeover
from tether.aio.server import _send_all

SESSIONS = 260  # more than one batch of descriptors


def _serve_once(path: Path, answer: Callable[[socket.socket], None]) -> threading.Thread:
    """A fake old server: accept one successor at ``path`` and ``answer`` it."""
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(path))
    listening.listen(1)
    listening.settimeout(30)

    def run() -> None:
        with listening:
            conn, _ = listening.accept()
            with conn:
                answer(conn)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_every_session_arrives_with_its_own_backend_socket(tmp_path: Path) -> None:
    pairs = [socket.socketpair() for _ in range(SESSIONS // 2)]
    ours = [a for a, _ in pairs]  # each stands for a backend connection of the old server
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    records = [
        takeover.Handed(f"192.0.2.{n % 250}", f"peer {n}", os.urandom(40 + n), fd=-1)
        for n in range(SESSIONS)
    ]
    for n, sock in enumerate(ours):
        records[2 * n].fd = sock.fileno()  # every other session has a backend
    assert len(takeover.build_batches(records)) == 1  # 130 descriptors: one batch
    records += [takeover.Handed("198.51.100.1", "p", b"s" * 10, fd=sock.fileno()) for sock in ours]
    assert [len(fds) for _, fds in takeover.build_batches(records)] == [250, 10]
    outcome: list[bool] = []

    def old_server(conn: socket.socket) -> None:
        request = takeover.read_request(conn)
        assert request is not None and request.fingerprint == "sha256:ab"
        outcome.append(_send_all(conn, [listening.fileno()], records))

    path = tmp_path / "takeover.sock"
    thread = _serve_once(path, old_server)
    inherited = takeover.receive(path, "sha256:ab")
    thread.join(30)
    try:
        assert outcome == [True]
        assert inherited.pid == os.getpid()
        assert [s.getsockname() for s in inherited.listening] == [listening.getsockname()]
        assert len(inherited.sessions) == len(records)
        for sent, got in zip(records, inherited.sessions, strict=True):
            assert (got.source, got.peer, got.state) == (sent.source, sent.peer, sent.state)
            assert (got.backend is None) == (sent.fd < 0)
        # Each received socket is the very connection sent: its peer hears it.
        by_fd = {a.fileno(): b for a, b in pairs}
        for sent, got in zip(records, inherited.sessions, strict=True):
            if got.backend is not None:
                got.backend.sendall(b"x")
                assert by_fd[sent.fd].recv(1) == b"x"
    finally:
        inherited.close()
        listening.close()
        for a, b in pairs:
            a.close()
            b.close()


@pytest.mark.parametrize("announced", [0, 2])
def test_descriptors_that_do_not_match_the_message_are_refused(
    tmp_path: Path, announced: int
) -> None:
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))

    def old_server(conn: socket.socket) -> None:
        takeover.read_request(conn)
        with contextlib.suppress(OSError):  # the successor may hang up first
            # A HELLO that announces ``announced`` listening sockets and carries one.
            hello = takeover.hello(os.getpid(), announced, 0)
            header = takeover._HEADER.pack(takeover.HELLO, len(hello), announced)
            fds = array.array("i", [listening.fileno()]).tobytes()
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
            conn.sendmsg([header], ancillary)
            conn.sendall(hello)
            conn.recv(1)  # until the successor gives up

    before = len(os.listdir("/proc/self/fd"))
    path = tmp_path / "takeover.sock"
    thread = _serve_once(path, old_server)
    with pytest.raises(takeover.TakeoverError):
        takeover.receive(path, "")
    thread.join(30)
    listening.close()
    assert len(os.listdir("/proc/self/fd")) <= before  # nothing received is left open


def test_a_refusal_is_reported_in_the_old_servers_words(tmp_path: Path) -> None:
    def old_server(conn: socket.socket) -> None:
        takeover.read_request(conn)
        takeover.send_refusal(conn, "this server is draining")

    path = tmp_path / "takeover.sock"
    thread = _serve_once(path, old_server)
    with pytest.raises(takeover.TakeoverError, match="refused: this server is draining"):
        takeover.receive(path, "")
    thread.join(30)


def test_no_server_there(tmp_path: Path) -> None:
    with pytest.raises(takeover.TakeoverError, match="no server to take over there"):
        takeover.receive(tmp_path / "takeover.sock", "")
