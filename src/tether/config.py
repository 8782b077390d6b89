"""Frozen configuration of the tether server and client, and the parsers for its values.

The dataclasses here (and :class:`~tether.protocol.session.SessionConfig`, which they
wrap) are the one source of every default: the command line (cli.py) starts from them
and replaces only the fields the user gave; library users build them directly.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .protocol.admission import DEFAULT_FLOOR
from .protocol.routing import MAX_SERVER_ID
from .protocol.session import SessionConfig
from .resources import default_memory_budget

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "ADMIN_PORTS",
    "Address",
    "ClientConfig",
    "GatewayConfig",
    "HookConfig",
    "RoutedServer",
    "ServerConfig",
    "format_duration",
    "format_size",
    "listen_addresses",
    "parse_address",
    "parse_duration",
    "parse_size",
    "replace_field",
]

DEFAULT_SERVER_PORT = 2598  # the port Citrix session reliability (CGP) uses
DEFAULT_BACKEND = ("127.0.0.1", 1494)  # the port ICA listens on behind it
# The admin endpoint's port when --admin names only a host, and where 'tether status' looks.
ADMIN_PORTS = {"server": 2599, "client": 2597}


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_NOT_IN_HOST = frozenset(" \t/@?#[]")


def parse_address(
    text: str,
    default_host: str = "127.0.0.1",
    *,
    default_port: int | None = None,
    any_port: bool = True,
) -> Address:
    """Parse ``HOST:PORT``, ``[V6]:PORT``, ``PORT``, or ``HOST`` / ``[V6]`` when there is
    a ``default_port``. ``any_port=False`` refuses port 0 (an address to connect to).

    Raises ValueError with a message that says what is wrong, not which text: the
    caller knows what it passed (cli.py prefixes the option and its value).
    """
    text = text.strip()
    if not text:
        raise ValueError("empty: give HOST:PORT")
    if "://" in text:
        raise ValueError("give HOST:PORT, not a URL")
    port_text: str | None
    if text.startswith("["):  # [V6]:PORT or [V6]
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError("write an IPv6 address as [ADDRESS]:PORT")
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:
        raise ValueError("an IPv6 address needs brackets: [ADDRESS]:PORT")
    elif ":" in text:
        host, _, port_text = text.partition(":")
    elif text.isascii() and text.isdigit():
        host, port_text = "", text
    else:
        host, port_text = text, None
    host = host or default_host
    if _NOT_IN_HOST.intersection(host):
        raise ValueError(f"{host!r} is not a host name or address")
    if port_text is None:
        if default_port is None:
            raise ValueError("port missing: give HOST:PORT")
        port_text = str(default_port)
    if not port_text:
        raise ValueError("port missing: give HOST:PORT")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError("port must be a number")
    port = int(port_text)
    lowest = 0 if any_port else 1
    if not lowest <= port <= 65535:
        raise ValueError(f"port must be within {lowest}-65535")
    return Address(host, port)


_NUMBER_UNIT = re.compile(r"([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*([A-Za-z]*)")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
}
_DURATION_UNITS: dict[str, int | Fraction] = {
    "": 1,
    "s": 1,
    "ms": Fraction(1, 1000),
    "m": 60,
    "min": 60,
    "h": 3600,
}


def _number_unit(text: str, what: str) -> tuple[Fraction, str]:
    match = _NUMBER_UNIT.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a {what}")
    return Fraction(match[1]), match[2].lower()


def parse_size(text: str) -> int:
    """Bytes: ``4194304``, ``64K``, ``4M``, ``1G``, ``4MiB``, ``1.5M``.

    K, M and G are binary multiples (1024, 1024², 1024³), like KiB, MiB and GiB;
    ``MB`` and the like are refused as ambiguous.
    """
    hint = "give bytes, or a number with K, M or G (binary: 4M is 4 MiB)"
    try:
        number, unit = _number_unit(text, "size")
    except ValueError as exc:
        raise ValueError(f"{exc}: {hint}") from None
    factor = _SIZE_UNITS.get(unit)
    if factor is None:
        if unit in ("kb", "mb", "gb"):
            letter = unit[0].upper()
            raise ValueError(f"{unit.upper()} is ambiguous: write {letter} or {letter}iB (binary)")
        raise ValueError(f"unknown unit {unit!r}: {hint}")
    size = number * factor
    if size <= 0:
        raise ValueError("must be positive")
    if size.denominator != 1:
        raise ValueError("not a whole number of bytes")
    return int(size)


def parse_duration(text: str) -> float:
    """Seconds: ``90``, ``0.3``, ``90s``, ``500ms``, ``3m``, ``1h``."""
    hint = "give seconds, or a number with ms, s, m or h (90s, 3m, 1h)"
    try:
        number, unit = _number_unit(text, "duration")
    except ValueError as exc:
        raise ValueError(f"{exc}: {hint}") from None
    factor = _DURATION_UNITS.get(unit)
    if factor is None:
        raise ValueError(f"unknown unit {unit!r}: {hint}")
    seconds = number * factor
    if seconds <= 0:
        raise ValueError("must be positive")
    return float(seconds)


def format_size(size: int) -> str:
    """The shortest exact form ``parse_size`` reads back: ``4MiB``, ``1536KiB``, ``1000``."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def format_duration(seconds: float) -> str:
    """``180s``, ``0.3s``: what ``parse_duration`` reads back."""
    return f"{seconds:g}s"


_Config = TypeVar("_Config", bound="DataclassInstance")


def is_loopback(host: str) -> bool:
    """Is ``host`` a loopback address (or ``localhost``)? Names are not resolved."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


# Tests set it to treat a loopback admin address as any other (tests/admin/test_tls.py): it
# can only make the endpoint stricter (a token and HTTPS required), never looser.
ADMIN_NOT_LOOPBACK_ENV = "TETHER_TEST_ADMIN_NOT_LOOPBACK"


def admin_is_local(host: str) -> bool:
    """May the admin endpoint on ``host`` serve plain HTTP without a token (loopback)?"""
    return is_loopback(host) and not os.environ.get(ADMIN_NOT_LOOPBACK_ENV)


def _check_admin(
    config: ServerConfig | ClientConfig,
) -> None:
    """The admin endpoint listens beyond loopback only behind a token, over HTTPS unless
    ``admin_plaintext`` says clear text (docs/security.md, "Admin endpoint")."""
    admin = config.admin
    if config.admin_token_file is not None and admin is None:
        raise ValueError("admin_token_file needs admin")
    if (config.admin_tls_cert is None) != (config.admin_tls_key is None):
        raise ValueError("admin_tls_cert and admin_tls_key go together")
    if config.admin_tls_cert is not None and admin is None:
        raise ValueError("admin_tls_cert needs admin")
    if config.admin_plaintext and admin is None:
        raise ValueError("admin_plaintext needs admin")
    if config.admin_plaintext and config.admin_tls_cert is not None:
        raise ValueError("admin_plaintext takes no admin TLS certificate")
    if admin is None or admin_is_local(admin.host):
        return
    if isinstance(config, ClientConfig) and (
        config.admin_token_file is None
        or (config.admin_tls_cert is None and not config.admin_plaintext)
    ):
        # Both requirements in one message: the command line is checked one option at a
        # time to name the one that fails, so --admin may be checked before the others.
        raise ValueError(
            "not loopback: a client's admin endpoint needs admin_token_file "
            "(--admin-token-file) there, and admin_tls_cert and admin_tls_key "
            "(--admin-tls-cert, --admin-tls-key) for HTTPS, or admin_plaintext "
            "(--admin-plaintext) for clear text"
        )
    if config.admin_token_file is None:
        raise ValueError(
            "not loopback: the admin endpoint needs admin_token_file (--admin-token-file) there"
        )


def _check_listen(listen: object) -> None:
    """``listen`` is one address or a non-empty tuple of distinct ones."""
    if isinstance(listen, Address):
        return
    if not isinstance(listen, tuple) or not listen:
        raise ValueError("listen must be an address or a non-empty tuple of addresses")
    for address in listen:
        if not isinstance(address, Address):
            raise ValueError(f"listen: {address!r} is not an Address")
    if len(set(listen)) != len(listen):
        raise ValueError("listen: an address given twice")


def listen_addresses(listen: Address | tuple[Address, ...]) -> tuple[Address, ...]:
    """Every address of a ``listen`` field, which holds one or several."""
    return (listen,) if isinstance(listen, Address) else listen


def replace_field(config: _Config, path: str, value: Any) -> _Config:
    """``config`` with one field replaced, ``path`` dotted into nested configs
    (``"session.window"``). The dataclasses check the new value and raise ValueError."""
    name, _, rest = path.partition(".")
    if rest:
        value = replace_field(getattr(config, name), rest, value)
    return replace(config, **{name: value})


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """A tether server. Links are TLS 1.3 unless ``plaintext`` (docs/security.md)."""

    # One address, or several (--listen given more than once); [::] takes IPv4 too.
    listen: Address | tuple[Address, ...] = Address("0.0.0.0", DEFAULT_SERVER_PORT)
    backend: Address = Address(*DEFAULT_BACKEND)
    session: SessionConfig = field(default_factory=SessionConfig)
    backend_connect_timeout: float = 10.0
    # docs/operations.md, "Drain": how long a draining server (SIGTERM, `tether drain`)
    # keeps its sessions before it ends the rest with GOING_AWAY.
    drain_timeout: float = 300.0
    max_sessions: int = 100_000
    # An office behind one NAT address is one source: room for its users, not for a flood.
    max_sessions_per_source: int = 4096
    # Links accepted whose handshake has not finished (OpenSSH's MaxStartups): past half of
    # the limit new ones are dropped at random, 30 % rising to 100 % at the limit.
    max_handshakes: int = 1024
    max_handshakes_per_source: int = 256  # a client's resume storm after an outage fits
    # Bytes all sessions' replay buffers may hold together (docs/security.md, "Abuse"): a
    # quarter of the memory this process may use. Windows shrink as it fills; past it new
    # setups are refused OVERLOADED, established sessions only stop reading their backend.
    memory_budget: int = field(default_factory=default_memory_budget)
    plaintext: bool = False  # links in clear text: only inside a trusted network
    tls_cert: Path | None = None  # with tls_key; without, an identity in state_dir
    tls_key: Path | None = None
    state_dir: Path | None = None  # None: tls.default_state_dir()
    tls_client_ca: Path | None = None  # clients must present a certificate it signed
    clients: Path | None = None  # hashes of the tokens that may create sessions
    admin: Address | None = None  # the admin endpoint (tether.admin); off when None
    admin_token_file: Path | None = None  # its bearer token; required beyond loopback
    # Beyond loopback the admin endpoint is HTTPS, with this certificate and key (server:
    # default its links' identity; client: required there) unless admin_plaintext.
    admin_tls_cert: Path | None = None
    admin_tls_key: Path | None = None
    admin_plaintext: bool = False  # the admin endpoint in clear text beyond loopback
    # docs/protocol.md, "Routing": behind a gateway, this server's id in its session ids,
    # authenticated under the site's routing key (0 and None: random ids).
    server_id: int = 0
    routing_key_file: Path | None = None

    def __post_init__(self) -> None:
        _check_listen(self.listen)
        if not 0 <= self.server_id <= MAX_SERVER_ID:
            raise ValueError(f"server_id must be within 0-{MAX_SERVER_ID}")
        if (self.server_id == 0) != (self.routing_key_file is None):
            raise ValueError("server_id and routing_key_file go together")
        if not self.backend_connect_timeout > 0:
            raise ValueError("backend_connect_timeout must be positive")
        if not self.drain_timeout >= 0:
            raise ValueError("drain_timeout must not be negative")
        for name in (
            "max_sessions",
            "max_sessions_per_source",
            "max_handshakes",
            "max_handshakes_per_source",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.memory_budget < DEFAULT_FLOOR:
            raise ValueError(f"memory_budget must be at least {DEFAULT_FLOOR} bytes (one floor)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.plaintext and (self.tls_cert or self.tls_client_ca):
            raise ValueError("plaintext takes no TLS certificate or client CA")
        _check_admin(self)


DEFAULT_HOOK_TIMEOUT = 30.0  # a hook still running then is killed
DEFAULT_MAX_HOOKS = 4  # hooks running at once; further events run none (hooks.py)


@dataclass(frozen=True, slots=True)
class HookConfig:
    """Commands the client runs when a session detaches, resumes or ends, or its server
    says it drains (hooks.py): a
    command line split as a shell would (shlex), run without a shell."""

    on_detach: str | None = None
    on_resume: str | None = None
    on_end: str | None = None
    on_drain: str | None = None
    timeout: float = DEFAULT_HOOK_TIMEOUT
    max_running: int = DEFAULT_MAX_HOOKS

    def __post_init__(self) -> None:
        for name in ("on_detach", "on_resume", "on_end", "on_drain"):
            command = getattr(self, name)
            if command is None:
                continue
            try:
                words = shlex.split(command)
            except ValueError as exc:
                raise ValueError(f"{name}: not a command line ({exc})") from None
            if not words:
                raise ValueError(f"{name}: empty command")
        if not self.timeout > 0:
            raise ValueError("hook timeout must be positive")
        if self.max_running < 1:
            raise ValueError("max_running hooks must be at least 1")


@dataclass(frozen=True, slots=True)
class ClientConfig:
    listen: Address | tuple[Address, ...] = Address("127.0.0.1", 1494)  # or several
    # The tether server, or several: a new session goes to the first that is not known
    # to be draining, and on to the next when one is out of reach or refuses it as going
    # away; a session resumes only where it was set up (docs/operations.md, "Drain").
    server: Address | tuple[Address, ...] = Address("127.0.0.1", DEFAULT_SERVER_PORT)
    fallback: Address | None = None
    session: SessionConfig = field(default_factory=SessionConfig)
    connect_timeout: float = 5.0  # to reach a tether server at session start
    backoff_initial: float = 0.05
    backoff_cap: float = 0.5
    max_attempts_in_flight: int = 4
    plaintext: bool = False  # links in clear text: only inside a trusted network
    tls_ca: Path | None = None  # verify the server against this CA bundle (and its name)
    server_fingerprint: str | None = None  # or pin its certificate: "sha256:HEX"
    known_servers: Path | None = None  # or trust on first use; None: tls.default_known_servers()
    strict: bool = False  # no trust on first use: a server must be pinned or CA-signed
    server_hostname: str | None = None  # the name the CA-signed certificate must carry
    tls_cert: Path | None = None  # the client's own certificate, for mutual TLS
    tls_key: Path | None = None
    token_file: Path | None = None  # the client's token, for a server with a clients file
    require_reliability: bool = False  # never fall back to a direct connection
    hooks: HookConfig = field(default_factory=HookConfig)  # run on outage events
    admin: Address | None = None  # the admin endpoint (tether.admin); off when None
    admin_token_file: Path | None = None  # its bearer token; required beyond loopback
    # Beyond loopback the admin endpoint is HTTPS, with this certificate and key (server:
    # default its links' identity; client: required there) unless admin_plaintext.
    admin_tls_cert: Path | None = None
    admin_tls_key: Path | None = None
    admin_plaintext: bool = False  # the admin endpoint in clear text beyond loopback

    @property
    def servers(self) -> tuple[Address, ...]:
        """The tether servers, in the order new sessions try them."""
        return self.server if isinstance(self.server, tuple) else (self.server,)

    def __post_init__(self) -> None:
        _check_listen(self.listen)
        servers = self.servers
        if not servers or not all(isinstance(one, Address) for one in servers):
            raise ValueError("server must be an address or a non-empty tuple of addresses")
        if len(set(servers)) != len(servers):
            raise ValueError("server: an address given twice")
        if self.plaintext and (self.tls_ca or self.server_fingerprint or self.tls_cert):
            raise ValueError("plaintext takes no TLS CA, fingerprint or certificate")
        if self.tls_ca is not None and self.server_fingerprint is not None:
            raise ValueError("choose one of tls_ca and server_fingerprint")
        if self.require_reliability and self.fallback is not None:
            raise ValueError("require_reliability and a fallback contradict each other")
        if self.tls_key is not None and self.tls_cert is None:
            raise ValueError("tls_key needs tls_cert")
        if not self.connect_timeout > 0:
            raise ValueError("connect_timeout must be positive")
        if not 0 < self.backoff_initial <= self.backoff_cap:
            raise ValueError("backoff_initial must be positive and at most backoff_cap")
        if self.max_attempts_in_flight < 1:
            raise ValueError("max_attempts_in_flight must be at least 1")
        _check_admin(self)


DEFAULT_GATEWAY_PORT = 443  # the gateway is where clients come from outside


@dataclass(frozen=True, slots=True)
class RoutedServer:
    """A server behind a gateway: its id (``tether server --server-id``) and address."""

    server_id: int
    address: Address

    def __str__(self) -> str:
        return f"{self.server_id}={self.address}"


def parse_routed_server(text: str, position: int) -> RoutedServer:
    """``[ID=]HOST[:PORT]``; without ``ID=`` the id is ``position`` (1 for the first)."""
    id_text, sep, rest = text.partition("=")
    if sep:
        if not (id_text.isascii() and id_text.isdigit()):
            raise ValueError("give [ID=]HOST:PORT, ID a number")
        server_id, text = int(id_text), rest
    else:
        server_id = position
    if not 1 <= server_id <= MAX_SERVER_ID:
        raise ValueError(f"server id must be within 1-{MAX_SERVER_ID}")
    return RoutedServer(
        server_id, parse_address(text, default_port=DEFAULT_SERVER_PORT, any_port=False)
    )


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """A tether gateway (docs/deployment.md): clients' TLS ends here, and each link goes
    to the server its first bytes name (docs/protocol.md, "Routing")."""

    listen: Address = Address("0.0.0.0", DEFAULT_GATEWAY_PORT)
    servers: tuple[RoutedServer, ...] = ()
    routing_key_file: Path | None = None  # required: the servers' routing key
    handshake_timeout: float = 10.0  # for the client's TLS and first bytes
    connect_timeout: float = 5.0  # to reach a server
    health_interval: float = 3.0  # between health checks of each server
    max_handshakes: int = 1024  # client links not yet routed, as ServerConfig
    max_handshakes_per_source: int = 256
    plaintext: bool = False  # client links in clear text: only inside a trusted network
    tls_cert: Path | None = None  # with tls_key; without, an identity in state_dir
    tls_key: Path | None = None
    state_dir: Path | None = None
    server_plaintext: bool = False  # links to the servers in clear text (internal network)
    server_ca: Path | None = None  # the servers' certificates chain to this CA (and name them)
    server_fingerprint: str | None = None  # or every server presents this certificate

    def __post_init__(self) -> None:
        ids = [server.server_id for server in self.servers]
        if len(set(ids)) != len(ids):
            raise ValueError("two servers have the same id")
        for name in ("handshake_timeout", "connect_timeout", "health_interval"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        for name in ("max_handshakes", "max_handshakes_per_source"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.plaintext and self.tls_cert:
            raise ValueError("plaintext takes no TLS certificate")
        trust = [self.server_plaintext, self.server_ca is not None, self.server_fingerprint]
        if sum(map(bool, trust)) > 1:
            raise ValueError("choose one of server_plaintext, server_ca and server_fingerprint")
