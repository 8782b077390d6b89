"""tether.tls: identities on disk, fingerprints, trust decisions, and real TLS 1.3 over
loopback with asyncio and uvloop (no mocks)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import ssl
import stat
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tether.tls import (
    CERT_FILE,
    KEY_FILE,
    ServerIdentity,
    SessionCache,
    TLSConfigError,
    TrustError,
    client_context,
    create_tls_connection,
    default_known_servers,
    default_state_dir,
    fingerprint,
    fingerprint_of_file,
    load_identity,
    load_or_create_identity,
    parse_fingerprint,
    server_context,
    server_key,
    verify_server,
)

from ..loops import LOOPS, Run, runner
from .pki import CA

POSIX = os.name == "posix"
FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")


@pytest.fixture(params=LOOPS)
def run(request: pytest.FixtureRequest) -> Run[Any]:
    return runner(request.param, 20)


@pytest.fixture
def identity(tmp_path: Path) -> ServerIdentity:
    return load_or_create_identity(tmp_path / "state")[0]


# -- peers over loopback -------------------------------------------------------------------


class Peer(asyncio.Protocol):
    """Either end: records what happens; the server side echoes."""

    def __init__(self, *, echo: bool = False, greeting: bytes = b"") -> None:
        loop = asyncio.get_running_loop()
        self.echo = echo
        self.greeting = greeting
        self.transport: asyncio.Transport | None = None
        self.received = bytearray()
        self.arrived = asyncio.Event()
        self.lost: asyncio.Future[Exception | None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        if self.greeting:
            self.transport.write(self.greeting)

    def data_received(self, data: bytes) -> None:
        self.received += data
        self.arrived.set()
        if self.echo:
            assert self.transport is not None
            self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)

    @property
    def ssl_object(self) -> ssl.SSLObject:
        assert self.transport is not None
        ssl_object = self.transport.get_extra_info("ssl_object")
        assert isinstance(ssl_object, ssl.SSLObject)
        return ssl_object

    async def exchange(self, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.write(payload)
        while len(self.received) < len(payload):
            self.arrived.clear()
            await self.arrived.wait()
        assert bytes(self.received) == payload

    async def close(self) -> None:
        assert self.transport is not None
        self.transport.close()
        await self.lost


@contextlib.asynccontextmanager
async def serve(context: ssl.SSLContext, port: int = 0) -> AsyncIterator[tuple[int, list[Peer]]]:
    accepted: list[Peer] = []

    def accept() -> Peer:
        accepted.append(Peer(echo=True))
        return accepted[-1]

    server = await asyncio.get_running_loop().create_server(accept, "127.0.0.1", port, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1], accepted
    finally:
        server.close()
        for peer in accepted:
            if peer.transport is not None:
                peer.transport.abort()
        await server.wait_closed()
        await asyncio.sleep(0.01)


async def connect(
    port: int, context: ssl.SSLContext, server_hostname: str | None = None, **kwargs: Any
) -> Peer:
    _, peer = await create_tls_connection(
        Peer, "127.0.0.1", port, context=context, server_hostname=server_hostname, **kwargs
    )
    return peer


# -- where things live ---------------------------------------------------------------------


def test_default_paths_follow_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "s"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "c"))
    assert default_state_dir() == tmp_path / "s" / "tether"
    assert default_known_servers() == tmp_path / "c" / "tether" / "known_servers"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    expected = Path("/var/lib/tether") if root else tmp_path / "home/.local/state/tether"
    assert default_state_dir() == expected
    assert default_known_servers() == tmp_path / "home/.config/tether/known_servers"


# -- the server's identity -----------------------------------------------------------------


def test_identity_is_created_once_then_reused(tmp_path: Path) -> None:
    state = tmp_path / "deep" / "state"
    first, created = load_or_create_identity(state)
    assert created
    assert FINGERPRINT.fullmatch(first.fingerprint)
    assert first.fingerprint == fingerprint_of_file(first.cert_path)
    assert (first.cert_path, first.key_path) == (state / CERT_FILE, state / KEY_FILE)
    key_bytes = first.key_path.read_bytes()
    again, created_again = load_or_create_identity(state)
    assert not created_again
    assert again == first
    assert first.key_path.read_bytes() == key_bytes
    assert sorted(p.name for p in state.iterdir()) == [CERT_FILE, KEY_FILE]  # no temp files
    if POSIX:
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert stat.S_IMODE(first.key_path.stat().st_mode) == 0o600


def test_created_certificate_is_p256_for_ten_years_and_names_localhost(
    identity: ServerIdentity,
) -> None:
    cert = x509.load_pem_x509_certificate(identity.cert_path.read_bytes())
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(cert.public_key().curve, ec.SECP256R1)  # type: ignore[union-attr]
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days >= 3650
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert fingerprint(cert.public_bytes(serialization.Encoding.DER)) == identity.fingerprint


@pytest.mark.skipif(not POSIX, reason="POSIX permissions")
def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    identity, _ = load_or_create_identity(tmp_path / "state")
    identity.key_path.chmod(0o644)
    for load in (
        lambda: load_or_create_identity(tmp_path / "state"),
        lambda: load_identity(identity.cert_path, identity.key_path),
    ):
        with pytest.raises(TLSConfigError) as info:
            load()
        assert str(identity.key_path) in str(info.value)
        assert f"chmod 600 {identity.key_path}" in str(info.value)
    identity.key_path.chmod(0o600)
    assert load_or_create_identity(tmp_path / "state") == (identity, False)


def test_lost_certificate_is_recreated_for_the_same_key(tmp_path: Path) -> None:
    identity, _ = load_or_create_identity(tmp_path / "state")
    key_bytes = identity.key_path.read_bytes()
    identity.cert_path.unlink()
    again, created = load_or_create_identity(tmp_path / "state")
    assert created  # a new certificate, so a new fingerprint for clients to learn
    assert again.key_path.read_bytes() == key_bytes
    server_context(again)  # the new certificate goes with the key


def test_certificate_of_another_key_is_refused_not_replaced(tmp_path: Path) -> None:
    mine, _ = load_or_create_identity(tmp_path / "a")
    other, _ = load_or_create_identity(tmp_path / "b")
    mine.cert_path.write_bytes(other.cert_path.read_bytes())
    with pytest.raises(TLSConfigError, match="delete") as info:
        load_or_create_identity(tmp_path / "a")
    assert str(mine.cert_path) in str(info.value)
    assert mine.cert_path.read_bytes() == other.cert_path.read_bytes()


def test_encrypted_key_is_refused_without_prompting(tmp_path: Path) -> None:
    identity, _ = load_or_create_identity(tmp_path / "state")
    key = serialization.load_pem_private_key(identity.key_path.read_bytes(), None)
    identity.key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TLSConfigError, match="encrypted"):
        load_identity(identity.cert_path, identity.key_path)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(TLSConfigError, match=r"nope\.key"):
        load_identity(tmp_path / "nope.crt", tmp_path / "nope.key")
    with pytest.raises(TLSConfigError, match=r"ca\.pem"):
        client_context(ca=tmp_path / "ca.pem")


# -- fingerprints --------------------------------------------------------------------------


def test_fingerprint_format_and_parsing() -> None:
    value = fingerprint(b"certificate")
    assert FINGERPRINT.fullmatch(value)
    digits = value.removeprefix("sha256:")
    colons = ":".join(digits[i : i + 2] for i in range(0, 64, 2))
    for text in (value, value.upper(), f"SHA256:{colons.upper()}", f"  sha256:{colons} "):
        assert parse_fingerprint(text) == value
    for bad in ("", digits, "md5:" + digits, value[:-1], value + "0", value[:-1] + "g"):
        with pytest.raises(ValueError, match="sha256:"):
            parse_fingerprint(bad)


def test_server_key_brackets_ipv6_and_normalises() -> None:
    assert server_key("::1", 2598) == "[::1]:2598"
    assert server_key("[0:0::1]", 2598) == "[::1]:2598"
    assert server_key("Example.COM.", 1) == "example.com:1"
    assert server_key("10.0.0.1", 443) == "10.0.0.1:443"


# -- trusting a server ---------------------------------------------------------------------

DER_A, DER_B = b"certificate A", b"certificate B"


def test_pin_match_and_mismatch(tmp_path: Path) -> None:
    known = tmp_path / "known_servers"
    result = verify_server(
        DER_A, "h", 1, pin=fingerprint(DER_A).upper(), known_servers=known, strict=True
    )
    assert result.fingerprint == fingerprint(DER_A) and not result.learned
    with pytest.raises(TrustError) as info:
        verify_server(DER_B, "h", 1, pin=fingerprint(DER_A), known_servers=known, strict=False)
    message = str(info.value)
    assert "h:1" in message and "--server-fingerprint" in message
    assert fingerprint(DER_A) in message and fingerprint(DER_B) in message
    assert not known.exists()  # a pin never touches the file
    with pytest.raises(ValueError):
        verify_server(DER_A, "h", 1, pin="sha256:nope", known_servers=None, strict=False)


def test_trust_on_first_use_learns_once(tmp_path: Path) -> None:
    known = tmp_path / "cfg" / "tether" / "known_servers"
    first = verify_server(DER_A, "::1", 2598, pin=None, known_servers=known, strict=False)
    assert first.learned and first.known_servers == known and first.line == 1
    assert known.read_text() == f"[::1]:2598 {fingerprint(DER_A)}\n"
    if POSIX:
        assert stat.S_IMODE(known.stat().st_mode) == 0o600
        assert stat.S_IMODE(known.parent.stat().st_mode) == 0o700
    before = known.stat().st_mtime_ns, known.read_bytes()
    second = verify_server(DER_A, "[::1]", 2598, pin=None, known_servers=known, strict=True)
    assert not second.learned and second.line == 1
    assert (known.stat().st_mtime_ns, known.read_bytes()) == before
    # Another port of the same host is another server.
    other = verify_server(DER_B, "::1", 2599, pin=None, known_servers=known, strict=False)
    assert other.learned and other.line == 2
    assert len(known.read_text().splitlines()) == 2


def test_changed_certificate_is_refused_naming_file_and_line(tmp_path: Path) -> None:
    known = tmp_path / "known_servers"
    known.write_text(
        f"# my servers\n\nother:1 {fingerprint(DER_B)}\nhost:2598 {fingerprint(DER_A)}\n"
    )
    content = known.read_text()
    with pytest.raises(TrustError) as info:
        verify_server(DER_B, "HOST", 2598, pin=None, known_servers=known, strict=False)
    message = str(info.value)
    assert f"{known}:4" in message
    assert "delete that line" in message and fingerprint(DER_B) in message
    assert known.read_text() == content  # nothing learned over a mismatch
    assert verify_server(DER_A, "host", 2598, pin=None, known_servers=known, strict=False).line == 4


def test_strict_refuses_an_unknown_server(tmp_path: Path) -> None:
    known = tmp_path / "known_servers"
    with pytest.raises(TrustError) as info:
        verify_server(DER_A, "10.1.2.3", 2598, pin=None, known_servers=known, strict=True)
    message = str(info.value)
    assert "--strict" in message and "--server-fingerprint" in message
    assert f"10.1.2.3:2598 {fingerprint(DER_A)}" in message
    assert not known.exists()


def test_malformed_known_servers_line_is_named(tmp_path: Path) -> None:
    known = tmp_path / "known_servers"
    for bad in ("host:2598", "host:port sha256:00", "host:2598 sha256:00", "nohost sha256:00"):
        known.write_text(f"# ok\nh:1 {fingerprint(DER_A)}\n{bad}\n")
        with pytest.raises(TrustError, match=rf"{re.escape(str(known))}:3: "):
            verify_server(DER_B, "x", 9, pin=None, known_servers=known, strict=False)
    known.write_bytes(b"\xff\xfe not text\n")
    with pytest.raises(TrustError, match="known servers file"):
        verify_server(DER_B, "x", 9, pin=None, known_servers=known, strict=False)


def test_learning_after_a_last_line_without_newline(tmp_path: Path) -> None:
    known = tmp_path / "known_servers"
    known.write_text(f"a:1 {fingerprint(DER_A)}")
    result = verify_server(DER_B, "b", 2, pin=None, known_servers=known, strict=False)
    assert result.line == 2
    assert known.read_text().splitlines() == [
        f"a:1 {fingerprint(DER_A)}",
        f"b:2 {fingerprint(DER_B)}",
    ]


def test_concurrent_learners_append_whole_lines(tmp_path: Path) -> None:
    known = tmp_path / "known_servers"
    barrier = threading.Barrier(16)

    def learn(n: int) -> None:
        barrier.wait()
        verify_server(bytes([n]) * 300, f"h{n}", n, pin=None, known_servers=known, strict=False)

    threads = [threading.Thread(target=learn, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = sorted(known.read_text().splitlines())
    assert lines == sorted(f"h{n}:{n} {fingerprint(bytes([n]) * 300)}" for n in range(16))


# -- TLS over loopback ---------------------------------------------------------------------


def test_tofu_over_tls_sees_the_identity_fingerprint(
    run: Run[Any], identity: ServerIdentity, tmp_path: Path
) -> None:
    known = tmp_path / "known_servers"
    results = []
    port = 0

    def verify(der: bytes) -> None:
        results.append(
            verify_server(der, "127.0.0.1", port, pin=None, known_servers=known, strict=False)
        )

    async def main() -> None:
        nonlocal port
        async with serve(server_context(identity)) as (port, _):
            for _ in range(2):
                client = await connect(port, client_context(), verify=verify)
                await client.exchange(b"hello")
                assert client.ssl_object.version() == "TLSv1.3"
                await client.close()

    run(main())
    assert [(r.fingerprint, r.learned) for r in results] == [
        (identity.fingerprint, True),
        (identity.fingerprint, False),
    ]
    assert known.read_text() == f"127.0.0.1:{port} {identity.fingerprint}\n"


def test_failed_verification_sends_nothing(run: Run[Any], identity: ServerIdentity) -> None:
    sessions = SessionCache()
    made: list[Peer] = []

    def factory() -> Peer:
        made.append(Peer(greeting=b"client token"))
        return made[-1]

    async def main() -> None:
        async with serve(server_context(identity)) as (port, accepted):
            with pytest.raises(TrustError, match="--server-fingerprint pins"):
                await create_tls_connection(
                    factory,
                    "127.0.0.1",
                    port,
                    context=client_context(),
                    sessions=sessions,
                    verify=lambda der: verify_server(
                        der,
                        "127.0.0.1",
                        port,
                        pin=fingerprint(b"x"),
                        known_servers=None,
                        strict=True,
                    ),
                )
            # The client aborted inside the handshake's completion, before its own
            # Finished went out: the server's handshake fails, its app never hears of it.
            peer = await connect(port, client_context())
            await peer.exchange(b"next")
            await peer.close()
            assert [p.received for p in accepted] == [b"", b"next"]
            assert accepted[0].transport is None

    run(main())
    assert len(made) == 1 and made[0].transport is None  # never told it was connected
    assert len(sessions) == 0  # an unverified connection is not resumed later


def test_tls_1_2_is_refused(run: Run[Any], identity: ServerIdentity) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.maximum_version = ssl.TLSVersion.TLSv1_2

    async def main() -> None:
        async with serve(server_context(identity)) as (port, accepted):
            with pytest.raises((ssl.SSLError, ConnectionResetError)):
                await asyncio.get_running_loop().create_connection(
                    asyncio.Protocol, "127.0.0.1", port, ssl=old
                )
            assert all(peer.transport is None for peer in accepted)

    run(main())


def test_ca_mode_checks_chain_and_host_name(run: Run[Any], tmp_path: Path) -> None:
    ca = CA(tmp_path)
    issued = ca.issue("localhost")
    server = server_context(load_identity(issued.cert, issued.key))
    client = client_context(ca=ca.cert)
    stranger = client_context(ca=CA(tmp_path, "another CA").cert)

    async def main() -> None:
        async with serve(server) as (port, _):
            peer = await connect(port, client, "localhost")
            await peer.exchange(b"verified")
            await peer.close()
            with pytest.raises(ssl.SSLCertVerificationError, match=r"wrong\.example"):
                await connect(port, client, "wrong.example")
            with pytest.raises(ssl.SSLCertVerificationError):
                await connect(port, stranger, "localhost")

    run(main())


def test_self_signed_identity_serves_as_its_own_ca(run: Run[Any], identity: ServerIdentity) -> None:
    client = client_context(ca=identity.cert_path)
    client.verify_flags |= ssl.VERIFY_X509_STRICT  # what Python 3.13's defaults add

    async def main() -> None:
        async with serve(server_context(identity)) as (port, _):
            peer = await connect(port, client, "localhost")
            await peer.exchange(b"ok")
            await peer.close()

    run(main())


def test_mutual_tls(run: Run[Any], tmp_path: Path) -> None:
    ca = CA(tmp_path)
    issued = ca.issue("localhost")
    alice = ca.issue("alice", client=True)
    mallory = CA(tmp_path, "mallory CA").issue("mallory", client=True)
    server = server_context(load_identity(issued.cert, issued.key), client_ca=ca.cert)

    async def refused(context: ssl.SSLContext, port: int) -> None:
        # TLS 1.3: the client's handshake is over before the server judges its
        # certificate; asyncio and uvloop then close without flushing the alert, so the
        # client sees a clean handshake and then the end of the connection.
        try:
            peer = await connect(port, context, "localhost")
        except (ssl.SSLError, ConnectionError):
            return
        assert peer.transport is not None
        peer.transport.write(b"let me in")
        await peer.lost
        assert peer.received == b""

    async def main() -> None:
        async with serve(server) as (port, accepted):
            await refused(client_context(ca=ca.cert), port)
            await refused(client_context(ca=ca.cert, cert=mallory.cert, key=mallory.key), port)
            assert all(peer.transport is None for peer in accepted)  # never reached the app
            context = client_context(ca=ca.cert, cert=alice.cert, key=alice.key)
            peer = await connect(port, context, "localhost")
            await peer.exchange(b"alice")
            der = accepted[-1].ssl_object.getpeercert(binary_form=True)
            assert der is not None and fingerprint(der) == fingerprint_of_file(alice.cert)
            await peer.close()

    run(main())


@pytest.mark.skipif(not POSIX, reason="POSIX permissions")
def test_client_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    alice = CA(tmp_path).issue("alice", client=True)
    alice.key.chmod(0o640)
    with pytest.raises(TLSConfigError, match=f"chmod 600 {re.escape(str(alice.key))}"):
        client_context(cert=alice.cert, key=alice.key)


# -- session resumption --------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["client close", "client abort", "server abort"])
def test_reconnect_resumes_the_tls_session(
    run: Run[Any], identity: ServerIdentity, loss: str
) -> None:
    context, sessions = client_context(), SessionCache()
    presented: list[str] = []

    def verify(der: bytes) -> None:  # still called, and still given the certificate
        presented.append(
            verify_server(
                der, "127.0.0.1", 0, pin=identity.fingerprint, known_servers=None, strict=True
            ).fingerprint
        )

    async def main() -> list[tuple[bool, bool]]:
        reused = []
        async with serve(server_context(identity)) as (port, accepted):
            for _ in range(3):
                peer = await connect(port, context, sessions=sessions, verify=verify)
                await peer.exchange(b"data")
                reused.append(
                    (peer.ssl_object.session_reused, accepted[-1].ssl_object.session_reused)
                )
                assert peer.transport is not None and accepted[-1].transport is not None
                if loss == "client close":
                    await peer.close()
                elif loss == "client abort":  # what a client does when a link goes silent
                    peer.transport.abort()
                else:
                    accepted[-1].transport.abort()
                await peer.lost
        return reused

    assert run(main()) == [(False, False), (True, True), (True, True)]
    assert presented == [identity.fingerprint] * 3
    assert len(sessions) == 1


def test_a_restarted_server_gets_a_full_handshake(run: Run[Any], identity: ServerIdentity) -> None:
    context, sessions = client_context(), SessionCache()

    async def main() -> list[bool]:
        reused, port = [], 0
        for _ in range(2):  # a new server context (new ticket keys), as after a restart
            async with serve(server_context(identity), port) as (port, _):
                for _ in range(2):
                    peer = await connect(port, context, sessions=sessions)
                    await peer.exchange(b"x")
                    reused.append(peer.ssl_object.session_reused)
                    await peer.close()
        return reused

    assert run(main()) == [False, True, False, True]


def test_resumption_with_mutual_tls(run: Run[Any], tmp_path: Path) -> None:
    ca = CA(tmp_path)
    issued, alice = ca.issue("localhost"), ca.issue("alice", client=True)
    server = server_context(load_identity(issued.cert, issued.key), client_ca=ca.cert)
    context = client_context(ca=ca.cert, cert=alice.cert, key=alice.key)
    sessions = SessionCache()

    async def main() -> list[tuple[bool, str]]:
        seen = []
        async with serve(server) as (port, accepted):
            for _ in range(2):
                peer = await connect(port, context, "localhost", sessions=sessions)
                await peer.exchange(b"x")
                der = accepted[-1].ssl_object.getpeercert(binary_form=True)
                assert der is not None
                seen.append((peer.ssl_object.session_reused, fingerprint(der)))
                await peer.close()
        return seen

    alice_fp = fingerprint_of_file(alice.cert)
    assert run(main()) == [(False, alice_fp), (True, alice_fp)]


def test_session_cache_is_bounded_and_per_context(run: Run[Any], identity: ServerIdentity) -> None:
    first, second = client_context(), client_context()
    sessions = SessionCache(max_servers=2)

    async def main() -> None:
        async with serve(server_context(identity)) as (port, _):
            peer = await connect(port, first, sessions=sessions)
            await peer.exchange(b"x")
            await peer.close()
            assert sessions.session("127.0.0.1", port, first) is not None
            assert sessions.session("127.0.0.1", port, second) is None  # OpenSSL would refuse
            peer = await connect(port, second, sessions=sessions)  # so: a full handshake
            await peer.exchange(b"x")
            assert not peer.ssl_object.session_reused
            await peer.close()
            for host in ("a", "b"):
                sessions.remember(host, 1, peer.ssl_object)
            assert len(sessions) == 2
            assert sessions.session("127.0.0.1", port, second) is None  # the oldest went
            sessions.forget("A", 1)
            assert len(sessions) == 1

    run(main())


class BufferedPeer(asyncio.BufferedProtocol):
    """A client that reads through ``get_buffer``, as tether's links do (the TLS layer's
    ``read(n, buffer)`` path; :class:`Peer` takes the ``read(n)`` one)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray(4096)  # smaller than a record: records span reads
        self.received = bytearray()
        self.arrived = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buf)

    def buffer_updated(self, nbytes: int) -> None:
        self.received += self.buf[:nbytes]
        self.arrived.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.arrived.set()


def test_records_go_to_openssl_without_the_python_wrappers(
    run: Run[Any], identity: ServerIdentity
) -> None:
    """Both contexts' SSL objects read, write and report pending bytes through OpenSSL's
    own methods (tls._SSLObject), and a stream of many records still arrives whole both
    ways, through a buffered reader and a plain one, on both loops."""
    payload = os.urandom(300 * 1024)

    def native(ssl_object: ssl.SSLObject) -> bool:
        inner = ssl_object._sslobj  # type: ignore[attr-defined]
        return all(
            getattr(ssl_object, name).__self__ is inner for name in ("read", "write", "pending")
        )

    async def main() -> None:
        async with serve(server_context(identity)) as (port, accepted):
            transport, client = await create_tls_connection(
                BufferedPeer, "127.0.0.1", port, context=client_context()
            )
            assert isinstance(client, BufferedPeer)
            transport.write(payload)  # the server's Peer echoes it
            while len(client.received) < len(payload) and not transport.is_closing():
                client.arrived.clear()
                await client.arrived.wait()
            assert bytes(client.received) == payload
            server_ssl = accepted[0].ssl_object
            assert bytes(accepted[0].received) == payload
            assert native(transport.get_extra_info("ssl_object")) and native(server_ssl)
            transport.close()

    run(main())


class _Session:
    """Stands in for an ssl.SSLSession: a ticket, valid for an hour."""

    has_ticket = True
    timeout = 3600

    def __init__(self) -> None:
        import time

        self.time = int(time.time())


class _Connection:
    """Stands in for a connection's ssl.SSLObject; counts reads of ``session``."""

    def __init__(self, context: ssl.SSLContext, ticket: bool = True) -> None:
        self.context = context
        self.reads = 0
        self.ticket = ticket

    @property
    def session(self) -> _Session | None:
        self.reads += 1
        return _Session() if self.ticket else None


def test_a_session_is_read_once_per_connection_and_reads_are_capped_where_they_leak(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """docs/fuzzing.md, F3: where reading SSLObject.session leaks (CPython gh-116810), a
    process reads it at most SESSION_READ_LIMIT times, then resumes no more and says so
    once; everywhere, a connection's session is read once, not once per attempt."""
    import tether.tls as tls_module

    monkeypatch.setattr(tls_module, "SESSION_GETTER_LEAKS", True)
    monkeypatch.setattr(tls_module, "SESSION_READ_LIMIT", 3)
    monkeypatch.setattr(SessionCache, "reads", 0)
    context, sessions = client_context(), SessionCache()

    early = _Connection(context, ticket=False)  # its ticket has not arrived yet
    sessions.remember("h", 1, cast(ssl.SSLObject, early))
    assert sessions.session("h", 1, context) is None
    early.ticket = True
    first = sessions.session("h", 1, context)
    assert first is not None and early.reads == 2  # read again until one has a ticket
    for _ in range(100):  # reconnect attempts reuse it
        assert sessions.session("h", 1, context) is first
    assert early.reads == 2

    later = _Connection(context)
    sessions.remember("h", 1, cast(ssl.SSLObject, later))
    assert sessions.session("h", 1, context) is not first and later.reads == 1

    capped = _Connection(context)  # a fourth read would pass the limit of 3
    sessions.remember("h", 1, cast(ssl.SSLObject, capped))
    with caplog.at_level("WARNING", logger="tether.client"):
        for _ in range(10):
            assert sessions.session("h", 1, context) is None
    assert capped.reads == 0
    warnings = [r for r in caplog.records if "resumption is off" in r.getMessage()]
    assert len(warnings) == 1 and "gh-116810" in warnings[0].getMessage()

    monkeypatch.setattr(tls_module, "SESSION_GETTER_LEAKS", False)  # a fixed Python
    assert sessions.session("h", 1, context) is not None and capped.reads == 1
