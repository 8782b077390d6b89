"""``tether probe``: classification on bytes alone, then real loopback listeners of every
kind (SSH, ICA, CGP, HTTP, TLS, HTTPS, a real tether server in clear and inside TLS)."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import io
import json
import os
import select
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import tether
from tether import probe as probe_mod
from tether.config import Address, ServerConfig
from tether.probe import (
    Kind,
    ProbeResult,
    classify,
    connect_failure,
    format_text,
    parse_http_head,
    parse_target,
    probe,
    run_probe,
    to_dict,
    to_json,
)
from tether.protocol.frames import (
    CLIENT_HELLO_SIZE,
    MAGIC,
    PROTOCOL_VERSION,
    client_hello,
    server_hello,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def run(coro: Coroutine[Any, Any, None], *, uvloop: bool = False) -> None:
    if uvloop:
        import uvloop as uv

        uv.run(asyncio.wait_for(coro, 60))
    else:
        asyncio.run(asyncio.wait_for(coro, 60))


# -- pure classification -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"", None),
        (b"S", None),  # could still become "SSH-"
        (b"SSH-2.0-OpenSSH_9.6\r\n", Kind.SSH),
        (b"\x7f\x7f", None),
        (b"\x7f\x7fICA\x00", Kind.ICA),
        (b"\x7f\x7fICA\x00\x7f\x7fICA\x00", Kind.ICA),
        (b"\x1aCGP", None),
        (b"\x1aCGP/01\x00\x01", Kind.CGP),
        (MAGIC[:3], None),
        (server_hello(1, bytes(32)), Kind.TETHER),
        (b"HTTP/1.1 400 Bad Request\r\n", Kind.HTTP),
        (b"\x15", None),  # a TLS record's first byte
        (b"\x15\x03", None),
        (b"\x15\x03\x03\x00\x02\x02\x46", Kind.TLS),  # alert: protocol_version
        (b"\x16\x03\x01", Kind.TLS),
        (b"\x15\x04\x03", Kind.OTHER),
        (b"220 smtp.example ESMTP\r\n", Kind.OTHER),
        (b"\x00\x01\x02", Kind.OTHER),
    ],
)
def test_classify_tells_protocols_from_their_first_bytes(data: bytes, kind: Kind | None) -> None:
    assert classify(data) is kind


def test_connect_failures_are_named_plainly() -> None:
    assert connect_failure("h", ConnectionRefusedError(111, "Connection refused"), 3)[0] is (
        Kind.CLOSED
    )
    kind, detail = connect_failure("h", TimeoutError(), 2.5)
    assert kind is Kind.FILTERED
    assert detail == "no answer within 2.5 s (filtered, or the host is down)"
    kind, detail = connect_failure(
        "no-such-host.invalid", socket.gaierror(socket.EAI_NONAME, "Unknown error -2"), 3
    )
    assert (kind, detail) == (Kind.UNREACHABLE, "no-such-host.invalid: name does not resolve")
    kind, detail = connect_failure("h", socket.gaierror(-12345, "Unknown error -12345"), 3)
    assert kind is Kind.UNREACHABLE
    assert "Unknown error" not in detail and "-12345" in detail
    kind, detail = connect_failure("h", OSError(101, "Network is unreachable"), 3)
    assert (kind, detail) == (Kind.UNREACHABLE, "network is unreachable")


def test_parse_http_head_uses_the_status_line_and_server_header() -> None:
    raw = b"HTTP/1.1 301 Moved Permanently\r\nServer: nginx/1.25\r\nLocation: /x\r\n\r\n"
    assert parse_http_head(raw) == ("HTTP/1.1 301 Moved Permanently", "nginx/1.25")
    assert parse_http_head(b"HTTP/1.0 200 OK\r\n\r\n") == ("HTTP/1.0 200 OK", None)
    assert parse_http_head(b"SSH-2.0-x\r\n") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:22", ("127.0.0.1", 22)),
        ("example.com", ("example.com", 2598)),
        ("[::1]:443", ("::1", 443)),
        ("[::1]", ("::1", 2598)),
        ("::1", ("::1", 2598)),
    ],
)
def test_parse_target(text: str, expected: tuple[str, int]) -> None:
    assert parse_target(text) == expected


@pytest.mark.parametrize("text", ["host:", ":80", "host:http", "host:70000", "[::1"])
def test_parse_target_refuses_nonsense(text: str) -> None:
    if text == "host:":  # an empty port means the default
        assert parse_target(text) == ("host", 2598)
        return
    with pytest.raises(ValueError, match="bad target"):
        parse_target(text)


def test_filtered_when_the_connection_attempt_never_completes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A SYN nobody answers, simulated: no packet leaves the host."""

    async def never(*args: Any, **kwargs: Any) -> Any:
        await asyncio.Event().wait()

    monkeypatch.setattr(probe_mod, "_connect", never)

    async def main() -> None:
        result = await probe("127.0.0.1", 9, timeout=0.5)
        assert result.kind is Kind.FILTERED, result
        assert 0.45 <= result.elapsed <= 0.5 + probe_mod.GRACE + 0.1
        assert not result.answered

    run(main())


def test_a_name_that_does_not_resolve_reads_plainly(monkeypatch: pytest.MonkeyPatch) -> None:
    """The resolver is simulated: no DNS query leaves the host."""

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def fail(*args: Any, **kwargs: Any) -> Any:
            raise socket.gaierror(socket.EAI_NONAME, "Unknown error -2")

        monkeypatch.setattr(loop, "getaddrinfo", fail)
        result = await probe("no-such-host.invalid", 2598, timeout=1)
        assert result.kind is Kind.UNREACHABLE
        assert result.detail == "no-such-host.invalid: name does not resolve"

    run(main())


# -- loopback listeners ----------------------------------------------------------------


@asynccontextmanager
async def listener(
    handler: Handler, *, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None
) -> AsyncIterator[int]:
    """A loopback server running ``handler`` for each connection; yields its port."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            writer.transport.abort()

    server = await asyncio.start_server(serve, host, 0, ssl=tls)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def greeter(greeting: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        await reader.read()  # until the prober hangs up

    return handler


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()


async def http_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Like nginx: a bad request line gets a 400 at once, a request head gets a 200."""
    line = await reader.readline()
    if not line.endswith(b" HTTP/1.0\r\n") and not line.endswith(b" HTTP/1.1\r\n"):
        writer.write(b"HTTP/1.1 400 Bad Request\r\nServer: test-httpd/1.0\r\n\r\n")
        return
    await reader.readuntil(b"\r\n\r\n")
    writer.write(
        b"HTTP/1.1 200 OK\r\nServer: test-httpd/1.0\r\nContent-Length: 5\r\n"
        b"Connection: close\r\n\r\n"
    )
    await writer.drain()


@pytest.mark.parametrize(
    ("greeting", "kind", "detail"),
    [
        (b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3\r\n", Kind.SSH, "SSH-2.0-OpenSSH_9.6p1 Ubuntu-3"),
        (b"\x7f\x7fICA\x00", Kind.ICA, "Citrix ICA greeting (7f7f49434100)"),
        (b"\x1aCGP/01\x00\x00", Kind.CGP, "Citrix CGP greeting (1a4347502f30310000)"),
        (b"220 mail ESMTP\r\n", Kind.OTHER, "first bytes 323230206d61696c2045534d54500d0a"),
        (bytes(range(40)), Kind.OTHER, "first bytes " + bytes(range(32)).hex()),
    ],
)
def test_server_first_greetings(greeting: bytes, kind: Kind, detail: str) -> None:
    async def main() -> None:
        async with listener(greeter(greeting)) as port:
            result = await probe("127.0.0.1", port, timeout=3)
        assert result.kind is kind, result
        assert result.detail == detail
        assert result.answered
        assert result.elapsed < 1.0  # a greeting is identified without waiting out the budget

    run(main())


def test_ssh_banner_over_ipv6_shows_brackets() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")

    async def main() -> None:
        try:
            ctx = listener(greeter(b"SSH-2.0-test\r\n"), host="::1")
            port = await ctx.__aenter__()
        except OSError:
            pytest.skip("no IPv6 loopback")
        try:
            result = await probe("::1", port, timeout=3)
        finally:
            await ctx.__aexit__(None, None, None)
        assert result.kind is Kind.SSH
        assert result.banner == "SSH-2.0-test"
        assert result.target == f"[::1]:{port}"
        assert result.address == f"[::1]:{port}"

    run(main())


def test_http_is_asked_with_head_after_it_refused_the_tether_hello() -> None:
    async def main() -> None:
        async with listener(http_server) as port:
            result = await probe("127.0.0.1", port, timeout=3)
        assert result.kind is Kind.HTTP, result
        assert result.banner == "HTTP/1.1 200 OK"  # the HEAD's answer, not the 400
        assert result.http_server == "test-httpd/1.0"
        assert result.detail == "HTTP/1.1 200 OK, server test-httpd/1.0"

    run(main())


def test_a_listener_that_never_speaks_is_silent_within_the_timeout() -> None:
    async def main() -> None:
        async with listener(silent) as port:
            result = await probe("127.0.0.1", port, timeout=1.5)
        assert result.kind is Kind.SILENT, result
        assert result.elapsed <= 1.5 + probe_mod.GRACE + 0.1
        assert not result.answered

    run(main())


def test_a_closed_port_is_closed() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused

        async def main() -> None:
            result = await probe("127.0.0.1", port, timeout=2)
            assert result.kind is Kind.CLOSED, result
            assert result.elapsed < 1

        run(main())


# -- TLS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A self-signed certificate: (cert.pem, key.pem, its sha256: fingerprint)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "tether-probe-test"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tether tests"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    tmp = tmp_path_factory.mktemp("tls")
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)  # a tether server refuses a key others can read
    der = cert.public_bytes(serialization.Encoding.DER)
    return cert_path, key_path, "sha256:" + hashlib.sha256(der).hexdigest()


def server_tls(certificate: tuple[Path, Path, str]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(certificate[0], certificate[1])
    return context


SUBJECT = "O=tether tests,CN=tether-probe-test"


def test_tls_reports_certificate_facts(certificate: tuple[Path, Path, str]) -> None:
    async def main() -> None:
        async with listener(silent, tls=server_tls(certificate)) as port:
            result = await probe("127.0.0.1", port, timeout=2)
        assert result.kind is Kind.TLS, result
        assert result.tls is not None
        assert result.tls.version == "TLSv1.3"
        assert result.tls.subject == SUBJECT
        assert result.tls.issuer == SUBJECT
        assert result.tls.fingerprint == certificate[2]
        assert certificate[2] in result.detail and "TLSv1.3" in result.detail
        assert result.elapsed <= 2 + probe_mod.GRACE + 0.1

    run(main())


def test_https_reports_tls_and_the_http_status(certificate: tuple[Path, Path, str]) -> None:
    async def main() -> None:
        async with listener(http_server, tls=server_tls(certificate)) as port:
            result = await probe("127.0.0.1", port, timeout=3)
        assert result.kind is Kind.TLS, result
        assert result.tls is not None and result.tls.fingerprint == certificate[2]
        assert result.banner == "HTTP/1.1 200 OK"
        assert result.http_server == "test-httpd/1.0"
        assert result.detail.endswith("; HTTP/1.1 200 OK, server test-httpd/1.0")

    run(main())


async def fake_tether(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    hello = await reader.readexactly(CLIENT_HELLO_SIZE)
    assert hello == client_hello()
    writer.write(server_hello(1, os.urandom(32)))
    await reader.read()


def test_the_probe_sends_the_client_hello_and_nothing_else() -> None:
    received = bytearray()
    ended = asyncio.Event()

    async def recording(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            received.extend(await reader.readexactly(CLIENT_HELLO_SIZE))
            writer.write(server_hello(1, os.urandom(32)))
            while chunk := await reader.read(4096):
                received.extend(chunk)
        finally:
            ended.set()

    async def main() -> None:
        async with listener(recording) as port:
            result = await probe("127.0.0.1", port, timeout=3)
            await asyncio.wait_for(ended.wait(), 5)
        assert result.kind is Kind.TETHER and result.tether_version == 1
        assert bytes(received) == client_hello()  # no SETUP, no RESUME

    run(main())


def test_a_tether_server_without_a_common_version() -> None:
    async def too_new(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(CLIENT_HELLO_SIZE)
        writer.write(server_hello(0, bytes(32)))  # what a server sends before its REJECT
        await reader.read()

    async def main() -> None:
        async with listener(too_new) as port:
            result = await probe("127.0.0.1", port, timeout=3)
        assert result.kind is Kind.TETHER and result.tether_version == 0
        assert result.detail.startswith("tether server sharing no protocol version with us")

    run(main())


@pytest.mark.parametrize("use_uvloop", [False, True], ids=["asyncio", "uvloop"])
def test_tether_inside_tls(certificate: tuple[Path, Path, str], use_uvloop: bool) -> None:
    async def main() -> None:
        async with listener(fake_tether, tls=server_tls(certificate)) as port:
            result = await probe("127.0.0.1", port, timeout=3)
        assert result.kind is Kind.TETHER, result
        assert result.tether_version == 1
        assert result.tls is not None and result.tls.version == "TLSv1.3"
        assert result.detail == f"tether version 1 over TLSv1.3, fingerprint {certificate[2]}"

    run(main(), uvloop=use_uvloop)


# -- real tether servers: a probe never reaches the backend --------------------------------


@contextmanager
def backend_socket() -> Iterator[socket.socket]:
    """A listening socket the tether server may use as its backend; we watch it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


def assert_never_connected(sock: socket.socket) -> None:
    readable, _, _ = select.select([sock], [], [], 0.2)
    assert not readable, "the probe made the tether server connect to its backend"


TETHER = (sys.executable, "-m", "tether")


def test_real_tether_server_in_clear_is_identified_without_touching_the_backend(
    tmp_path: Path,
) -> None:
    src = str(Path(tether.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": src}  # this worktree's tether, not an installed one
    with backend_socket() as backend:
        port = backend.getsockname()[1]
        log = tmp_path / "server.log"
        with log.open("wb") as err:
            proc = subprocess.Popen(
                [
                    *TETHER,
                    "server",
                    "--listen",
                    "127.0.0.1:0",
                    "--backend",
                    f"127.0.0.1:{port}",
                    "--plaintext",
                ],
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().decode().strip()
            assert line.startswith("READY "), (line, log.read_text())
            host, _, server_port = line.split()[1].rpartition(":")

            async def main() -> None:
                result = await probe(host, int(server_port), timeout=3)
                assert result.kind is Kind.TETHER, result
                assert result.tether_version == PROTOCOL_VERSION
                assert result.tls is None
                assert result.detail == f"tether version {PROTOCOL_VERSION} in clear (no TLS)"

            run(main())
            assert_never_connected(backend)
            assert proc.poll() is None, log.read_text()
        finally:
            proc.terminate()
            proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()


def test_real_tether_server_inside_tls(certificate: tuple[Path, Path, str]) -> None:
    from tether.aio.server import TetherServer

    with backend_socket() as backend:
        config = ServerConfig(
            listen=Address("127.0.0.1", 0),
            backend=Address("127.0.0.1", backend.getsockname()[1]),
            tls_cert=certificate[0],
            tls_key=certificate[1],
        )

        async def main() -> None:
            async with TetherServer(config) as server:
                result = await probe("127.0.0.1", server.addresses[0].port, timeout=3)
            assert result.kind is Kind.TETHER, result
            assert result.tether_version == PROTOCOL_VERSION
            assert result.tls is not None and result.tls.fingerprint == certificate[2]

        run(main())
        assert_never_connected(backend)


# -- several targets ------------------------------------------------------------------------


def test_run_probe_prints_one_line_each_and_fails_if_one_did_not_answer() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]

        async def main() -> None:
            async with listener(greeter(b"SSH-2.0-x\r\n")) as port:
                out = io.StringIO()
                code = await run_probe(
                    [f"127.0.0.1:{port}", f"127.0.0.1:{closed_port}"], timeout=2, out=out
                )
                assert code == 1
                lines = out.getvalue().splitlines()
                assert len(lines) == 2
                assert lines[0].startswith(f"127.0.0.1:{port}  ssh  SSH-2.0-x  (")
                assert lines[1].startswith(f"127.0.0.1:{closed_port}  closed  connection refused")

                out = io.StringIO()
                code = await run_probe([f"127.0.0.1:{port}"], timeout=2, json=True, out=out)
                assert code == 0
                [entry] = json.loads(out.getvalue())
                assert entry["kind"] == "ssh" and entry["answered"] is True
                assert entry["banner"] == "SSH-2.0-x"

        run(main())


def test_run_probe_refuses_a_malformed_target(capsys: pytest.CaptureFixture[str]) -> None:
    async def main() -> None:
        assert await run_probe(["host:port"], timeout=1) == 2

    run(main())
    assert "bad target 'host:port': port must be a number" in capsys.readouterr().err


def test_formatting_layer() -> None:
    result = ProbeResult("h:1", Kind.CLOSED, "connection refused", 0.0123)
    assert format_text(result) == "h:1  closed  connection refused  (12 ms)"
    assert to_dict(result)["answered"] is False
    assert json.loads(to_json(result))["kind"] == "closed"
    assert json.loads(to_json([result, result]))[1]["target"] == "h:1"
