"""Admission control before and after authentication, through a real ``tether server``
on loopback (issue 9): a flood of silent connections from one source does not keep a
legitimate client out, sessions are bounded per source, and refusals are logged once
per source and summarised, not once per connection.

Sources are loopback addresses (127.0.0.2, ...): one address is one source. The server
runs in clear text so that the raw peers (rawpeer.py) need no TLS; admission happens
before TLS, and does not depend on it. Every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any

import pytest

from tether.protocol.codes import CloseCode

from .faultnet import start_tether, stop
from .rawpeer import RawClient


def _silent_connections(address: tuple[str, int], source: str, count: int) -> list[socket.socket]:
    """``count`` connections from ``source`` that never send a byte."""
    held = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind((source, 0))
        sock.settimeout(5)
        sock.connect(address)
        held.append(sock)
    return held


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(64) is not None  # b"" (closed) or a REJECT: the server gave up on it
    except BlockingIOError:
        return False  # still open and silent: the server holds it
    except OSError:
        return True


def test_a_flood_of_silent_connections_does_not_keep_a_client_out(tmp_path: Any) -> None:
    async def main() -> None:
        backend = socket.create_server(("127.0.0.1", 0))
        server = await start_tether(
            "server", "--listen", "127.0.0.1:0", "--backend",
            f"127.0.0.1:{backend.getsockname()[1]}", "--plaintext",
            "--max-handshakes", "64", "--max-handshakes-per-source", "8",
            tmp=str(tmp_path),
        )  # fmt: skip
        flood: list[socket.socket] = []
        try:
            flood = await asyncio.to_thread(_silent_connections, server.address, "127.0.0.2", 120)
            await asyncio.sleep(0.5)  # the server answers (closes) what it does not admit
            refused = [_closed_by_peer(sock) for sock in flood]
            assert sum(refused) >= 120 - 8, sum(refused)  # one source holds at most 8
            client = await asyncio.to_thread(RawClient, server.address, source="127.0.0.1")
            client.close()  # got its session while the flood's 8 places stay taken
            log = server.log()
            lines = [line for line in log.splitlines() if "127.0.0.2" in line]
            assert lines and len(lines) <= 3, lines  # one line, then summaries, not 112
            assert "too many handshakes (per-source)" in lines[0]
        finally:
            for sock in flood:
                sock.close()
            assert stop(server) == 0, server.log()
            backend.close()

    asyncio.run(main())


def test_sessions_are_bounded_per_source(tmp_path: Any) -> None:
    async def main() -> None:
        backend = socket.create_server(("127.0.0.1", 0))
        backend.listen(16)
        server = await start_tether(
            "server", "--listen", "127.0.0.1:0", "--backend",
            f"127.0.0.1:{backend.getsockname()[1]}", "--plaintext",
            "--max-sessions-per-source", "2",
            tmp=str(tmp_path),
        )  # fmt: skip
        clients: list[RawClient] = []
        try:
            for _ in range(2):
                clients.append(
                    await asyncio.to_thread(RawClient, server.address, source="127.0.0.3")
                )
            with pytest.raises(ConnectionError, match="OVERLOADED"):
                await asyncio.to_thread(RawClient, server.address, source="127.0.0.3")
            other = await asyncio.to_thread(RawClient, server.address, source="127.0.0.4")
            other.close()
            # One of the two ends (a CLOSE, not a cut: a detached session still counts).
            first = clients.pop(0)
            first.session.close(CloseCode.APPLICATION_RESET, "done")
            first.sock.sendall(b"".join(first.session.data_to_send()))
            deadline = time.monotonic() + 10
            while True:
                try:
                    again = await asyncio.to_thread(RawClient, server.address, source="127.0.0.3")
                    break
                except ConnectionError:
                    assert time.monotonic() < deadline, server.log()
                    await asyncio.sleep(0.1)
            again.close()
            first.close()
            assert "setup from 127.0.0.3 refused: overloaded" in server.log()
        finally:
            for client in clients:
                client.close()
            with contextlib.suppress(Exception):
                assert stop(server) == 0, server.log()
            backend.close()

    asyncio.run(main())
