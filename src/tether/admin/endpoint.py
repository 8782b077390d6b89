"""The admin endpoint of a running server or client: HTTP on the service's own event loop,
served by aiohttp (no HTTP parsing of ours).

Routes (docs/operations.md, "Admin endpoint"): ``GET /metrics``, ``GET /api/sessions``,
``GET /api/sessions/ID`` and ``DELETE /api/sessions/ID`` (ID: a unique prefix of the
session id), ``GET /healthz``, ``GET /readyz``, and the status page ``GET /`` (static
files shipped in ``static/``; they carry no data, the page fetches ``/api/sessions``).

Exposure (docs/security.md, "Admin endpoint"): loopback only unless a token file is
given (config.py refuses it otherwise), then every route but the static page needs
``Authorization: Bearer TOKEN`` (401 and nothing more); the Host header must name the
bound address or a loopback name (a DNS-rebinding page gets 403), and a request whose
Origin is another site gets 403. Plain HTTP on loopback; beyond it HTTPS (the standard
library's ``ssl``, TLS 1.3) with ``admin_tls_cert`` or, on a server, its links' own identity,
unless ``admin_plaintext`` asks for clear text (a WARNING at start; CONTRIBUTING.md S1).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import ssl
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import tls
from ..aio.link import SessionRelay
from ..aio.service import Service, TrafficStatistics
from ..config import Address, ClientConfig, ServerConfig, admin_is_local, is_loopback
from ..protocol.codes import CloseCode
from ..protocol.session import SessionState
from .metrics import registry_for

__all__ = ["AdminEndpoint", "AdminListening", "admin_tls", "read_admin_token", "serve_admin"]

logger = logging.getLogger("tether.admin")

MAX_TOKEN_BYTES = 4096  # an admin token file holds one line, not a document
# Bytes are summed over every session (about 0.5 us each): at most once per this many
# seconds, however many pages and scrapers ask.
TRAFFIC_MAX_AGE = 1.0
SESSIONS_SHOWN = 500  # /api/sessions lists this many unless ?limit= says otherwise
MAX_SESSIONS_SHOWN = 100_000
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
STATIC_FILES = {  # path -> (file in static/, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/status.js": ("status.js", "text/javascript; charset=utf-8"),
    "/status.css": ("status.css", "text/css; charset=utf-8"),
}
# The page loads only its own script and style and talks only to this endpoint.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def read_admin_token(path: Path) -> bytes:
    """The admin token from ``path``: a secret, so a file others can read is refused."""
    try:
        mode = path.stat().st_mode
        token = path.read_bytes().strip()
    except OSError as exc:
        raise ValueError(f"admin token file {path}: {exc.strerror}") from None
    if os.name == "posix" and mode & 0o077:
        raise ValueError(
            f"admin token file {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
        )
    if not token or len(token) > MAX_TOKEN_BYTES or b"\n" in token:
        raise ValueError(f"admin token file {path}: expected one line of 1 to 4096 bytes")
    return token


class AdminEndpoint:
    """The aiohttp application serving one service's admin routes."""

    def __init__(self, service: Service, address: Address, token: bytes | None) -> None:
        self.service = service
        self.address = address
        self.token = token
        self._traffic: tuple[float, TrafficStatistics] | None = None
        self.registry = registry_for(service, self.traffic)
        self.app = web.Application(middlewares=[self._guard])
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_get("/api/sessions", self.list_sessions)
        self.app.router.add_get("/api/sessions/{id}", self.get_session)
        self.app.router.add_delete("/api/sessions/{id}", self.delete_session)
        self.app.router.add_post("/api/drain", self.drain)
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.readyz)
        for path in STATIC_FILES:
            self.app.router.add_get(path, self.static)
        self._hosts = self._allowed_hosts(address.host)

    def traffic(self) -> TrafficStatistics:
        """The service's traffic, summed at most once per TRAFFIC_MAX_AGE."""
        now = asyncio.get_running_loop().time()
        cached = self._traffic
        if cached is None or now - cached[0] >= TRAFFIC_MAX_AGE:
            cached = self._traffic = (now, self.service.traffic())
        return cached[1]

    # -- who may ask -----------------------------------------------------------------

    @staticmethod
    def _allowed_hosts(host: str) -> frozenset[str] | None:
        """Host header names accepted; None: any (a wildcard address behind a token)."""
        if host in ("0.0.0.0", "::", ""):
            return None
        names = {host.lower()}
        if is_loopback(host):
            names |= LOOPBACK_NAMES
        return frozenset(names)

    def _host_ok(self, request: web.Request) -> bool:
        if self._hosts is None:
            return True
        try:
            host = urlsplit(f"//{request.host}").hostname
        except ValueError:
            return False
        return host is not None and host.lower() in self._hosts

    def _origin_ok(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:
            return True
        try:
            netloc = urlsplit(origin).netloc
        except ValueError:
            return False
        return netloc.lower() == request.host.lower()

    def _authorized(self, request: web.Request) -> bool:
        if self.token is None:
            return True
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        given = credentials.strip().encode("utf-8", "replace")
        return scheme.lower() == "bearer" and hmac.compare_digest(given, self.token)

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self._host_ok(request) or not self._origin_ok(request):
            return web.Response(status=403)  # DNS rebinding, or another site's page
        if request.path not in STATIC_FILES and not self._authorized(request):
            return web.Response(status=401)
        response = await handler(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @staticmethod
    def _who(request: web.Request) -> str:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        return str(Address(*peer[:2])) if peer else "an unknown peer"

    # -- routes ----------------------------------------------------------------------

    async def static(self, request: web.Request) -> web.Response:
        name, content_type = STATIC_FILES[request.path]
        body = resources.files("tether.admin").joinpath("static", name).read_bytes()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def list_sessions(self, request: web.Request) -> web.Response:
        service = self.service
        try:
            limit = int(request.query.get("limit", SESSIONS_SHOWN))
        except ValueError:
            return web.json_response({"error": "limit: not a whole number"}, status=400)
        limit = max(0, min(limit, MAX_SESSIONS_SHOWN))
        stats = service.statistics()
        traffic = self.traffic()
        now = asyncio.get_running_loop().time()
        shown = self._relays(limit)
        return web.json_response(
            {
                "role": stats.role,
                "local_name": service.local_name,
                "listening": [str(a) for a in service.addresses],
                "time": time.time(),
                "totals": {
                    "sessions": stats.sessions,
                    "attached": stats.attached,
                    "detached": stats.detached,
                    "sessions_total": stats.sessions_total,
                    "resumes_total": stats.resumes_total,
                    "ended_total": stats.ended_total,
                    "expired_total": stats.expired_total,
                    "rejected_total": stats.rejected_total,
                    "bytes_sent": traffic.bytes_sent,
                    "bytes_received": traffic.bytes_received,
                    "replay_buffered": traffic.replay_buffered,
                    "handshakes_in_flight": stats.handshakes_in_flight,
                    "accepting": stats.accepting,
                },
                "sessions": [_session_json(r, service, now) for r in shown],
                "sessions_shown": len(shown),
                "events": [
                    {"at": e.at, "session": e.session_id, "kind": e.kind, "detail": e.detail}
                    for e in reversed(service.recent_events())
                ],
            }
        )

    def _relays(self, limit: int | None = None) -> list[SessionRelay]:
        """The live sessions that have an id (a client's session gets one at setup); with
        ``limit``, at most that many, detached ones (the ones to watch) first."""
        live = [r for r in self.service.relays() if r.core.session_id and not r.core.closed]
        if limit is None or len(live) <= limit:
            return live
        detached = [r for r in live if r.core.state is SessionState.DETACHED]
        return (detached + [r for r in live if r.core.state is not SessionState.DETACHED])[:limit]

    def _find(self, request: web.Request) -> SessionRelay | web.Response:
        """The one live session whose id starts with the route's ID, or the error."""
        prefix = request.match_info["id"].lower()
        found = [r for r in self._relays() if r.core.session_id.hex().startswith(prefix)]
        if not found:
            return web.json_response({"error": "no such session"}, status=404)
        if len(found) > 1:
            return web.json_response({"error": "ambiguous session id prefix"}, status=409)
        return found[0]

    async def get_session(self, request: web.Request) -> web.Response:
        relay = self._find(request)
        if isinstance(relay, web.Response):
            return relay
        now = asyncio.get_running_loop().time()
        return web.json_response(_session_json(relay, self.service, now))

    async def delete_session(self, request: web.Request) -> web.Response:
        relay = self._find(request)
        if isinstance(relay, web.Response):
            return relay
        sid = relay.core.session_id.hex()
        if self.service.handing_over:  # its state may be with the successor already
            return web.json_response(
                {"error": "a takeover is under way: ask the new server"}, status=409
            )
        who = self._who(request)
        logger.warning(
            "session %s: ended by the admin endpoint, asked by %s%s",
            sid[:12],
            who,
            " (with the admin token)" if self.token is not None else "",
        )
        relay.abort(CloseCode.GOING_AWAY, "ended by an operator")
        return web.json_response({"id": sid, "ended": True})

    async def healthz(self, request: web.Request) -> web.Response:
        """Answering proves the loop turns; ``loop_lag`` is one turn, measured now."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.sleep(0)
        listening = [str(a) for a in self.service.addresses]
        body = {"ok": bool(listening), "listening": listening, "loop_lag": loop.time() - start}
        return web.json_response(body, status=200 if listening else 503)

    async def readyz(self, request: web.Request) -> web.Response:
        if self.service.draining:  # docs/operations.md, "Drain"
            return web.json_response({"ready": False, "reason": "draining"}, status=503)
        ready = self.service.accepting()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def drain(self, request: web.Request) -> web.Response:
        """Start a drain, as SIGTERM does (guarded as DELETE is: token, Host, Origin)."""
        service = self.service
        already = service.draining
        if service.handing_over:
            return web.json_response(
                {"error": "a takeover is under way: ask the new server"}, status=409
            )
        if not service.drain():
            return web.json_response({"error": "only a server drains"}, status=409)
        if not already:
            logger.warning(
                "drain asked by %s%s",
                self._who(request),
                " (with the admin token)" if self.token is not None else "",
            )
        return web.json_response({"draining": True, "sessions": len(list(service.relays()))})


def _session_json(relay: SessionRelay, service: Service, now: float) -> dict[str, Any]:
    stats = relay.core.statistics()
    wall = time.time()
    since = stats.detached_since if stats.state == "detached" else None
    return {
        "id": stats.session_id,
        "state": stats.state,
        "peer": relay.peer,
        service.local_name: relay.local_address,
        "since": _iso(wall - (now - relay.started_at)),
        "detached_for": now - since if since is not None else None,
        "expires_in": (
            max(stats.expires_at - now, 0.0)
            if since is not None and stats.expires_at is not None
            else None
        ),
        "bytes_sent": stats.bytes_sent,
        "bytes_received": stats.bytes_received,
        "replay_buffered": stats.replay_buffered,
        "bytes_replayed": stats.bytes_replayed,
        "resumes": stats.resumes,
        "links": stats.links,
    }


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def url_of(address: Address, scheme: str = "http") -> str:
    host = "127.0.0.1" if address.host == "0.0.0.0" else address.host
    host = "[::1]" if host == "::" else f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{address.port}/"


@dataclass(frozen=True, slots=True)
class AdminListening:
    """Where the admin endpoint listens: its URL and, over HTTPS, its certificate's
    fingerprint (what ``tether status --admin-fingerprint`` pins). ``str()`` is what the
    CLI prints after ``ADMIN``."""

    url: str
    fingerprint: str | None = None

    def __str__(self) -> str:
        return f"{self.url} {self.fingerprint}" if self.fingerprint else self.url


def admin_tls(config: ServerConfig | ClientConfig) -> tuple[ssl.SSLContext, str] | None:
    """The admin endpoint's TLS context and certificate fingerprint; None for plain HTTP
    (loopback without admin_tls_cert, or admin_plaintext). A server without an admin
    certificate uses its links' identity: --tls-cert, or the one in its state directory
    (made there on first start, even with --plaintext links)."""
    assert config.admin is not None
    if config.admin_tls_cert is not None and config.admin_tls_key is not None:
        identity = tls.load_identity(config.admin_tls_cert, config.admin_tls_key)
    elif config.admin_plaintext or admin_is_local(config.admin.host):
        return None
    elif not isinstance(config, ServerConfig):  # ClientConfig refuses this
        raise ValueError("not loopback: the admin endpoint needs admin_tls_cert")
    else:
        identity = tls.configured_identity(
            config.tls_cert, config.tls_key, config.state_dir, "server"
        )
    return tls.server_context(identity), identity.fingerprint


@contextlib.asynccontextmanager
async def serve_admin(
    service: Service, config: ServerConfig | ClientConfig
) -> AsyncIterator[AdminListening | None]:
    """Serve ``config.admin`` for ``service`` while the block runs; yields where (the real
    port for ``:0``), or None when the endpoint is off."""
    if config.admin is None:
        yield None
        return
    token = read_admin_token(config.admin_token_file) if config.admin_token_file else None
    secure = admin_tls(config)
    context, fingerprint = secure if secure is not None else (None, None)
    endpoint = AdminEndpoint(service, config.admin, token)
    runner = web.AppRunner(endpoint.app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(
            runner, config.admin.host, config.admin.port, ssl_context=context, reuse_address=True
        )
        await site.start()
        host, port = runner.addresses[0][:2]
        bound = Address(host, port)
        endpoint.address = bound
        listening = AdminListening(url_of(bound, "https" if context else "http"), fingerprint)
        logger.info(
            "admin endpoint on %s (status page, /metrics, /api/sessions); %s%s",
            listening.url,
            f"TLS 1.3, certificate {fingerprint}" if fingerprint else "plain HTTP",
            "; it requires the admin token" if token is not None else "",
        )
        if context is None and not admin_is_local(config.admin.host):
            logger.warning(
                "the admin endpoint on %s is in clear text (--admin-plaintext): its token and "
                "the sessions it shows cross the network readable; use it only inside a "
                "trusted network",
                listening.url,
            )
        yield listening
    finally:
        await runner.cleanup()
