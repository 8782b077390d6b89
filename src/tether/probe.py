"""``tether probe``: what answers on HOST:PORT?

Identifies, within one bounded time budget, a tether server (in clear or inside TLS),
TLS itself (certificate subject, issuer, SHA-256 fingerprint, version), SSH, HTTP,
Citrix ICA (1494) and Citrix CGP (2598), and otherwise shows the first bytes the peer
sent. Connection failures are named plainly: closed (refused), filtered (no answer),
unreachable (no route, or a name that does not resolve).

The probe is safe to point at a production tether server: it sends only the 10-byte
client hello and reads the 41-byte server hello (docs/protocol.md, "Link hello"). It
never sends SETUP or RESUME, so a probe never makes a server open a backend connection.

Strategy, at most three connections to the one address the name resolved to:

1. connect, listen briefly for a server-first greeting (SSH, ICA, CGP); if none, send the
   tether client hello and read the answer. The tether magic means tether in clear.
2. if the peer answered with a TLS record or hung up: a TLS handshake (verification off:
   we identify, we do not trust), then the tether hello inside it.
3. if still nothing: a minimal ``HEAD / HTTP/1.0`` (inside TLS when TLS answered).

What the peer sent is classified by :func:`classify`, a pure function over bytes.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import hashlib
import http.client
import io
import ipaddress
import json as jsonlib
import socket
import ssl
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, TextIO, cast

from .errors import ProtocolError
from .protocol.codes import CloseCode
from .protocol.frames import (
    FRAME_HEADER_SIZE,
    MAGIC,
    PROTOCOL_VERSION,
    SERVER_HELLO_SIZE,
    FrameType,
    client_hello,
    parse_server_hello,
)

__all__ = [
    "DEFAULT_PORT",
    "Kind",
    "ProbeResult",
    "TlsInfo",
    "classify",
    "connect_failure",
    "format_text",
    "parse_target",
    "probe",
    "run_probe",
    "to_dict",
    "to_json",
]

DEFAULT_PORT = 2598  # a target without a port is a tether (CGP) port

GREETING_WAIT = 0.4  # how long a server-first protocol gets to greet, at most
SETTLE = 0.3  # once a peer has spoken, how long to wait for the rest of its answer
GRACE = 0.1  # the hard bound on a probe is its timeout plus this; steps aim for the timeout
FIRST_BYTES_SHOWN = 32  # bytes of an unknown greeting shown in hex
MAX_HEAD_RESPONSE = 16 * 1024  # bytes of an HTTP response read before giving up on its end
MAX_BANNER = 255  # an SSH identification line is at most 255 bytes (RFC 4253, 4.2)

ICA_GREETING = b"\x7f\x7fICA\x00"  # what a Citrix ICA listener (1494) sends first
CGP_GREETING = b"\x1aCGP/01"  # what a Citrix CGP listener (2598) sends first
SSH_PREFIX = b"SSH-"
HTTP_PREFIX = b"HTTP/"
_TLS_CONTENT_TYPES = frozenset((0x14, 0x15, 0x16, 0x17))  # change_cipher_spec .. app data


class Kind(enum.StrEnum):
    """What answered. The first group answered; the rest did not (exit code 1)."""

    TETHER = "tether"
    TLS = "tls"
    SSH = "ssh"
    HTTP = "http"
    ICA = "ica"
    CGP = "cgp"
    OTHER = "other"  # sent bytes we do not recognise
    SILENT = "silent"  # accepted the connection and said nothing
    CLOSED = "closed"  # connection refused
    FILTERED = "filtered"  # no answer to the connection attempt
    UNREACHABLE = "unreachable"  # no route, or the name does not resolve
    ERROR = "error"  # anything else that kept us from connecting


_ANSWERED = frozenset((Kind.TETHER, Kind.TLS, Kind.SSH, Kind.HTTP, Kind.ICA, Kind.CGP, Kind.OTHER))


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """The TLS facts of a peer: protocol version and its leaf certificate."""

    version: str  # as ssl reports it: "TLSv1.3"
    cipher: str
    subject: str  # RFC 4514: "CN=tether.example.com,O=Example"
    issuer: str
    fingerprint: str  # "sha256:" + hex of the SHA-256 of the DER certificate
    not_after: str  # ISO 8601 UTC, "?" when the certificate could not be parsed


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One probe's finding. ``detail`` is the one human line; the rest are its facts."""

    target: str  # as given, normalised: "host:port" or "[v6]:port"
    kind: Kind
    detail: str
    elapsed: float  # seconds
    address: str | None = None  # the address that was connected to
    tether_version: int | None = None  # 0: the server shares no version with us
    tls: TlsInfo | None = None
    banner: str | None = None  # SSH identification line, HTTP status line
    http_server: str | None = None  # HTTP ``Server`` header
    first_bytes: str | None = None  # hex of the first bytes the peer sent (at most 32)

    @property
    def answered(self) -> bool:
        """True when something spoke on the port (anything but silence or no connection)."""
        return self.kind in _ANSWERED


# -- classification: pure functions over bytes and exceptions -------------------------


_SIGNATURES: tuple[tuple[bytes, Kind], ...] = (
    (MAGIC, Kind.TETHER),
    (ICA_GREETING, Kind.ICA),
    (CGP_GREETING, Kind.CGP),
    (SSH_PREFIX, Kind.SSH),
    (HTTP_PREFIX, Kind.HTTP),
)


def classify(data: bytes) -> Kind | None:
    """What the first bytes a peer sent look like, or None when they are too few to tell.

    None means ``data`` is empty or a strict prefix of a known signature: read more
    (on EOF or timeout, such a prefix is :attr:`Kind.OTHER`). A TLS record header
    (content type 20-23, version 3.x) is :attr:`Kind.TLS`: typically an alert sent back
    because we spoke clear text to a TLS server.
    """
    if not data:
        return None
    undecided = False
    for signature, kind in _SIGNATURES:
        n = min(len(data), len(signature))
        if data[:n] == signature[:n]:
            if len(data) >= len(signature):
                return kind
            undecided = True
    if data[0] in _TLS_CONTENT_TYPES:
        if len(data) < 3:
            if len(data) == 1 or data[1] == 0x03:
                undecided = True
        elif data[1] == 0x03 and data[2] <= 0x04:
            return Kind.TLS
    return None if undecided else Kind.OTHER


def _tls_required(data: bytes) -> bool:
    """A server hello followed by REJECT(TLS_REQUIRED): a TLS server answering in clear."""
    rest = data[SERVER_HELLO_SIZE:]
    if len(rest) < FRAME_HEADER_SIZE + 2 or rest[0] != FrameType.REJECT:
        return False
    code = int.from_bytes(rest[FRAME_HEADER_SIZE : FRAME_HEADER_SIZE + 2], "big")
    return code == CloseCode.TLS_REQUIRED


def _complete(kind: Kind | None, data: bytes) -> bool:
    """Whether ``data`` holds all we want to read of an answer of this kind."""
    if kind is None:
        return False
    if kind is Kind.TETHER:
        return len(data) >= SERVER_HELLO_SIZE
    if kind is Kind.SSH:
        return b"\n" in data or len(data) >= MAX_BANNER
    if kind is Kind.HTTP:
        return b"\r\n\r\n" in data or b"\n\n" in data or len(data) >= MAX_HEAD_RESPONSE
    if kind is Kind.OTHER:
        return len(data) >= FIRST_BYTES_SHOWN
    return True


_EAI_TEXT: dict[int, str] = {
    socket.EAI_NONAME: "name does not resolve",
    socket.EAI_AGAIN: "temporary failure in name resolution (is a DNS server reachable?)",
    socket.EAI_FAIL: "name resolution failed (the DNS server gave a permanent error)",
    socket.EAI_SERVICE: "bad port",
    socket.EAI_FAMILY: "address family not supported",
}
for _name, _text in (
    ("EAI_NODATA", "name has no address"),
    ("EAI_ADDRFAMILY", "name has no address"),
):
    if hasattr(socket, _name):
        _EAI_TEXT[getattr(socket, _name)] = _text

_UNREACHABLE_ERRNOS = frozenset(
    (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.EADDRNOTAVAIL)
)


def connect_failure(host: str, exc: BaseException, timeout: float) -> tuple[Kind, str]:
    """Classify why a connection (or the name lookup before it) failed, in plain words."""
    if isinstance(exc, socket.gaierror):
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        text = _EAI_TEXT.get(code) if code is not None else None
        if text is None:
            raw = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
            text = raw if raw and not raw.startswith("Unknown error") else "name lookup failed"
            if code is not None and text == "name lookup failed":
                text += f" (getaddrinfo error {code})"
        return Kind.UNREACHABLE, f"{host}: {text}"
    if isinstance(exc, TimeoutError):
        return Kind.FILTERED, f"no answer within {timeout:g} s (filtered, or the host is down)"
    if isinstance(exc, ConnectionRefusedError):
        return Kind.CLOSED, "connection refused (nothing listens on this port)"
    if isinstance(exc, OSError):
        text = exc.strerror or str(exc) or type(exc).__name__
        text = text[0].lower() + text[1:] if text else text
        if exc.errno in _UNREACHABLE_ERRNOS:
            return Kind.UNREACHABLE, text
        return Kind.ERROR, text
    return Kind.ERROR, f"{type(exc).__name__}: {exc}"


def parse_http_head(data: bytes) -> tuple[str, str | None] | None:
    """``(status line, Server header)`` of an HTTP response's head, or None if not HTTP."""
    if not data.startswith(HTTP_PREFIX):
        return None
    status_line = data.split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")

    class _Bytes:  # what http.client needs of a socket: makefile()
        def makefile(self, mode: str, *args: Any, **kwargs: Any) -> io.BytesIO:
            return io.BytesIO(data)

    response = http.client.HTTPResponse(cast(socket.socket, _Bytes()), method="HEAD")
    try:
        response.begin()
    except (http.client.HTTPException, ValueError):
        return status_line, None
    finally:
        response.close()
    return status_line, response.getheader("Server")


def parse_target(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``HOST`` or a bare IPv6 address. Raises ValueError."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad target {text!r}: expected [ADDRESS]:PORT")
        port_text = rest[1:] if rest else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:  # a name, an IPv4 address or a bare IPv6 address: no port
        host, port_text = text, ""
    if not host:
        raise ValueError(f"bad target {text!r}: no host")
    if not port_text:
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad target {text!r}: port must be a number") from None
    if not 0 < port <= 65535:
        raise ValueError(f"bad target {text!r}: port out of range")
    return host, port


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _tls_info(obj: ssl.SSLObject | None) -> TlsInfo:
    version = cipher = "?"
    der = None
    if obj is not None:
        version = obj.version() or "?"
        cipher = (obj.cipher() or ("?",))[0]
        der = obj.getpeercert(binary_form=True)
    if not der:
        return TlsInfo(version, cipher, "?", "?", "?", "?")
    fingerprint = "sha256:" + hashlib.sha256(der).hexdigest()
    try:
        from cryptography import x509

        cert = x509.load_der_x509_certificate(der)
        subject = cert.subject.rfc4514_string() or "(empty)"
        issuer = cert.issuer.rfc4514_string() or "(empty)"
        not_after = cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    except Exception:  # an unparseable certificate is still a fact worth a fingerprint
        subject = issuer = not_after = "?"
    return TlsInfo(version, cipher, subject, issuer, fingerprint, not_after)


def _tls_text(tls: TlsInfo) -> str:
    return (
        f"{tls.version}, subject {tls.subject}, issuer {tls.issuer}, fingerprint {tls.fingerprint}"
    )


def _tether_text(version: int) -> str:
    if version == 0:
        return f"tether server sharing no protocol version with us (we offered {PROTOCOL_VERSION})"
    return f"tether version {version}"


# -- the probe -------------------------------------------------------------------------


class _Budget:
    def __init__(self, timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.start = self.loop.time()
        self.deadline = self.start + timeout

    def left(self) -> float:
        return max(0.0, self.deadline - self.loop.time())

    def elapsed(self) -> float:
        return self.loop.time() - self.start


@dataclass(frozen=True, slots=True)
class _Answer:
    data: bytes
    kind: Kind | None  # classify(data) once reading stopped; None: nothing, or a prefix
    closed: bool  # the peer closed (FIN or RST)


async def _read_answer(reader: asyncio.StreamReader, wait: float) -> _Answer:
    """Read until :func:`classify` can tell and the answer is complete, EOF, or ``wait``."""
    loop = asyncio.get_running_loop()
    until = loop.time() + wait
    data = b""
    closed = False
    while not _complete(classify(data), data):
        if data:  # the peer has spoken: the rest of its answer comes quickly or not at all
            until = min(until, loop.time() + SETTLE)
        left = until - loop.time()
        if left <= 0:
            break
        try:
            async with asyncio.timeout(left):  # CONTRIBUTING.md C6
                chunk = await reader.read(4096)
        except TimeoutError:
            break
        except (ConnectionError, ssl.SSLError, OSError):
            closed = True
            break
        if not chunk:
            closed = True
            break
        data += chunk
    return _Answer(data, classify(data), closed)


async def _connect(
    address: tuple[Any, ...],
    family: int,
    *,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect one TCP stream (and TLS over it) to a resolved ``address``."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    if tls is None:
        return await asyncio.open_connection(sock=sock)
    # "" (no SNI) for an address: asyncio insists on a name when it has no host
    return await asyncio.open_connection(sock=sock, ssl=tls, server_hostname=server_hostname or "")


def _abort(writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()


def _tls_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # we identify the peer; we do not trust it
    return context


class _Prober:
    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.target = _show(host, port)
        self.budget = _Budget(timeout)
        self.address: tuple[Any, ...] | None = None
        self.family = socket.AF_INET
        self.connected = False
        self.first: _Answer | None = None  # what connection 1 heard, should time run out

    def result(self, kind: Kind, detail: str, **facts: Any) -> ProbeResult:
        shown = _show(str(self.address[0]), int(self.address[1])) if self.address else None
        return ProbeResult(
            self.target, kind, detail, round(self.budget.elapsed(), 4), shown, **facts
        )

    async def run(self) -> ProbeResult:
        try:
            async with asyncio.timeout(self.budget.left() + GRACE):
                return await self._run()
        except TimeoutError:
            if self.first is not None and (self.first.data or self.first.closed):
                return self._identify(self.first, said_hello=True)
            if self.connected:
                return self.result(Kind.SILENT, "accepted the connection but sent nothing")
            return self.result(*connect_failure(self.host, TimeoutError(), self.timeout))

    async def _resolve_and_connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        if not infos:
            raise socket.gaierror(socket.EAI_NONAME, "name does not resolve")
        error: OSError | None = None
        for family, _type, _proto, _name, address in infos:
            self.family, self.address = family, address
            try:
                return await _connect(address, family)
            except OSError as exc:
                error = error or exc
        assert error is not None
        raise error

    async def _run(self) -> ProbeResult:
        try:
            reader, writer = await self._resolve_and_connect()
        except (OSError, TimeoutError) as exc:
            return self.result(*connect_failure(self.host, exc, self.timeout))
        self.connected = True
        try:
            greeting = await _read_answer(reader, min(GREETING_WAIT, self.budget.left() / 4))
            if greeting.data or greeting.closed:
                return self._identify(greeting, said_hello=False)
            writer.write(client_hello())
            answer = await _read_answer(reader, self.budget.left() / 2)
        finally:
            _abort(writer)
        self.first = answer
        if answer.kind in (Kind.TLS, None) and (answer.closed or answer.data):
            return await self._try_tls(answer)
        if answer.kind is Kind.TETHER and _tls_required(answer.data):
            return await self._try_tls(answer)  # a TLS tether server told us so, in clear
        if answer.kind is Kind.HTTP or not answer.data:
            return await self._try_http(None, fallback=answer)
        return self._identify(answer, said_hello=True)

    def _identify(
        self, answer: _Answer, *, said_hello: bool, tls: TlsInfo | None = None
    ) -> ProbeResult:
        """Report what one answer shows (no more connections)."""
        data, kind = answer.data, answer.kind
        prefix = f"{_tls_text(tls)}; " if tls else ""
        hexed = data[:FIRST_BYTES_SHOWN].hex()
        if not data:
            if answer.closed:
                what = "closed the connection" + (
                    " on our tether hello" if said_hello else " without a word"
                )
            else:
                what = "accepted the connection but sent nothing"
            if tls:
                return self.result(Kind.TLS, _tls_text(tls), tls=tls)
            return self.result(Kind.SILENT, what)
        if kind is Kind.TETHER:
            try:
                version, _nonce = parse_server_hello(data[:SERVER_HELLO_SIZE])
            except ProtocolError:  # what the peer said is not a server hello after all
                version = None
            if version is not None:
                where = (
                    f"over {tls.version}, fingerprint {tls.fingerprint}"
                    if tls
                    else "in clear (no TLS)"
                )
                return self.result(
                    Kind.TETHER, f"{_tether_text(version)} {where}", tether_version=version, tls=tls
                )
            kind = Kind.OTHER  # the magic, then the peer hung up
        if kind is Kind.SSH:
            banner = data.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "replace")
            return self.result(Kind.SSH, prefix + banner, banner=banner, tls=tls)
        if kind is Kind.ICA:
            return self.result(
                Kind.ICA, prefix + f"Citrix ICA greeting ({hexed})", first_bytes=hexed, tls=tls
            )
        if kind is Kind.CGP:
            return self.result(
                Kind.CGP, prefix + f"Citrix CGP greeting ({hexed})", first_bytes=hexed, tls=tls
            )
        if kind is Kind.HTTP:
            head = parse_http_head(data)
            if head is not None:
                status, server = head
                text = status + (f", server {server}" if server else "")
                return self.result(
                    Kind.TLS if tls else Kind.HTTP,
                    prefix + text,
                    banner=status,
                    http_server=server,
                    tls=tls,
                )
        if kind is Kind.TLS and not tls:
            return self.result(
                Kind.TLS,
                f"a TLS record ({hexed}), but no TLS handshake completed",
                first_bytes=hexed,
            )
        return self.result(
            Kind.TLS if tls else Kind.OTHER,
            prefix + f"first bytes {hexed}",
            first_bytes=hexed,
            tls=tls,
        )

    async def _try_tls(self, clear: _Answer) -> ProbeResult:
        """Connection 2: a TLS handshake, then the tether hello inside."""
        context = _tls_context()
        hostname = None if _is_ip(self.host) else self.host
        assert self.address is not None
        try:  # leave part of the budget for the HTTP attempt should TLS fail
            async with asyncio.timeout(self.budget.left() * 0.6):
                reader, writer = await _connect(
                    self.address, self.family, tls=context, server_hostname=hostname
                )
        except (OSError, EOFError):  # ssl.SSLError, ConnectionError, TimeoutError included
            return await self._try_http(None, fallback=clear)
        try:
            obj = writer.get_extra_info("ssl_object")
            tls = _tls_info(cast("ssl.SSLObject | None", obj))
            writer.write(client_hello())
            answer = await _read_answer(reader, self.budget.left() / 2)
        finally:
            _abort(writer)
        if answer.kind is Kind.TETHER:
            return self._identify(answer, said_hello=True, tls=tls)
        if answer.kind is Kind.HTTP or not answer.data:
            return await self._try_http(tls, fallback=answer)
        return self._identify(answer, said_hello=True, tls=tls)

    async def _try_http(self, tls: TlsInfo | None, *, fallback: _Answer) -> ProbeResult:
        """Connection 3: ``HEAD / HTTP/1.0`` (inside TLS when TLS answered)."""
        assert self.address is not None
        hostname = None if _is_ip(self.host) else self.host
        request = f"HEAD / HTTP/1.0\r\nHost: {self.target}\r\nUser-Agent: tether-probe\r\n\r\n"
        answer: _Answer | None = None
        if self.budget.left() > 0:
            try:
                async with asyncio.timeout(self.budget.left()):
                    reader, writer = await _connect(
                        self.address,
                        self.family,
                        tls=_tls_context() if tls else None,
                        server_hostname=hostname,
                    )
            except (OSError, EOFError):
                pass
            else:
                try:
                    writer.write(request.encode("ascii", "replace"))
                    answer = await _read_answer(reader, self.budget.left())
                finally:
                    _abort(writer)
        if answer is not None and answer.kind is Kind.HTTP:
            return self._identify(answer, said_hello=False, tls=tls)
        if answer is not None and answer.data and not fallback.data:
            return self._identify(answer, said_hello=False, tls=tls)
        if tls is None and not fallback.data and not fallback.closed:
            return self.result(
                Kind.SILENT,
                "accepted the connection but sent nothing, and answered neither a tether "
                "hello nor an HTTP request",
            )
        return self._identify(fallback, said_hello=True, tls=tls)


async def probe(host: str, port: int, *, timeout: float = 3.0) -> ProbeResult:  # noqa: ASYNC109
    """Identify what answers on ``host:port`` within ``timeout`` seconds. Never raises
    for network reasons: every failure is a :class:`ProbeResult` of its own kind."""
    prober = _Prober(host, port, timeout)
    try:
        return await prober.run()
    except Exception as exc:  # pragma: no cover - a probe reports, it does not crash the batch
        return prober.result(*connect_failure(host, exc, timeout))


# -- formatting -----------------------------------------------------------------------


def format_text(result: ProbeResult) -> str:
    """One line: target, kind, detail and the time it took."""
    return (
        f"{result.target}  {result.kind.value}  {result.detail}  ({result.elapsed * 1000:.0f} ms)"
    )


def to_dict(result: ProbeResult) -> dict[str, Any]:
    """A JSON-ready dict of ``result`` (``answered`` included)."""
    out = asdict(result)
    out["kind"] = result.kind.value
    out["answered"] = result.answered
    return out


def to_json(result: ProbeResult | Sequence[ProbeResult]) -> str:
    """One result as a JSON object, several as a JSON array."""
    if isinstance(result, ProbeResult):
        return jsonlib.dumps(to_dict(result))
    return jsonlib.dumps([to_dict(r) for r in result], indent=2)


async def run_probe(
    targets: list[str],
    *,
    timeout: float = 3.0,  # noqa: ASYNC109 - the budget of each probe, reported in its result
    json: bool = False,
    out: TextIO | None = None,
) -> int:
    """Probe ``targets`` concurrently and print one line each (or a JSON array).

    Exit code: 0 if every target answered, 1 otherwise, 2 for a malformed target.
    """
    stream = out if out is not None else sys.stdout
    try:
        parsed = [parse_target(t) for t in targets]
    except ValueError as exc:
        print(f"tether probe: error: {exc}", file=sys.stderr)
        return 2
    if not parsed:
        print("tether probe: error: no target given", file=sys.stderr)
        return 2
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(probe(h, p, timeout=timeout)) for h, p in parsed]
    results = [task.result() for task in tasks]
    if json:
        print(to_json(results), file=stream)
    else:
        for result in results:
            print(format_text(result), file=stream)
    stream.flush()
    return 0 if all(r.answered for r in results) else 1
