"""SIGHUP: re-read the config file and apply what can change without dropping a session.

The reloader builds the new settings as a start would (defaults, then the ``--config``
file, then the command line, which still wins), compares them key by key with those in use,
and applies every change that can take effect live; sessions already running keep what they
began with. What only a restart can change (the listening address, clear text or TLS, the
admin endpoint's address, token, certificate and clear text or not; a server's id, routing
key and memory budget) is kept as it is and named in one WARNING. A file that does not load,
or a certificate, CA or clients file that does not read, changes nothing: one ERROR, and the
old settings stay.
The process never exits on SIGHUP. systemd hears ``RELOADING=1`` before and ``READY=1``
after (``Type=notify-reload``, or ``Type=notify`` with ``ExecReload=``).

What applies live (docs/operations.md, "Reload"):

- server: session timeouts, keepalive, buffer and handshake timeout for new sessions and
  links, session and handshake limits, the backend for new sessions, the drain timeout (from
  the next drain), the clients file, the
  TLS certificate and key (re-read even when their paths did not change: a renewed
  certificate), the client CA, the log level and format;
- client: the same session settings, the server, fallback and connect timeout for new
  sessions, every trust setting and the token (re-read), the hooks, the log level and format;
- gateway: the server list (an added server is health-checked and takes new sessions once
  healthy; a removed one takes none, but the resumes its id names still go to it until a
  restart; a moved one is reached at its new address by new links), the health interval,
  connect and handshake timeouts, the routing key, the trust in the servers and the
  gateway's own certificate (re-read), the log level and format.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import sdnotify
from .config import ClientConfig, GatewayConfig, RoutedServer, ServerConfig
from .configfile import OptionLike, format_value, key_of
from .errors import TetherError

if TYPE_CHECKING:
    from .aio.client import TetherClient
    from .aio.gateway import TetherGateway
    from .aio.server import TetherServer

__all__ = [
    "RESTART_KEYS",
    "Reloader",
    "Settings",
    "apply_client",
    "apply_server",
    "server_list_changes",
]

logger = logging.getLogger("tether.reload")

# The listening socket and its TLS or not; the admin endpoint's address, token, TLS identity
# and clear text or not (tether.admin binds and reads them once, at start).
_RESTART_FIELDS = (
    "listen",
    "plaintext",
    "admin",
    "admin_token_file",
    "admin_tls_cert",
    "admin_tls_key",
    "admin_plaintext",
)
RESTART_KEYS = frozenset(name.replace("_", "-") for name in _RESTART_FIELDS)
# A server makes its session ids with these (routing.py), once, at start; a gateway
# re-reads its routing key on reload. The memory budget is built once too (its accounts are
# the live sessions'), so a reload says so rather than claiming to apply it.
_SERVER_RESTART_FIELDS = ("server_id", "routing_key_file", "memory_budget")


def _restart_fields(config: object) -> tuple[str, ...]:
    """The fields of ``config`` that only a restart changes."""
    if isinstance(config, ServerConfig):
        return (*_RESTART_FIELDS, *_SERVER_RESTART_FIELDS)
    return _RESTART_FIELDS


@dataclass(frozen=True, slots=True)
class Settings:
    """What a server, client or gateway runs with: its config and its logging."""

    config: ServerConfig | ClientConfig | GatewayConfig
    log_level: str = "info"
    log_format: str = "text"
    file: Path | None = None  # the --config file, if any


class Reloader:
    """The SIGHUP handler of one running server, client or gateway (call it from the event
    loop)."""

    def __init__(
        self,
        runner: TetherServer | TetherClient | TetherGateway,
        settings: Settings,
        reread: Callable[[], Settings],
        options: Sequence[OptionLike],
        set_logging: Callable[[str, str], None],
    ) -> None:
        self.runner = runner
        self.settings = settings
        self.reread = reread
        self.options = options
        self.set_logging = set_logging

    def __call__(self) -> None:
        sdnotify.reloading()
        try:
            self.reload()
        finally:
            sdnotify.ready(f"listening on {', '.join(map(str, self.runner.addresses))}")

    def reload(self) -> bool:
        """Re-read and apply; True if the new settings are in use."""
        old = self.settings
        if old.file is None:
            logger.info("SIGHUP: no --config file to re-read; settings unchanged")
            return False
        try:
            new = self.reread()
        except ValueError as exc:
            logger.error("reload failed, keeping the settings in use: %s", exc)
            return False
        changed = self.changes(old, new)
        frozen = _restart_fields(old.config)
        restart_keys = {name.replace("_", "-") for name in frozen}
        restart = [key for key, _, _ in changed if key in restart_keys]
        try:
            # What needs a restart stays as it is, the rest applies.
            fields = {field.name for field in dataclasses.fields(old.config)}
            config = dataclasses.replace(
                new.config,
                **{name: getattr(old.config, name) for name in frozen if name in fields},
            )
            runner = self.runner
            if isinstance(config, ServerConfig):
                assert runner.role == "server"
                apply_server(runner, config)  # type: ignore[arg-type]
            elif isinstance(config, ClientConfig):
                assert runner.role == "client"
                apply_client(runner, config)  # type: ignore[arg-type]
            else:
                assert runner.role == "gateway"
                runner.reconfigure(config)  # type: ignore[union-attr]
        except (ValueError, OSError, TetherError) as exc:
            logger.error("reload of %s failed, keeping the settings in use: %s", old.file, exc)
            return False
        self.settings = dataclasses.replace(new, config=config)
        if (new.log_level, new.log_format) != (old.log_level, old.log_format):
            self.set_logging(new.log_level, new.log_format)
        live = [
            f"{key} {was} -> {now}"
            for key, was, now in changed
            if key not in restart_keys
            and not (key == "server" and isinstance(config, GatewayConfig))
        ]
        parts = ["changed " + ", ".join(live)] if live else []
        if isinstance(config, GatewayConfig):  # its servers, by id: what was added, removed
            assert isinstance(old.config, GatewayConfig)
            parts[:0] = server_list_changes(old.config.servers, config.servers)
        whom = "links" if isinstance(config, GatewayConfig) else "sessions"
        logger.info(
            "reloaded %s: %s",
            old.file,
            ("; ".join(parts) + f" (for new {whom})") if parts else "nothing changed",
        )
        if restart:
            logger.warning(
                "reload: %s changed in %s but take effect only after a restart",
                ", ".join(restart),
                old.file,
            )
        return True

    def changes(self, old: Settings, new: Settings) -> list[tuple[str, str, str]]:
        """(key, old value, new value) for every key whose value differs."""
        out = []
        for option in self.options:
            get = functools.partial(_field, path=option.path)
            was, now = get(old.config), get(new.config)
            if was != now:
                before, after = (_plain(format_value(option.kind, v)) for v in (was, now))
                out.append((key_of(option), before, after))
        for key, was, now in (
            ("log-level", old.log_level, new.log_level),
            ("log-format", old.log_format, new.log_format),
        ):
            if was != now:
                out.append((key, was, now))
        return out


def server_list_changes(old: tuple[RoutedServer, ...], new: tuple[RoutedServer, ...]) -> list[str]:
    """A gateway's server list changes, for the reload's log line: ``servers added
    3=10.0.0.13:2598``, ``servers removed 2=10.0.0.12:2598``, ``server 1 moved
    10.0.0.11:2598 -> 10.0.0.21:2598`` (several servers in one phrase: space separated)."""
    was = {server.server_id: server for server in old}
    now = {server.server_id: server for server in new}
    added = [str(server) for server in new if server.server_id not in was]
    removed = [str(server) for server in old if server.server_id not in now]
    out = []
    if added:
        out.append("servers added " + " ".join(added))
    if removed:
        out.append("servers removed " + " ".join(removed))
    for server in new:
        before = was.get(server.server_id)
        if before is not None and before.address != server.address:
            out.append(f"server {server.server_id} moved {before.address} -> {server.address}")
    return out


def _plain(text: str | None) -> str:
    """A value as the log shows it: a TOML string without its quotes, none for unset."""
    if text is None:
        return "none"
    return text[1:-1] if text.startswith('"') else text


def _field(config: object, path: str) -> object:
    return functools.reduce(getattr, path.split("."), config)


def apply_server(server: TetherServer, config: ServerConfig) -> None:
    """Make ``config`` the server's for new links and sessions. Everything that can fail
    (the TLS identity, the clients file) is read first: a failure changes nothing."""
    from .credentials import ClientTokens

    old = server.config
    tokens = ClientTokens(config.clients) if config.clients is not None else None
    context = None
    if not config.plaintext:
        fingerprint = server.fingerprint
        server.config = config  # _tls_context reads it
        try:
            context = server._tls_context()
        except BaseException:
            server.config, server.fingerprint = old, fingerprint
            raise
        if server.fingerprint != fingerprint:
            logger.info(
                "TLS certificate for new links: %s (was %s)", server.fingerprint, fingerprint
            )
    server.config = config
    router = server._router
    router.config = config.session
    router.admission.max_sessions = config.max_sessions
    router.admission.max_per_source = config.max_sessions_per_source
    server._tokens = tokens
    router.authorize = server._authorize if tokens is not None else None
    links = server._links
    if links is not None:
        links.reconfigure(context, config.session.handshake_timeout)
        admission = links.admission
        admission.max_handshakes = config.max_handshakes
        admission.per_source = config.max_handshakes_per_source
        admission.start = config.max_handshakes // 2


def apply_client(client: TetherClient, config: ClientConfig) -> None:
    """Make ``config`` the client's for new sessions; the trust and the token are read
    again first (a renewed CA bundle, a new token), and a failure changes nothing."""
    from .aio.client import read_token
    from .aio.dial import TLSPolicy

    policy = None if config.plaintext else TLSPolicy(config)
    token = read_token(config.token_file) if config.token_file is not None else b""
    client.config = config
    client.tls_policy = policy
    client.token = token
    client.hooks.config = config.hooks
