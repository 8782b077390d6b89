"""The tether server (the XTE role): accepts links, authenticates them, routes each
resume to its session by id, and relays every session to the one configured backend.

Each new session opens exactly one backend connection, to the address in the
server's configuration (a client cannot choose it: no open proxy). While a client
is away the backend connection stays open; what the backend sends is kept in the
session's replay buffer up to its bound, then the backend is no longer read.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..config import Address, ServerConfig
from ..protocol.codes import CloseCode
from ..protocol.events import (
    HandshakeFailed,
    LinkLost,
    ResumeRequested,
    SessionEnded,
    SetupRequested,
)
from ..protocol.handshake import ServerHandshake
from ..protocol.session import Session
from .link import LinkProtocol, LocalProtocol, Service, SessionRelay
from .stream import TetherStream

Handler = Callable[[TetherStream], Awaitable[None]]

__all__ = ["ServerStatistics", "TetherServer"]

logger = logging.getLogger("tether.server")
ENDED_MEMORY = 16384  # recently ended session ids remembered to answer a late resume


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    sessions: int
    attached: int
    detached: int
    sessions_total: int
    resumes_total: int
    rejected_total: int
    expired_total: int
    handshakes_failed: int


class _ServerSession(SessionRelay):
    def __init__(self, server: TetherServer, core: Session, peer: str) -> None:
        sid = core.session_id.hex()[:12]
        super().__init__(core, logger)
        self.server = server
        self.sid = sid
        self.peer = peer

    def on_link_lost(self, event: LinkLost | None) -> None:
        why = event.reason if event else "connection closed"
        self.log.info("session %s: link lost (%s); holding the backend", self.sid, why)

    def on_ended(self, event: SessionEnded) -> None:
        self.server._forget(self, event)


class _ServerLink(LinkProtocol):
    def __init__(self, server: TetherServer) -> None:
        super().__init__()
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.hs = ServerHandshake(server.config.session, self.loop.time())
        self._timer: asyncio.TimerHandle | None = None
        self.peer = "?"
        self._pending_setup = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        when = self.hs.next_timer()
        if when is not None:
            self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.hs.handle_timer(self.loop.time())
        self._pump_handshake()

    def handshake_data(self, data: bytes) -> None:
        self.hs.receive_data(data)
        self._pump_handshake()

    def handshake_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.transport = None

    def _pump_handshake(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for buf in self.hs.data_to_send():
            transport.write(buf)
        while (event := self.hs.next_event()) is not None:
            if isinstance(event, SetupRequested):
                self._pending_setup = True
                self.server._spawn(self._setup())
            elif isinstance(event, ResumeRequested):
                self.server._resume(self, event.session_id)
            elif isinstance(event, HandshakeFailed):
                self.server._handshakes_failed += 1
                logger.info("link from %s refused: %s", self.peer, event.reason)
                for buf in self.hs.data_to_send():  # the REJECT goes out before the close
                    transport.write(buf)
                transport.close()
        if self.hs.done and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _setup(self) -> None:
        server = self.server
        if server.handler is not None:
            self._setup_stream(server.handler)
            return
        backend_proto = LocalProtocol(CloseCode.BACKEND_RESET)
        backend: asyncio.BaseTransport | None = None
        try:
            if len(server._sessions) >= server.config.max_sessions:
                raise _Refused(CloseCode.OVERLOADED, "server holds its maximum of sessions")
            target = server.config.backend
            try:
                connected, _ = await asyncio.wait_for(
                    self.loop.create_connection(lambda: backend_proto, target.host, target.port),
                    server.config.backend_connect_timeout,
                )
            except (OSError, TimeoutError) as exc:
                raise _Refused(
                    CloseCode.BACKEND_UNAVAILABLE, f"backend {target} unreachable: {exc}"
                ) from None
            backend = connected
            if self.transport is None or self.hs.done:
                connected.close()  # the link died while we reached the backend
                return
            core = self.hs.accept_setup(self.loop.time())
            relay = server._register(core, self.peer)
            self.relay = relay
            relay.set_link(self.transport)
            self._pump_handshake()  # the ACCEPT goes out before any session frame
            backend_proto.bind(relay)  # what the backend already said follows it
            relay.log.info(
                "session %s: new from %s, backend %s", relay.sid, self.peer, server.config.backend
            )
            leftover = self.hs.leftover()
            if leftover:
                relay.link_data(self.transport, leftover)
            relay.pump()
        except _Refused as exc:
            logger.warning("setup from %s rejected: %s", self.peer, exc.reason)
            server._rejected += 1
            if backend is not None:
                backend.close()
            self.hs.reject(exc.code, exc.reason)
            self._pump_handshake()

    def _setup_stream(self, handler: Handler) -> None:
        """A library server: the session goes to ``handler``, not to a backend."""
        server = self.server
        if len(server._sessions) >= server.config.max_sessions:
            server._rejected += 1
            self.hs.reject(CloseCode.OVERLOADED, "server holds its maximum of sessions")
            self._pump_handshake()
            return
        if self.transport is None or self.hs.done:
            return
        core = self.hs.accept_setup(self.loop.time())
        relay = server._register(core, self.peer)
        self.relay = relay
        relay.set_link(self.transport)
        self._pump_handshake()
        stream = TetherStream()
        stream._bind(relay)
        relay.log.info("session %s: new from %s, to the handler", relay.sid, self.peer)
        leftover = self.hs.leftover()
        if leftover:
            relay.link_data(self.transport, leftover)
        relay.pump()
        server._spawn(server._serve_stream(handler, stream, relay))


class _Refused(Exception):
    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class TetherServer(Service):
    """Serve tether sessions. Use ``async with TetherServer(config) as server``."""

    def __init__(self, config: ServerConfig, *, handler: Handler | None = None) -> None:
        """Relay each session to ``config.backend``, or, with ``handler``, call
        ``await handler(stream)`` for it (returning from the handler half-closes)."""
        self.config = config
        self.handler = handler
        self._sessions: dict[bytes, _ServerSession] = {}
        self._ended: OrderedDict[bytes, CloseCode] = OrderedDict()
        self._server: asyncio.Server | None = None
        self._sessions_total = 0
        self._resumes = 0
        self._rejected = 0
        self._expired = 0
        self._handshakes_failed = 0
        self.addresses: list[Address] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        listen = self.config.listen
        self._server = await loop.create_server(
            lambda: _ServerLink(self),
            listen.host,
            listen.port,
            ssl=self.config.ssl,
            reuse_address=True,
            backlog=4096,
        )
        self.addresses = [Address(*sock.getsockname()[:2]) for sock in self._server.sockets]
        logger.info(
            "listening on %s, backend %s, timeout %gs, keepalive %gs",
            ", ".join(map(str, self.addresses)),
            self.config.backend,
            self.config.session.timeout,
            self.config.session.keepalive,
        )

    async def close(self) -> None:
        """Stop accepting, end every session (GOING_AWAY) and close backends."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for relay in list(self._sessions.values()):
            relay.abort(CloseCode.GOING_AWAY, "server shutting down")

    def statistics(self) -> ServerStatistics:
        attached = sum(1 for s in self._sessions.values() if s.link is not None)
        return ServerStatistics(
            sessions=len(self._sessions),
            attached=attached,
            detached=len(self._sessions) - attached,
            sessions_total=self._sessions_total,
            resumes_total=self._resumes,
            rejected_total=self._rejected,
            expired_total=self._expired,
            handshakes_failed=self._handshakes_failed,
        )

    def sessions(self) -> list[Session]:
        return [relay.core for relay in self._sessions.values()]

    # -- internals ---------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        assert self._tasks is not None, "use the server as an async context manager"
        self._tasks.create_task(coro)

    async def _serve_stream(
        self, handler: Handler, stream: TetherStream, relay: _ServerSession
    ) -> None:
        try:
            await handler(stream)
        except Exception as exc:  # the handler's bug costs its session only
            relay.log.exception("session %s: handler failed", relay.sid)
            stream.close(CloseCode.INTERNAL_ERROR, f"handler failed: {exc!r}")
            return
        if not relay.core.closed:
            stream.write_eof()
            await relay.ended.wait()

    def _register(self, core: Session, peer: str) -> _ServerSession:
        relay = _ServerSession(self, core, peer)
        self._sessions[core.session_id] = relay
        self._sessions_total += 1
        return relay

    def _resume(self, link: _ServerLink, session_id: bytes) -> None:
        relay = self._sessions.get(session_id)
        if relay is None:
            code = self._ended.get(session_id, CloseCode.UNKNOWN_SESSION)
            self._rejected += 1
            logger.warning(
                "resume from %s for session %s rejected: %s",
                link.peer,
                session_id.hex()[:12],
                code.name,
            )
            link.hs.reject(code, "no such session" if code is CloseCode.UNKNOWN_SESSION else "")
            return
        now = asyncio.get_running_loop().time()
        if not link.hs.accept_resume(relay.core, now):
            self._rejected += 1
            logger.warning(
                "resume from %s for session %s rejected: bad proof or offsets; "
                "the live session is untouched",
                link.peer,
                relay.sid,
            )
            return
        self._resumes += 1
        assert link.transport is not None
        for buf in link.hs.data_to_send():  # RESUMED before anything the session sends
            link.transport.write(buf)
        link.relay = relay
        relay.set_link(link.transport)
        stats = relay.core.statistics()
        relay.log.info(
            "session %s: resumed from %s (resume %d), replaying %d bytes",
            relay.sid,
            link.peer,
            stats.resumes,
            stats.replay_buffered,
        )
        leftover = link.hs.leftover()
        if leftover:
            relay.link_data(link.transport, leftover)
        relay.pump()

    def _forget(self, relay: _ServerSession, event: SessionEnded) -> None:
        sid = relay.core.session_id
        self._sessions.pop(sid, None)
        self._ended[sid] = event.code
        while len(self._ended) > ENDED_MEMORY:
            self._ended.popitem(last=False)
        if event.code is CloseCode.EXPIRED:
            self._expired += 1
        stats = relay.core.statistics()
        relay.log.info(
            "session %s: ended %s (%s)%s; %d bytes up, %d bytes down, %d resumes",
            relay.sid,
            event.code.name,
            event.reason,
            " by the client" if event.by_peer else "",
            stats.bytes_received,
            stats.bytes_sent,
            stats.resumes,
        )
