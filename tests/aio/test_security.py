"""The security rules of issue 8, end to end on loopback (docs/security.md).

Real ``tether server`` and ``tether client`` processes with their command-line flags, or
an in-process server and client with real sockets and real TLS. Each test sets up its
own identities, known servers and clients files in ``tmp_path``: nothing is shared.

1. default settings: TLS both ways; a tap on the path sees none of the stream
2. trust on first use: learned once, then a different server identity is refused,
   naming the file and line, with no fallback and no backend connection
3. ``--strict`` and ``--server-fingerprint``
4. ``--tls-ca``: the certificate must carry the name the client connects to
5. tokens: none or a wrong one gets no session and no backend connection; a client
   added to the clients file while the server runs is admitted
6. mutual TLS: no client certificate, no session
7. clear text on one side only: the server logs why in one line, the client's session
   ends, no silent fallback (both sides in clear text: test 1)
8. a peer is told "backend unavailable", never the backend's address
9. a private key that others may read stops the server at start
10. a cut TLS link resumes the session, and the TLS session too
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import ssl
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, cast

import pytest

from tether import credentials, tls
from tether.aio.client import TetherClient
from tether.aio.server import TetherServer
from tether.config import Address, ClientConfig, ServerConfig

from ..tls.pki import CA
from .endpoints import Backend, Streamer, close_all, connect_app, stream_digest
from .faultnet import FaultRelay, Proc, start_tether, stop

LIMIT = 10.0  # seconds any one step may take: a bound for a hang, never a measurement
FAIL_FAST = ("--connect-timeout", "2")  # a client that cannot get a session gives up soon
LOOPBACK = "127.0.0.1:0"
FELL_BACK = "connecting directly to fallback"  # the client's WARNING when it falls back


@pytest.fixture(autouse=True)
def own_xdg_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default identity and known servers in ``tmp_path`` (the processes inherit them):
    conftest.py gives every test its own already; these tests look at them by path."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))


def at(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


def run(coro: Coroutine[Any, Any, None], limit: float = 45) -> None:
    async def main() -> None:
        try:
            await asyncio.wait_for(coro, limit)
        finally:
            close_all()
            await asyncio.sleep(0)

    asyncio.run(main())


# -- helpers -------------------------------------------------------------------------------


class Tethers:
    """Start ``tether`` processes; stop them all at the end, each to exit 0."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []

    async def server(self, backend: tuple[str, int], *args: str, listen: str = LOOPBACK) -> Proc:
        proc = await start_tether(
            "server", "--listen", listen, "--backend", at(backend), *args, tmp=str(self.tmp)
        )
        self.procs.append(proc)
        return proc

    async def client(self, server: str, *args: str) -> Proc:
        proc = await start_tether(
            "client", "--listen", LOOPBACK, "--server", server, *args, tmp=str(self.tmp)
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        self.procs.remove(proc)
        assert stop(proc) == 0, proc.log()

    def stop_all(self) -> None:
        codes = [(stop(proc), proc) for proc in self.procs]
        self.procs.clear()
        for code, proc in codes:
            assert code == 0, proc.log()


class Listener:
    """A TCP service that echoes (EOF too) and counts its connections: a backend, or a
    fallback that must never be reached."""

    def __init__(self) -> None:
        self.accepted = 0
        self.server: asyncio.Server | None = None
        self.transports: list[asyncio.Transport] = []

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None
        return cast(tuple[str, int], self.server.sockets[0].getsockname()[:2])

    def _make(self) -> asyncio.Protocol:
        self.accepted += 1
        listener = self

        class Echo(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = cast(asyncio.Transport, transport)
                listener.transports.append(self.transport)

            def data_received(self, data: bytes) -> None:
                self.transport.write(data)

            def eof_received(self) -> bool:
                self.transport.write_eof()
                return True

        return Echo()

    async def __aenter__(self) -> Listener:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._make, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for transport in self.transports:
            transport.abort()
        await self.server.wait_closed()


async def session_works(client: Proc, seed: int, size: int = 256 * 1024) -> None:
    """An application connection through ``client`` to an echo backend: every byte
    comes back, in order, and the EOF too."""
    app = await connect_app(client.address, seed=seed, size=size)
    await wait(app.peer_eof, "the echo through the session")
    assert app.received == size, client.log()
    assert app.digest.hexdigest() == stream_digest(seed, size)


async def session_refused(client: Proc) -> Streamer:
    """An application connection through ``client`` that is closed without a byte."""
    app = await connect_app(client.address, seed=0, size=4096)
    await wait(app.peer_eof, "the application's connection to be closed")
    assert app.received == 0, client.log()
    return app


async def wait(event: asyncio.Event, what: str, limit: float = LIMIT) -> None:
    try:
        await asyncio.wait_for(event.wait(), limit)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def log_line(proc: Proc, pattern: str, limit: float = LIMIT) -> str:
    """The first line of ``proc``'s log that matches ``pattern``, waited for."""
    regex = re.compile(pattern)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while True:
        for line in proc.log().splitlines():
            if regex.search(line):
                return line
        if loop.time() > deadline:
            raise AssertionError(f"no line matching {pattern!r} in the log:\n{proc.log()}")
        await asyncio.sleep(0.05)


def lines(proc: Proc, *words: str) -> list[str]:
    """The lines of ``proc``'s log that contain every one of ``words``."""
    return [line for line in proc.log().splitlines() if all(w in line for w in words)]


def private_file(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text + "\n")
    return path


# -- 1. default settings: nothing of the stream on the wire ---------------------------------


class _TapHalf(asyncio.Protocol):
    def __init__(self, tap: Tap, record: bytearray) -> None:
        self.tap = tap
        self.record = record
        self.transport: asyncio.Transport | None = None
        self.peer: _TapHalf | None = None
        self.held = bytearray()
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.tap.transports.append(self.transport)

    def data_received(self, data: bytes) -> None:
        self.record += data
        if self.peer is None or self.peer.transport is None:
            self.held += data
        else:
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write_eof()
        else:
            self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class Tap:
    """A TCP relay that records every byte it carries, each direction apart."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.up = bytearray()  # client to server
        self.down = bytearray()  # server to client
        self.transports: list[asyncio.Transport] = []
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Tap:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._accept, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def _accept(self) -> asyncio.Protocol:
        down = _TapHalf(self, self.up)
        up = _TapHalf(self, self.down)

        async def connect() -> None:
            loop = asyncio.get_running_loop()
            await loop.create_connection(lambda: up, *self.target)
            up.peer, down.peer = down, up
            for half in (up, down):
                assert half.peer is not None and half.peer.transport is not None
                if half.held:
                    half.peer.transport.write(bytes(half.held))
                if half.eof:
                    half.peer.transport.write_eof()

        task = asyncio.ensure_future(connect())
        self.tasks.add(task)
        return down

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        for transport in self.transports:
            transport.abort()
        await self.server.wait_closed()
        await asyncio.sleep(0)


WINDOW = 16


def shared_windows(payload: bytes, seen: bytes) -> int:
    """How many of ``payload``'s WINDOW-byte substrings appear anywhere in ``seen``."""
    windows = {seen[i : i + WINDOW] for i in range(len(seen) - WINDOW + 1)}
    return sum(payload[i : i + WINDOW] in windows for i in range(len(payload) - WINDOW + 1))


@pytest.mark.parametrize("mode", ["default", "plaintext"])
def test_a_tap_on_the_path_sees_none_of_the_stream(tmp_path: Path, mode: str) -> None:
    """Default flags: not one 16-byte piece of either direction's stream crosses the
    path. The same tap between two --plaintext ends sees all of it (the tap works)."""
    size = 128 * 1024
    up = random.Random(101).randbytes(size)
    down = random.Random(102).randbytes(size)
    args = ("--plaintext",) if mode == "plaintext" else ()
    tethers = Tethers(tmp_path)

    async def main() -> None:
        async with Backend(seed=102, size=size) as backend:
            try:
                server = await tethers.server(backend.address, *args)
                async with Tap(server.address) as tap:
                    client = await tethers.client(f"127.0.0.1:{tap.port}", *args)
                    app = await connect_app(client.address, seed=101, size=size)
                    await wait(app.peer_eof, "the backend's stream at the application")
                    await wait(backend.connected, "the backend connection")
                    far = backend.connections[0]
                    await wait(far.peer_eof, "the application's stream at the backend")
                    assert app.digest.hexdigest() == stream_digest(102, size)
                    assert far.digest.hexdigest() == stream_digest(101, size)
                    wire_up, wire_down = bytes(tap.up), bytes(tap.down)
            finally:
                tethers.stop_all()
        assert len(wire_up) > size and len(wire_down) > size  # the tap carried it all
        if mode == "default":
            assert wire_up[0] == 0x16 and wire_down[0] == 0x16  # TLS records both ways
            assert shared_windows(up, wire_up) == 0
            assert shared_windows(down, wire_down) == 0
            assert "TLS 1.3, certificate sha256:" in server.log()
        else:
            # Frame headers split the stream: most of its windows are there, not all.
            windows = size - WINDOW + 1
            assert shared_windows(up, wire_up) > windows // 2
            assert shared_windows(down, wire_down) > windows // 2

    run(main())


# -- 2. trust on first use ------------------------------------------------------------------


def test_trust_on_first_use_then_a_changed_server_is_refused_without_fallback(
    tmp_path: Path,
) -> None:
    known = tmp_path / "known_servers"
    first_state, second_state = tmp_path / "server-1", tmp_path / "server-2"
    tethers = Tethers(tmp_path)

    async def main() -> None:
        async with Listener() as backend, Listener() as fallback:
            try:
                server = await tethers.server(backend.address, "--state-dir", str(first_state))
                port = server.address[1]
                where = f"127.0.0.1:{port}"
                fingerprint = tls.fingerprint_of_file(first_state / tls.CERT_FILE)

                # First client run: learns the server, one line, one WARNING.
                first = await tethers.client(where, "--known-servers", str(known))
                await session_works(first, seed=1)
                assert known.read_text() == f"{where} {fingerprint}\n"
                (warning,) = lines(first, "WARNING", str(known))
                assert f"{known}:1" in warning and fingerprint in warning
                tethers.stop(first)

                # Second run: nothing new to learn (and a fallback it must never use).
                second = await tethers.client(
                    where, "--known-servers", str(known), "--fallback", at(fallback.address)
                )
                await session_works(second, seed=2)
                assert known.read_text() == f"{where} {fingerprint}\n"
                assert lines(second, "WARNING") == []
                assert backend.accepted == 2

                # Another identity on the same HOST:PORT.
                tethers.stop(server)
                other = await tethers.server(
                    backend.address, "--state-dir", str(second_state), listen=where
                )
                assert tls.fingerprint_of_file(second_state / tls.CERT_FILE) != fingerprint
                third = await tethers.client(where, "--known-servers", str(known))
                for client in (second, third):  # a TLS session cached or none
                    await session_refused(client)
                    line = await log_line(client, "ended UNTRUSTED_SERVER")
                    assert f"{known}:1" in line and "delete that line" in line, line
                    assert "not sent anywhere else" in line
                    assert "ERROR" in line
                assert known.read_text() == f"{where} {fingerprint}\n"
                assert fallback.accepted == 0, second.log()
                assert backend.accepted == 2, other.log()
                assert lines(second, FELL_BACK) == []
            finally:
                tethers.stop_all()

    run(main())


# -- 3. --strict and --server-fingerprint ---------------------------------------------------


def test_strict_refuses_an_unknown_server_and_a_pin_decides(tmp_path: Path) -> None:
    state = tmp_path / "server"
    known = tmp_path / "known_servers"
    wrong_pin = "sha256:" + "ab" * 32
    tethers = Tethers(tmp_path)

    async def main() -> None:
        async with Listener() as backend, Listener() as fallback:
            try:
                server = await tethers.server(backend.address, "--state-dir", str(state))
                where = at(server.address)
                fingerprint = tls.fingerprint_of_file(state / tls.CERT_FILE)
                to_fallback = ("--fallback", at(fallback.address))

                strict = await tethers.client(
                    where, "--strict", "--known-servers", str(known), *to_fallback
                )
                await session_refused(strict)
                line = await log_line(strict, "ended UNTRUSTED_SERVER")
                assert "--strict forbids trusting it on first use" in line, line
                assert f"{where} {fingerprint}" in line  # the line to add, ready to copy
                assert not known.exists()  # --strict learns nothing

                pinned = await tethers.client(where, "--server-fingerprint", fingerprint)
                await session_works(pinned, seed=3)
                assert backend.accepted == 1

                mismatch = await tethers.client(
                    where, "--server-fingerprint", wrong_pin, *to_fallback
                )
                await session_refused(mismatch)
                line = await log_line(mismatch, "ended UNTRUSTED_SERVER")
                assert f"presented certificate {fingerprint}" in line, line
                assert f"pins {wrong_pin}" in line

                assert fallback.accepted == 0
                assert backend.accepted == 1
                assert lines(strict, FELL_BACK) == lines(mismatch, FELL_BACK) == []
            finally:
                tethers.stop_all()

    run(main())


# -- 4. --tls-ca ----------------------------------------------------------------------------


def test_a_ca_signed_certificate_must_carry_the_name_the_client_uses(tmp_path: Path) -> None:
    ca = CA(tmp_path)
    issued = ca.issue("localhost")  # a DNS name only: no IP address in the certificate
    other_ca = CA(tmp_path, "another CA")
    known = tmp_path / "known_servers"
    tethers = Tethers(tmp_path)

    async def main() -> None:
        async with Listener() as backend, Listener() as fallback:
            try:
                server = await tethers.server(
                    backend.address, "--tls-cert", str(issued.cert), "--tls-key", str(issued.key)
                )
                port = server.address[1]
                to_fallback = ("--fallback", at(fallback.address))

                good = await tethers.client(f"localhost:{port}", "--tls-ca", str(ca.cert))
                await session_works(good, seed=4)
                assert backend.accepted == 1

                wrong_name = await tethers.client(
                    f"127.0.0.1:{port}", "--tls-ca", str(ca.cert), *to_fallback
                )
                await session_refused(wrong_name)
                line = await log_line(wrong_name, "ended UNTRUSTED_SERVER")
                assert "certificate verify failed: IP address mismatch" in line, line
                assert "not valid for '127.0.0.1';" in line

                wrong_ca = await tethers.client(
                    f"localhost:{port}", "--tls-ca", str(other_ca.cert), *to_fallback
                )
                await session_refused(wrong_ca)
                line = await log_line(wrong_ca, "ended UNTRUSTED_SERVER")
                assert "certificate verify failed: unable to get local issuer" in line, line

                assert fallback.accepted == 0
                assert backend.accepted == 1
                assert not known.exists() and not (tmp_path / "xdg-config").exists()
            finally:
                tethers.stop_all()

    run(main())


# -- 5. tokens ------------------------------------------------------------------------------


def test_tokens_decide_who_gets_a_session_and_the_clients_file_is_reread(
    tmp_path: Path,
) -> None:
    clients = tmp_path / "clients"
    made = subprocess.run(
        [sys.executable, "-m", "tether", "token", "new", "--clients", str(clients)],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    token = made.stdout.strip()
    assert token.startswith(credentials.TOKEN_PREFIX)
    assert token not in clients.read_text()  # only its hash is kept
    assert credentials.token_hash(token) in clients.read_text()
    right = private_file(tmp_path / "right.token", token)
    late_token = credentials.new_token()
    late = private_file(tmp_path / "late.token", late_token)
    tethers = Tethers(tmp_path)

    async def main() -> None:
        async with Listener() as backend, Listener() as fallback:
            try:
                server = await tethers.server(backend.address, "--clients", str(clients))
                where = at(server.address)
                to_fallback = ("--fallback", at(fallback.address))

                anonymous = await tethers.client(where, *to_fallback)
                await session_refused(anonymous)
                line = await log_line(anonymous, "ended UNAUTHORIZED")
                assert "(not authorized)" in line, line
                await log_line(server, r"setup from 127\.0\.0\.1 refused: unauthorized \(no token")

                stranger = await tethers.client(where, "--token-file", str(late), *to_fallback)
                await session_refused(stranger)
                line = await log_line(stranger, "ended UNAUTHORIZED")
                assert "(not authorized)" in line, line
                assert backend.accepted == 0, server.log()

                member = await tethers.client(where, "--token-file", str(right))
                await session_works(member, seed=5)
                assert backend.accepted == 1

                # Admitted while the server runs: the same client process, now let in.
                credentials.append_client(clients, credentials.token_hash(late_token), "late")
                await session_works(stranger, seed=6)
                assert backend.accepted == 2
                await log_line(server, r"clients file .* re-read: 2 clients")

                assert fallback.accepted == 0
                tethers.stop(server)  # writes the summary of refusals from this source
                assert lines(server, "unauthorized (token not accepted)"), server.log()
                for proc in (anonymous, stranger):  # peers learn the code, not the check
                    assert lines(proc, "no token") == lines(proc, "not accepted") == []
                    assert lines(proc, FELL_BACK) == []
            finally:
                tethers.stop_all()

    run(main())


# -- 6. mutual TLS --------------------------------------------------------------------------


def test_mutual_tls_admits_only_clients_with_a_certificate_the_ca_signed(tmp_path: Path) -> None:
    ca = CA(tmp_path)
    alice = ca.issue("alice", client=True)
    mallory = CA(tmp_path, "mallory CA").issue("mallory", client=True)
    tethers = Tethers(tmp_path)

    async def main() -> None:
        async with Listener() as backend, Listener() as fallback:
            try:
                server = await tethers.server(backend.address, "--tls-client-ca", str(ca.cert))
                where = at(server.address)
                to_fallback = ("--fallback", at(fallback.address))

                without = await tethers.client(where, *to_fallback, *FAIL_FAST)
                await session_refused(without)
                await log_line(without, r"ended \w+ .*application connection closed")

                forged = await tethers.client(
                    where, "--tls-cert", str(mallory.cert), "--tls-key", str(mallory.key),
                    *to_fallback, *FAIL_FAST,
                )  # fmt: skip
                await session_refused(forged)
                await log_line(forged, r"ended \w+ .*application connection closed")
                assert backend.accepted == 0, server.log()

                signed = await tethers.client(
                    where, "--tls-cert", str(alice.cert), "--tls-key", str(alice.key)
                )
                await session_works(signed, seed=7)
                assert backend.accepted == 1
                assert fallback.accepted == 0, without.log() + forged.log()
                tethers.stop(server)  # writes the summary of refusals from this source
                assert lines(server, "TLS handshake failed: peer did not return a certificate")
                assert lines(server, "TLS handshake failed: certificate verify failed")
            finally:
                tethers.stop_all()

    run(main())


class Silent(Listener):
    """Accepts TCP connections and never says a word (a hung server); they are aborted at
    the end."""

    def _make(self) -> asyncio.Protocol:
        owner = self

        class Hold(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                owner.accepted += 1
                owner.connected(cast(asyncio.Transport, transport))

        return Hold()

    def connected(self, transport: asyncio.Transport) -> None:
        self.transports.append(transport)


class AnswersOnce(Silent):
    """A server with ``issued``'s identity that completes one TLS handshake and closes the
    link at once (as a tether server does to a client it refuses), then leaves every later
    connection without a word: a client's attempts after the first run into its deadline."""

    def __init__(self, issued: Any) -> None:
        super().__init__()
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(issued.cert, issued.key)
        self.tasks: set[asyncio.Task[None]] = set()

    def connected(self, transport: asyncio.Transport) -> None:
        if self.accepted > 1:
            super().connected(transport)
            return
        self._tls(transport, close=True)

    def _tls(self, transport: asyncio.Transport, *, close: bool) -> None:
        task = asyncio.ensure_future(self._serve(transport, close))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, transport: asyncio.Transport, close: bool) -> None:
        protocol = cast(asyncio.BaseProtocol, transport.get_protocol())
        loop = asyncio.get_running_loop()
        tls_transport = await loop.start_tls(transport, protocol, self.context, server_side=True)
        assert tls_transport is not None
        if close:
            tls_transport.close()
        else:
            self.transports.append(tls_transport)


class QuietAfterTLS(AnswersOnce):
    """Completes the TLS handshake of every connection with ``issued``'s identity, then
    says nothing: a tether server too busy to answer, as far as the client can tell."""

    def connected(self, transport: asyncio.Transport) -> None:
        self._tls(transport, close=False)


class AnswersOnceThenQuiet(AnswersOnce):
    """As AnswersOnce, but every later connection completes TLS and then says nothing: the
    client's later attempts meet a verified server whose silence runs into its deadline."""

    def connected(self, transport: asyncio.Transport) -> None:
        self._tls(transport, close=self.accepted <= 1)


@pytest.mark.parametrize(
    "server_class", [AnswersOnce, AnswersOnceThenQuiet], ids=["silent", "quiet"]
)
def test_no_fallback_once_a_server_answered_even_when_a_later_attempt_times_out(
    tmp_path: Path, server_class: type[AnswersOnce]
) -> None:
    """The server answered the first attempt (it refused this client); the next one, made
    with little of the connect timeout left, times out, before TLS (silent) or after it
    (quiet). A timeout otherwise says that no tether server is there, but not after one
    answered: no fallback, and the client says what the server did, not that an attempt
    timed out (CI failures of stop 17 and, for the quiet case, of a local run in stop 19)."""
    issued = CA(tmp_path).issue("server.test")
    pin = tls.fingerprint_of_file(issued.cert)
    tethers = Tethers(tmp_path)

    async def main() -> None:
        async with server_class(issued) as server, Listener() as fallback:
            where = at(server.address)
            try:
                client = await tethers.client(
                    where, "--server-fingerprint", pin, "--fallback", at(fallback.address),
                    *FAIL_FAST,
                )  # fmt: skip
                await session_refused(client)
                line = await log_line(client, r"ended \w+ .*application connection closed")
                # What the server did ("connection closed", "... lost at once"): not "timed out".
                assert re.search(r"did not take the session: connection (closed|lost)", line), line
                assert server.accepted >= 2, client.log()  # a later attempt was made
                assert fallback.accepted == 0
                assert lines(client, FELL_BACK) == []
            finally:
                tethers.stop_all()

    run(main())


@pytest.mark.parametrize("handshake_timeout", ["60", "1"], ids=["connect-first", "handshake-first"])
def test_a_verified_server_that_stays_silent_gets_no_fallback_and_no_more_time(
    tmp_path: Path, handshake_timeout: str
) -> None:
    """TLS verified the server's identity, then it never answers the SETUP. It is a tether
    server that cannot take the session now (as when it drops the link): no fallback,
    whichever ends the attempt first, the connect timeout (2 s; not the 60 s handshake
    timeout) or a 1 s handshake timeout (the core's HandshakeFailed)."""
    issued = CA(tmp_path).issue("server.test")
    pin = tls.fingerprint_of_file(issued.cert)
    tethers = Tethers(tmp_path)

    async def main() -> None:
        async with QuietAfterTLS(issued) as server, Listener() as fallback:
            try:
                client = await tethers.client(
                    at(server.address), "--server-fingerprint", pin,
                    "--fallback", at(fallback.address), "--handshake-timeout", handshake_timeout,
                    *FAIL_FAST,
                )  # fmt: skip
                await session_refused(client)  # within LIMIT (10 s), far below 60 s
                line = await log_line(client, r"ended \w+ .*application connection closed")
                said = re.search(r"did not take the session: (link handshake )?timed out", line)
                assert said, line
                assert server.accepted >= 1 and fallback.accepted == 0
                assert lines(client, FELL_BACK) == []
            finally:
                tethers.stop_all()

    run(main())


def test_a_hung_first_server_leaves_time_for_the_next(tmp_path: Path) -> None:
    """The first of two servers accepts TCP and then says nothing. The connect timeout is
    shared among the servers a round has not tried: the session is set up through the
    second, not sent to the fallback once the first has used all of it."""
    tethers = Tethers(tmp_path)

    async def main() -> None:
        async with Silent() as hung, Listener() as backend, Listener() as fallback:
            try:
                server = await tethers.server(backend.address)
                client = await tethers.client(
                    at(hung.address), "--server", at(server.address),
                    "--fallback", at(fallback.address), *FAIL_FAST,
                )  # fmt: skip
                await session_works(client, seed=11)
                assert hung.accepted >= 1 and backend.accepted == 1
                assert fallback.accepted == 0 and lines(client, FELL_BACK) == [], client.log()
                line = await log_line(client, "did not take the session")
                assert f"server {at(hung.address)} did not take the session (timed out)" in line
            finally:
                tethers.stop_all()

    run(main())


# -- 7. clear text on one side only ---------------------------------------------------------


def test_a_clear_text_client_is_told_the_server_requires_tls(tmp_path: Path) -> None:
    tethers = Tethers(tmp_path)

    async def main() -> None:
        async with Listener() as backend, Listener() as fallback:
            try:
                server = await tethers.server(backend.address)
                client = await tethers.client(
                    at(server.address),
                    "--plaintext", "--fallback", at(fallback.address),
                )  # fmt: skip
                await session_refused(client)
                line = await log_line(client, "ended TLS_REQUIRED")
                assert "this server takes TLS links only" in line, line
                said = "refused: the client speaks clear text; this server requires TLS"
                await log_line(server, re.escape(said))
                assert len(lines(server, said)) == 1
                assert backend.accepted == fallback.accepted == 0
            finally:
                tethers.stop_all()

    run(main())


def test_a_tls_client_of_a_plaintext_server_fails_and_does_not_fall_back(tmp_path: Path) -> None:
    tethers = Tethers(tmp_path)

    async def main() -> None:
        async with Listener() as backend, Listener() as fallback:
            try:
                server = await tethers.server(backend.address, "--plaintext")
                client = await tethers.client(
                    at(server.address),
                    "--fallback", at(fallback.address), *FAIL_FAST,
                )  # fmt: skip
                await session_refused(client)
                # Only the server can tell why: to the client it is a reset in the TLS
                # handshake, as from a busy server (RESUME_FAILED, "Connection reset").
                line = await log_line(client, r"ended \w+ .*application connection closed")
                assert "WARNING" in line and at(server.address) in line, line
                said = "refused: the client speaks TLS; this server runs with --plaintext"
                await log_line(server, re.escape(said))
                assert len(lines(server, said)) == 1
                assert backend.accepted == fallback.accepted == 0
                assert lines(client, FELL_BACK) == []
            finally:
                tethers.stop_all()

    run(main())


# -- 8. unauthenticated peers learn nothing internal ----------------------------------------


def test_a_client_is_not_told_the_backend_address_or_the_error(tmp_path: Path) -> None:
    tethers = Tethers(tmp_path)

    async def main() -> None:
        async with Listener() as gone:
            down = gone.address  # a port nobody listens on once this block ends
        try:
            server = await tethers.server(down)
            client = await tethers.client(at(server.address))
            await session_refused(client)
            line = await log_line(client, "ended BACKEND_UNAVAILABLE")
            assert "(backend unavailable)" in line, line
            told = await log_line(server, "setup from .* refused: backend unavailable")
            assert f"127.0.0.1:{down[1]}" in told and "refused" in told.lower(), told
            for secret in (f":{down[1]}", "Connection refused", "ECONNREFUSED", "errno"):
                assert secret not in client.log(), client.log()
        finally:
            tethers.stop_all()

    run(main())


# -- 9. key file permissions ----------------------------------------------------------------


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_a_server_key_others_may_read_stops_the_server_at_start(tmp_path: Path) -> None:
    issued = CA(tmp_path).issue("localhost")
    issued.key.chmod(0o644)
    done = subprocess.run(
        [
            sys.executable, "-m", "tether", "server", "--listen", "127.0.0.1:0",
            "--tls-cert", str(issued.cert), "--tls-key", str(issued.key),
        ],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode != 0
    assert "READY" not in done.stdout
    (error,) = [line for line in done.stderr.splitlines() if line.startswith("tether: error:")]
    assert str(issued.key) in error and f"chmod 600 {issued.key}" in error, done.stderr
    assert "Traceback" not in done.stderr


# -- 10. a cut TLS link resumes the session, and the TLS session ----------------------------


def test_a_cut_tls_link_resumes_the_session_with_its_tls_session(tmp_path: Path) -> None:
    size = 512 * 1024
    payload = random.Random(110).randbytes(size)

    async def main() -> None:
        async with Listener() as backend:
            relay = FaultRelay(("127.0.0.1", 0))
            server_config = ServerConfig(
                listen=Address("127.0.0.1", 0),
                backend=Address(*backend.address),
                state_dir=tmp_path / "server",
            )
            async with TetherServer(server_config) as server:
                relay.target = (server.addresses[0].host, server.addresses[0].port)
                await relay.start()
                config = ClientConfig(
                    server=Address("127.0.0.1", relay.port),
                    known_servers=tmp_path / "known_servers",
                    strict=False,
                )
                try:
                    async with (
                        TetherClient(config, listen=False) as client,
                        client.open_stream() as stream,
                    ):
                        (session,) = client.relays()
                        links = [session_tls(session)]
                        half = size // 2
                        stream.write(payload[:half])
                        assert await stream.readexactly(half) == payload[:half]
                        accepted = relay.accepted
                        relay.kill_all()
                        stream.write(payload[half:])
                        rest = await asyncio.wait_for(stream.readexactly(size - half), LIMIT)
                        assert rest == payload[half:]
                        links.append(session_tls(session))
                        assert relay.accepted > accepted  # a new link carried it
                        assert client.counters.resumes_total == 1
                        assert backend.accepted == 1  # the backend never saw the cut
                        (server_session,) = server.relays()
                        assert server_session.link is not None
                        server_side = server_session.link.get_extra_info("ssl_object")
                        assert server_side.session_reused
                        stream.write_eof()
                        assert await asyncio.wait_for(stream.read(), LIMIT) == b""
                finally:
                    await relay.close()
        first, second = links
        assert first.version() == second.version() == "TLSv1.3"
        assert not first.session_reused
        assert second.session_reused

    run(main())


def session_tls(session: Any) -> Any:
    link = session.link
    assert link is not None
    ssl_object = link.get_extra_info("ssl_object")
    assert ssl_object is not None
    return ssl_object
