"""Loopback integration: real ``tether server`` and ``tether client`` processes with a
fault-injecting relay between them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest

from tether.protocol.codes import CloseCode
from tether.protocol.frames import (
    PROTOCOL_VERSION,
    SERVER_HELLO_SIZE,
    Reject,
    Resume,
    client_hello,
    parse_control,
)

from .endpoints import Backend, close_all, connect_app, stream_digest
from .faultnet import FaultRelay, logged, tether_pair

FAST = ("--keepalive", "0.3")


def run(coro: Coroutine[Any, Any, None], limit: float = 180) -> None:
    async def main() -> None:
        try:
            await asyncio.wait_for(coro, limit)
        finally:
            close_all()
            await asyncio.sleep(0)

    asyncio.run(main())


async def wait_for(event: asyncio.Event, limit: float, what: str) -> None:
    try:
        await asyncio.wait_for(event.wait(), limit)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def test_bulk_both_ways_survives_twenty_cuts_of_every_kind(tmp_path: Any) -> None:
    size = 64 * 1024 * 1024
    kinds: list[str] = []

    async def main() -> None:
        relay = FaultRelay(("127.0.0.1", 0), cut_every=(2 * size) // 26)

        def cut() -> None:
            kind = ("kill", "blackhole", "reset-new")[len(kinds) % 3]
            kinds.append(kind)
            if kind == "kill":
                relay.kill_all()
            elif kind == "blackhole":
                relay.blackhole_current()
            else:
                relay.reset_new = True
                relay.kill_all()
                asyncio.get_running_loop().call_later(0.3, setattr, relay, "reset_new", False)

        relay.on_cut = cut
        async with (
            Backend(seed=1, size=size) as backend,
            tether_pair(
                backend.address, str(tmp_path), server_args=FAST, client_args=FAST, relay=relay
            ) as (_server, client, _),
        ):
            app = await connect_app(client.address, seed=2, size=size)
            await wait_for(backend.connected, 10, "the backend connection")
            far = backend.connections[0]
            await wait_for(app.peer_eof, 150, "the backend's EOF at the application")
            await wait_for(far.peer_eof, 30, "the application's EOF at the backend")
            assert app.received == size
            assert far.received == size
            assert app.digest.hexdigest() == stream_digest(1, size)
            assert far.digest.hexdigest() == stream_digest(2, size)
            # The backend saw a pause, never a disconnection.
            assert len(backend.connections) == 1
            assert len(kinds) >= 20, kinds
            assert relay.accepted > 20
            assert "resumed" in client.log()

    run(main())


def test_application_half_close_keeps_the_other_direction_flowing(tmp_path: Any) -> None:
    async def main() -> None:
        async with (
            Backend(seed=3, size=2 * 1024 * 1024, eof=False) as backend,
            tether_pair(backend.address, str(tmp_path)) as (_, client, relay),
        ):
            app = await connect_app(client.address, seed=4, size=1024 * 1024, eof=True)
            far = await backend.serving(1024 * 1024)
            await wait_for(far.peer_eof, 30, "the application's EOF at the backend")
            assert far.received == 1024 * 1024
            assert not far.closed.is_set()
            assert not app.peer_eof.is_set()
            # The backend keeps talking after the application's half-close, across a cut.
            await wait_for(far.sent_all, 30, "the backend's stream")
            relay.kill_all()
            assert far.transport is not None
            far.transport.write(b"still here after your EOF")
            far.transport.write_eof()
            await wait_for(app.peer_eof, 30, "the backend's EOF at the application")
            assert app.received == 2 * 1024 * 1024 + len(b"still here after your EOF")
            assert far.digest.hexdigest() == stream_digest(4, 1024 * 1024)

    run(main())


def test_backend_close_reaches_the_application_after_all_its_data(tmp_path: Any) -> None:
    async def main() -> None:
        async with (
            Backend(seed=5, size=3 * 1024 * 1024, eof=False) as backend,
            tether_pair(backend.address, str(tmp_path)) as (_, client, relay),
        ):
            app = await connect_app(client.address, seed=6, size=1024, eof=False)
            far = await backend.serving(1024)
            await wait_for(far.sent_all, 30, "the backend's stream")
            assert far.transport is not None
            far.transport.close()
            relay.kill_all()
            await wait_for(app.peer_eof, 30, "the backend's close at the application")
            assert app.received == 3 * 1024 * 1024
            assert app.digest.hexdigest() == stream_digest(5, 3 * 1024 * 1024)

    run(main())


@contextlib.asynccontextmanager
async def _session_up(tmp_path: Any, args: tuple[str, ...]) -> AsyncIterator[Any]:
    """A server and a client (both with ``args``) behind a fault relay, and one session
    through them whose 64 KiB each way have arrived: (server, client, relay, app, far)."""
    async with (
        Backend(seed=7, size=64 * 1024, eof=False) as backend,
        tether_pair(backend.address, str(tmp_path), server_args=args, client_args=args) as (
            server,
            client,
            relay,
        ),
    ):
        app = await connect_app(client.address, seed=8, size=64 * 1024, eof=False)
        far = await backend.serving(64 * 1024)
        for _ in range(200):  # both streams delivered: the session is up
            if app.received == far.received == 64 * 1024:
                break
            await asyncio.sleep(0.05)
        yield server, client, relay, app, far


def test_expiry_ends_the_session_on_both_sides(tmp_path: Any) -> None:
    args = ("--timeout", "2", "--keepalive", "0.3")

    async def main() -> None:
        async with _session_up(tmp_path, args) as (server, client, relay, app, far):
            relay.reset_new = True  # the path never comes back
            relay.kill_all()
            started = asyncio.get_running_loop().time()
            await wait_for(app.peer_eof, 10, "the application to see the session end")
            await wait_for(far.peer_eof, 10, "the backend connection to be closed")
            assert asyncio.get_running_loop().time() - started >= 1.5
            await asyncio.sleep(0.2)
            assert "EXPIRED" in server.log()
            assert "EXPIRED" in client.log()

    run(main())


@pytest.mark.parametrize("link", ["clear", "tls"])
def test_an_application_reset_during_an_outage_reaches_the_backend_when_the_path_returns(
    tmp_path: Any, link: str
) -> None:
    """The application resets its connection while the path is down, and the backend has
    written meanwhile (the server sends it on the resume, into the client's link, which the
    client closes unread): once the path is back the server hears the abort and closes the
    backend connection, within seconds, not at the 60 s timeout it waited for before
    (docs/design.md, limitation 3)."""
    args = ("--timeout", "60", "--keepalive", "0.3", *(("--plaintext",) if link == "clear" else ()))

    async def main() -> None:
        async with _session_up(tmp_path, args) as (server, client, relay, app, far):
            relay.reset_new = True  # the path is down until we say
            relay.kill_all()
            await logged(client, "link lost")  # (an abort before that goes on the link)
            far.transport.write(bytes(256 * 1024))  # for the client, sent on the resume
            app.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            app.transport.abort()  # a reset, not an end of stream
            await logged(client, "the server is told when the session resumes")
            await asyncio.sleep(1.0)  # the outage goes on: the backend is not told yet
            assert not far.peer_eof.is_set()
            started = asyncio.get_running_loop().time()
            relay.reset_new = False  # the path is back
            await wait_for(far.peer_eof, 20, "the backend connection to be closed")
            assert asyncio.get_running_loop().time() - started < 20
            await logged(server, "ended APPLICATION_RESET")  # logged just after the close
            assert "ended APPLICATION_RESET" in client.log(), client.log()

    run(main())


async def _plain_server(banner: bytes) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(banner)
        await writer.drain()
        await reader.read()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("peer", ["refused", "not-tether"])
def test_fallback_connects_straight_to_the_backend(tmp_path: Any, peer: str) -> None:
    from .faultnet import start_tether, stop

    async def main() -> None:
        plain = await _plain_server(b"SSH-2.0-OpenSSH_9.2\r\n")
        port = plain.sockets[0].getsockname()[1] if peer == "not-tether" else _free_port()
        async with Backend(seed=9, size=1024 * 1024) as backend:
            client = await start_tether(
                "client",
                "--listen", "127.0.0.1:0",
                "--server", f"127.0.0.1:{port}",
                "--fallback", f"{backend.address[0]}:{backend.address[1]}",
                tmp=str(tmp_path),
            )  # fmt: skip
            try:
                app = await connect_app(client.address, seed=10, size=1024 * 1024)
                await wait_for(app.peer_eof, 30, "the fallback backend's stream")
                far = backend.connections[0]
                await wait_for(far.peer_eof, 30, "the application's EOF at the backend")
                assert app.digest.hexdigest() == stream_digest(9, 1024 * 1024)
                assert far.digest.hexdigest() == stream_digest(10, 1024 * 1024)
            finally:
                assert stop(client) == 0
            assert "no reliability" in client.log()
        plain.close()
        await plain.wait_closed()

    run(main())


def test_without_fallback_an_unreachable_server_closes_the_application(tmp_path: Any) -> None:
    from .faultnet import start_tether, stop

    async def main() -> None:
        client = await start_tether(
            "client",
            "--listen", "127.0.0.1:0",
            "--server", f"127.0.0.1:{_free_port()}",
            "--connect-timeout", "1",
            tmp=str(tmp_path),
        )  # fmt: skip
        try:
            app = await connect_app(client.address, seed=11, size=1000, eof=False)
            await wait_for(app.peer_eof, 10, "the application connection to close")
        finally:
            assert stop(client) == 0
        assert "no tether server" in client.log()

    run(main())


def test_resume_with_a_wrong_proof_is_rejected_and_the_session_keeps_flowing(
    tmp_path: Any,
) -> None:
    size = 8 * 1024 * 1024

    async def main() -> None:
        # In clear text, so that the observer learns the session id: the resume proof is
        # the defence in depth that still holds when TLS is off.
        async with (
            Backend(seed=12, size=size, eof=False) as backend,
            tether_pair(
                backend.address,
                str(tmp_path),
                server_args=("--plaintext",),
                client_args=(*FAST, "--plaintext"),
            ) as (server, client, relay),
        ):
            app = await connect_app(client.address, seed=13, size=size, eof=False)
            await wait_for(backend.connected, 10, "the backend connection")
            far = backend.connections[0]
            # The server connects the backend before it sends ACCEPT: wait for the relay to
            # have carried it.
            for _ in range(200):
                if len(relay.sniffed) >= SERVER_HELLO_SIZE + 20:
                    break
                await asyncio.sleep(0.05)
            # A passive observer of the setup learns the session id, not the secret.
            session_id = bytes(relay.sniffed[SERVER_HELLO_SIZE + 4 : SERVER_HELLO_SIZE + 20])
            assert len(session_id) == 16
            reader, writer = await asyncio.open_connection(*server.address)
            writer.write(client_hello())
            forged = Resume(session_id, os.urandom(32), 0, 1 << 20, 3000, os.urandom(32))
            writer.write(forged.serialize())
            hello = await reader.readexactly(SERVER_HELLO_SIZE)
            header = await reader.readexactly(4)
            word = int.from_bytes(header, "big")
            reply = parse_control(word >> 24, await reader.readexactly(word & 0xFFFFFF))
            assert reply == Reject(CloseCode.BAD_PROOF, "resume proof did not verify")
            assert hello[8] == PROTOCOL_VERSION
            assert await reader.read() == b""  # and the attacker's link is closed
            writer.close()
            # The owner's session is untouched and keeps flowing, across a real cut too.
            relay.kill_all()
            await wait_for(app.sent_all, 30, "the application's stream")
            await wait_for(far.sent_all, 30, "the backend's stream")
            for _ in range(300):
                if app.received == size and far.received == size:
                    break
                await asyncio.sleep(0.05)
            assert app.digest.hexdigest() == stream_digest(12, size)
            assert far.digest.hexdigest() == stream_digest(13, size)
            assert len(backend.connections) == 1
            assert "bad proof" in server.log()
            writer.transport.abort()

    run(main())


def test_cli_rejects_a_bad_address_with_a_clear_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tether", "server", "--listen", "127.0.0.1:notaport"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "port must be a number" in result.stderr


def test_demo_runs_a_session_through_an_outage() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tether", "demo", "--outage", "1", "--bytes", "1048576"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PATH CUT" in result.stdout and "resumed" in result.stdout
    assert result.stdout.count(" OK") == 2
