"""The tether gateway: one address (443) in front of several tether servers.

It ends the client's TLS, reads the link's first bytes (the decisions are the core's:
protocol/routing.py, :class:`~tether.protocol.routing.FirstBytes`), connects to the
server they name (a resume) or to the healthy server with the fewest of its links (a
setup), writes those bytes to it, and from then on passes both directions through
untouched, with :class:`~tether.aio.splice.Splice` (no per-byte work, backpressure
both ways). The server runs the whole tether handshake; the gateway keeps no session
state, so any gateway routes any resume (docs/protocol.md, "Routing").

Servers are health-checked every ``health_interval`` with a tether health probe (a
client hello offering version 0, and a server hello back; a draining server answers
version 0: docs/protocol.md, "Health probe"), not only a TCP connect; a server that fails is
given no new sessions until it passes again. Links to the servers are TLS, verified by
a CA or a pinned fingerprint, or in clear text on an internal network.

A reload (:meth:`TetherGateway.reconfigure`, on SIGHUP through tether/reload.py) changes
the server list and everything else but the listening address and its clear text, for new
links: links already spliced are never touched (docs/operations.md, "Reload").
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import ssl
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

from .. import tls
from ..config import GatewayConfig, RoutedServer
from ..logs import RateLimitedLog
from ..protocol.admission import HandshakeAdmission
from ..protocol.codes import CloseCode
from ..protocol.frames import HEALTH_PROBE_VERSION, client_hello
from ..protocol.routing import FirstBytes, Refuse, RouteTo, RoutingKey, health_answer
from ..protocol.routing import parse_routing_key as _parse_key
from .link import LinkProtocol
from .listener import LinkListener
from .service import Service
from .splice import Splice
from .util import describe

__all__ = ["HAPROXY_TEMPLATE", "TetherGateway", "haproxy_config", "read_routing_key"]

logger = logging.getLogger("tether.gateway")

REFUSAL_LINGER = 2.0  # seconds a refused client may still send before the gateway closes
SETUP_ATTEMPTS = 3  # servers a setup tries before it is refused for now


def read_routing_key(path: Path) -> RoutingKey:
    """The site's routing key from its file (base64, private: mode 600)."""
    tls.check_private_file(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read routing key file {path}: {exc.strerror}") from None
    try:
        return _parse_key(text)
    except ValueError as exc:
        raise ValueError(f"routing key file {path}: {exc}") from None


class _Server:
    """A server behind the gateway, as the gateway sees it."""

    __slots__ = ("address", "checks", "healthy", "links", "listed", "server_id")

    def __init__(self, server: RoutedServer) -> None:
        self.server_id = server.server_id
        self.address = server.address  # for new links (a reload may change it)
        self.healthy = False  # until its first health check passes
        self.links = 0  # links of ours open to it now (in setup or spliced)
        # In the configured list: it takes new sessions while healthy. A server a reload
        # removed is not, but the resumes its id names still go to it (nobody else holds
        # its sessions) until the gateway restarts.
        self.listed = True
        self.checks = 0  # the generation of its health-check loop: a new one ends the old

    def __str__(self) -> str:
        return f"server {self.server_id} ({self.address})"


class _Counted(Splice):
    """The server side's splice: counts its link on the server while it lives."""

    __slots__ = ("server",)

    def __init__(self, target: asyncio.Transport, server: _Server) -> None:
        super().__init__(target)
        self.server = server

    def eof_received(self) -> bool:
        return _finished(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.links -= 1
        super().connection_lost(exc)


class _ClientSide(Splice):
    """The client side's splice, once routed: known to the gateway while it lives."""

    __slots__ = ("links", "on_closed")

    def __init__(
        self,
        target: asyncio.Transport,
        links: set[asyncio.Transport],
        on_closed: Callable[[], None] | None,
    ) -> None:
        super().__init__(target)
        self.links = links
        self.on_closed = on_closed

    def eof_received(self) -> bool:
        return _finished(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.links.discard(self.transport)
        if self.on_closed is not None:
            self.on_closed()
        super().connection_lost(exc)


def _finished(splice: Splice) -> bool:
    """A tether link half-closed by one side is over (tether's EOF is a frame, and TLS
    cannot half-close): pass the EOF on, then let the link close."""
    Splice.eof_received(splice)
    return False


class _HealthProbe(asyncio.Protocol):
    """Reads a server's answer to a client hello."""

    def __init__(self) -> None:
        self.answer = bytearray()
        self.result: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.answer += data
        verdict = health_answer(bytes(self.answer))
        if verdict is not None and not self.result.done():
            self.result.set_result(verdict)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.result.done():
            self.result.set_result(False)


class _ClientLink(asyncio.Protocol):
    """A client's link until it is routed: read its first bytes, then hand it over."""

    # One per link the gateway holds (CONTRIBUTING.md N4).
    __slots__ = (
        "_timer",
        "eof",
        "gateway",
        "on_closed",
        "peer",
        "reader",
        "refused",
        "settled",
        "transport",
    )

    def __init__(self, gateway: TetherGateway) -> None:
        self.gateway = gateway
        self.reader = FirstBytes(gateway.key, gateway.knows)
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self.refused = False
        self.peer = "?"
        self._timer: asyncio.TimerHandle | None = None
        # Set by the LinkListener: its handshake place is freed once the link is decided,
        # its descriptor counted until the transport is gone (as for a server's links).
        self.settled: Callable[[], None] | None = None
        self.on_closed: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) else "?"
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.gateway.config.handshake_timeout, self._too_slow)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return  # read and dropped: the refusal must not be lost to a reset
        decided = self.reader.decision is not None
        self.reader.receive_data(data)
        decision = self.reader.decision
        if decided or decision is None:
            return
        self._cancel_timer()
        self.settle()
        assert self.transport is not None
        if isinstance(decision, Refuse):
            self._refuse(decision)
            return
        self.transport.pause_reading()
        self.gateway.spawn(self.gateway.forward(self, decision))

    def eof_received(self) -> bool:
        self.eof = True
        # Before a decision (or after a refusal) the link closes; while we connect it
        # stays half-closed, and the EOF is passed on once the server is there.
        return self.reader.decision is not None and not self.refused

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self.settle()
        closed, self.on_closed = self.on_closed, None
        if closed is not None:
            closed()

    def settle(self) -> None:
        settled, self.settled = self.settled, None
        if settled is not None:
            settled()

    def refuse(self, code: CloseCode, reason: str) -> None:
        self._refuse(self.reader.refusal(code, reason))

    def unreachable(self) -> None:
        refusal = self.reader.unreachable()
        if refusal is None:
            assert self.transport is not None
            self.transport.abort()
        else:
            self._refuse(refusal)

    def _refuse(self, refusal: Refuse) -> None:
        transport = self.transport
        assert transport is not None
        self.refused = True
        self.gateway.log_refused(self.peer, refusal.reason)
        if not refusal.answer:
            transport.abort()
            return
        transport.write(refusal.answer)
        transport.resume_reading()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(REFUSAL_LINGER, transport.close)

    def _too_slow(self) -> None:
        self._timer = None
        if self.transport is not None:
            self.gateway.log_refused(self.peer, "no routable first bytes in time")
            self.transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _same(protocol: asyncio.BaseProtocol) -> asyncio.BaseProtocol:
    return protocol


class TetherGateway(Service):
    """Route tether links to servers. Use ``async with TetherGateway(config) as gw``."""

    role = "gateway"

    def __init__(self, config: GatewayConfig) -> None:
        super().__init__()
        self.config = config
        self.key = _routing_key(config)
        # The servers that take new sessions (while healthy), in the configured order; and
        # every server known since start by id, removed ones too (their resumes).
        self.servers = [_Server(server) for server in config.servers]
        self._by_id = {server.server_id: server for server in self.servers}
        self.fingerprint: str | None = None  # of the gateway's own certificate
        self._server_tls: ssl.SSLContext | None = None
        self._pin = _pin(config)
        self._health: list[asyncio.Task[None]] = []
        self._checking: dict[int, asyncio.Task[None]] = {}  # each server's check loop
        self._running = True  # until shutdown
        self._links: set[asyncio.Transport] = set()  # clients' links, once routed
        self._listening: LinkListener | None = None
        self._accepting: asyncio.Task[None] | None = None
        self.forwarded_total = 0
        self.refused_total = 0
        # Refused links are logged once per source, then summarised every 10 s (as a
        # server's): a gateway on 443 meets every scanner.
        self._refused_links = RateLimitedLog(logger, level=logging.INFO)

    def knows(self, server_id: int) -> bool:
        return server_id in self._by_id

    # -- the service ----------------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        self._server_tls = _server_context(config)
        # The first round of health checks before READY: new sessions find a server.
        await asyncio.gather(*(self._check_once(server) for server in self.servers))
        # The server's listener: the first byte decides TLS or clear text (a clear-text
        # client of a TLS gateway is told TLS_REQUIRED), and handshakes in progress are
        # limited as a server limits them (docs/security.md, "Abuse").
        listener = LinkListener(
            # Duck-typed: the listener only sets settled/on_closed and gives it to the loop.
            cast(Callable[[], LinkProtocol], lambda: _ClientLink(self)),
            self._client_tls(),
            handshake_timeout=config.handshake_timeout,
            admission=HandshakeAdmission(
                config.max_handshakes,
                config.max_handshakes_per_source,
                start=config.max_handshakes // 2,
            ),
            refused=self.log_refused,
            spawn=self.spawn,
        )
        listener.open(config.listen)
        self.addresses = listener.addresses
        self._listening = listener
        self._accepting = self.spawn(listener.serve())
        for server in self.servers:
            self._watch(server, now=False)
        self._health.append(self.spawn(self._summarise()))
        logger.info(
            "gateway listening on %s; %s; servers %s (%s)",
            ", ".join(map(str, self.addresses)),
            f"TLS 1.3, certificate {self.fingerprint}" if self.fingerprint else "clear text",
            ", ".join(f"{s.server_id}={s.address}" for s in self.servers),
            "clear text" if config.server_plaintext else "TLS",
        )

    def stop_listening(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            self._accepting = None
        if self._listening is not None:
            self._listening.close()
            self._listening = None
        self._refused_links.flush()

    def shutdown(self) -> None:
        """Stop checking and drop every routed link: the sessions live on in their
        servers, and their clients resume through any gateway."""
        self._running = False
        for task in [*self._health, *self._checking.values()]:
            task.cancel()
        for link in list(self._links):
            link.abort()

    @property
    def client_links(self) -> list[asyncio.Transport]:
        """The clients' links routed and open now."""
        return list(self._links)

    def relays(self) -> Iterable[Any]:
        return ()

    def _client_tls(self) -> ssl.SSLContext | None:
        config = self.config
        if config.plaintext:
            logger.warning(
                "client links to %s are in clear text (--plaintext): use it only inside a "
                "trusted network",
                config.listen,
            )
            return None
        context, self.fingerprint = _identity(config)
        return context

    # -- reload ---------------------------------------------------------------------------

    def reconfigure(self, config: GatewayConfig) -> None:
        """Make ``config`` the gateway's for new links (a reload: tether/reload.py).

        Everything that can fail (the routing key, the gateway's certificate, the servers'
        CA) is read first, and a failure changes nothing (ValueError, OSError or
        TetherError). ``listen`` and ``plaintext`` stay as the gateway started: only a
        restart changes them. Links already spliced are never touched. The server list:
        an added server is checked at once and takes new sessions once healthy; a removed
        one takes no new sessions, but the resumes its id names still go to it until the
        gateway restarts; a server whose address changed is checked again there, and new
        links (resumes too) go to the new address.
        """
        old = self.config
        config = dataclasses.replace(config, listen=old.listen, plaintext=old.plaintext)
        key = _routing_key(config)
        server_tls = _server_context(config)
        pin = _pin(config)
        context, fingerprint = (None, None) if old.plaintext else _identity(config)
        # From here on nothing fails.
        self.config = config
        self.key = key
        self._server_tls, self._pin = server_tls, pin
        if self._listening is not None:
            self._listening.reconfigure(context, config.handshake_timeout)
        if fingerprint != self.fingerprint:
            logger.info("TLS certificate for new links: %s (was %s)", fingerprint, self.fingerprint)
            self.fingerprint = fingerprint
        self._reconfigure_servers(config.servers)

    def _reconfigure_servers(self, servers: tuple[RoutedServer, ...]) -> None:
        wanted = {routed.server_id for routed in servers}
        for server in self.servers:
            if server.server_id not in wanted:  # removed: no new sessions, resumes still go
                server.listed = False
                self._unwatch(server)
        for routed in servers:
            known = self._by_id.get(routed.server_id)
            if known is None:
                known = self._by_id[routed.server_id] = _Server(routed)
            elif known.listed and known.address == routed.address:
                continue  # as it was: its checks go on
            else:  # back in the list, or moved: unchecked until a check there passes
                known.address, known.listed, known.healthy = routed.address, True, False
            self._watch(known, now=True)
        self.servers = [self._by_id[routed.server_id] for routed in servers]

    # -- routing --------------------------------------------------------------------------

    def _candidates(self, decision: RouteTo) -> list[_Server]:
        if decision.server_id is not None:
            return [self._by_id[decision.server_id]]  # whatever its health: only it can
        healthy = [server for server in self.servers if server.healthy]
        healthy.sort(key=lambda server: server.links)
        return healthy[:SETUP_ATTEMPTS]

    async def forward(self, link: _ClientLink, decision: RouteTo) -> None:
        """Connect ``link`` to its server and splice them (a task per routed link, until
        it is spliced)."""
        client = link.transport
        assert client is not None
        try:
            for server in self._candidates(decision):
                if client.is_closing():
                    return
                inbound = _Counted(client, server)  # server -> client
                server.links += 1
                try:
                    async with asyncio.timeout(self.config.connect_timeout):  # CONTRIBUTING.md C6
                        remote = await self._connect(server, functools.partial(_same, inbound))
                except (OSError, TimeoutError, tls.TrustError) as exc:
                    server.links -= 1
                    logger.warning("%s: cannot connect: %s", server, describe(exc))
                    if decision.server_id is None:
                        self._set_health(server, False, describe(exc))
                    continue
                self._splice(link, client, remote)
                self.forwarded_total += 1
                return
            if decision.server_id is None:
                link.refuse(CloseCode.OVERLOADED, "server busy")  # transient: it retries
            else:
                # The client retries until its server is back or its session expires; from
                # version 4 it is told why (SERVER_UNREACHABLE), and its end reason says so.
                link.unreachable()
        except Exception:  # a bug must cost this link only, never the gateway
            logger.exception("link from %s failed to be routed", link.peer)
            client.abort()

    def _splice(self, link: _ClientLink, client: asyncio.Transport, remote: Any) -> None:
        remote_transport: asyncio.Transport = remote
        remote_transport.write(link.reader.first_bytes())
        if link.eof and remote_transport.can_write_eof():
            remote_transport.write_eof()
        closed, link.on_closed = link.on_closed, None  # the splice owns the transport now
        outbound = _ClientSide(remote_transport, self._links, closed)  # client -> server
        outbound.transport = client
        self._links.add(client)
        client.set_protocol(outbound)
        if client.is_closing():
            remote_transport.close()  # the client went away while we connected
        else:
            client.resume_reading()

    async def _connect(
        self, server: _Server, protocol: Callable[[], asyncio.BaseProtocol]
    ) -> asyncio.Transport:
        loop = asyncio.get_running_loop()
        host, port = server.address.host, server.address.port
        context = self._server_tls
        if context is None:
            transport, _ = await loop.create_connection(protocol, host, port)
            return transport
        transport, _ = await tls.create_tls_connection(
            protocol,
            host,
            port,
            context=context,
            server_hostname=host,
            # No TLS session resumption to the servers: reading SSLObject.session leaks its
            # copy on CPython 3.11 (tests/fuzz, F3), once per link here.
            verify=self._verify if self._pin is not None else None,
            ssl_handshake_timeout=self.config.connect_timeout,
        )
        return transport

    def _verify(self, der: bytes) -> None:
        if tls.fingerprint(der) != self._pin:
            raise tls.TrustError(
                f"server certificate {tls.fingerprint(der)} is not the pinned {self._pin}"
            )

    def log_refused(self, peer: str, why: str) -> None:
        self.refused_total += 1
        self._refused_links.hit(f"link from {peer} refused", why)

    async def _summarise(self) -> None:
        """Write the refusal summaries whose window has passed (until the gateway stops)."""
        while self._running:
            await asyncio.sleep(self._refused_links.window)
            self._refused_links.handle_timer()

    # -- health ---------------------------------------------------------------------------

    def _watch(self, server: _Server, *, now: bool) -> None:
        """Start ``server``'s check loop (ending the one it had), the first check ``now``
        or after one interval."""
        self._unwatch(server)
        self._checking[server.server_id] = self.spawn(
            self._check_forever(server, server.checks, now=now)
        )

    def _unwatch(self, server: _Server) -> None:
        server.checks += 1  # the old loop, and a check it has in flight, are void
        task = self._checking.pop(server.server_id, None)
        if task is not None:
            task.cancel()

    async def _check_forever(self, server: _Server, generation: int, *, now: bool) -> None:
        """Until the gateway stops or the server's checks are restarted or ended: one check
        per interval (the interval in use at each turn). Bounded by the flags as well as by
        the cancellation: a cancellation swallowed when the check ends at the same moment
        (as Python 3.11's wait_for could, gh-86296) must not keep the loop going, and the
        TaskGroup waiting."""
        while self._running and server.checks == generation:
            if not now:
                await asyncio.sleep(self.config.health_interval)
            now = False
            if self._running and server.checks == generation:
                await self._check_once(server, generation)

    async def _check_once(self, server: _Server, generation: int | None = None) -> None:
        why = "no tether server hello, or draining"
        ok = False
        try:
            async with asyncio.timeout(self.config.connect_timeout):  # CONTRIBUTING.md C6
                ok = await self._hello(server)
        except (OSError, TimeoutError, tls.TrustError) as exc:
            why = describe(exc)
        except Exception as exc:  # a bug must cost this check only, never the gateway
            logger.exception("health check of %s failed", server)
            why = describe(exc)
        if generation is None or server.checks == generation:  # not of an older address
            self._set_health(server, ok, why)

    async def _hello(self, server: _Server) -> bool:
        probe = _HealthProbe()
        transport = await self._connect(server, lambda: probe)
        try:
            # docs/protocol.md, "Health probe": a draining server answers it version 0.
            transport.write(client_hello(HEALTH_PROBE_VERSION))
            return await probe.result
        finally:
            transport.close()

    def _set_health(self, server: _Server, ok: bool, why: str) -> None:
        if ok and not server.healthy:
            logger.info("%s: healthy", server)
        elif not ok and server.healthy:
            logger.warning("%s: unhealthy (%s); no new sessions go there", server, why)
        elif not ok:
            logger.debug("%s: still unhealthy (%s)", server, why)
        server.healthy = ok

    def snapshot(self) -> dict[int, tuple[bool, int]]:
        """Each listed server's health and open links: for tests and status pages."""
        return {s.server_id: (s.healthy, s.links) for s in self.servers}


def _routing_key(config: GatewayConfig) -> RoutingKey:
    """The routing key ``config`` names, its servers and trust checked first (at start and
    on a reload: a gateway always has all three)."""
    if not config.servers:
        raise ValueError("a gateway needs at least one --server")
    if config.routing_key_file is None:
        raise ValueError("a gateway needs the servers' --routing-key-file")
    if not (config.server_plaintext or config.server_ca or config.server_fingerprint):
        raise ValueError(
            "say how to trust the servers: --server-ca, --server-fingerprint or --server-plaintext"
        )
    return read_routing_key(config.routing_key_file)


def _pin(config: GatewayConfig) -> str | None:
    fingerprint = config.server_fingerprint
    return tls.parse_fingerprint(fingerprint) if fingerprint else None


def _server_context(config: GatewayConfig) -> ssl.SSLContext | None:
    """The TLS of links to the servers (None: clear text, which it says)."""
    if not config.server_plaintext:
        return tls.client_context(ca=config.server_ca)
    # CONTRIBUTING.md S1: clear text only when asked, and said (at start and on a reload).
    logger.warning(
        "links to the servers are in clear text (--server-plaintext): anyone on that "
        "network can read and change every session; use it only on an internal network"
    )
    return None


def _identity(config: GatewayConfig) -> tuple[ssl.SSLContext, str]:
    """The clients' TLS and its certificate's fingerprint: the configured certificate, or
    the one made (once) in the state directory. Read again on every call (a reload)."""
    identity = tls.configured_identity(config.tls_cert, config.tls_key, config.state_dir, "gateway")
    return tls.server_context(identity), identity.fingerprint


# deploy/haproxy/haproxy.cfg is this, for the servers in its header (a test keeps them equal).
HAPROXY_TEMPLATE = """\
# HAProxy in front of tether servers, routing by the routing field of docs/protocol.md, "Routing".
#
# HAProxy ends the clients' TLS (the certificate clients check or pin), reads the first bytes of
# the tether stream in TCP mode, and sends
#   - a setup (byte 10 is 0x01, SETUP) to the server with the fewest connections (leastconn);
#   - a resume (bytes 10-13 are 06 00 00 10, ROUTE) to the server whose id is at bytes 14-15,
#     after checking the 6-byte tag at bytes 24-29: HMAC-SHA256(routing key, bytes 14-23).
# Anything else is closed without a byte. Servers are health-checked with a tether hello.
#
# Made by `tether gateway --server 1=10.0.0.11:2598 --server 2=10.0.0.12:2598 --server-ca
# /etc/tether/servers-ca.pem --print-haproxy-config`: give your servers (and --routing-key-file to
# fill in ROUTING_KEY_BASE64, the servers' key, base64), then put the certificate clients trust
# (PEM: chain, then key) in /etc/tether/gateway.pem.
# tests/aio/test_haproxy.py runs this file, with loopback addresses, against real servers.

global
    log stdout format raw local0 info
    # Two sockets per session, so HAProxy needs a file limit above 2 x maxconn.
    maxconn 100000

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    # Longer than the clients' keepalive (3 s default): an idle session sends a PING every 3 s.
    timeout client 1h
    timeout server 1h

frontend tether
    bind :443 ssl crt /etc/tether/gateway.pem ssl-min-ver TLSv1.3
    # The first bytes: 14 decide a setup, 30 a resume; a client sends them in one write.
    tcp-request inspect-delay 10s
    acl setup   req.payload(10,1) -m bin 01
    acl route   req.payload(10,4) -m bin 06000010
    acl whole   req.len ge 30
    tcp-request content set-var(sess.tag) req.payload(24,6),hex if route whole
    tcp-request content set-var(sess.want) req.payload(14,10),hmac(sha256,{key}),bytes(0,6),hex if route whole
    acl tag_ok  var(sess.want),strcmp(sess.tag) eq 0
    tcp-request content accept if setup
    tcp-request content accept if route whole tag_ok
    tcp-request content reject if route whole
    tcp-request content reject if {{ req.len ge 14 }} !setup !route
    # Neither within the inspect delay (a silent or a version-2 client): closed.
    tcp-request content reject
    default_backend tether_servers

backend tether_servers
    balance leastconn
    # A resume goes to its server even when its health check fails (only it holds the session;
    # the client keeps retrying until it is back or the session expires).
    force-persist if {{ req.payload(10,1) -m bin 06 }}
{use_servers}    # The health check: a tether health probe (a client hello for versions 0..3) answered
    # by a server hello of version 2 to 4; a draining server answers version 0 (rbinary
    # matches the answer in upper-case hex).
    option tcp-check
{check_connect}    tcp-check send-binary 895445544845520a0003
    tcp-check expect rbinary ^895445544845520A0[234]
    default-server check inter 3s fall 1 rise 1{server_tls}
{servers}"""  # noqa: E501 - HAProxy has no line continuation


def haproxy_config(config: GatewayConfig) -> str:
    """HAProxy's configuration for the same servers, routing as this gateway does
    (docs/deployment.md, "HAProxy at scale"): ``tether gateway --print-haproxy-config``."""
    key = "ROUTING_KEY_BASE64"
    if config.routing_key_file is not None:
        read_routing_key(config.routing_key_file)  # a bad key fails here, not in HAProxy
        key = "".join(config.routing_key_file.read_text().split())
    use_servers = "".join(
        f"    use-server s{s.server_id} if {{ req.payload(14,2) -m bin {s.server_id:04x} }}\n"
        for s in config.servers
    )
    servers = "".join(f"    server s{s.server_id} {s.address}\n" for s in config.servers)
    server_tls = ""
    if not config.server_plaintext:
        ca = config.server_ca or Path("/etc/tether/servers-ca.pem")
        server_tls = f" ssl verify required ca-file {ca}"
    return HAPROXY_TEMPLATE.format(
        use_servers=use_servers,
        servers=servers,
        key=key,
        check_connect="" if config.server_plaintext else "    tcp-check connect ssl\n",
        server_tls=server_tls,
    )
