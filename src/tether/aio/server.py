"""The tether server (the XTE role): accepts links, lets the router authenticate and
route them, and relays every session to the one configured backend.

Each new session opens exactly one backend connection, to the address in the
server's configuration (a client cannot choose it: no open proxy). While a client
is away the backend connection stays open; what the backend sends is kept in the
session's replay buffer up to its bound, then the backend is no longer read.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from .. import tls
from ..config import ServerConfig, listen_addresses
from ..credentials import ClientsFileError, ClientTokens
from ..errors import StateError
from ..logs import RateLimitedLog
from ..protocol import routing
from ..protocol.admission import HandshakeAdmission, MemoryBudget, MemoryStatistics
from ..protocol.codes import CloseCode
from ..protocol.events import (
    Event,
    HandshakeFailed,
    ResumeRequested,
    SessionEnded,
    SessionResumed,
    SetupRequested,
)
from ..protocol.frames import Resume, Setup
from ..protocol.handshake import ServerHandshake, SessionIds
from ..protocol.router import Router
from ..protocol.session import Session
from ..resources import FdGuard
from . import takeover
from .gateway import read_routing_key
from .link import LinkProtocol, LocalProtocol, LocalTransport, SessionRelay
from .listener import BusyOwner, LinkListener
from .service import Service
from .stream import TetherStream
from .util import describe

Handler = Callable[[TetherStream], Awaitable[None]]

__all__ = ["Handler", "TetherServer"]

logger = logging.getLogger("tether.server")

# docs/operations.md, "Takeover": how long the backends may take to read the bytes the
# clients already had acknowledged, before a takeover is refused and the server carries on.
FLUSH_TIMEOUT = 5.0  # seconds
FLUSH_POLL = 0.01  # seconds between looks at the backends' write buffers


class _ServerSession(SessionRelay):
    __slots__ = ("backend", "server")  # one per session (B4): no per-instance dict

    def __init__(self, server: TetherServer, core: Session, peer: str) -> None:
        super().__init__(core, logger)
        self.server = server
        self.peer = peer  # the address of its current (or last) link
        # The same for every session: one string, not one each (sys.intern).
        self.local_address = sys.intern(
            "the handler" if server.handler else str(server.config.backend)
        )
        self.backend: _Backend | None = None  # the backend connection's protocol

    @property
    def sid(self) -> str:
        """The session id as the log shows it (made when logged, not kept: B4)."""
        return self.core.session_id.hex()[:12]

    def fields(self, event: str, **more: object) -> dict[str, object]:
        """The structured fields of a session event (``--log-format json``)."""
        return {"tether": {"session": self.sid, "peer": self.peer, "event": event, **more}}

    def on_link_lost(self, reason: str) -> None:
        self.server.note_detached(self, reason)  # sets detached_at (aio/service.py)
        timeout = self.server.config.session.timeout
        self.log.info(
            "session %s: link lost (%s), peer %s; holding the backend for up to %gs",
            self.sid,
            reason,
            self.peer,
            timeout,
            extra=self.fields("link_lost", reason=reason),
        )

    def on_resumed(self, event: SessionResumed) -> None:
        self.server.note_resumed(self, event)  # clears detached_at

    def on_ended(self, event: SessionEnded) -> None:
        self.server._session_ended(self, event)


class TetherServer(Service):
    """Serve tether sessions. Use ``async with TetherServer(config) as server``."""

    role = "server"
    local_name = "backend"

    def __init__(
        self,
        config: ServerConfig,
        *,
        handler: Handler | None = None,
        control: Path | None = None,
        take_over: bool = False,
    ) -> None:
        """Relay each session to ``config.backend``, or, with ``handler``, call
        ``await handler(stream)`` for it (returning from the handler half-closes).
        ``control``: the Unix socket where a successor may ask to take over (None: no
        takeover); with ``take_over``, take over from the server that serves it there
        first (docs/operations.md, "Takeover")."""
        super().__init__()
        self.config = config
        self.handler = handler
        self._control_path = control
        self._take_over = take_over
        self._control: socket.socket | None = None
        self._controlling: asyncio.Task[None] | None = None
        self._control_inode = 0  # of the socket file we bound: we unlink only ours
        self._handing_over = False
        self._handed_sessions = self._handed_listening = 0
        self.handed_over = asyncio.Event()  # set once a successor owns everything
        self._router = Router(
            config.session,
            max_sessions=config.max_sessions,
            max_sessions_per_source=config.max_sessions_per_source,
            memory=MemoryBudget(config.memory_budget),  # replay buffers, all sessions
            session_ids=_session_ids(config),
        )
        # Refused links and setups are logged once per source, then summarised every 10 s.
        self._refused_links = RateLimitedLog(logger, level=logging.INFO)
        self._refused_setups = RateLimitedLog(logger, level=logging.WARNING)
        self._relays: dict[bytes, _ServerSession] = {}
        self._tokens = ClientTokens(config.clients) if config.clients is not None else None
        if self._tokens is not None:
            self._router.authorize = self._authorize
        self.fingerprint: str | None = None  # of the TLS certificate, once started
        self._links: LinkListener | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._summaries: asyncio.Task[None] | None = None
        self._fds: FdGuard | None = None  # read at start, once the CLI raised the limit
        self.drain_requested = asyncio.Event()  # set by drain(): SIGTERM, POST /api/drain
        self.sessions_gone = asyncio.Event()  # set while draining once no session is left

    def relays(self) -> Iterable[SessionRelay]:
        return self._relays.values()

    def handshakes_in_flight(self) -> int:
        return self._links.admission.in_flight if self._links is not None else 0

    def accepting(self) -> bool:
        budget = self._router.memory
        return (
            self._links is not None
            and not self.draining
            and len(self._relays) < self.config.max_sessions
            and (budget is None or budget.window_for(self.config.session.window) is not None)
        )

    @property
    def draining(self) -> bool:
        return self._router.draining

    @property
    def handing_over(self) -> bool:
        return self._handing_over

    def drain(self) -> bool:
        """Refuse new sessions (REJECT GOING_AWAY) and keep the live ones; resumes of them
        are still accepted. Whoever runs the server waits on :attr:`drain_requested` and
        ends the rest when its drain timeout passes (cli.py). Idempotent."""
        if self._router.draining:
            return True
        now = asyncio.get_running_loop().time()
        # Each live session's client is told (DRAINING, from version 4) when its session
        # will be ended: cli.py ends the rest drain_timeout from now.
        self._router.drain(now, now + self.config.drain_timeout)
        for relay in list(self._relays.values()):
            relay.pump()
        self.drain_requested.set()
        if not self._relays:
            self.sessions_gone.set()
        return True

    def session_count(self) -> int:
        return len(self._relays)

    def memory(self) -> MemoryStatistics | None:
        budget = self._router.memory
        return budget.statistics() if budget is not None else None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        router = self._router
        self._fds = FdGuard.from_system()
        busy = BusyOwner()
        context = self._tls_context()
        inherited: takeover.Inherited | None = None
        if self._take_over and self._control_path is not None:
            inherited = await asyncio.to_thread(
                takeover.receive, self._control_path, self.fingerprint or ""
            )
        listener = LinkListener(
            lambda: LinkProtocol(self, router.open_link(loop.time())),
            context,
            handshake_timeout=self.config.session.handshake_timeout,
            admission=HandshakeAdmission(
                self.config.max_handshakes,
                self.config.max_handshakes_per_source,
                start=self.config.max_handshakes // 2,
            ),
            refused=self._link_refused,
            spawn=self.spawn,
            fds=self._fds,
            # Near RLIMIT_NOFILE a TLS link is told REJECT(OVERLOADED) once TLS is up.
            busy=lambda: LinkProtocol(busy, router.open_link(loop.time())),
        )
        if inherited is not None:
            for sock in inherited.listening:
                listener.adopt(sock)
        else:
            try:
                for address in listen_addresses(self.config.listen):
                    listener.open(address)
            except OSError:
                listener.close()
                raise
        self.addresses = listener.addresses
        self._links = listener
        if inherited is not None:
            wanted = {str(a) for a in listen_addresses(self.config.listen) if a.port}
            if wanted and wanted != {str(a) for a in listener.addresses}:
                logger.warning(
                    "takeover: listening on %s, as the server taken over did; --listen %s "
                    "takes effect only at a restart",
                    ", ".join(map(str, listener.addresses)),
                    ", ".join(sorted(wanted)),
                )
            await self._adopt(inherited)
        self._accepting = self.spawn(listener.serve())
        self._summaries = self.spawn(self._summarise())
        self._open_control(replace=inherited is not None)
        logger.info(
            "listening on %s, backend %s, timeout %gs, keepalive %gs; %s; %s",
            ", ".join(map(str, self.addresses)),
            "the handler" if self.handler else self.config.backend,
            self.config.session.timeout,
            self.config.session.keepalive,
            f"TLS 1.3, certificate {self.fingerprint}" if self.fingerprint else "clear text",
            self._who_may_connect(),
        )

    def _tls_context(self) -> ssl.SSLContext | None:
        """The links' TLS: the configured identity, or one made (once) in the state
        directory. None with ``plaintext``, which warns unless only loopback listens."""
        config = self.config
        if config.plaintext:
            listen = listen_addresses(config.listen)
            if not all(_loopback(address.host) for address in listen):
                logger.warning(
                    "links to %s are in clear text (--plaintext): anyone on the path can read "
                    "and change every session; use it only inside a trusted network",
                    ", ".join(map(str, listen)),
                )
            return None
        identity = tls.configured_identity(
            config.tls_cert, config.tls_key, config.state_dir, "server"
        )
        self.fingerprint = identity.fingerprint
        return tls.server_context(identity, client_ca=config.tls_client_ca)

    def _who_may_connect(self) -> str:
        config = self.config
        if config.clients is not None:
            return f"clients: those with a token listed in {config.clients}"
        if config.tls_client_ca is not None:
            return f"clients: those with a certificate signed by {config.tls_client_ca}"
        if config.plaintext:
            return "clients: anyone who can connect (the backend authenticates its users)"
        return "clients: anyone who completes TLS (the backend authenticates its users)"

    def _authorize(self, token: bytes) -> bool:
        tokens = self._tokens
        assert tokens is not None
        try:
            if tokens.reload_if_changed():
                logger.info("clients file %s re-read: %d clients", self.config.clients, len(tokens))
        except ClientsFileError as exc:
            logger.warning("%s; keeping the clients read before", exc)
        return tokens.check(token)

    # -- takeover (docs/design.md, "Takeover") --------------------------------------------

    def _open_control(self, *, replace: bool = False) -> None:
        path = self._control_path
        if path is None or self.handler is not None:
            return
        try:
            control = takeover.bind_control(path, replace=replace)
        except OSError as exc:
            logger.warning("takeover: cannot listen on %s (%s): no takeover", path, describe(exc))
            return
        if control is None:
            logger.info(
                "takeover: %s belongs to another running server: this one cannot be taken over",
                path,
            )
            return
        self._control = control
        self._control_inode = os.stat(path).st_ino
        self._controlling = self.spawn(self._serve_control(control))

    def _close_control(self, *, unlink: bool) -> None:
        control, self._control = self._control, None
        if control is None:
            return
        task, self._controlling = self._controlling, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()  # a pending accept on a closed socket may never return (uvloop)
        control.close()
        path = self._control_path
        if unlink and path is not None:
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == self._control_inode:
                    path.unlink()

    async def _serve_control(self, control: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while control.fileno() != -1:
            try:
                conn, _ = await loop.sock_accept(control)
            except (OSError, ValueError):
                if control.fileno() == -1:
                    return  # closed: a takeover began, or the server stops
                await asyncio.sleep(0.1)
                continue
            try:
                await self._answer_takeover(conn)
            except Exception:  # a bug must cost this takeover only, never the server
                logger.exception("takeover failed (a bug); serving on")
                self._resume_after_takeover()
            finally:
                conn.close()

    def _cannot_hand_over(self, request: takeover.TakeoverRequest) -> str | None:
        if self.handler is not None:
            return "this server runs a handler, not a backend"
        if self.draining:
            return "this server is draining"
        if self._links is None or self._handing_over:
            return "this server is not serving"
        ours = self.fingerprint or ""
        if request.fingerprint != ours:
            theirs = request.fingerprint or "clear text"
            return (
                f"the new server's TLS identity ({theirs}) is not this one's "
                f"({ours or 'clear text'}): its clients would refuse it"
            )
        return None

    async def _answer_takeover(self, conn: socket.socket) -> None:
        """Hand everything to the process at the other end of ``conn``, or refuse."""
        pid, uid = takeover.peer_uid(conn)
        if uid != os.getuid():
            logger.warning(
                "takeover: a request from pid %d (uid %d) refused: not this server's user",
                pid,
                uid,
            )
            return
        request = await asyncio.to_thread(takeover.read_request, conn)
        if request is None:  # another server starting beside us looks whether we answer
            logger.debug("takeover: pid %d sent no takeover request; ignored", pid)
            return
        why = self._cannot_hand_over(request)
        if why is not None:
            logger.warning("takeover by pid %d refused: %s", pid, why)
            await asyncio.to_thread(takeover.send_refusal, conn, why)
            return
        logger.info(
            "takeover by pid %d: closing %d sessions' links and handing them over",
            pid,
            len(self._relays),
        )
        started = time.monotonic()
        self._freeze()
        handed = False
        try:
            handed = await self._hand_over(conn, pid)
        finally:
            if not handed:
                self._resume_after_takeover()
        if handed:
            logger.info(
                "handed over %d sessions and %d listening sockets to pid %d in %.2fs; exiting",
                self._handed_sessions,
                self._handed_listening,
                pid,
                time.monotonic() - started,
            )

    def _freeze(self) -> None:
        """Stop accepting and taking setups, close every link, stop reading backends."""
        self._handing_over = True
        self._close_control(unlink=False)  # one at a time; re-opened if this one fails
        if self._accepting is not None:
            self._accepting.cancel()
            self._accepting = None
        for relay in list(self._relays.values()):
            if relay.link is not None:
                self.note_detached(relay, "server handing over")
            relay.freeze()

    def _resume_after_takeover(self) -> None:
        if not self._handing_over:
            return
        self._handing_over = False
        for relay in list(self._relays.values()):
            relay.thaw()
        if self._links is not None and self._accepting is None:
            self._accepting = self.spawn(self._links.serve())
        if self._control is None:
            self._open_control(replace=True)
        logger.warning("takeover failed; serving on (clients resume here)")

    async def _flushed(self) -> int:
        """Wait (at most FLUSH_TIMEOUT) until every backend has taken the bytes written to
        it (what the clients sent and were told had arrived); how many have not."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FLUSH_TIMEOUT
        while True:
            waiting = 0
            for relay in self._relays.values():
                backend = relay.backend
                transport = backend.transport if backend is not None else None
                if transport is not None and transport.get_write_buffer_size() > 0:
                    waiting += 1
            if not waiting or loop.time() >= deadline:
                return waiting
            await asyncio.sleep(FLUSH_POLL)

    async def _hand_over(self, conn: socket.socket, pid: int) -> bool:
        """Send the listening sockets and the sessions; True once the successor has them
        and was told BYE (this process then owns nothing)."""
        waiting = await self._flushed()
        if waiting:
            why = f"{waiting} backends did not read what they were sent within {FLUSH_TIMEOUT:g}s"
            logger.warning("takeover by pid %d refused: %s", pid, why)
            await asyncio.to_thread(takeover.send_refusal, conn, why)
            return False
        assert self._links is not None
        # Duplicates are sent, from a thread: whatever the loop closes meanwhile (a session
        # that expires), the descriptor sent is still the socket exported, never a reused
        # number; and the successor then holds it, so that close sends nothing.
        dups: list[int] = []
        try:
            listening = [_dup(sock.fileno(), dups) for sock in self._links.sockets]
            now = asyncio.get_running_loop().time()
            records: list[takeover.Handed] = []
            relays = list(self._relays.values())
            for relay in relays:
                sid = relay.core.session_id
                backend = relay.backend
                fd = -1
                transport = backend.transport if backend is not None else None
                if transport is not None and relay.local is not None and not transport.is_closing():
                    sock = transport.get_extra_info("socket")
                    fd = _dup(sock.fileno(), dups) if sock is not None else -1
                state = relay.core.export_state(now)
                source = self._router.source_of(sid)
                records.append(takeover.Handed(source, relay.peer, state, fd=fd))
            done = await asyncio.to_thread(_send_all, conn, listening, records)
        finally:
            for fd in dups:
                os.close(fd)
        if not done:
            logger.warning("takeover by pid %d failed: it did not take everything", pid)
            return False
        # Committed: the successor serves from now on. Close our copies of the sockets
        # (nothing is sent: the successor holds the same ones) and forget the sessions.
        self._handed_sessions, self._handed_listening = len(records), len(listening)
        for relay in relays:
            backend = relay.backend
            if backend is not None:
                backend.relay = None
                if backend.transport is not None:
                    backend.transport.close()
            relay.local = None
            self._relays.pop(relay.core.session_id, None)
        self.stop_listening()
        self.handed_over.set()
        return True

    async def _adopt(self, inherited: takeover.Inherited) -> None:
        """Serve the sessions a takeover brought, DETACHED until their clients resume."""
        loop = asyncio.get_running_loop()
        router = self._router
        now = loop.time()
        taken = 0
        for handed in inherited.sessions:
            try:
                core = router.adopt(handed.state, now, handed.source)
            except StateError as exc:
                logger.error("takeover: a session from pid %d lost: %s", inherited.pid, exc)
                if handed.backend is not None:
                    handed.backend.close()
                continue
            relay = _ServerSession(self, core, handed.peer)
            self._relays[core.session_id] = relay
            relay.detached_at = core.detached_since
            try:
                if handed.backend is not None:
                    fds = self._fds
                    # bound at once: a byte at most is read before (obligation 9)
                    backend = _Backend(fds if fds is not None and fds.acquire() else None, 0)
                    await loop.connect_accepted_socket(_returning(backend), handed.backend)
                    relay.backend = backend
                    backend.bind(relay)
                relay.pump()  # arms its expiry
            except Exception:  # a bug must cost this session only, never the others
                logger.exception("takeover: session %s lost", relay.sid)
                if handed.backend is not None and relay.backend is None:
                    handed.backend.close()
                relay.abort(CloseCode.INTERNAL_ERROR, "internal error")
                continue
            taken += 1
        logger.info(
            "took over %d sessions and %d listening sockets from pid %d",
            taken,
            len(inherited.listening),
            inherited.pid,
        )

    def stop_listening(self) -> None:
        if not self._handing_over:
            self._close_control(unlink=True)
        for task in (self._accepting, self._summaries):
            if task is not None:
                task.cancel()
        self._accepting = self._summaries = None
        self._refused_links.flush()
        self._refused_setups.flush()
        if self._links is not None:
            self._links.close()
            self._links = None

    def shutdown(self) -> None:
        """End every session (GOING_AWAY) and close their backends."""
        for relay in list(self._relays.values()):
            relay.abort(CloseCode.GOING_AWAY, "server shutting down")

    # -- links, while their handshake decides (LinkOwner) ------------------------------

    def link_event(self, link: LinkProtocol, event: Event) -> None:
        handshake = link.handshake
        assert isinstance(handshake, ServerHandshake)
        if self._handing_over and isinstance(event, SetupRequested | ResumeRequested):
            # Transient for setups and resumes alike: the client comes back, to the successor.
            link.why = "server handing over (takeover)"
            handshake.reject(CloseCode.GOING_AWAY, "server restarting")
        elif isinstance(event, SetupRequested):
            logger.debug("link %s: SETUP received", link.peer)
            refusal = self._router.admit_setup(handshake, link.source)
            if refusal is not None:
                if refusal.code is CloseCode.UNAUTHORIZED:
                    setup = handshake.request
                    token = setup.token if isinstance(setup, Setup) else b""
                    link.why = "token not accepted" if token else "no token"
                handshake.reject(refusal.code, refusal.reason)
            else:
                self.spawn(self._setup(link, handshake))
        elif isinstance(event, ResumeRequested):
            logger.debug(
                "link %s: RESUME received for session %s",
                link.peer,
                event.session_id.hex()[:12],
            )
            core = self._router.resume(handshake, asyncio.get_running_loop().time())
            if core is not None:
                relay = self._relays[core.session_id]
                now = asyncio.get_running_loop().time()
                away = now - relay.detached_at if relay.detached_at is not None else 0.0
                moved = "" if link.peer == relay.peer else f" (was {relay.peer})"
                relay.peer = link.peer
                link.hand_over(relay)  # its SessionResumed: note_resumed counts the outage
                relay.log.info(
                    "session %s: resumed from %s%s after %.2fs away (resume %d), "
                    "replaying %d bytes",
                    relay.sid,
                    link.peer,
                    moved,
                    away,
                    core.statistics().resumes,
                    core.replay_buffered,
                    extra=relay.fields("resumed", outage_seconds=round(away, 3)),
                )
        elif isinstance(event, HandshakeFailed):
            self._refused(link, handshake, event)

    def link_ready(self, link: LinkProtocol) -> None:
        """Never: a server handshake completes only by this server's own decision."""

    def link_lost(self, link: LinkProtocol, exc: Exception | None) -> None:
        """Nothing to do: the handshake is dropped with its link."""

    def _link_refused(self, source: str, why: str) -> None:
        """A connection that never became a link (see listener.py)."""
        self.counters.handshakes_failed += 1
        self._refused_links.hit(f"link from {_show(source)} refused", why)

    async def _summarise(self) -> None:
        """Write the refusal summaries whose window has passed (one task, all sources)."""
        while True:
            await asyncio.sleep(self._refused_links.window)
            self._refused_links.handle_timer()
            self._refused_setups.handle_timer()

    def _refused(self, link: LinkProtocol, hs: ServerHandshake, event: HandshakeFailed) -> None:
        counters = self.counters
        counters.handshakes_failed += 1
        why = link.why or event.reason
        code = event.code.name.lower().replace("_", " ")
        source = _show(link.source)
        if isinstance(hs.request, Resume):
            self.note_rejected(event.code)
            self._refused_setups.hit(
                f"resume from {source} refused",
                f"{code} ({why}) for session {hs.request.session_id.hex()[:12]}; "
                "the live session is untouched",
            )
        elif hs.request is not None:
            self.note_rejected(event.code)
            self._refused_setups.hit(f"setup from {source} refused", f"{code} ({why})")
        else:
            self._refused_links.hit(f"link from {source} refused", why)
        link.close()  # after the REJECT, if the client is owed one

    # -- sessions ------------------------------------------------------------------------

    async def _setup(self, link: LinkProtocol, hs: ServerHandshake) -> None:
        """Get what the new session needs, then accept it (one task per setup). The
        router holds a place for it (admitted) until it is accepted or given up."""
        accepted = False
        try:
            if self.handler is not None:
                stream = TetherStream()
                relay = self._accept(link, hs, stream.local_end)
                if relay is not None:
                    accepted = True
                    stream.bind(relay)
                    self.spawn(self._serve_stream(self.handler, stream, relay))
                return
            accepted = await self._setup_backend(link, hs)
        except Exception:  # a bug must cost this link only, never the server
            logger.exception("setup from %s failed", link.peer)
            link.why = "internal error"
            hs.reject(CloseCode.INTERNAL_ERROR, "internal error")
            link.pump_handshake()
        finally:
            if not accepted:
                self._router.cancel_setup(link.source, hs)

    async def _setup_backend(self, link: LinkProtocol, hs: ServerHandshake) -> bool:
        loop = asyncio.get_running_loop()
        target = self.config.backend
        if self._fds is not None and not self._fds.acquire():
            link.why = "out of file descriptors for the backend connection (near RLIMIT_NOFILE)"
            hs.reject(CloseCode.OVERLOADED, "server busy")  # transient: the client retries
            link.pump_handshake()
            return False
        # What the backend says before its session is accepted is bounded by what the
        # memory budget reserved for the setup (docs/design.md, obligation 9).
        backend = _Backend(self._fds, self._router.reserved_for(hs))
        try:
            async with asyncio.timeout(self.config.backend_connect_timeout):  # CONTRIBUTING.md C6
                transport, _ = await loop.create_connection(
                    lambda: backend, target.host, target.port
                )
        except (OSError, TimeoutError) as exc:
            backend.closed()
            # The reason and the address stay in our log; the client is told no more.
            link.why = f"backend {target} unreachable: {describe(exc)}"
            hs.reject(CloseCode.BACKEND_UNAVAILABLE, "backend unavailable")
            link.pump_handshake()
            return False
        relay = self._accept(link, hs, transport)
        if relay is None:
            transport.close()  # the link died while we reached the backend
            return False
        relay.backend = backend
        backend.bind(relay)  # what the backend already said follows the ACCEPT
        relay.log.info(
            "session %s: new from %s, backend %s",
            relay.sid,
            link.peer,
            target,
            extra=relay.fields("new", backend=str(target)),
        )
        self.note_new(relay)
        return True

    def _accept(
        self, link: LinkProtocol, hs: ServerHandshake, local: LocalTransport
    ) -> _ServerSession | None:
        """Create the session and give it the link; None if the link died meanwhile."""
        if link.lost or hs.done:
            return None
        if self._handing_over:  # admitted before the takeover began: the client retries
            link.why = "server handing over (takeover)"
            hs.reject(CloseCode.GOING_AWAY, "server restarting")
            link.pump_handshake()
            return None
        core = self._router.accept_setup(hs, asyncio.get_running_loop().time(), link.source)
        relay = _ServerSession(self, core, link.peer)
        relay.local = local  # before the first pump: the client's first bytes go there
        self._relays[core.session_id] = relay
        self.counters.sessions_total += 1
        link.hand_over(relay)
        return relay

    async def _serve_stream(
        self, handler: Handler, stream: TetherStream, relay: _ServerSession
    ) -> None:
        relay.log.info("session %s: new from %s, to the handler", relay.sid, relay.peer)
        self.note_new(relay)
        try:
            await handler(stream)
        except Exception as exc:  # the handler's bug costs its session only
            relay.log.exception("session %s: handler failed", relay.sid)
            stream.close(CloseCode.INTERNAL_ERROR, f"handler failed: {exc!r}")
            return
        if not relay.core.closed:
            stream.write_eof()
            await relay.ended.wait()

    def _session_ended(self, relay: _ServerSession, event: SessionEnded) -> None:
        core = relay.core
        self._router.forget(core)
        self._relays.pop(core.session_id, None)
        if self.draining and not self._relays:
            self.sessions_gone.set()
        self.counters.ended_total += 1
        if event.code is CloseCode.EXPIRED:
            self.counters.expired_total += 1
        self.note_ended(relay, event.code, event.reason)
        stats = core.statistics()
        relay.log.log(
            logging.INFO if event.code is CloseCode.NORMAL else logging.WARNING,
            "session %s: ended %s (%s)%s; peer %s, %d bytes up, %d bytes down, %d resumes",
            relay.sid,
            event.code.name,
            event.reason,
            " by the client" if event.by_peer else "",
            relay.peer,
            stats.bytes_received,
            stats.bytes_sent,
            stats.resumes,
            extra=relay.fields("ended", code=event.code.name, reason=event.reason),
        )


class _Backend(LocalProtocol):
    """A session's backend connection, whose descriptor the server's FdGuard counts."""

    __slots__ = ("_fds",)

    def __init__(self, fds: FdGuard | None, early_max: int | None = None) -> None:
        super().__init__(CloseCode.BACKEND_RESET, early_max)
        self._fds = fds

    def closed(self) -> None:
        """Its descriptor is gone (or never was): count it once."""
        fds, self._fds = self._fds, None
        if fds is not None:
            fds.release()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed()
        super().connection_lost(exc)


def _dup(fd: int, dups: list[int]) -> int:
    """A duplicate of ``fd``, remembered in ``dups`` (closed by the caller)."""
    dup = os.dup(fd)
    dups.append(dup)
    return dup


def _returning(backend: _Backend) -> Callable[[], _Backend]:
    return lambda: backend


def _send_all(conn: socket.socket, listening: list[int], records: list[takeover.Handed]) -> bool:
    """The old server's side of the exchange (blocking, in a thread): True once the
    successor acknowledged everything and was told BYE."""
    deadline = time.monotonic() + takeover.TAKEOVER_TIMEOUT
    try:
        hello = takeover.hello(os.getpid(), len(listening), len(records))
        takeover.send_message(conn, takeover.HELLO, hello, listening, deadline)
        for payload, fds in takeover.build_batches(records):
            takeover.send_message(conn, takeover.SESSIONS, payload, fds, deadline)
        takeover.send_message(conn, takeover.END, b"", [], deadline)
        if takeover.recv_byte(conn, deadline) != takeover.ACK:
            return False
        takeover.send_byte(conn, takeover.BYE, deadline)
    except OSError as exc:
        logger.warning("takeover: %s", describe(exc))
        return False
    return True


def _session_ids(config: ServerConfig) -> SessionIds | None:
    """Routed session ids with a routing key (docs/protocol.md, "Routing"); None: random."""
    if config.routing_key_file is None:
        return None
    return routing.session_ids(config.server_id, read_routing_key(config.routing_key_file))


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _show(host: str) -> str:
    return f"[{host}]" if ":" in host else host
