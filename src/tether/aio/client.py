"""The tether client (the agent): one session per application connection.

It connects to the tether server, notices a dead path (keepalive silence, or at
once on a connection error), keeps taking the application's bytes into the
replay buffer up to its bound (then stops reading the application: backpressure,
never an error), reconnects (dial.py: capped exponential backoff with jitter,
several attempts in flight so a restored path is used as soon as it works), and
resumes from whatever local address it has now. When no tether server answers at
session start it splices the application straight to the fallback, if one is given
(splice.py).

The pieces: :class:`_ClientSession` is the relay of one session and its life (setup,
reconnects, fallback), the :class:`~tether.aio.dial.Dialer` is the connection
policy, and each link's handshake is the core's ``ClientHandshake``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import socket
import sys
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from pathlib import Path

from .. import tls
from ..config import Address, ClientConfig, parse_address
from ..errors import SessionClosed
from ..hooks import HookRunner
from ..protocol.codes import CloseCode
from ..protocol.events import (
    Event,
    HandshakeFailed,
    ServerDraining,
    SessionEnded,
    SessionEstablished,
    SessionResumed,
)
from ..protocol.frames import MAX_TOKEN_BYTES
from ..protocol.handshake import ClientHandshake
from ..protocol.session import Session, SessionState
from .dial import Dialer, TLSPolicy, Untrusted, describe_link_failure, not_tls
from .link import LinkProtocol, LocalProtocol, SessionRelay
from .service import Service
from .splice import Splice, splice_to
from .stream import TetherStream
from .util import describe

__all__ = ["TetherClient", "connect"]

logger = logging.getLogger("tether.client")

# docs/operations.md, "Drain": how long a server that said it drains is tried last for new
# sessions, at most (its drain timeout, when it said one) and at least.
DRAIN_MEMORY = 600.0
DRAIN_MEMORY_MIN = 5.0


class _ClientSession(SessionRelay):
    """One session of the client: its relay, its links' owner, and its life."""

    # One per session (B4): without __slots__ these attributes and the relay's overflow
    # the shared-key instance dict into a 1.5 KiB dict of its own.
    __slots__ = (
        "_candidates",
        "_detached_at",
        "_failure",
        "_fallback",
        "_last_error",
        "_outcome",
        "_ready",
        "_ready_future",
        "_trying",
        "_wake",
        "_woken",
        "app",
        "client",
        "dialer",
        "name",
        "server",
    )

    def __init__(self, client: TetherClient, app: _AppProtocol | None, number: int) -> None:
        loop = asyncio.get_running_loop()
        super().__init__(Session.client(client.config.session, loop.time()), logger)
        self.client = client
        self.app = app
        self.name = f"#{number}"
        # The servers a new session tries, in order (the one it is set up on keeps it).
        self._candidates = client.servers_for_new_session()
        self.server = self._candidates[0]
        self.dialer = Dialer(
            client.config,
            self.server,
            self._new_link,  # a bound method: smaller than a closure (B4)
            self._note_failure,
            client.tls_policy,
        )
        # Established (True) or not (False), once known; the future of :attr:`ready` is
        # made only for whoever waits (open_stream), not for each idle session (B4).
        self._ready: bool | None = None
        self._ready_future: asyncio.Future[bool] | None = None
        # The link was lost (or the session ended): time for the session's task to look.
        # A flag and the future the task waits on, not an asyncio.Event (0.8 KiB with its
        # deque) for each idle session.
        self._woken = False
        self._wake: asyncio.Future[None] | None = None
        self._trying: LinkProtocol | None = None  # the link whose handshake runs now
        self._outcome: asyncio.Future[bool] | None = None  # of that handshake
        self._failure: HandshakeFailed | None = None  # why the last link failed
        self._last_error = ""
        self._detached_at: float | None = None
        self._fallback: tuple[Splice, Splice] | None = None
        self.peer = sys.intern(str(self.server))  # one string for all its sessions
        if app is not None and app.transport is not None:
            application = app.transport.get_extra_info("peername")
            if application:
                self.local_address = str(Address(*application[:2]))

    @property
    def ready(self) -> asyncio.Future[bool]:
        """Done once the session is established (True) or will not be (False)."""
        future = self._ready_future
        if future is None:
            future = self._ready_future = self.loop.create_future()
            if self._ready is not None:
                future.set_result(self._ready)
        return future

    def _set_ready(self, up: bool) -> None:
        if self._ready is None:
            self._ready = up
            future = self._ready_future
            if future is not None and not future.done():
                future.set_result(up)

    # -- the relay's hooks -------------------------------------------------------------

    def on_established(self, event: SessionEstablished) -> None:
        self.name = f"{self.name}/{event.session_id.hex()[:12]}"
        self.log.info(
            "session %s: established via %s",
            self.name,
            self.server,
            extra=self._fields("new"),
        )
        self.client.note_new(self)
        self.client.takes_new_sessions(self.server)
        self._set_ready(True)
        self._settle(True)

    def on_resumed(self, event: SessionResumed) -> None:
        if self.core.closed:  # a resume only to deliver an abort (local_lost): its end follows
            self._settle(True)
            return
        self.client.note_resumed(self, event)
        away = self.loop.time() - self._detached_at if self._detached_at else 0.0
        self._detached_at = None
        self._last_error = ""
        self.log.info(
            "session %s: resumed after %.2fs away via %s, replaying %d bytes",
            self.name,
            away,
            self.server,
            event.replayed,
            extra=self._fields("resumed", outage_seconds=round(away, 3)),
        )
        self._hook("resume", "resumed", outage_seconds=f"{away:.1f}", replayed_bytes=event.replayed)
        self._settle(True)

    def on_link_lost(self, reason: str) -> None:
        if self._detached_at is None:
            self._detached_at = self.loop.time()
            self.log.info(
                "session %s: link lost (%s) to %s; reconnecting",
                self.name,
                reason,
                self.server,
                extra=self._fields("link_lost", reason=reason),
            )
            expires = self.core.expires_at
            left = max(expires - self._detached_at, 0.0) if expires is not None else 0.0
            self._hook("detach", reason, outage_seconds="0.0", expires_seconds=f"{left:.1f}")
        self.client.note_detached(self, reason)
        self._wake_up()

    def on_server_draining(self, event: ServerDraining) -> None:
        within = event.within
        self.log.info(
            "session %s: server %s is draining: the session goes on%s; new sessions go "
            "elsewhere when there is another server",
            self.name,
            self.server,
            f" until it ends or for at most {within:.0f}s" if within is not None else "",
            extra=self._fields("server_draining", within_seconds=within),
        )
        self.client.note_draining(self.server, within)
        seconds = f"{within:.0f}" if within is not None else ""
        self._hook("drain", "server draining", drain_seconds=seconds)

    def local_lost(self, exc: Exception | None, code: CloseCode) -> None:
        super().local_lost(exc, code)
        if self.core.close_pending:
            self.log.info(
                "session %s: application connection ended (%s) while the link is down; "
                "the server is told when the session resumes (or it expires)",
                self.name,
                describe(exc) if exc is not None else "closed",
                extra=self._fields("close_pending", code=code.name),
            )

    def on_ended(self, event: SessionEnded) -> None:
        self._set_ready(False)
        self.dialer.cancel()
        self._settle(False)
        self._wake_up()  # the session's task finishes
        if self._fallback is not None:
            return  # the application carries on over the fallback connection
        self.client.counters.ended_total += 1
        self.client.note_ended(self, event.code, event.reason)
        reason = event.reason
        if event.code is CloseCode.EXPIRED and self._last_error:
            reason = f"{reason}; reconnect attempts failed: {self._last_error}"
        level = logging.INFO if event.code is CloseCode.NORMAL else logging.WARNING
        self.log.log(
            logging.ERROR if event.code is CloseCode.UNTRUSTED_SERVER else level,
            "session %s: ended %s (%s)%s; server %s; application connection closed",
            self.name,
            event.code.name,
            reason,
            " by the server" if event.by_peer else "",
            self.server,
            extra=self._fields("ended", code=event.code.name, reason=reason),
        )
        away = self.loop.time() - self._detached_at if self._detached_at is not None else 0.0
        self._hook("end", reason, close_code=event.code.name, outage_seconds=f"{away:.1f}")

    def _fields(self, event: str, **more: object) -> dict[str, object]:
        """The structured fields of a session event (``--log-format json``)."""
        session = self.name.partition("/")[2] or self.name
        peer = str(self.server)
        return {"tether": {"session": session, "peer": peer, "event": event, **more}}

    def _hook(self, event: str, reason: str, **variables: object) -> None:
        """Run the user's hook for ``event`` (hooks.py); never waits for it."""
        hooks = self.client.hooks
        if hooks.command(event) is not None:
            server = self.server
            hooks.fire(event, self.name, {"server": server, "reason": reason, **variables})

    # -- its links, while their handshake runs (LinkOwner) -------------------------------

    @property
    def _verified(self) -> bool:
        """Over TLS the server's identity is verified before a link starts: whatever then
        ends the link (a refused client certificate, a busy or silent server) is our tether
        server, not its absence."""
        return self.client.tls_policy is not None

    def link_event(self, link: LinkProtocol, event: Event) -> None:
        if isinstance(event, HandshakeFailed) and link is self._trying:
            if event.code is CloseCode.HANDSHAKE_TIMEOUT and self._verified:
                # The core counts a peer as tether once it sent tether's magic; a verified
                # server that said nothing yet is ours all the same (_verified).
                event = HandshakeFailed(event.code, event.reason, peer_is_tether=True)
            self.log.debug(
                "session %s: link %s: handshake failed: %s %s",
                self.name,
                link.peer,
                event.code.name,
                event.reason,
            )
            self._failure = event
            self.client.counters.handshakes_failed += 1
            link.close()
            if self.core.closed:  # the server refused the session for good (a REJECT)
                self.client.note_rejected(self.core.close_code or event.code)
                self.pump()  # its SessionEnded
            self._settle(False)

    def link_ready(self, link: LinkProtocol) -> None:
        self.log.debug("session %s: link %s: accepted by the server", self.name, link.peer)
        link.hand_over(self)  # SessionEstablished or SessionResumed follow, and settle

    def link_lost(self, link: LinkProtocol, exc: Exception | None) -> None:
        if link is not self._trying:
            return  # an attempt that lost the race, closed by us
        reason = describe_link_failure(exc) if exc is not None else "connection closed"
        self._failure = HandshakeFailed(CloseCode.LINK_LOST, reason, self._tether_seen(link))
        self._settle(False)

    def _tether_seen(self, link: LinkProtocol) -> bool:
        """Was a tether server on ``link`` (its certificate verified, or its magic read)?
        A link lost after that is not a reason to fall back."""
        handshake = link.handshake
        return self._verified or (handshake.peer_is_tether if handshake is not None else False)

    def _wake_up(self) -> None:
        self._woken = True
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _woken_up(self) -> None:
        """Wait for :meth:`_wake_up` (at once if it came already)."""
        if not self._woken:
            self._wake = self.loop.create_future()
            try:
                await self._wake
            finally:
                self._wake = None
        self._woken = False

    def on_lingered(self, unconfirmed: str | None) -> None:
        if unconfirmed is not None:
            # docs/design.md, limitations 1 and 3: a server that did not read the end keeps
            # the session, and its backend connection, until it expires.
            self.log.warning(
                "session %s: after its end, %s; the server may not have read the end, and "
                "then keeps the session until it expires",
                self.name,
                unconfirmed,
                extra=self._fields("end_unconfirmed", reason=unconfirmed),
            )
        self._wake_up()

    def _settle(self, up: bool) -> None:
        if self._outcome is not None and not self._outcome.done():
            self._outcome.set_result(up)

    def _new_link(self) -> LinkProtocol:
        return LinkProtocol(self)

    def _note_failure(self, why: str) -> None:
        """A reconnect attempt failed: log each new kind of failure once, not every try."""
        if why != self._last_error and self.core.session_id:
            self.log.info("session %s: reconnect attempt failed: %s; retrying", self.name, why)
        self._last_error = why

    # -- the session's life ------------------------------------------------------------

    async def run(self) -> None:
        # One coroutine for the session's whole life: each idle session's task holds one
        # suspended frame, not two (B4).
        try:
            if not await self._setup():
                if self._fallback is not None:
                    await self._fallback[1].done.wait()
                return
            while not self.core.closed:
                await self._woken_up()
                if self.core.state is SessionState.DETACHED:
                    await self._reconnect()
            # Its link may outlive the end by up to LINGER (link.py, _close_link): until it
            # is closed the session stays the client's, so that leaving the client's
            # ``async with`` (its task group) waits for it.
            while self.lingering is not None:
                await self._woken_up()
        except Exception as exc:  # a bug must cost this session only, never the client
            self.log.exception("session %s: internal error", self.name)
            self.abort(CloseCode.INTERNAL_ERROR, f"internal error: {exc!r}")
        finally:
            if not self.core.closed:  # (with no local side left: an abort still to deliver)
                self.abort(CloseCode.GOING_AWAY, "client shutting down")
            lingering, self.lingering = self.lingering, None  # cut, not answered
            for link in (self.link, lingering):
                if link is not None:
                    link.abort()
            self.dialer.close()
            self.client._live.discard(self)

    async def _use(
        self, transport: asyncio.Transport, link: LinkProtocol, until: float | None = None
    ) -> bool:
        """Run the handshake on a connected link. True once the session is on it. With
        ``until`` (loop time), the attempt fails as timed out then, if it is still on."""
        self._failure = None
        if self.core.closed:  # the session ended while this link was being made
            transport.close()
            return False
        lost = link.lost or transport.is_closing()
        if lost and not link.has_early_bytes():
            return self._lost_at_once(link)
        self._outcome = self.loop.create_future()
        self._trying = link
        if lost:
            what = "closed with bytes from the server: reading them"
        else:
            what = "sending RESUME" if self.core.session_id else "sending SETUP"
        self.log.debug("session %s: link %s: %s", self.name, link.peer, what)
        # On a link already gone, the server said something before it closed (while the
        # dialer's race ran): most often a busy server's whole refusal, sent before our
        # hello arrived. The handshake reads it, so that its REJECT decides (OVERLOADED:
        # retry, never the fallback), not "connection lost".
        link.start(ClientHandshake(self.core, self.loop.time(), token=self.client.token))
        if lost and not self._outcome.done():  # no whole answer: lost after all
            self._outcome = self._trying = None
            link.abort()  # a transport closing but not yet closed: no handshake timer
            return self._lost_at_once(link)
        expiry = self.loop.call_at(until, self._expire, link) if until is not None else None
        try:
            return await self._outcome
        finally:
            if expiry is not None:
                expiry.cancel()
            self._outcome = self._trying = None

    def _lost_at_once(self, link: LinkProtocol) -> bool:
        """The attempt on ``link`` fails: its connection was gone before an answer."""
        self._failure = HandshakeFailed(
            CloseCode.LINK_LOST, "connection lost at once", self._tether_seen(link)
        )
        return False

    def _expire(self, link: LinkProtocol) -> None:
        """An attempt of a new session ran out of its share of the connect timeout."""
        if link is self._trying and not self.core.closed:
            self._failure = HandshakeFailed(
                CloseCode.HANDSHAKE_TIMEOUT, "timed out", self._verified
            )
            self._trying = None  # its connection_lost is not this attempt's news any more
            link.abort()
            self._settle(False)

    async def _setup(self) -> bool:
        """Reach a tether server for a new session, or fall back. True when established.

        The servers are tried in order (those known to be draining last): the next one at
        once when one is out of reach or refuses the session as going away, round again
        after a backoff step, until the connect timeout; each attempt may take an equal
        share of the time left among the servers this round has not tried. The fallback is
        taken only when no tether server is there: the connections are refused or time
        out, or the answer is not tether (docs/security.md, "No silent downgrade"), or
        every server that answered is going away; never when a server's identity does not
        verify, never once one answered that it is busy or refuses this client, whatever
        later attempts of the same setup meet.
        """
        config = self.client.config
        deadline = self.loop.time() + config.connect_timeout
        backoff = self.dialer.backoff()
        candidates, index = self._candidates, 0
        tether_answered = False  # a tether server answered, and not with GOING_AWAY
        answered = False  # a tether server answered, GOING_AWAY included
        while not self.core.closed:
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                await self._give_up(self._last_error or "timed out", not tether_answered)
                return False
            going_away = False
            # Each server left in this round gets an equal share of the time left: one that
            # accepts TCP and then says nothing cannot use it all, leaving the others untried
            # and the session to the fallback.
            limit = remaining / (len(candidates) - index)
            until = self.loop.time() + limit
            try:
                if await self._use(*await self.dialer.connect(limit), until=until):
                    return True
                failure = self._failure
                why = failure.reason if failure else "connection closed"
                no_tether = failure is None or not failure.peer_is_tether
                going_away = failure is not None and failure.code is CloseCode.GOING_AWAY
                # A verified server that said nothing in time (link_event): not an answer.
                silent = failure is not None and failure.code is CloseCode.HANDSHAKE_TIMEOUT
            except Untrusted as exc:
                self._untrusted(exc)
                return False
            except (OSError, TimeoutError) as exc:
                why, no_tether = describe_link_failure(exc), _no_tether_there(exc)
                silent = isinstance(exc, TimeoutError)
            if self.core.closed:
                return False  # refused by the server; on_ended said why
            # Once a server answered in this setup, a later attempt that times out (the
            # deadline cut it short on a busy machine, before or after TLS) or is refused
            # does not make it absent: no fallback, and what it answered stays the reason
            # to report.
            if not ((no_tether or silent) and answered):
                self._last_error = why
            answered |= not no_tether
            tether_answered |= not (no_tether or going_away)
            if going_away:
                self.client.note_draining(self.server, None)
            if (no_tether or going_away) and index + 1 < len(candidates):
                index += 1  # the next server, at once
                self._move_to(candidates[index], why)
                continue
            if no_tether and not tether_answered and self._can_fall_back():
                await self._fall_back(why)
                return False
            if index:
                index = 0
                self._move_to(candidates[0], why)
            await asyncio.sleep(min(backoff.next(), max(deadline - self.loop.time(), 0)))
        return False

    def _move_to(self, server: Address, why: str) -> None:
        """A new session tries ``server`` next (the last one failed for ``why``)."""
        self.log.info(
            "session %s: server %s did not take the session (%s); trying %s",
            self.name,
            self.server,
            why,
            server,
        )
        self.server = self.dialer.server = server
        self.peer = sys.intern(str(server))

    async def _give_up(self, why: str, no_tether: bool) -> None:
        if no_tether and self._can_fall_back():
            await self._fall_back(why)
            return
        server = ", ".join(map(str, self._candidates))
        if no_tether:
            self.abort(CloseCode.RESUME_FAILED, f"no tether server at {server}: {why}")
        else:  # it answered, then refused or dropped the link: it says why in its log
            self.abort(
                CloseCode.RESUME_FAILED,
                f"the tether server at {server} did not take the session: {why}",
            )

    def _untrusted(self, exc: BaseException) -> None:
        """The server is not who it must be: an attack signal. Fail closed, no fallback."""
        self.abort(
            CloseCode.UNTRUSTED_SERVER,
            f"{describe_link_failure(exc) if not isinstance(exc, tls.TrustError) else exc}; "
            "the application's connection is closed, not sent anywhere else",
        )

    async def _reconnect(self) -> None:
        """Race connection attempts until one carries the session again, or it ends.

        A link that connects but does not resume (refused for now, cut in its handshake)
        is followed by the next backoff step, not at once: one backoff per outage, so a
        client whose server is out of reach behind a gateway (SERVER_UNREACHABLE) or busy
        asks at most once per step, never in a tight loop."""
        backoff = self.dialer.backoff()
        while self.core.state is SessionState.DETACHED:
            try:
                won = await self.dialer.race(backoff)
            except Untrusted as exc:
                self._untrusted(exc)
                return
            if won is None:
                return  # the session ended (expired) while we were trying
            if await self._use(*won):
                return
            self._note_failure(self._failure.reason if self._failure else "connection lost")
            if self.core.state is SessionState.DETACHED:
                await self.dialer.pause(backoff.next())

    # -- fallback ----------------------------------------------------------------------

    def _can_fall_back(self) -> bool:
        return self.client.config.fallback is not None and self.app is not None

    async def _fall_back(self, why: str) -> None:
        config = self.client.config
        target = config.fallback
        assert target is not None and self.app is not None
        app = self.app.transport
        if app is None:  # the application left while the session was set up (_let_go)
            return
        if not app.is_closing():
            app.pause_reading()  # until the splice takes over
        early, early_eof = self.core.pending(), self.core.eof_sent
        self.log.warning(
            "session %s: no tether server took the session at %s (%s); connecting directly "
            "to fallback %s: this session has no reliability",
            self.name,
            ", ".join(map(str, self._candidates)),
            why,
            target,
        )
        self.client.counters.fallbacks_total += 1
        try:
            self._fallback = await splice_to(app, target.host, target.port, early, early_eof)
        except OSError as exc:
            self.log.warning("session %s: fallback %s failed: %s", self.name, target, describe(exc))
            self.abort(CloseCode.RESUME_FAILED, f"fallback {target} failed: {describe(exc)}")
            return
        # The session never existed for any server: it ends here, quietly; the
        # application's connection now belongs to the splice.
        self.local = None
        self.abort(CloseCode.NORMAL, "fell back to a direct connection")

    def shutdown(self) -> None:
        """The client is stopping: end this session, or its fallback connection."""
        if self._fallback is not None:
            for splice in self._fallback:
                if splice.transport is not None:
                    splice.transport.abort()
        self.abort(CloseCode.GOING_AWAY, "client shutting down")


class _AppProtocol(LocalProtocol):
    """An application's connection to the client's listener: each starts a session."""

    __slots__ = ("client",)

    def __init__(self, client: TetherClient) -> None:
        super().__init__(CloseCode.APPLICATION_RESET)
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.client._start_session(self)


class TetherClient(Service):
    """Accept application connections and carry each over a tether session."""

    role = "client"
    local_name = "application"

    def __init__(self, config: ClientConfig, *, listen: bool = True) -> None:
        super().__init__()
        self.config = config
        self._listen = listen
        self._live: set[_ClientSession] = set()
        self._numbers = itertools.count(1)
        # Read once, here: a missing file or a key readable by others fails at start.
        self.tls_policy = None if config.plaintext else TLSPolicy(config)
        self.token = read_token(config.token_file) if config.token_file is not None else b""
        self.hooks = HookRunner(config.hooks, self.spawn)
        # docs/operations.md, "Drain": servers that said they drain, until when (loop time).
        self._draining: dict[Address, float] = {}

    def servers_for_new_session(self) -> tuple[Address, ...]:
        """The servers a new session tries, in order: those not known to be draining
        first (in the configured order), then the draining ones."""
        now = asyncio.get_running_loop().time()
        for server, until in list(self._draining.items()):
            if until <= now:
                del self._draining[server]
        servers = self.config.servers
        fresh = [server for server in servers if server not in self._draining]
        return (*fresh, *(server for server in servers if server in self._draining))

    def note_draining(self, server: Address, within: float | None) -> None:
        """``server`` said it drains (DRAINING, or a setup refused GOING_AWAY): new sessions
        try the other servers first, for ``within`` seconds (the server's drain timeout)
        or until a new session is taken there (through a gateway, by another server)."""
        now = asyncio.get_running_loop().time()
        span = DRAIN_MEMORY if within is None else min(within, DRAIN_MEMORY)
        until = now + max(span, DRAIN_MEMORY_MIN)
        if server not in self._draining:
            others = [one for one in self.config.servers if one != server]
            logger.info(
                "server %s is draining: %s",
                server,
                f"new sessions go to {', '.join(map(str, others))} first"
                if others
                else "no other server; new sessions still go there (a gateway in front "
                "sends them to another server)",
            )
        self._draining[server] = max(until, self._draining.get(server, 0.0))

    def takes_new_sessions(self, server: Address) -> None:
        """A new session was set up through ``server``: it is no longer avoided."""
        self._draining.pop(server, None)

    def relays(self) -> Iterable[SessionRelay]:
        # Not the sessions that ended while their link lingers (link.py, _close_link).
        return [s for s in self._live if s._fallback is None and not s.core.closed]

    def handshakes_in_flight(self) -> int:
        return sum(session._trying is not None for session in self._live)

    async def start(self) -> None:
        if not self._listen:
            return
        await self.listen(lambda: _AppProtocol(self), self.config.listen)
        config = self.config
        logger.info(
            "listening on %s for applications; server %s (%s)%s",
            ", ".join(map(str, self.addresses)),
            ", ".join(map(str, config.servers)),
            self._trust(),
            f", fallback {config.fallback}" if config.fallback else "",
        )
        if config.plaintext:
            logger.warning(
                "links to %s are in clear text (--plaintext): use it only inside a trusted network",
                ", ".join(map(str, config.servers)),
            )

    def _trust(self) -> str:
        config, policy = self.config, self.tls_policy
        if policy is None:
            return "clear text"
        if config.tls_ca is not None:
            names = config.server_hostname or ", ".join(sorted({s.host for s in config.servers}))
            return f"TLS 1.3, certificate signed by {config.tls_ca} for {names}"
        if config.server_fingerprint is not None:
            return f"TLS 1.3, certificate pinned to {config.server_fingerprint}"
        first_use = "known servers only" if config.strict else "trust on first use"
        return f"TLS 1.3, {first_use}: {policy.known_servers}"

    def shutdown(self) -> None:
        for session in list(self._live):
            session.shutdown()

    @contextlib.asynccontextmanager
    async def open_stream(self) -> AsyncIterator[TetherStream]:
        """A new session for the caller's own use, as a :class:`TetherStream`.

        Raises :class:`~tether.errors.SessionClosed` when no session could be set up.
        Leaving the block closes the session (call ``write_eof()`` and read to EOF first
        for a graceful end).
        """
        stream = TetherStream()
        session = self._new_session(None)
        stream.bind(session)
        if not await session.ready:
            code = session.core.close_code or CloseCode.RESUME_FAILED
            raise SessionClosed(code, f"no session with {session.server}")
        try:
            yield stream
        finally:
            stream.close()

    def _start_session(self, app: _AppProtocol) -> None:
        app.bind(self._new_session(app))

    def _new_session(self, app: _AppProtocol | None) -> _ClientSession:
        session = _ClientSession(self, app, next(self._numbers))
        self._live.add(session)
        self.counters.sessions_total += 1
        self.spawn(session.run())
        return session


@contextlib.asynccontextmanager
async def connect(
    server: str | Address, *, config: ClientConfig | None = None
) -> AsyncIterator[TetherStream]:
    """Open one resumable stream to a tether server (no local listener, no fallback)."""
    address = parse_address(server) if isinstance(server, str) else server
    settings = replace(config or ClientConfig(), server=address, fallback=None)
    async with TetherClient(settings, listen=False) as client, client.open_stream() as stream:
        yield stream


def read_token(path: Path) -> bytes:
    """The client's token from ``path``: a secret, so a file others can read is refused."""
    tls.check_private_file(path, "token file")
    token = path.read_bytes().strip()
    if not token or len(token) > MAX_TOKEN_BYTES:
        raise ValueError(f"token file {path}: expected one token of 1 to {MAX_TOKEN_BYTES} bytes")
    return token


_UNREACHABLE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED})


def _no_tether_there(exc: BaseException) -> bool:
    """Does this failed connection show there is no tether server (refused, timed out,
    unreachable, or not TLS at all), rather than a tether server that could not talk now
    (a reset or an EOF in the TLS handshake: busy, or running with --plaintext)?"""
    if isinstance(exc, TimeoutError | socket.gaierror):
        return True
    if isinstance(exc, OSError) and exc.errno in _UNREACHABLE:
        return True
    return not_tls(exc)
