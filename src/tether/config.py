"""Frozen configuration of the tether server and client.

The command line (cli.py) builds these; library users build them directly.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from .protocol.session import SessionConfig

__all__ = ["Address", "ClientConfig", "ServerConfig", "parse_address"]

DEFAULT_SERVER_PORT = 2598  # the port Citrix session reliability (CGP) uses
DEFAULT_BACKEND = ("127.0.0.1", 1494)  # the port ICA listens on behind it


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, default_host: str = "127.0.0.1") -> Address:
    """Parse ``HOST:PORT``, ``[V6]:PORT`` or ``PORT``. Raises ValueError with a clear message."""
    text = text.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = default_host, text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        host = default_host
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad address {text!r}: port must be a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"bad address {text!r}: port out of range")
    return Address(host, port)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: Address = Address("0.0.0.0", DEFAULT_SERVER_PORT)
    backend: Address = Address(*DEFAULT_BACKEND)
    session: SessionConfig = field(default_factory=SessionConfig)
    backend_connect_timeout: float = 10.0
    max_sessions: int = 100_000
    ssl: ssl.SSLContext | None = None


@dataclass(frozen=True, slots=True)
class ClientConfig:
    listen: Address = Address("127.0.0.1", 1494)
    server: Address = Address("127.0.0.1", DEFAULT_SERVER_PORT)
    fallback: Address | None = None
    session: SessionConfig = field(default_factory=SessionConfig)
    connect_timeout: float = 5.0  # to reach a tether server at session start
    backoff_initial: float = 0.05
    backoff_cap: float = 0.5
    max_attempts_in_flight: int = 4
    ssl: ssl.SSLContext | None = None
    server_hostname: str | None = None
