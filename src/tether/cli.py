"""``tether``: the command line. Parse, build a frozen config, run; nothing else.

Every default lives in the config dataclasses (config.py, protocol/session.py): the
help shows their values, and an option the user did not give leaves its field alone,
so the ``--config`` file (configfile.py, its keys derived from the option table here)
sits between the defaults and the options.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import functools
import gc
import inspect
import ipaddress
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from . import __version__, allocator, configfile, sdnotify
from .aio.listener import ListenError
from .config import (
    ADMIN_PORTS,
    Address,
    ClientConfig,
    GatewayConfig,
    ServerConfig,
    format_duration,
    format_size,
    parse_address,
    parse_duration,
    parse_routed_server,
    parse_size,
    replace_field,
)
from .demo import run_demo
from .errors import TetherError
from .logs import loop_exception_handler, setup_logging
from .reload import Reloader, Settings

if TYPE_CHECKING:
    from .aio.server import TetherServer

__all__ = ["build_config", "main", "parse_args"]

_T = TypeVar("_T")

_DEFAULTS: dict[str, ServerConfig | ClientConfig | GatewayConfig] = {
    "server": ServerConfig(),
    "client": ClientConfig(),
    "gateway": GatewayConfig(),
}

_VALUES = """\
values:
  HOST:PORT  [ADDRESS]:PORT for IPv6; HOST alone takes the port the help names,
             PORT alone the default host
  DURATION   seconds, or a number with ms, s, m or h: 0.5, 90s, 3m, 1h
  SIZE       bytes, or a number with K, M or G (binary: 4M = 4MiB = 4194304)"""


@dataclass(frozen=True, slots=True)
class _Option:
    """One command-line option: it sets one field (``path``, dotted into the config)."""

    flag: str
    path: str
    kind: str  # "listen", "target" (an address to connect to), "duration", "size",
    #            "file", "text", "switch" (a flag that sets True) or "servers" (repeated
    #            [ID=]HOST:PORT)
    help: str
    required: bool = False
    shown: str | None = None  # the default as the help shows it, when not the field's value
    port: int | None = None  # the port of an address option given only a host, default none
    many: bool = False  # may be given more than once (--listen): the field takes a tuple

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def metavar(self) -> str:
        names = {
            "duration": "DURATION",
            "size": "SIZE",
            "file": "FILE",
            "text": "TEXT",
            "count": "N",
            "servers": "[ID=]HOST:PORT",
        }
        return names.get(self.kind, "HOST:PORT")

    def parse(self, text: str | list[str], default: object) -> object:
        if isinstance(text, list):  # "servers": the option given once per server
            servers = []
            for position, one in enumerate(text, 1):
                try:
                    servers.append(parse_routed_server(one, position))
                except ValueError as exc:
                    raise ValueError(f"{one}: {exc}") from None
            return tuple(servers)
        if self.kind == "switch":
            return True
        if self.kind == "file":
            return Path(text).expanduser()
        if self.kind == "text":
            return text
        if self.kind == "count":
            try:
                return int(text)
            except ValueError:
                raise ValueError("expected a whole number") from None
        if self.kind == "duration":
            return parse_duration(text)
        if self.kind == "size":
            return parse_size(text)
        if default is None and self.port is not None:
            return parse_address(text, default_port=self.port, any_port=self.kind == "listen")
        if isinstance(default, Address):
            return parse_address(
                text, default.host, default_port=default.port, any_port=self.kind == "listen"
            )
        return parse_address(text, any_port=self.kind == "listen")

    def describe(self, default: object) -> str:
        """The help text, ending with the default (or the port taken when omitted)."""
        if self.kind == "switch":
            return f"{self.help} (default off)"
        if self.shown is not None:
            shown = self.shown
        elif isinstance(default, Address):
            shown = f"port {default.port}" if self.required else str(default)
        elif default is None or default == ():
            shown = "none"
        elif self.kind == "size" and isinstance(default, int):
            shown = format_size(default)
        elif self.kind == "duration" and isinstance(default, int | float):
            shown = format_duration(default)
        else:
            shown = str(default)
        return f"{self.help} ({'required; default ' if self.required else 'default '}{shown})"


_SESSION_OPTIONS = (
    _Option(
        "--timeout",
        "session.timeout",
        "duration",
        "session-reliability timeout: how long a session waits for its peer to come back",
    ),
    _Option(
        "--keepalive",
        "session.keepalive",
        "duration",
        "keepalive interval; a link silent for two intervals is dead",
    ),
    _Option(
        "--handshake-timeout",
        "session.handshake_timeout",
        "duration",
        "how long one link may take to reach its session (TLS and tether handshakes)",
    ),
    _Option(
        "--buffer",
        "session.window",
        "size",
        "replay buffer bound per direction and session; when it is full, tether stops "
        "reading the sender",
    ),
)


def _certificate(what: str) -> tuple[_Option, _Option]:
    return (
        _Option("--tls-cert", "tls_cert", "file", what),
        _Option("--tls-key", "tls_key", "file", "its private key (PEM; mode 600)"),
    )


_PLAINTEXT = _Option(
    "--plaintext",
    "plaintext",
    "switch",
    "links in clear text, no TLS: only inside a VPN or a trusted internal network, and only "
    "when the other end runs in clear text too",
)


def _admin(role: str) -> tuple[_Option, ...]:
    port = ADMIN_PORTS[role]
    identity = (
        "the server's own TLS identity: --tls-cert, or the one in --state-dir"
        if role == "server"
        else "required there"
    )
    return (
        _Option(
            "--admin",
            "admin",
            "listen",
            "serve the admin endpoint here (/metrics, /api/sessions, a status page at /): "
            "plain HTTP on loopback; beyond it HTTPS, and the admin token file is required",
            shown=f"off; HOST alone takes port {port}",
            port=port,
        ),
        _Option(
            "--admin-token-file",
            "admin_token_file",
            "file",
            "require this bearer token (a file of mode 600) on the admin endpoint",
        ),
        _Option(
            "--admin-tls-cert",
            "admin_tls_cert",
            "file",
            "the admin endpoint's TLS certificate (PEM chain); given, it is HTTPS even on loopback",
            shown=f"none: beyond loopback, {identity}",
        ),
        _Option("--admin-tls-key", "admin_tls_key", "file", "its private key (PEM; mode 600)"),
        _Option(
            "--admin-plaintext",
            "admin_plaintext",
            "switch",
            "serve the admin endpoint in clear text beyond loopback, no TLS: its token and "
            "session list cross the network readable; only inside a trusted network",
        ),
    )


_OPTIONS: dict[str, tuple[_Option, ...]] = {
    "server": (
        _Option(
            "--listen",
            "listen",
            "listen",
            "where to accept tether links; give it again to listen on several addresses; "
            "[::] takes IPv4 too",
            many=True,
        ),
        _Option("--backend", "backend", "target", "the service every session is relayed to"),
        *_SESSION_OPTIONS,
        _Option(
            "--drain-timeout",
            "drain_timeout",
            "duration",
            "on SIGTERM (or 'tether drain') new sessions are refused and the live ones kept "
            "this long, then ended; a second SIGTERM ends them at once",
        ),
        _Option("--max-sessions", "max_sessions", "count", "sessions held at once"),
        _Option(
            "--max-sessions-per-source",
            "max_sessions_per_source",
            "count",
            "sessions held at once for one source (an IPv4 address or an IPv6 /64); past "
            "either limit a setup is refused for now (OVERLOADED) and the client retries",
        ),
        _Option(
            "--max-handshakes",
            "max_handshakes",
            "count",
            "links accepted but not yet in a session; past half of it new ones are dropped "
            "at random, 30 %% rising to 100 %% at the limit (as OpenSSH's MaxStartups)",
        ),
        _Option(
            "--max-handshakes-per-source",
            "max_handshakes_per_source",
            "count",
            "of those, from one source",
        ),
        _Option(
            "--memory-budget",
            "memory_budget",
            "size",
            "replay-buffer bytes all sessions may hold together; as it fills, new sessions "
            "get smaller windows (down to 64K) and the largest stop reading their backend; "
            "when not even 64K fits, a setup is refused for now (OVERLOADED)",
            shown="a quarter of physical memory, or of the cgroup's limit if smaller",
        ),
        *_certificate("this server's TLS certificate (PEM chain)"),
        _Option(
            "--state-dir",
            "state_dir",
            "file",
            "where the server keeps the key and self-signed certificate it makes on first "
            "start, when it is given no certificate",
            shown="$XDG_STATE_HOME/tether, ~/.local/state/tether, or /var/lib/tether for root",
        ),
        _Option(
            "--tls-client-ca",
            "tls_client_ca",
            "file",
            "accept only clients with a certificate this CA signed (mutual TLS)",
        ),
        _Option(
            "--clients",
            "clients",
            "file",
            "accept only clients presenting a token listed here (see 'tether token new'); "
            "re-read when it changes",
        ),
        _Option(
            "--server-id",
            "server_id",
            "count",
            "behind a gateway: this server's id (1-65535, unique in the site), written into "
            "every session id so that resumes come back here; needs the routing key file",
        ),
        _Option(
            "--routing-key-file",
            "routing_key_file",
            "file",
            "the site's routing key (base64, mode 600; openssl rand -base64 32), shared by its "
            "servers and gateways: it authenticates the server id in session ids",
        ),
        _PLAINTEXT,
        *_admin("server"),
    ),
    "client": (
        _Option(
            "--listen",
            "listen",
            "listen",
            "where the application connects; give it again to listen on several addresses",
            required=True,
            many=True,
        ),
        _Option(
            "--server",
            "server",
            "target",
            "the tether server; give it again for others, which new sessions use when one "
            "is out of reach or draining",
            required=True,
            many=True,
        ),
        _Option(
            "--fallback",
            "fallback",
            "target",
            "connect the application straight here, without reliability, when no tether "
            "server answers at session start",
        ),
        _Option(
            "--connect-timeout",
            "connect_timeout",
            "duration",
            "how long a new session tries to reach the tether server",
        ),
        *_SESSION_OPTIONS,
        _Option(
            "--tls-ca",
            "tls_ca",
            "file",
            "trust the server if a CA in this bundle signed its certificate for its host name",
        ),
        _Option(
            "--server-fingerprint",
            "server_fingerprint",
            "text",
            "trust the server only with this certificate (sha256:HEX, as the server logs it "
            "and 'tether fingerprint' prints it)",
        ),
        _Option(
            "--known-servers",
            "known_servers",
            "file",
            "with neither a CA nor a pinned fingerprint, trust a server on first use and "
            "remember its certificate here, as OpenSSH does",
            shown="$XDG_CONFIG_HOME/tether/known_servers or ~/.config/tether/known_servers",
        ),
        _Option(
            "--strict",
            "strict",
            "switch",
            "no trust on first use: refuse a server that is neither pinned nor CA-signed nor "
            "already known",
        ),
        *_certificate("this client's certificate, for mutual TLS"),
        _Option(
            "--token-file",
            "token_file",
            "file",
            "present the token in this file (mode 600) to a server that asks for one",
        ),
        _Option(
            "--require-reliability",
            "require_reliability",
            "switch",
            "never fall back to a direct connection",
        ),
        _PLAINTEXT,
        _Option(
            "--on-detach",
            "hooks.on_detach",
            "text",
            "run this command when a session loses its link (no shell unless the command is "
            "one; TETHER_* variables say which session and why)",
        ),
        _Option("--on-resume", "hooks.on_resume", "text", "run this command when it resumes"),
        _Option("--on-end", "hooks.on_end", "text", "run this command when a session ends"),
        _Option(
            "--on-drain",
            "hooks.on_drain",
            "text",
            "run this command when a session's server says it is draining (the session goes "
            "on until it ends or the server's drain timeout)",
        ),
        _Option(
            "--hook-timeout",
            "hooks.timeout",
            "duration",
            "a hook still running after this is killed",
        ),
        _Option(
            "--max-hooks",
            "hooks.max_running",
            "count",
            "hooks running at once; an event past it runs no hook (logged)",
        ),
        *_admin("client"),
    ),
    "gateway": (
        _Option("--listen", "listen", "listen", "where to accept clients' tether links"),
        _Option(
            "--server",
            "servers",
            "servers",
            "a tether server behind this gateway, once per server; ID is the server's id "
            "(tether server's option; without ID=, 1 for the first, 2 for the second, ...)",
        ),
        _Option(
            "--routing-key-file",
            "routing_key_file",
            "file",
            "the routing key the servers use (base64, mode 600): resumes are routed by the "
            "server id it authenticates",
        ),
        _Option(
            "--handshake-timeout",
            "handshake_timeout",
            "duration",
            "how long a client may take for TLS and its first bytes",
        ),
        _Option("--connect-timeout", "connect_timeout", "duration", "to reach a server"),
        _Option(
            "--health-interval",
            "health_interval",
            "duration",
            "between health checks (a tether hello) of each server; a server that fails gets "
            "no new sessions until it passes",
        ),
        *_certificate("this gateway's TLS certificate (PEM chain), what clients check"),
        _Option(
            "--state-dir",
            "state_dir",
            "file",
            "where the gateway keeps the key and self-signed certificate it makes on first "
            "start, when it is given no certificate",
            shown="$XDG_STATE_HOME/tether, ~/.local/state/tether, or /var/lib/tether for root",
        ),
        _Option(
            "--server-ca",
            "server_ca",
            "file",
            "trust a server if a CA in this bundle signed its certificate for its host name",
        ),
        _Option(
            "--server-fingerprint",
            "server_fingerprint",
            "text",
            "trust a server only with this certificate (sha256:HEX)",
        ),
        _Option(
            "--server-plaintext",
            "server_plaintext",
            "switch",
            "links to the servers in clear text (they run in clear text too): only on an "
            "internal network",
        ),
        _Option(
            "--plaintext",
            "plaintext",
            "switch",
            "client links in clear text, no TLS: only inside a VPN or a trusted network",
        ),
    ),
    "demo": (
        _Option("--outage", "outage", "duration", "how long the network path is cut"),
        _Option("--bytes", "total_bulk", "size", "bulk data the application sends"),
    ),
}


def _default(command: str, path: str) -> object:
    if command == "demo":
        return inspect.signature(run_demo).parameters[path].default
    return functools.reduce(getattr, path.split("."), _DEFAULTS[command])


def data_path_build() -> str:
    """Whether the data path runs compiled (setup.py, TETHER_COMPILE=1) or as plain Python;
    shown by ``tether --version`` (docs/design.md, "Compiled data path")."""
    from .aio import link

    return "pure Python" if link.__file__.endswith(".py") else "compiled with mypyc"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether",
        description="Session reliability for any TCP service: sessions that survive network loss.",
        epilog=_VALUES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-V", "--version", action="version", version=f"tether {__version__} ({data_path_build()})"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "server": "relay tether sessions to a backend (the XTE role)",
        "client": "carry local application connections over tether",
        "gateway": "route tether links to the servers behind it (one address for many)",
        "demo": "run a whole session through an outage on loopback",
    }
    for command, summary in commands.items():
        cmd = sub.add_parser(
            command,
            help=summary,
            description=summary,
            epilog=_VALUES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for option in _OPTIONS[command]:
            if option.kind == "switch":
                cmd.add_argument(
                    option.flag,
                    dest=option.dest,
                    action="store_const",
                    const="",
                    help=option.describe(False),
                )
                continue
            cmd.add_argument(
                option.flag,
                dest=option.dest,
                metavar=option.metavar,
                action="append" if option.many or option.kind == "servers" else "store",
                # required: checked in _settings, once the config file (which may set it) is read
                help=option.describe(_default(command, option.path)),
            )
        if command == "demo":
            cmd.add_argument("-v", "--verbose", action="store_true", help="show tether's own logs")
            continue
        if command == "gateway":
            cmd.add_argument(
                "--print-haproxy-config",
                action="store_true",
                help="print an HAProxy configuration that routes to the same servers as this "
                "gateway would, and exit (default off)",
            )
        cmd.add_argument(
            "--config",
            metavar="FILE",
            help="read settings from this TOML file (one key per option, named as the option "
            "without dashes); options given here override it; SIGHUP re-reads it (default none)",
        )
        if command == "server":
            cmd.add_argument(
                "--takeover",
                action="store_true",
                help="take over the listening sockets and every live session of the server "
                "running with the same state directory (its control socket there), which then "
                "exits; its clients resume here and its backends see nothing (default off)",
            )
        verbosity = cmd.add_mutually_exclusive_group()
        verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        verbosity.add_argument(
            "-q", "--quiet", action="store_true", help="warnings and errors only"
        )
        cmd.add_argument(
            "--log-format",
            choices=("text", "json"),
            help="log lines as text or as one JSON object each (default text)",
        )
    _tool_parsers(sub)
    check = sub.add_parser(
        "check-config",
        help="validate a config file and print the settings it makes",
        description="Read FILE as 'tether server --config FILE' (or client, or gateway) would, "
        "and print the effective settings as a config file; an error is one line naming the "
        "key (exit 2). Without --server, --client or --gateway the role is the one whose keys "
        "the file uses.",
    )
    role = check.add_mutually_exclusive_group()
    role.add_argument(
        "--server",
        dest="role",
        action="store_const",
        const="server",
        help="read it as a server's (default: guessed from its keys)",
    )
    role.add_argument(
        "--client",
        dest="role",
        action="store_const",
        const="client",
        help="read it as a client's (default: guessed from its keys)",
    )
    role.add_argument(
        "--gateway",
        dest="role",
        action="store_const",
        const="gateway",
        help="read it as a gateway's (default: guessed from its keys)",
    )
    check.add_argument("file", metavar="FILE", help="the TOML config file")
    return parser


def _tool_parsers(sub: Any) -> None:
    """The commands that run once and print: fingerprint, token, probe, ports."""
    fingerprint = sub.add_parser(
        "fingerprint",
        help="print a tether server's TLS certificate fingerprint (what clients pin)",
        description="Print the SHA-256 fingerprint of a server's TLS certificate, as "
        "'tether client --server-fingerprint' takes it. Without options: the identity the "
        "server keeps in its default state directory (made there if it does not exist yet).",
    )
    which = fingerprint.add_mutually_exclusive_group()
    which.add_argument(
        "--state-dir", metavar="DIR", help="the server's state directory (default as for server)"
    )
    which.add_argument("--tls-cert", metavar="FILE", help="a certificate file (PEM) (default none)")
    token = sub.add_parser("token", help="make client tokens for 'tether server --clients'")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    new = token_sub.add_parser(
        "new",
        help="print a new token once and add its hash to the clients file",
        description="Print a new random token (give it to one client, in a file of mode 600, "
        "for --token-file) and append its hash, never the token, to the clients file.",
    )
    new.add_argument(
        "--clients",
        metavar="FILE",
        required=True,
        help="the server's clients file (created, mode 600) (required; default none)",
    )
    new.add_argument("--comment", default="", help="who the token is for (default none)")
    probe = sub.add_parser(
        "probe",
        help="identify what answers on HOST:PORT (tether, TLS, SSH, HTTP, Citrix ICA or CGP)",
        description="Identify what answers on each target, within a bounded time. It never "
        "makes a tether server open a backend connection.",
    )
    probe.add_argument("targets", nargs="+", metavar="HOST:PORT", help="port 2598 when omitted")
    probe.add_argument("--timeout", type=float, default=3.0, help="seconds per target (default 3)")
    probe.add_argument("--json", action="store_true", help="one JSON array (default off)")
    ports = sub.add_parser(
        "ports",
        help="list this machine's listeners on 1494, 2598, 443, 80 and owning processes",
    )
    ports.add_argument("ports", nargs="*", type=int, metavar="PORT", help="more ports to list")
    ports.add_argument("--json", action="store_true", help="JSON (default off)")
    _admin_tool_parsers(sub)


def _admin_tool_parsers(sub: Any) -> None:
    """``status`` and ``kill``: clients of a running tether's admin endpoint."""
    where = f"http://127.0.0.1:{ADMIN_PORTS['server']}/, a server's; a client's is port " + str(
        ADMIN_PORTS["client"]
    )
    status = sub.add_parser(
        "status",
        help="show the sessions of a running tether server or client (its --admin endpoint)",
        description="Show the sessions of a running tether (state, peer, bytes, and for a "
        "detached one 'interrupted 12 s, expires in 168 s'), refreshed every second until "
        "interrupted.",
    )
    kill = sub.add_parser(
        "kill",
        help="end one session of a running tether server or client (its --admin endpoint)",
        description="End one session: its backend (server) or application (client) "
        "connection is closed and the other tether is told GOING_AWAY.",
    )
    kill.add_argument("session_id", metavar="SESSION_ID", help="a unique prefix is enough")
    drain = sub.add_parser(
        "drain",
        help="drain a running tether server, as SIGTERM does (its --admin endpoint)",
        description="Drain a running tether server: new sessions are refused (GOING_AWAY, "
        "so clients and gateways go elsewhere), live ones go on until they end or its "
        "--drain-timeout passes, then it exits.",
    )
    for cmd in (status, kill, drain):
        cmd.add_argument("--admin", metavar="URL", help=f"the admin endpoint (default {where})")
        cmd.add_argument(
            "--admin-token-file",
            metavar="FILE",
            help="the endpoint's bearer token, when it requires one (default none)",
        )
        trust = cmd.add_mutually_exclusive_group()
        trust.add_argument(
            "--admin-fingerprint",
            metavar="sha256:HEX",
            help="an https:// endpoint must present the certificate with this fingerprint "
            "(its ADMIN line shows it) (default none: it must verify against the system's CAs)",
        )
        trust.add_argument(
            "--tls-ca",
            metavar="FILE",
            help="an https:// endpoint's certificate must chain to this CA bundle and name "
            "its host (default none)",
        )
    status.add_argument("--once", action="store_true", help="show it once (default off)")
    status.add_argument(
        "--json", action="store_true", help="print /api/sessions once as JSON (default off)"
    )


def _tool(args: argparse.Namespace) -> int:
    """Run a one-shot command; ValueError and TetherError become one error line (exit 2)."""
    from . import credentials, tls

    if args.command == "fingerprint":
        if args.tls_cert:
            print(tls.fingerprint_of_file(Path(args.tls_cert).expanduser()))
        else:
            state = Path(args.state_dir).expanduser() if args.state_dir else None
            identity, _ = tls.load_or_create_identity(state or tls.default_state_dir())
            print(identity.fingerprint)
        return 0
    if args.command == "token":
        token = credentials.new_token()
        path = Path(args.clients).expanduser()
        credentials.append_client(path, credentials.token_hash(token), args.comment)
        print(token)
        print(f"(its hash was added to {path}; this token is not stored anywhere)", file=sys.stderr)
        return 0
    if args.command in ("status", "kill", "drain"):
        from .admin.status import DEFAULT_ADMIN_URL, AdminTrust, run_drain, run_kill, run_status

        url = args.admin or DEFAULT_ADMIN_URL
        secret = Path(args.admin_token_file).expanduser() if args.admin_token_file else None
        ca = Path(args.tls_ca).expanduser() if args.tls_ca else None
        trust = AdminTrust(args.admin_fingerprint, ca)
        if args.command == "kill":
            return _run(lambda: run_kill(args.session_id, url, secret, trust))
        if args.command == "drain":
            return _run(lambda: run_drain(url, secret, trust))
        try:
            return _run(
                lambda: run_status(url, secret, once=args.once, as_json=args.json, trust=trust)
            )
        except KeyboardInterrupt:  # Ctrl-C ends the live view: that is how it is left
            return 0
    if args.command == "probe":
        from .probe import run_probe

        return _run(lambda: run_probe(args.targets, timeout=args.timeout, json=args.json))
    from .ports import run_ports

    return run_ports(args.ports, json=args.json)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The parsed command line; argparse's own errors exit (status 2)."""
    return _parser().parse_args(argv)


def _given(args: argparse.Namespace) -> Iterator[tuple[_Option, str]]:
    """Each option the user gave, with its text (once per time it was given)."""
    for option in _OPTIONS[args.command]:
        text = getattr(args, option.dest)
        if isinstance(text, list) and option.many:  # --listen: each address on its own
            for each in text:
                yield option, each
        elif text is not None:  # ("servers" takes its whole list)
            yield option, text


@contextlib.contextmanager
def _about(option: _Option, text: str | list[str]) -> Iterator[None]:
    """Name the option and its value in any ValueError: ``--timeout -3: must be positive``
    (a repeated option's error names the value itself)."""
    try:
        yield
    except ValueError as exc:
        shown = f" {text}:" if isinstance(text, str) else ""
        raise ValueError(f"{option.flag}{shown} {exc}") from None


def build_config(
    args: argparse.Namespace, base: ServerConfig | ClientConfig | GatewayConfig | None = None
) -> ServerConfig | ClientConfig | GatewayConfig:
    """``base`` (default: the dataclass defaults) with the fields the user gave replaced.

    Raises ValueError naming the option: ``--listen 127.0.0.1:x: port must be a number``.
    """
    config = _DEFAULTS[args.command] if base is None else base
    given: list[tuple[_Option, str, object]] = []
    for option, text in _given(args):
        with _about(option, text):
            value = option.parse(text, _default(args.command, option.path))
        if option.many and given and given[-1][0] is option:  # --listen A --listen B
            earlier = given.pop()
            values = earlier[2] if isinstance(earlier[2], tuple) else (earlier[2],)
            if value in values:
                raise ValueError(f"{option.flag} {text}: given twice")
            given.append((option, f"{earlier[1]} {option.flag} {text}", (*values, value)))
        else:
            given.append((option, text, value))
    # All fields at once: some are checked together (--tls-cert with --tls-key).
    changes: dict[str, Any] = {}
    try:
        for option, _, value in given:
            name, _, rest = option.path.partition(".")
            inner = changes.get(name, getattr(config, name))
            changes[name] = replace_field(inner, rest, value) if rest else value
        return dataclasses.replace(config, **changes)
    except ValueError:
        pass
    for option, text, value in given:  # one at a time, to name the option that fails
        with _about(option, text):
            config = replace_field(config, option.path, value)  # the dataclass checks it
    return config


def _settings(args: argparse.Namespace) -> Settings:
    """What to run with: the defaults, then the ``--config`` file, then the options given.

    Raises ValueError naming the file and key, or the option, that is wrong.
    """
    file = None
    if args.config is not None:
        file = configfile.load(
            Path(args.config).expanduser(),
            _OPTIONS[args.command],
            _DEFAULTS[args.command],
            functools.partial(_default, args.command),
        )
    missing = [
        option.flag
        for option in _OPTIONS[args.command]
        if option.required
        and getattr(args, option.dest) is None
        and (file is None or configfile.key_of(option) not in file.keys)
    ]
    if missing:
        raise _Missing(
            f"tether {args.command}: error: the following arguments are required: "
            + ", ".join(missing)
        )
    config = build_config(args, file.config if file is not None else None)
    if args.verbose:
        level = "debug"
    elif args.quiet:
        level = "warning"
    else:
        level = (file.log_level if file is not None else None) or "info"
    log_format = args.log_format or (file.log_format if file is not None else None) or "text"
    return Settings(config, level, log_format, file.path if file is not None else None)


class _Missing(ValueError):
    """A required option neither given nor in the config file (argparse's wording)."""


def _check_config(args: argparse.Namespace) -> int:
    """``tether check-config [--server|--client|--gateway] FILE``: load it as the role would and
    print the effective settings, as a config file."""
    path = Path(args.file).expanduser()
    role = args.role or _role_of(path)
    options = _OPTIONS[role]
    file = configfile.load(path, options, _DEFAULTS[role], functools.partial(_default, role))
    print(f"# {path}: valid for 'tether {role}'; the settings it makes (unset keys commented):")
    keys = [configfile.key_of(o) for o in options if o.required]
    missing = [key for key in keys if key not in file.keys]
    if missing:
        print(f"# required, so give them on the command line: {', '.join(missing)}")
    notes = {configfile.key_of(o): o.shown for o in options if o.shown is not None}
    print(
        configfile.render(
            file.config,
            options,
            log_level=file.log_level or "info",
            log_format=file.log_format or "text",
            notes=notes,
        ),
        end="",
    )
    return 0


def _role_of(path: Path) -> str:
    """The role a config file is for: gateway if it uses a key only gateways have (or gives
    ``server`` as a list), else client if it uses a key only clients have, else server."""
    import tomllib

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "server"  # load() says what is wrong with it
    keys = set(data)
    server, client, gateway = (
        {configfile.key_of(o) for o in _OPTIONS[role]} for role in ("server", "client", "gateway")
    )
    if keys & (gateway - server - client) or isinstance(data.get("server"), list):
        return "gateway"
    return "client" if keys & (client - server) else "server"


def _demo_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for option, text in _given(args):
        with _about(option, text):
            kwargs[option.path] = option.parse(text, _default("demo", option.path))
    return kwargs


def _role(config: ServerConfig | ClientConfig | GatewayConfig) -> str:
    """The command whose options make ``config``."""
    if isinstance(config, ServerConfig):
        return "server"
    return "client" if isinstance(config, ClientConfig) else "gateway"


def _with_file_option(message: str, config: ServerConfig | ClientConfig | GatewayConfig) -> str:
    """``message`` about an unusable file, prefixed with the option that names it when
    exactly one does: ``--token-file: cannot read /x: no such file`` (U3)."""
    role = _role(config)
    flags = []
    for option in _OPTIONS[role]:
        if option.kind == "file":
            value = functools.reduce(getattr, option.path.split("."), config)
            if value is not None and str(value) in message:
                flags.append(option.flag)
    return f"{flags[0]}: {message}" if len(flags) == 1 else message


def _setup_logging(level: str, log_format: str) -> None:
    setup_logging(getattr(logging, level.upper()), "json" if log_format == "json" else "text")


def _run(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    allocator.tune()
    finished: list[int] = []

    async def recorded() -> int:
        asyncio.get_running_loop().set_exception_handler(loop_exception_handler)
        code = await main()
        finished.append(code)
        return code

    run: Callable[[Coroutine[Any, Any, int]], int] = asyncio.run
    if not os.environ.get("TETHER_NO_UVLOOP"):
        try:
            import uvloop
        except ImportError:
            pass
        else:
            run = uvloop.run
    try:
        return run(recorded())
    except KeyboardInterrupt:
        # A SIGINT after the work was done, while the loop was closing (it had let go of
        # its signal handlers): a stop asked for while stopping, not an error.
        if finished:
            return finished[0]
        raise


MACOS_OPEN_MAX = 10240  # <sys/syslimits.h> OPEN_MAX: the most macOS allows a soft limit


def _raise_file_limit() -> None:
    """Each session holds two sockets: let the process use as many as it is allowed."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except ImportError:  # Windows: no such limit to raise
        return
    # macOS reports an unlimited hard limit but refuses a soft one above OPEN_MAX (10240):
    # try that when the hard limit itself is refused, rather than keep its default of 256.
    infinite = resource.RLIM_INFINITY
    if soft == hard:
        return
    for limit in (hard, MACOS_OPEN_MAX):
        if soft == infinite or (limit != infinite and soft >= limit):
            return
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        except (ValueError, OSError):  # pragma: no cover - platform dependent
            continue
        return


# How long the names of --server, --backend, --fallback (and a gateway's servers) may take
# to resolve at start.
RESOLVE_TIMEOUT = 5.0


async def _check_names(config: ServerConfig | ClientConfig | GatewayConfig) -> None:
    """Resolve, at start and within :data:`RESOLVE_TIMEOUT`, every host name the service
    connects to, so that a typo is refused now (exit 2) rather than once per session:
    ``--server no-such-host.invalid: name does not resolve``.

    A lookup that could not be answered (no network, no reachable name server: EAI_AGAIN,
    or no answer in time) only warns: the name may be right, and each session looks it
    up again, so a client started before the network is up still starts
    (docs/operations.md, "Start-up errors").
    """
    from .aio.util import describe_lookup, lookup_is_final

    loop = asyncio.get_running_loop()
    names: list[tuple[str, Address]] = []
    for option in _OPTIONS[_role(config)]:
        value = functools.reduce(getattr, option.path.split("."), config)
        if option.kind == "target" and isinstance(value, Address):
            names.append((option.flag, value))
        elif option.kind == "target" and isinstance(value, tuple):  # a client's servers
            names += [(option.flag, address) for address in value]
        elif option.kind == "servers" and isinstance(value, tuple):  # a gateway's servers
            names += [(option.flag, server.address) for server in value]
    names = [(flag, address) for flag, address in names if not _is_ip(address.host)]

    async def lookup(flag: str, address: Address) -> None:
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT):
                await loop.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if lookup_is_final(exc):
                raise ValueError(f"{flag} {address.host}: {describe_lookup(exc)}") from None
            why = describe_lookup(exc)
        except UnicodeError:  # the IDNA codec refused it (an empty or too long label)
            raise ValueError(f"{flag} {address.host}: not a valid host name") from None
        except TimeoutError:
            why = f"no answer from the name server within {RESOLVE_TIMEOUT:g}s"
        else:
            return
        logging.getLogger("tether").warning(
            "%s %s: %s; starting anyway, each session looks it up again", flag, address.host, why
        )

    async with asyncio.TaskGroup() as group:
        for flag, address in names:
            group.create_task(lookup(flag, address))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


_BIND_ERRORS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})


@contextlib.asynccontextmanager
async def _binding(
    flag: str, address: Address, inner: contextlib.AbstractAsyncContextManager[_T]
) -> AsyncIterator[_T]:
    """``inner``, whose failure to bind ``address`` becomes a ListenError naming ``flag``
    (the admin endpoint's ``--admin 127.0.0.1:2599: address already in use``)."""
    from .aio.util import describe

    async with contextlib.AsyncExitStack() as stack:
        try:
            value = await stack.enter_async_context(inner)
        except OSError as exc:
            if exc.errno not in _BIND_ERRORS:
                raise
            failure = ListenError(exc.errno, describe(exc), str(address))
            failure.option = flag
            raise failure from None
        yield value


ADMIN_TAKEOVER_WAIT = 10.0  # seconds a successor waits for the admin port to be free
ADMIN_RETRY = 0.1  # seconds between its attempts


@contextlib.asynccontextmanager
async def _binding_when_free(
    flag: str,
    address: Address,
    make: Callable[[], contextlib.AbstractAsyncContextManager[_T]],
    *,
    wait: float,
) -> AsyncIterator[_T]:
    """:func:`_binding` of ``make()``, tried again while ``address`` is in use, for up to
    ``wait`` seconds: after a takeover, the old server's admin endpoint holds the port until
    it exits, a moment after it let go of its sessions (docs/operations.md, "Takeover")."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    async with contextlib.AsyncExitStack() as stack:
        while True:
            try:
                value = await stack.enter_async_context(_binding(flag, address, make()))
            except ListenError as exc:
                if exc.errno != errno.EADDRINUSE or loop.time() >= deadline:
                    raise
                await asyncio.sleep(ADMIN_RETRY)
                continue
            break
        yield value


def _on_signal(loop: asyncio.AbstractEventLoop, sig: int, callback: Callable[[], None]) -> None:
    """Run ``callback`` in the loop when ``sig`` arrives.

    ``loop.add_signal_handler`` where the loop has it (Unix); elsewhere (Windows' proactor
    loop raises NotImplementedError) a plain ``signal.signal`` handler that hands the
    callback to the loop, so that Ctrl-C stops the client cleanly there too. Windows never
    delivers SIGTERM (TerminateProcess ends a process without a signal).
    """
    try:
        loop.add_signal_handler(sig, callback)
    except NotImplementedError:
        signal.signal(sig, lambda _signum, _frame: loop.call_soon_threadsafe(callback))


async def _serve_until_signal(
    settings: Settings, reread: Callable[[], Settings], *, take_over: bool = False
) -> int:
    from . import tls
    from .aio.client import TetherClient
    from .aio.gateway import TetherGateway
    from .aio.server import TetherServer
    from .aio.takeover import control_path

    service = settings.config
    stop = asyncio.Event()
    terms = 0  # SIGTERMs received: a server drains on the first, stops on the second
    serving: list[TetherServer] = []  # the server, once it listens (before that: stop)

    def on_term() -> None:
        nonlocal terms
        terms += 1
        if terms == 1 and serving:
            serving[0].drain()
        else:
            stop.set()

    loop = asyncio.get_running_loop()
    _on_signal(loop, signal.SIGINT, stop.set)
    _on_signal(loop, signal.SIGTERM, on_term)
    hangup = getattr(signal, "SIGHUP", None)  # not on Windows
    if hangup is not None:  # never the default (exit): a reload before we listen is moot
        _on_signal(
            loop,
            hangup,
            lambda: logging.getLogger("tether").info("SIGHUP while starting: ignored"),
        )
    runner: TetherServer | TetherClient | TetherGateway
    admin: contextlib.AbstractAsyncContextManager[object | None] = contextlib.nullcontext()
    if isinstance(service, GatewayConfig):
        runner = TetherGateway(service)
    else:
        served: TetherServer | TetherClient
        if isinstance(service, ServerConfig):
            state = service.state_dir or tls.default_state_dir()
            served = TetherServer(service, control=control_path(state), take_over=take_over)
        else:
            served = TetherClient(service)
        if service.admin is not None:
            from .admin import serve_admin  # aiohttp is imported only when it is used

            admin = _binding_when_free(
                "--admin",
                service.admin,
                functools.partial(serve_admin, served, service),
                # The server taken over still holds the port until it exits, just after.
                wait=ADMIN_TAKEOVER_WAIT if take_over else 0.0,
            )
        runner = served
    # After the runner read its files (a bad one is named first), before it listens.
    try:
        await _check_names(service)
    except* ValueError as group:
        raise group.exceptions[0] from None
    async with runner, admin as admin_url, allocator.trimming():
        if hangup is not None:
            reloader = Reloader(runner, settings, reread, _OPTIONS[runner.role], _setup_logging)
            _on_signal(loop, hangup, reloader)
        # Everything built so far lives as long as the process: keep the collector from
        # walking it again and again (idle CPU with many sessions).
        gc.freeze()
        for address in runner.addresses:
            print(f"READY {address}", flush=True)
        if admin_url is not None:  # the URL, and over HTTPS its certificate's fingerprint
            print(f"ADMIN {admin_url}", flush=True)
        sdnotify.ready(f"listening on {', '.join(map(str, runner.addresses))}")
        if isinstance(runner, TetherServer):
            serving.append(runner)
            await _serve_and_drain(runner, stop)
        else:
            await stop.wait()
            sdnotify.stopping()
        logging.getLogger("tether").info("shutting down")
    return 0


DRAIN_PROGRESS_INTERVAL = 10.0  # docs/operations.md, "Drain": a progress line this often


async def _wait_any(*events: asyncio.Event, within: float | None = None) -> None:
    """Until one of ``events`` is set, or ``within`` seconds pass."""
    async with asyncio.TaskGroup() as group:
        waits = [group.create_task(event.wait()) for event in events]
        await asyncio.wait(waits, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()


async def _serve_and_drain(server: TetherServer, stop: asyncio.Event) -> None:
    """Serve until ``stop`` or a drain; a drain (SIGTERM, POST /api/drain) refuses new
    sessions and keeps the live ones until they end or ``drain_timeout`` passes, or
    ``stop`` (a second SIGTERM, SIGINT) comes. The caller's exit ends the rest."""
    log = logging.getLogger("tether")
    await _wait_any(stop, server.drain_requested, server.handed_over)
    sdnotify.stopping()
    if server.handed_over.is_set():
        return  # a successor serves every session now (docs/operations.md, "Takeover")
    if stop.is_set():
        # A second SIGTERM may come before this task wakes for the first one's drain.
        if server.drain_requested.is_set():
            log.warning("stopping now: ending %d sessions left", server.session_count())
        return
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + server.config.drain_timeout
    log.info(
        "draining: new sessions refused, %d sessions left, ending the rest in %s "
        "(SIGTERM again to stop now)",
        server.session_count(),
        format_duration(server.config.drain_timeout),
    )
    # Bounded: every turn waits until the next progress line or the deadline.
    while not stop.is_set() and server.session_count() > 0:
        now = loop.time()
        if now >= deadline:
            log.warning(
                "drain timeout: ending %d sessions left (GOING_AWAY)", server.session_count()
            )
            return
        if server.sessions_gone.is_set():  # a setup admitted before the drain came in since
            server.sessions_gone.clear()
        await _wait_any(
            stop,
            server.sessions_gone,
            within=min(DRAIN_PROGRESS_INTERVAL, deadline - now),
        )
        if not stop.is_set() and server.session_count() > 0 and loop.time() < deadline:
            log.info(
                "draining: %d sessions left, %s to the drain timeout",
                server.session_count(),
                format_duration(round(deadline - loop.time())),
            )
    if stop.is_set():
        log.warning("stopping now: ending %d sessions left", server.session_count())
    else:
        log.info("drained: every session ended, after %.1fs", loop.time() - started)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse has printed
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    if args.command in (
        "fingerprint",
        "token",
        "probe",
        "ports",
        "check-config",
        "status",
        "kill",
        "drain",
    ):
        try:
            return _check_config(args) if args.command == "check-config" else _tool(args)
        except (ValueError, OSError, TetherError) as exc:
            print(f"tether: error: {exc}", file=sys.stderr)
            return 2
    try:
        if args.command == "demo":
            kwargs = _demo_kwargs(args)
        else:
            settings = _settings(args)
    except _Missing as exc:
        print(exc, file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"tether: error: {exc}", file=sys.stderr)
        return 2
    if args.command == "demo":
        return _run(lambda: run_demo(**kwargs, verbose=args.verbose))
    if args.command == "gateway" and args.print_haproxy_config:
        from .aio.gateway import haproxy_config

        assert isinstance(settings.config, GatewayConfig)
        try:
            print(haproxy_config(settings.config), end="")
        except (ValueError, TetherError) as exc:
            print(f"tether: error: {exc}", file=sys.stderr)
            return 2
        return 0
    _setup_logging(settings.log_level, settings.log_format)
    _raise_file_limit()
    try:
        take_over = bool(getattr(args, "takeover", False))
        return _run(
            lambda: _serve_until_signal(settings, lambda: _settings(args), take_over=take_over)
        )
    except (ValueError, TetherError) as exc:  # a file the configuration names is unusable
        print(f"tether: error: {_with_file_option(str(exc), settings.config)}", file=sys.stderr)
        return 2
    except ListenError as exc:  # exit 1: the listening socket could not be opened (U3)
        why = exc.strerror or str(exc)
        what = f"{exc.option} {exc.filename}"
        print(f"tether: error: {what}: {why[:1].lower()}{why[1:]}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"tether: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
