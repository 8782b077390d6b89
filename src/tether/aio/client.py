"""The tether client (the agent): one session per application connection.

It connects to the tether server, notices a dead path (keepalive silence, or at
once on a connection error), keeps taking the application's bytes into the
replay buffer up to its bound (then stops reading the application: backpressure,
never an error), reconnects with capped exponential backoff and jitter, several
attempts in flight so a restored path is used as soon as it works, and resumes
from whatever local address it has now. When no tether server answers at session
start it connects the application straight to the fallback, if one is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import cast

from ..config import Address, ClientConfig, parse_address
from ..errors import SessionClosed
from ..protocol.codes import CloseCode
from ..protocol.events import LinkLost, SessionEnded, SessionEstablished, SessionResumed
from ..protocol.session import LinkState, Session
from .link import LinkProtocol, LocalProtocol, Service, SessionRelay
from .stream import TetherStream

__all__ = ["ClientStatistics", "TetherClient", "connect"]

logger = logging.getLogger("tether.client")


@dataclass(frozen=True, slots=True)
class ClientStatistics:
    sessions: int
    sessions_total: int
    fallbacks_total: int
    resumes_total: int
    ended_total: int


class _NotTether(Exception):
    pass


class _ClientSession(SessionRelay):
    def __init__(self, client: TetherClient, app: _AppProtocol | None, number: int) -> None:
        loop = asyncio.get_running_loop()
        core = Session.client(client.config.session, loop.time())
        super().__init__(core, logger)
        self.client = client
        self.app = app
        self.name = f"#{number}"
        self._changed = asyncio.Event()
        self._last_loss: LinkLost | None = None
        self._winner: asyncio.Future[tuple[asyncio.Transport, _ClientLink] | None] | None = None
        self._last_error = ""
        self._detached_at: float | None = None
        self._fallback_peer: _Splice | None = None
        self.ready: asyncio.Future[bool] = loop.create_future()  # established, or not

    # -- hooks -------------------------------------------------------------------

    def shutdown(self) -> None:
        """The client is stopping: end this session (or its fallback connection)."""
        peer = self._fallback_peer
        if peer is not None:
            for transport in (peer.transport, peer.target):
                if transport is not None:
                    transport.abort()
            peer.done.set()
        self.abort(CloseCode.GOING_AWAY, "client shutting down")

    def on_established(self, event: SessionEstablished) -> None:
        self.name = f"{self.name}/{event.session_id.hex()[:12]}"
        self.log.info("session %s: established via %s", self.name, self.client.config.server)
        if not self.ready.done():
            self.ready.set_result(True)
        self._changed.set()

    def on_resumed(self, event: SessionResumed) -> None:
        self.client._resumes += 1
        away = self.loop.time() - self._detached_at if self._detached_at else 0.0
        self._detached_at = None
        self.log.info(
            "session %s: resumed after %.2fs away, replaying %d bytes",
            self.name,
            away,
            event.replayed,
        )
        self._changed.set()

    def on_link_lost(self, event: LinkLost | None) -> None:
        self._last_loss = event
        if self.core.session_id and self._detached_at is None:
            self._detached_at = self.loop.time()
            why = event.reason if event else "connection lost"
            self.log.info("session %s: link lost (%s); reconnecting", self.name, why)
        self._changed.set()

    def _note_failure(self, why: str) -> None:
        """A reconnect attempt failed: log each new kind of failure once, not every try."""
        if why != self._last_error and self.core.session_id:
            self.log.info("session %s: reconnect attempt failed: %s; retrying", self.name, why)
        self._last_error = why

    def on_ended(self, event: SessionEnded) -> None:
        self.client._ended += 1
        if not self.ready.done():
            self.ready.set_result(False)
        if self._winner is not None and not self._winner.done():
            self._winner.set_result(None)
        level = logging.INFO if event.code is CloseCode.NORMAL else logging.WARNING
        reason = event.reason
        if event.code is CloseCode.EXPIRED and self._last_error:
            reason = f"{reason}; reconnect attempts failed: {self._last_error}"
        self.log.log(
            level,
            "session %s: ended %s (%s)%s; application connection closed",
            self.name,
            event.code.name,
            reason,
            " by the server" if event.by_peer else "",
        )
        self._changed.set()

    # -- the session's life ------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        except Exception as exc:  # a bug must cost this session only, never the client
            self.log.exception("session %s: internal error", self.name)
            self.abort(CloseCode.INTERNAL_ERROR, f"internal error: {exc!r}")
        finally:
            if not self.core.closed and self.local is not None:
                self.abort(CloseCode.GOING_AWAY, "client shutting down")
            if self.link is not None:
                self.link.abort()
            self.client._live.discard(self)

    async def _run(self) -> None:
        if not await self._setup():
            return
        while not self.core.closed:
            await self._changed.wait()
            self._changed.clear()
            if self.core.closed:
                break
            if self.core.link is LinkState.NONE:
                await self._reconnect()

    async def _setup(self) -> bool:
        """Reach a tether server for a new session, or fall back. True when established."""
        config = self.client.config
        deadline = self.loop.time() + config.connect_timeout
        delay = config.backoff_initial
        while not self.core.closed:
            remaining = deadline - self.loop.time()
            why = ""
            if remaining <= 0:
                why = self._last_error or "timed out"
            else:
                try:
                    if await self._try_link(remaining):
                        return True
                    if self.core.closed:
                        return False  # rejected by the server; logged by on_ended
                    loss = self._last_loss
                    if loss is not None and loss.peer_is_tether:
                        self._last_error = loss.reason  # a tether server: retry it
                    else:
                        raise _NotTether(loss.reason if loss else "connection closed")
                except (OSError, TimeoutError) as exc:
                    why = _describe(exc)
                except _NotTether as exc:
                    why = str(exc)
            if why and config.fallback is not None and self.app is not None:
                await self._fallback(why)
                return False
            if why and remaining <= 0:
                self.abort(CloseCode.RESUME_FAILED, f"no tether server at {config.server}: {why}")
                return False
            if why:
                self._last_error = why
            await asyncio.sleep(min(delay * random.uniform(0.5, 1.0), max(remaining, 0)))
            delay = min(delay * 2, config.backoff_cap)
        return False

    async def _connect(self, limit: float) -> tuple[asyncio.Transport, _ClientLink]:
        """One TCP (or TLS) connection to the server, within ``limit`` seconds."""
        config = self.client.config
        return await asyncio.wait_for(
            self.loop.create_connection(
                _ClientLink,
                config.server.host,
                config.server.port,
                ssl=config.ssl,
                server_hostname=config.server_hostname if config.ssl else None,
            ),
            limit,
        )

    async def _try_link(self, limit: float) -> bool:
        """One connection: TCP connect, then the link handshake. True when it is up."""
        transport, proto = await self._connect(limit)
        return await self._use_link(transport, proto)

    async def _use_link(self, transport: asyncio.Transport, proto: _ClientLink) -> bool:
        self._last_loss = None
        if proto.lost or transport.is_closing():
            self._last_loss = LinkLost("connection lost at once", CloseCode.LINK_LOST, False)
            return False
        self._changed.clear()
        proto.relay = self
        self.set_link(transport)
        self.core.link_opened(self.loop.time())
        self.pump()
        while self.core.link is not LinkState.ESTABLISHED and not self.core.closed:
            if self.core.link is LinkState.NONE:
                return False
            await self._changed.wait()
            self._changed.clear()
        return not self.core.closed

    async def _reconnect(self) -> None:
        """Race connection attempts until one carries the session again, or it ends."""
        config = self.client.config
        delay = config.backoff_initial
        while not self.core.closed and self.core.link is LinkState.NONE:
            winner: asyncio.Future[tuple[asyncio.Transport, _ClientLink] | None]
            winner = self.loop.create_future()
            self._winner = winner
            async with asyncio.TaskGroup() as attempts:
                # A new attempt every backoff step, even while older ones still wait: an
                # attempt whose SYNs were lost is stuck in TCP's own backoff (1, 3, 7 s),
                # so only a fresh SYN uses a restored path at once. Past the cap, the
                # oldest attempt gives way.
                in_flight: list[asyncio.Task[None]] = []
                while not winner.done():
                    in_flight = [task for task in in_flight if not task.done()]
                    if len(in_flight) >= config.max_attempts_in_flight:
                        in_flight.pop(0).cancel()
                    in_flight.append(attempts.create_task(self._attempt(winner)))
                    await asyncio.wait({winner}, timeout=delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, config.backoff_cap)
                for task in in_flight:
                    task.cancel()
            self._winner = None
            won = winner.result()
            if won is None:
                return  # the session ended (expired) while we were trying
            transport, proto = won
            if await self._use_link(transport, proto):
                self._last_error = ""
                return
            self._note_failure(self._last_loss.reason if self._last_loss else "connection lost")

    async def _attempt(
        self, winner: asyncio.Future[tuple[asyncio.Transport, _ClientLink] | None]
    ) -> None:
        try:
            transport, proto = await self._connect(self.client.config.session.handshake_timeout)
        except (OSError, TimeoutError) as exc:
            self._note_failure(_describe(exc))
            return
        if winner.done():
            transport.close()
        else:
            winner.set_result((transport, proto))

    async def _fallback(self, why: str) -> None:
        config = self.client.config
        target = config.fallback
        assert target is not None and self.app is not None
        app = self.app.transport
        assert app is not None
        if not app.is_closing():
            app.pause_reading()  # until the splice below takes over
        early = self.core.pending()  # what the application wrote during the setup
        early_eof = self.core.statistics().eof_sent
        self.local = None  # the session never existed for the server: end it quietly
        self.core.close(CloseCode.NORMAL, "fell back to a direct connection")
        self.core.data_to_send()
        self.log.warning(
            "session %s: no tether server answered at %s (%s); connecting directly to "
            "fallback %s: this session has no reliability",
            self.name,
            config.server,
            why,
            target,
        )
        self.client._fallbacks += 1
        peer = _Splice(app)
        try:
            await self.loop.create_connection(lambda: peer, target.host, target.port)
        except OSError as exc:
            self.log.warning("session %s: fallback %s failed: %s", self.name, target, exc)
            app.abort()
            return
        assert peer.transport is not None
        for piece in early:
            peer.transport.write(piece)
        if early_eof:
            peer.transport.write_eof()
        back = _Splice(peer.transport)  # application -> fallback
        self.app.relay = None
        self.app.splice = back
        self._fallback_peer = peer
        if not app.is_closing():
            app.resume_reading()
        await peer.done.wait()


class _Splice(asyncio.Protocol):
    """A plain relay into ``target``: what the fallback path uses, with backpressure."""

    def __init__(self, target: asyncio.Transport | None) -> None:
        self.target = target
        self.transport: asyncio.Transport | None = None
        self.done = asyncio.Event()
        self.partner: _Splice | None = None

    # asyncio.Protocol interface (for the fallback connection)
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.target is not None:
            self.target.write(data)

    def eof_received(self) -> bool:
        if self.target is not None and self.target.can_write_eof():
            self.target.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.target is not None:
            if exc is None:
                self.target.close()
            else:
                self.target.abort()
        self.done.set()

    def pause_writing(self) -> None:
        if self.target is not None:
            self.target.pause_reading()

    def resume_writing(self) -> None:
        if self.target is not None and not self.target.is_closing():
            self.target.resume_reading()


class _AppProtocol(LocalProtocol):
    def __init__(self, client: TetherClient) -> None:
        super().__init__(CloseCode.APPLICATION_RESET)
        self.client = client
        self.splice: _Splice | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.client._start_session(self)

    def data_received(self, data: bytes | memoryview) -> None:
        if self.splice is not None:
            self.splice.data_received(bytes(data))
        else:
            super().data_received(data)

    def eof_received(self) -> bool:
        if self.splice is not None:
            return self.splice.eof_received()
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.splice is not None:
            self.splice.connection_lost(exc)
        else:
            super().connection_lost(exc)

    def pause_writing(self) -> None:
        if self.splice is not None:
            self.splice.pause_writing()
        else:
            super().pause_writing()

    def resume_writing(self) -> None:
        if self.splice is not None:
            self.splice.resume_writing()
        else:
            super().resume_writing()


class _ClientLink(LinkProtocol):
    pass


class TetherClient(Service):
    """Accept application connections and carry each over a tether session."""

    def __init__(self, config: ClientConfig, *, listen: bool = True) -> None:
        self.config = config
        self._listen = listen
        self._server: asyncio.Server | None = None
        self._live: set[_ClientSession] = set()
        self._numbers = itertools.count(1)
        self._sessions_total = 0
        self._fallbacks = 0
        self._resumes = 0
        self._ended = 0
        self.addresses: list[Address] = []

    async def start(self) -> None:
        if not self._listen:
            return
        loop = asyncio.get_running_loop()
        listen = self.config.listen
        self._server = await loop.create_server(
            lambda: _AppProtocol(self), listen.host, listen.port, reuse_address=True, backlog=4096
        )
        self.addresses = [Address(*s.getsockname()[:2]) for s in self._server.sockets]
        logger.info(
            "listening on %s for applications; server %s%s",
            ", ".join(map(str, self.addresses)),
            self.config.server,
            f", fallback {self.config.fallback}" if self.config.fallback else "",
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for session in list(self._live):
            session.shutdown()

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(
            sessions=len(self._live),
            sessions_total=self._sessions_total,
            fallbacks_total=self._fallbacks,
            resumes_total=self._resumes,
            ended_total=self._ended,
        )

    def sessions(self) -> list[Session]:
        return [s.core for s in self._live]

    @contextlib.asynccontextmanager
    async def open_stream(self) -> AsyncIterator[TetherStream]:
        """A new session for the caller's own use, as a :class:`TetherStream`.

        Raises :class:`~tether.errors.SessionClosed` when no session could be set up.
        Leaving the block closes the session (call ``write_eof()`` and read to EOF first
        for a graceful end).
        """
        assert self._tasks is not None, "use the client as an async context manager"
        stream = TetherStream()
        session = _ClientSession(self, None, next(self._numbers))
        stream._bind(session)
        self._live.add(session)
        self._sessions_total += 1
        self._tasks.create_task(session.run())
        if not await session.ready:
            code = session.core.close_code or CloseCode.RESUME_FAILED
            raise SessionClosed(code, f"no session with {self.config.server}")
        try:
            yield stream
        finally:
            stream.close()

    def _start_session(self, app: _AppProtocol) -> None:
        assert self._tasks is not None, "use the client as an async context manager"
        session = _ClientSession(self, app, next(self._numbers))
        app.bind(session)
        self._live.add(session)
        self._sessions_total += 1
        self._tasks.create_task(session.run())


@contextlib.asynccontextmanager
async def connect(
    server: str | Address, *, config: ClientConfig | None = None
) -> AsyncIterator[TetherStream]:
    """Open one resumable stream to a tether server (no local listener, no fallback)."""
    address = parse_address(server) if isinstance(server, str) else server
    settings = replace(config or ClientConfig(), server=address, fallback=None)
    async with TetherClient(settings, listen=False) as client, client.open_stream() as stream:
        yield stream


def _describe(exc: BaseException) -> str:
    """A short, readable reason: "Connection refused", not "[Errno 111] Connect call failed"."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # asyncio's text hides it ("Connect call failed")
    return str(exc) or type(exc).__name__
