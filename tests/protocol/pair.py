"""A client and a server joined by a fake link and a fake clock.

Modelled on h11's ``ConnectionPair`` and aioquic's ``client_and_server``: no event
loop, no sockets, no real time. Both sides drive the core exactly as the asyncio
drivers do (CONTRIBUTING.md, "Layers" L3: drivers are thin pumps):

- every link starts with a handshake that owns it: a :class:`ClientHandshake` on the
  client's end, a :class:`ServerHandshake` from the server's :class:`Router` on the
  server's; once the handshake hands the link to a session, the session's bytes and
  events are pumped instead;
- ``SetupRequested`` -> ``router.admit_setup(hs)`` then ``router.accept_setup()``;
  ``ResumeRequested`` -> ``router.resume()``; a resumed session's previous link is
  closed by the server (superseded);
- ``HandshakeFailed`` and ``LinkLost`` close that end of the link; ``SessionEnded``
  flushes the last bytes (a CLOSE) and closes it.

A link carries whole writes (the buffers ``data_to_send()`` returned) in each
direction. ``deliver()`` moves some of them, ``transfer()`` moves everything until
the pair is quiet, ``drop()`` loses what is in flight, ``cut()`` loses the link on
both sides, ``blackhole()`` makes it swallow everything silently (a path that died
without a reset) and ``advance(dt)`` moves the fake clock, waking every object
whose ``next_timer()`` is due, in deadline order.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tether.protocol.codes import CloseCode
from tether.protocol.events import (
    DataReceived,
    EofReceived,
    Event,
    HandshakeFailed,
    LinkLost,
    ResumeRequested,
    SessionEnded,
    SessionEstablished,
    SessionResumed,
    SetupRequested,
)
from tether.protocol.handshake import ClientHandshake, ServerHandshake
from tether.protocol.router import Router
from tether.protocol.session import Session, SessionConfig

__all__ = ["Endpoint", "FakeLink", "Pair"]

MAX_ROUNDS = 100_000  # a pair that never goes quiet is a livelock in the core


@dataclass(eq=False)
class Endpoint:
    """One session and what its application (client) or backend (server) saw of it."""

    session: Session
    sent: bytearray = field(default_factory=bytearray)
    received: bytearray = field(default_factory=bytearray)
    eof_sent: bool = False
    eof: bool = False  # EofReceived seen
    events: list[Event] = field(default_factory=list)
    ended: SessionEnded | None = None
    link_losses: list[LinkLost | HandshakeFailed] = field(default_factory=list)

    def of_type(self, kind: type) -> list[Event]:
        return [event for event in self.events if isinstance(event, kind)]


@dataclass(eq=False)
class FakeLink:
    """One transport: writes queued each way, each end open or closed."""

    number: int
    handshake: ServerHandshake | None  # the server's end, until it reaches a session
    client_handshake: ClientHandshake | None  # the client's end, until it is done
    to_server: deque[bytes] = field(default_factory=deque)
    to_client: deque[bytes] = field(default_factory=deque)
    client_open: bool = True
    server_open: bool = True
    blackholed: bool = False
    session_id: bytes | None = None  # the server session this link carries, if any
    failure: HandshakeFailed | None = None

    def in_flight(self) -> int:
        return sum(map(len, self.to_server)) + sum(map(len, self.to_client))


def _take(queue: deque[bytes], limit: int | None) -> bytes:
    """Pop the next write, or its first ``limit`` bytes."""
    head = queue[0]
    if limit is None or limit >= len(head):
        return queue.popleft()
    queue[0] = head[limit:]
    return head[:limit]


class Pair:
    """A client :class:`Session`, a routing server and the fake links between them."""

    def __init__(
        self,
        client_config: SessionConfig | None = None,
        server_config: SessionConfig | None = None,
        *,
        now: float = 0.0,
    ) -> None:
        self.now = now
        self.client_config = client_config or SessionConfig()
        self.server_config = server_config or self.client_config
        self.app = Endpoint(Session.client(self.client_config, now))
        self.backends: dict[bytes, Endpoint] = {}  # every server session ever created
        self.router = Router(self.server_config, max_sessions=1 << 30)
        self.token = b""  # the client's credential
        self.links: list[FakeLink] = []
        self.link: FakeLink | None = None  # the client's current link
        self.handshake_failures: list[HandshakeFailed] = []

    # -- accessors -----------------------------------------------------------------

    @property
    def client(self) -> Session:
        return self.app.session

    @property
    def backend(self) -> Endpoint:
        """The server side of the client's session (KeyError before the setup)."""
        return self.backends[self.client.session_id]

    @property
    def server(self) -> Session:
        return self.backend.session

    @property
    def sessions(self) -> dict[bytes, Session]:
        """The server's registry of open sessions."""
        return self.router.sessions

    @property
    def client_handshake(self) -> ClientHandshake | None:
        """The handshake of the client's current link, while it runs."""
        link = self.link
        if link is None or link.client_handshake is None or link.client_handshake.done:
            return None
        return link.client_handshake

    def server_link(self, session_id: bytes) -> FakeLink | None:
        for link in self.links:
            if link.session_id == session_id and link.server_open:
                return link
        return None

    # -- the application and the backend -------------------------------------------------

    def client_send(self, data: bytes) -> None:
        self.client.send(data)
        self.app.sent += data
        self.pump()

    def server_send(self, data: bytes) -> None:
        self.server.send(data)
        self.backend.sent += data
        self.pump()

    def client_eof(self) -> None:
        self.client.send_eof()
        self.app.eof_sent = True
        self.pump()

    def server_eof(self) -> None:
        self.server.send_eof()
        self.backend.eof_sent = True
        self.pump()

    # -- links ---------------------------------------------------------------------

    def connect(self) -> FakeLink:
        """The client opens a new link (and the server accepts it)."""
        client_hs = ClientHandshake(self.client, self.now, token=self.token)
        link = FakeLink(len(self.links), self.router.open_link(self.now), client_hs)
        self.links.append(link)
        self.link = link
        self.pump()
        return link

    def reconnect(self) -> FakeLink | None:
        """Connect if the client is open and has no link, as its driver would."""
        if self.client.closed or (self.link is not None and self.link.client_open):
            return None
        return self.connect()

    def establish(self) -> None:
        """Connect and complete the setup."""
        self.connect()
        self.transfer()
        assert self.app.of_type(SessionEstablished), self.app.events

    def drop(self) -> int:
        """Lose every byte in flight on every link; return how many."""
        lost = 0
        for link in self.links:
            lost += link.in_flight()
            link.to_server.clear()
            link.to_client.clear()
        return lost

    def cut(self) -> None:
        """Every link dies on both sides at once; what was in flight is lost."""
        self.drop()
        for link in self.links:
            if link.client_open:
                self._close_client_end(link, notify=True)
            if link.server_open:
                self._close_server_end(link, notify=True)
        self.pump()

    def blackhole(self, on: bool = True) -> None:
        """From now on the current links swallow every byte, with no error on either side."""
        for link in self.links:
            if link.client_open or link.server_open:
                link.blackholed = on

    # -- moving bytes ----------------------------------------------------------------------

    def deliver(self, to_server: int | None = None, to_client: int | None = None) -> int:
        """Move up to ``to_server`` / ``to_client`` bytes (None: all) one way and the other.

        A closed end sees the other's close (FIN) once the bytes before it have arrived.
        Returns the number of bytes moved.
        """
        moved = 0
        for link in list(self.links):
            budget = to_server
            while link.to_server and link.server_open and budget != 0:
                chunk = _take(link.to_server, budget)
                if budget is not None:
                    budget -= len(chunk)
                moved += len(chunk)
                if not link.blackholed:
                    self._server_receive(link, chunk)
                self.pump()
            budget = to_client
            while link.to_client and link.client_open and budget != 0:
                chunk = _take(link.to_client, budget)
                if budget is not None:
                    budget -= len(chunk)
                moved += len(chunk)
                if not link.blackholed and link is self.link:
                    self._client_receive(link, chunk)
                self.pump()
            if link.blackholed:
                continue
            if not link.client_open and link.server_open and not link.to_server:
                self._close_server_end(link, notify=True)
                moved += 1
            if not link.server_open and link.client_open and not link.to_client:
                self._close_client_end(link, notify=True)
                moved += 1
        self.pump()
        return moved

    def deliver_writes(self, to_server: int, to_client: int) -> int:
        """Move the next ``to_server`` / ``to_client`` whole writes of the current link."""
        link = self.link
        if link is None:
            return 0
        up = sum(len(buf) for buf in list(link.to_server)[:to_server])
        down = sum(len(buf) for buf in list(link.to_client)[:to_client])
        return self.deliver(to_server=up, to_client=down)

    def transfer(self) -> None:
        """Move bytes both ways until nothing more happens."""
        for _ in range(MAX_ROUNDS):
            self.pump()
            if not self.deliver():
                return
        raise AssertionError("the pair never went quiet")

    def advance(self, dt: float, *, transfer: bool = True) -> None:
        """Move the fake clock by ``dt``, firing every due timer in deadline order.

        With ``transfer`` the link carries what the timers produce (a PING and its
        PONG) between deadlines, as a healthy network would.
        """
        target = self.now + dt
        for _ in range(MAX_ROUNDS):
            due = [t for t in (obj.next_timer() for obj in self._timed()) if t is not None]
            if not due or min(due) > target:
                break
            self.now = max(self.now, min(due))
            for obj in self._timed():
                deadline = obj.next_timer()
                if deadline is not None and deadline <= self.now:
                    obj.handle_timer(self.now)
            self.pump()
            if transfer:
                self.transfer()
        else:
            raise AssertionError("a timer fired without moving its deadline")
        self.now = max(self.now, target)
        self.pump()

    def _timed(self) -> list[Session | ServerHandshake | ClientHandshake]:
        objs: list[Session | ServerHandshake | ClientHandshake] = [self.app.session]
        objs += [end.session for end in self.backends.values() if not end.session.closed]
        objs += [link.handshake for link in self.links if link.handshake is not None]
        if self.client_handshake is not None:
            objs.append(self.client_handshake)
        return objs

    # -- the drivers ------------------------------------------------------------------------

    def pump(self) -> None:
        """Write what every object has to send and act on every event, until quiet."""
        for _ in range(MAX_ROUNDS):
            busy = self._pump_client()
            for link in list(self.links):
                busy |= self._pump_handshake(link)
            for end in list(self.backends.values()):
                busy |= self._pump_server_session(end)
            if not busy:
                return
        raise AssertionError("the drivers never went quiet")

    def _write(self, link: FakeLink | None, out: list[bytes], toward_server: bool) -> None:
        if link is None:
            assert not out, "bytes to send with no link"
            return
        # Bytes toward an end that is closed already are lost (it would answer with a reset).
        if toward_server and link.client_open and link.server_open:
            link.to_server.extend(bytes(buf) for buf in out if buf)
        elif not toward_server and link.server_open and link.client_open:
            link.to_client.extend(bytes(buf) for buf in out if buf)

    def _pump_client(self) -> bool:
        app = self.app
        link = self.link
        hs = link.client_handshake if link is not None else None
        busy = False
        if hs is not None:
            out = hs.data_to_send()
            self._write(link, out, toward_server=True)
            busy = bool(out)
            while (failure := hs.next_event()) is not None:
                assert isinstance(failure, HandshakeFailed), failure
                busy = True
                app.link_losses.append(failure)
                assert link is not None
                link.client_handshake = None
                if link.client_open:
                    self._close_client_end(link, notify=False)
        out = app.session.data_to_send()
        self._write(self.link, out, toward_server=True)
        busy |= bool(out)
        while (event := app.session.next_event()) is not None:
            busy = True
            app.events.append(event)
            if isinstance(event, DataReceived):
                app.received += event.data
            elif isinstance(event, EofReceived):
                assert not app.eof, "two EOFs"
                app.eof = True
            elif isinstance(event, LinkLost):
                app.link_losses.append(event)
                if self.link is not None and self.link.client_open:
                    self._close_client_end(self.link, notify=False)
            elif isinstance(event, SessionEnded):
                assert app.ended is None, "two SessionEnded"
                app.ended = event
                self._write(self.link, app.session.data_to_send(), toward_server=True)
                if self.link is not None and self.link.client_open:
                    self._close_client_end(self.link, notify=False)
        return busy

    def _pump_handshake(self, link: FakeLink) -> bool:
        hs = link.handshake
        if hs is None:
            return False
        out = hs.data_to_send()
        self._write(link, out, toward_server=False)
        busy = bool(out)
        while (event := hs.next_event()) is not None:
            busy = True
            if isinstance(event, SetupRequested):
                refusal = self.router.admit_setup(hs)
                if refusal is not None:
                    hs.reject(refusal.code, refusal.reason)
                    continue
                session = self.router.accept_setup(hs, self.now)
                sid = session.session_id
                assert sid not in self.backends, "session id reused"
                self.backends[sid] = Endpoint(session)
                self._hand_over(link, sid)
            elif isinstance(event, ResumeRequested):
                found = self.router.resume(hs, self.now)
                if found is not None:
                    old = self.server_link(found.session_id)
                    if old is not None and old is not link:
                        old.session_id = None  # superseded: the server closes it
                        self._close_server_end(old, notify=False)
                    self._hand_over(link, found.session_id)
            elif isinstance(event, HandshakeFailed):
                link.failure = event
                self.handshake_failures.append(event)
                self._write(link, hs.data_to_send(), toward_server=False)
                link.handshake = None
                self._close_server_end(link, notify=False)
        return busy

    def _hand_over(self, link: FakeLink, sid: bytes) -> None:
        """The handshake gave the link to a session: from now on its bytes are the
        session's (the handshake's answer is first in the session's output)."""
        assert link.handshake is not None and link.handshake.done
        assert link.handshake.data_to_send() == []
        link.handshake = None
        link.session_id = sid

    def _pump_server_session(self, end: Endpoint) -> bool:
        session = end.session
        sid = session.session_id
        link = self.server_link(sid)
        out = session.data_to_send()
        if out:
            assert link is not None, "a detached server session has bytes to send"
            self._write(link, out, toward_server=False)
        busy = bool(out)
        # The server's sessions are drained with next_events() (as the relay's pump does),
        # the client's with next_event(): the schedules exercise both.
        for event in session.next_events():
            busy = True
            end.events.append(event)
            if isinstance(event, DataReceived):
                end.received += event.data
            elif isinstance(event, EofReceived):
                assert not end.eof, "two EOFs"
                end.eof = True
            elif isinstance(event, LinkLost):
                end.link_losses.append(event)
                if link is not None:
                    link.session_id = None
                    self._close_server_end(link, notify=False)
                    link = None
            elif isinstance(event, SessionEnded):
                assert end.ended is None, "two SessionEnded"
                end.ended = event
                self.router.forget(session)
                if link is not None:
                    self._write(link, session.data_to_send(), toward_server=False)
                    link.session_id = None
                    self._close_server_end(link, notify=False)
                    link = None
            elif isinstance(event, SessionEstablished | SessionResumed):
                pass
        return busy

    def _client_receive(self, link: FakeLink, chunk: bytes) -> None:
        hs = link.client_handshake
        if hs is not None and not hs.done:
            hs.receive_data(chunk)  # it hands what follows its last frame to the session
        elif hs is None or not hs.failed:
            self.client.receive_data(chunk, self.now)

    def _server_receive(self, link: FakeLink, chunk: bytes) -> None:
        if link.handshake is not None:
            link.handshake.receive_data(chunk)
        elif link.session_id is not None:
            self.sessions[link.session_id].receive_data(chunk, self.now)

    def _close_client_end(self, link: FakeLink, *, notify: bool) -> None:
        """The client's end of ``link`` closes; ``notify``: the client learns it from the link."""
        link.client_open = False
        link.to_client.clear()
        hs, link.client_handshake = link.client_handshake, None
        if notify and link is self.link:
            if hs is not None and not hs.done:  # the driver sees the connection close
                self.app.link_losses.append(
                    HandshakeFailed(CloseCode.LINK_LOST, "connection lost", hs.peer_is_tether)
                )
            elif hs is None or not hs.failed:
                self.client.link_lost(self.now)

    def _close_server_end(self, link: FakeLink, *, notify: bool) -> None:
        link.server_open = False
        link.to_server.clear()
        if link.handshake is not None:
            link.handshake = None  # the driver forgets a handshake whose link died
        if link.session_id is not None:
            sid, link.session_id = link.session_id, None
            if notify and sid in self.sessions:
                self.sessions[sid].link_lost(self.now)
