"""TLS on every link: the server's identity, the contexts, and how a client trusts a server.

Issue 8: a link is TLS 1.3 by default. The server has an identity even when nobody
configured one: on first start it creates an EC P-256 key and a self-signed certificate
in its state directory and reuses them afterwards. A client trusts a server in one of
three ways, strongest first:

* ``--tls-ca FILE``: ordinary X.509 verification with that bundle, host name checked;
* ``--server-fingerprint sha256:HEX``: the certificate must be exactly the pinned one;
* trust on first use, like OpenSSH: the first certificate a ``HOST:PORT`` presents is
  recorded in the known servers file, and a later different one is refused
  (``--strict`` refuses servers not already recorded).

Without ``--tls-ca`` the handshake verifies nothing (``CERT_NONE``): the pin or the known
servers file is checked on the DER certificate once the handshake is done and before the
first byte of tether's own handshake is written (:func:`create_tls_connection`). That
check also holds for resumed TLS sessions: OpenSSL keeps the peer's certificate in the
session.

TLS session resumption: asyncio's ``loop.create_connection`` has no ``session=``, but
both asyncio's and uvloop's SSL protocol call ``context.wrap_bio()`` for each
connection, in the connecting task's context. :func:`client_context` returns a context
whose ``wrap_bio`` takes the session from a context variable that
:func:`create_tls_connection` sets from a :class:`SessionCache`. Resumption saves the
server a signature and the client a certificate check; it saves no round trip (TLS 1.3
is one round trip either way, and Python's ssl has no 0-RTT).

Only the standard library's ``ssl``, ``hashlib`` and ``os`` and the ``cryptography``
package do any cryptography here.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime
import hashlib
import ipaddress
import logging
import os
import socket
import ssl
import stat
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import TetherError
from .files import append_line

__all__ = [
    "CERT_FILE",
    "KEY_FILE",
    "KNOWN_SERVERS_FILE",
    "ServerIdentity",
    "SessionCache",
    "TLSConfigError",
    "TrustError",
    "TrustResult",
    "check_private_file",
    "client_context",
    "configured_identity",
    "create_tls_connection",
    "default_known_servers",
    "default_state_dir",
    "fingerprint",
    "fingerprint_of_file",
    "load_identity",
    "load_or_create_identity",
    "parse_fingerprint",
    "server_context",
    "server_key",
    "verify_server",
]

CERT_FILE = "server.crt"  # in the state directory
KEY_FILE = "server.key"
KNOWN_SERVERS_FILE = "known_servers"
CERT_VALIDITY = datetime.timedelta(days=3653)  # about ten years; only --tls-ca mode checks dates
FINGERPRINT_PREFIX = "sha256:"
_SHA256_HEX_LEN = 64


class TLSConfigError(TetherError):
    """A certificate, key or CA file cannot be used; the message names the file and the fix."""


class TrustError(TetherError):
    """The client must not trust this server: pin or known servers mismatch, or unknown."""


# -- where things live ---------------------------------------------------------------------


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/tether``, else ``/var/lib/tether`` for root, else
    ``~/.local/state/tether``: where the server keeps its identity."""
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg:
        return Path(xdg) / "tether"
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/tether")
    return Path.home() / ".local" / "state" / "tether"


def default_known_servers() -> Path:
    """``$XDG_CONFIG_HOME/tether/known_servers``, else ``~/.config/tether/known_servers``."""
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg else Path.home() / ".config"
    return base / "tether" / KNOWN_SERVERS_FILE


# -- fingerprints --------------------------------------------------------------------------


def fingerprint(der: bytes) -> str:
    """``sha256:`` and the lowercase hex SHA-256 of a DER certificate."""
    return FINGERPRINT_PREFIX + hashlib.sha256(der).hexdigest()


def fingerprint_of_file(cert_path: Path) -> str:
    """The fingerprint of the first (leaf) certificate of a PEM file."""
    return fingerprint(_read_leaf_der(cert_path))


def parse_fingerprint(text: str) -> str:
    """Normalise ``sha256:HEX`` (any case, bytes optionally separated by colons) to the
    form :func:`fingerprint` returns. Raises ValueError with the expected form."""
    algorithm, sep, digits = text.strip().partition(":")
    if sep and algorithm.lower() == "sha256":
        digits = digits.replace(":", "").lower()
        if len(digits) == _SHA256_HEX_LEN and all(c in "0123456789abcdef" for c in digits):
            return FINGERPRINT_PREFIX + digits
    raise ValueError(
        f"bad fingerprint {text!r}: expected sha256: and 64 hex digits"
        " (as printed by the tether server at start)"
    )


# -- the server's identity -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerIdentity:
    """The files of a server's certificate (chain, leaf first) and key, and the leaf's
    fingerprint, which clients pin or record."""

    cert_path: Path
    key_path: Path
    fingerprint: str


def load_identity(cert_path: Path, key_path: Path) -> ServerIdentity:
    """Check and load a certificate and its key. Raises TLSConfigError if the key is
    readable by others, the files cannot be read, or they do not belong together."""
    check_private_file(key_path)
    _load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert_path, key_path)
    return ServerIdentity(cert_path, key_path, fingerprint_of_file(cert_path))


def configured_identity(
    cert_path: Path | None, key_path: Path | None, state_dir: Path | None, role: str
) -> ServerIdentity:
    """A server's or gateway's identity: ``cert_path`` and ``key_path`` when both are given,
    else the one made (once) in ``state_dir`` (default: :func:`default_state_dir`), whose
    creation is logged on ``tether.ROLE``."""
    if cert_path is not None and key_path is not None:
        return load_identity(cert_path, key_path)
    state = state_dir or default_state_dir()
    identity, created = load_or_create_identity(state)
    if created:
        logging.getLogger(f"tether.{role}").info(
            "created this %s's TLS key and certificate in %s", role, state
        )
    return identity


def load_or_create_identity(state_dir: Path) -> tuple[ServerIdentity, bool]:
    """The server's own identity in ``state_dir``, created on first start (the bool is
    True then: the caller logs the new fingerprint).

    The key is written to a private temporary file (created 0600, never readable by
    others) and linked into place only when complete, so that concurrent first starts
    agree on one key. A key without a certificate (a crash between the two) gets a new
    certificate; a certificate that does not match its key is an error, not replaced.
    """
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        why = exc.strerror or str(exc)  # the OS's words, not "[Errno 2] ...: '/x'" (E5)
        raise TLSConfigError(f"cannot create state directory {state_dir}: {why}") from None
    cert_path, key_path = state_dir / CERT_FILE, state_dir / KEY_FILE
    created = False
    if not key_path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        created = _publish(key_path, pem, 0o600, replace=False)
    check_private_file(key_path)
    key = _read_key(key_path)
    if created or not cert_path.exists():
        pem = _self_signed(key).public_bytes(serialization.Encoding.PEM)
        _publish(cert_path, pem, 0o644, replace=True)  # every writer writes one for this key
        created = True
    try:
        load_identity(cert_path, key_path)
    except TLSConfigError as exc:
        raise TLSConfigError(
            f"{exc}; to create a new server identity (clients will have to trust the new"
            f" fingerprint), delete {cert_path} and {key_path}"
        ) from None
    return ServerIdentity(cert_path, key_path, fingerprint_of_file(cert_path)), created


def check_private_file(path: Path, what: str = "private key") -> None:
    """Refuse a private key (or another secret, ``what``) that group or others can access
    (POSIX; not on Windows)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise TLSConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    if os.name == "posix" and mode & 0o077:
        raise TLSConfigError(
            f"{what} {path} is accessible by group or others"
            f" (mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
        )


def _publish(path: Path, data: bytes, mode: int, *, replace: bool) -> bool:
    """Write ``data`` to ``path`` whole or not at all; False if ``replace`` is off and
    another process got there first (its file is kept)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # fails if the name exists: no race can replace a key
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links
            if path.exists():
                return False
            os.replace(tmp, path)
        return True
    except OSError as exc:
        raise TLSConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _self_signed(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """A certificate for ``key`` naming this host, ``localhost`` and the loopback addresses,
    usable as its own CA file by a client (``--tls-ca server.crt``)."""
    host = socket.gethostname()
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    if host and host.isascii() and host.lower() != "localhost":
        names.insert(0, x509.DNSName(host))
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    common_name = host if host and host.isascii() and len(host) <= 64 else "tether server"
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))  # tolerate clocks a bit behind
        .not_valid_after(now + CERT_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _read_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise TLSConfigError(f"cannot load private key {path}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TLSConfigError(f"private key {path} is not the EC key tether creates")
    return key


def _read_leaf_der(cert_path: Path) -> bytes:
    try:
        return x509.load_pem_x509_certificate(cert_path.read_bytes()).public_bytes(
            serialization.Encoding.DER
        )
    except OSError as exc:
        raise TLSConfigError(f"cannot read certificate {cert_path}: {exc.strerror}") from None
    except ValueError as exc:
        raise TLSConfigError(f"{cert_path} is not a PEM certificate: {exc}") from None


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal and hang a daemon.
    raise TLSConfigError("encrypted private keys are not supported")


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path | None) -> None:
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except TLSConfigError as exc:
        raise TLSConfigError(f"{key or cert}: {exc}; decrypt it first") from None
    except FileNotFoundError as exc:
        raise TLSConfigError(f"cannot read {exc.filename or cert}: no such file") from None
    except (OSError, ssl.SSLError) as exc:
        what = f"{cert} and {key}" if key else f"{cert}"
        raise TLSConfigError(
            f"cannot use {what} as certificate and private key ({exc}); the certificate"
            " file must hold PEM certificates, leaf first, and the key must be its key"
        ) from None


def _load_ca(context: ssl.SSLContext, ca: Path) -> None:
    try:
        context.load_verify_locations(cafile=ca)
    except FileNotFoundError:
        raise TLSConfigError(f"cannot read CA file {ca}: no such file") from None
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot load CA file {ca} (PEM certificates): {exc}") from None


# -- contexts ------------------------------------------------------------------------------


class _SSLObject(ssl.SSLObject):
    """An ``SSLObject`` whose ``read``, ``write`` and ``pending`` are the OpenSSL
    object's own (C) methods rather than ``ssl.SSLObject``'s Python wrappers around them.

    The event loop's TLS layer (uvloop's and asyncio's SSLProtocol) calls the three for
    every record, with the arguments the C methods take (``read(n)``, ``read(n, buffer)``,
    ``write(data)``, ``pending()``); the wrappers cost an interpreted frame each, four per
    message in each process (``python -m benchmarks.cpu_per_rtt --calls --tls``). Nothing
    else changes: the handshake, certificates and shutdown go through ``ssl.SSLObject``.
    ``_create`` and ``_sslobj`` are ssl.py's own: where they are missing (another Python),
    the object keeps the wrappers."""

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> _SSLObject:
        self: _SSLObject = super()._create(*args, **kwargs)  # type: ignore[misc]
        native = getattr(self, "_sslobj", None)
        if native is not None:
            self.read = native.read  # type: ignore[method-assign]
            self.write = native.write  # type: ignore[method-assign]
            self.pending = native.pending  # type: ignore[method-assign]
        return self


def server_context(identity: ServerIdentity, *, client_ca: Path | None = None) -> ssl.SSLContext:
    """TLS 1.3 only, this identity; with ``client_ca``, clients must present a certificate
    that CA signed (mutual TLS). Session tickets stay on (OpenSSL sends two per handshake),
    so reconnecting clients resume."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.sslobject_class = _SSLObject
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    _load_chain(context, identity.cert_path, identity.key_path)
    if client_ca is not None:
        _load_ca(context, client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


_RESUME: contextvars.ContextVar[ssl.SSLSession | None] = contextvars.ContextVar(
    "tether_tls_resume", default=None
)


class _ClientContext(ssl.SSLContext):
    """A client context that resumes the session :func:`create_tls_connection` chose.

    asyncio (sslproto.SSLProtocol.__init__) and uvloop (SSLProtocol._start_handshake,
    run in the context copied when create_connection was called) both call
    ``wrap_bio`` in the connecting task's context, where ``_RESUME`` is set.
    """

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if session is None and not server_side:
            session = _RESUME.get()
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)


def client_context(
    *, ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """TLS 1.3 only. With ``ca``: the server's certificate must chain to that bundle and
    name the host (``server_hostname``). Without: the handshake verifies nothing, and the
    caller must check the certificate with :func:`verify_server` (as
    :func:`create_tls_connection` does). ``cert`` and ``key``: the client's certificate
    for mutual TLS (``key`` None: the key is in ``cert``)."""
    context = _ClientContext(ssl.PROTOCOL_TLS_CLIENT)
    context.sslobject_class = _SSLObject
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    if ca is not None:
        _load_ca(context, ca)  # PROTOCOL_TLS_CLIENT: CERT_REQUIRED and check_hostname
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert is not None:
        _load_chain(context, cert, key)
        check_private_file(key or cert)
    elif key is not None:
        raise TLSConfigError(f"private key {key} given without its certificate")
    return context


# -- session resumption --------------------------------------------------------------------


# CPython before the fix of gh-116810 (3.12.8 and 3.13.1; never in 3.11) leaks a copy of
# the session, about 6 KiB, at every read of ``SSLObject.session`` (docs/fuzzing.md, F3).
# Where it does, a process reads it at most SESSION_READ_LIMIT times (about 6 MiB), then
# resumes no more: a full handshake costs the server a signature, not a round trip.
SESSION_GETTER_LEAKS = sys.version_info < (3, 12, 8) or (3, 13) <= sys.version_info < (3, 13, 1)
SESSION_READ_LIMIT = 1024


class _Latest:
    """One server's latest connection, until its session (with a ticket) is read; then
    that session."""

    __slots__ = ("context", "session", "ssl_object")

    def __init__(self, ssl_object: ssl.SSLObject) -> None:
        self.ssl_object: ssl.SSLObject | None = ssl_object
        self.context = ssl_object.context
        self.session: ssl.SSLSession | None = None


class SessionCache:
    """The latest TLS connection to each server (``host``, ``port``), from which a
    reconnect takes a session ticket.

    It keeps the SSL object until its session is first needed (TLS 1.3 tickets arrive
    after the handshake) and reads the session then; once one with a ticket is read, it
    keeps that session and lets the SSL object go, and every later attempt to the server
    resumes with it until a newer connection replaces it. Reads are counted process-wide
    (:data:`SESSION_READ_LIMIT`, where :data:`SESSION_GETTER_LEAKS`). Bounded: the least
    recently used server goes first.
    """

    reads = 0  # SSLObject.session reads by every cache of the process

    def __init__(self, max_servers: int = 64) -> None:
        self._max = max_servers
        self._latest: OrderedDict[tuple[str, int], _Latest] = OrderedDict()

    def __len__(self) -> int:
        return len(self._latest)

    def remember(self, host: str, port: int, ssl_object: ssl.SSLObject) -> None:
        key = (host.lower(), port)
        self._latest[key] = _Latest(ssl_object)
        self._latest.move_to_end(key)
        while len(self._latest) > self._max:
            self._latest.popitem(last=False)

    def forget(self, host: str, port: int) -> None:
        self._latest.pop((host.lower(), port), None)

    def session(self, host: str, port: int, context: ssl.SSLContext) -> ssl.SSLSession | None:
        """A session to resume with ``context``, or None (a full handshake follows)."""
        latest = self._latest.get((host.lower(), port))
        if latest is None or latest.context is not context:
            return None  # OpenSSL refuses a session made under another context
        session = latest.session
        if session is None:
            ssl_object = latest.ssl_object
            assert ssl_object is not None  # let go of only once a session is kept
            if SESSION_GETTER_LEAKS and SessionCache.reads >= SESSION_READ_LIMIT:
                if SessionCache.reads == SESSION_READ_LIMIT:
                    SessionCache.reads += 1  # say it once
                    logging.getLogger("tether.client").warning(
                        "TLS session resumption is off from now on: this Python (%s) leaks "
                        "memory at every session read (CPython gh-116810, fixed in 3.12.8 "
                        "and 3.13.1); reconnects make full TLS handshakes",
                        sys.version.split()[0],
                    )
                return None
            SessionCache.reads += 1
            session = ssl_object.session
            if session is None or not session.has_ticket:
                return None  # no ticket (yet): read again next time
            latest.session, latest.ssl_object = session, None
        if time.time() > session.time + session.timeout:
            return None  # the server would refuse it anyway
        return session


_P = TypeVar("_P", bound=asyncio.BaseProtocol)


class _Gate(asyncio.Protocol):
    """Stands in for the application's protocol until the server's certificate passed
    ``verify``; then hands the transport over (no cost on the data path after that)."""

    def __init__(self, protocol: asyncio.BaseProtocol, verify: Callable[[bytes], Any]) -> None:
        self.protocol = protocol
        self.verify = verify
        self.error: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        try:
            ssl_object = transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            if not der:
                raise TrustError("the server presented no certificate")
            self.verify(der)
        except Exception as exc:  # contained to this connection (CONTRIBUTING.md E4): the
            # caller raises it once the transport is aborted (create_tls_connection)
            self.error = exc
            cast(asyncio.Transport, transport).abort()
            return
        transport.set_protocol(self.protocol)
        self.protocol.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is None:
            self.error = exc or ConnectionResetError("connection lost during the TLS handshake")


async def create_tls_connection(
    protocol_factory: Callable[[], _P],
    host: str,
    port: int,
    *,
    context: ssl.SSLContext,
    server_hostname: str | None = None,
    sessions: SessionCache | None = None,
    verify: Callable[[bytes], Any] | None = None,
    **kwargs: Any,
) -> tuple[asyncio.Transport, _P]:
    """``loop.create_connection`` with TLS, resuming a session from ``sessions`` (with a
    context made by :func:`client_context`), and calling ``verify(der)`` on the server's
    certificate before the protocol's ``connection_made``: if it raises, the connection
    is aborted before a byte of application data was written, and the exception
    (e.g. :class:`TrustError`) propagates. Only verified connections enter ``sessions``.
    """
    loop = asyncio.get_running_loop()
    session = sessions.session(host, port, context) if sessions is not None else None
    gate: _Gate | None = None

    def make() -> asyncio.BaseProtocol:
        nonlocal gate
        protocol = protocol_factory()
        if verify is None:
            return protocol
        gate = _Gate(protocol, verify)
        return gate

    token = _RESUME.set(session)
    try:
        transport, made = await loop.create_connection(
            make, host, port, ssl=context, server_hostname=server_hostname, **kwargs
        )
    finally:
        _RESUME.reset(token)
    if gate is not None:
        if gate.error is not None:
            transport.abort()
            raise gate.error
        made = gate.protocol
    if sessions is not None:
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            sessions.remember(host, port, ssl_object)
    return transport, cast(_P, made)


# -- trusting a server without a CA --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrustResult:
    """Why the client trusts the server: its pin, or a known servers entry (``line``),
    or ``learned``: it was unknown and has just been recorded (the caller logs a WARNING
    naming ``known_servers``)."""

    fingerprint: str
    learned: bool = False
    known_servers: Path | None = None
    line: int | None = None


def server_key(host: str, port: int) -> str:
    """``HOST:PORT`` as the known servers file writes it: IPv6 in brackets, names in
    lowercase, addresses in their canonical form."""
    host = host.strip("[]")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        host = host.lower().rstrip(".")
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def verify_server(
    der: bytes,
    host: str,
    port: int,
    *,
    pin: str | None,
    known_servers: Path | None,
    strict: bool,
) -> TrustResult:
    """Decide whether to trust the server at ``host``:``port`` that presented ``der``.

    With ``pin`` the certificate must be the pinned one (the file is not consulted).
    Otherwise trust on first use in ``known_servers`` (lines ``HOST:PORT sha256:HEX``,
    ``#`` comments): a recorded server must present a recorded fingerprint; an unknown
    one is recorded (appended in one write, so concurrent clients are safe), or with
    ``strict`` refused. Raises TrustError (and nothing else for any file content), or
    ValueError for a malformed ``pin`` or a missing ``known_servers``.
    """
    presented = fingerprint(der)
    where = server_key(host, port)
    if pin is not None:
        pinned = parse_fingerprint(pin)
        if presented != pinned:
            raise TrustError(
                f"server {where} presented certificate {presented}"
                f" but --server-fingerprint pins {pinned}"
            )
        return TrustResult(presented)
    if known_servers is None:
        raise ValueError("verify_server needs a pin or a known servers file")
    text = _read_known_servers(known_servers)
    recorded: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = _parse_known_line(line, known_servers, number)
        if entry is not None and entry[0] == where:
            if entry[1] == presented:
                return TrustResult(presented, known_servers=known_servers, line=number)
            recorded.append((number, entry[1]))
    if recorded:
        number, expected = recorded[0]
        raise TrustError(
            f"server {where} presented certificate {presented}, which does not match the"
            f" one recorded in {known_servers}:{number} ({expected}): someone may be"
            f" intercepting the connection; if the server's key changed on purpose, delete"
            f" that line"
        )
    if strict:
        raise TrustError(
            f"server {where} (certificate {presented}) is not in {known_servers}, and"
            f" --strict forbids trusting it on first use; check the fingerprint the server"
            f" printed at start, then pass --server-fingerprint with it or add the line"
            f" '{where} {presented}' to {known_servers}"
        )
    append_line(known_servers, f"{where} {presented}\n", TrustError)
    number = len(text.splitlines()) + 1  # unless another client appended meanwhile
    return TrustResult(presented, learned=True, known_servers=known_servers, line=number)


def _read_known_servers(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as exc:
        raise TrustError(f"cannot read known servers file {path}: {exc}") from None


def _parse_known_line(line: str, path: Path, number: int) -> tuple[str, str] | None:
    """(``HOST:PORT``, fingerprint) of one line; None for a blank or comment line."""
    fields = line.split("#", 1)[0].split()
    if not fields:
        return None
    host, sep, port = fields[0].rpartition(":")
    problem = ""
    if len(fields) != 2:
        problem = "expected 'HOST:PORT sha256:HEX'"
    elif not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        problem = f"bad server {fields[0]!r}, expected HOST:PORT ([V6]:PORT)"
    else:
        try:
            return server_key(host, int(port)), parse_fingerprint(fields[1])
        except ValueError as exc:
            problem = str(exc)
    raise TrustError(f"{path}:{number}: {problem}; fix or delete that line")
