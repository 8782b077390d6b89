"""The server's listening sockets: accept, look at the first byte, then start the link
with TLS or in clear text (docs/security.md, "Transport").

Accepting ourselves rather than with ``create_server(ssl=...)`` lets the server tell
a mismatched client what is wrong instead of failing silently:

- first byte 0x16 (a TLS handshake record): the link starts with TLS when the server
  has TLS; a ``--plaintext`` server refuses it with one log line;
- first byte 0x89 (the tether magic in clear): a ``--plaintext`` server takes the link;
  a TLS server answers, in clear, a server hello and ``REJECT(TLS_REQUIRED)`` that a
  clear-text client reports, and logs one line;
- anything else is not a tether client: closed (TLS servers let TLS refuse it).

The first byte is read with ``MSG_PEEK``, so it is still there for the TLS handshake.
A connection that sends nothing within the handshake timeout is closed.

Admission comes first (docs/security.md, "Abuse"): every accepted connection takes a
place in the :class:`~tether.protocol.admission.HandshakeAdmission` until its link joins
a session, fails or dies; past the limits (global, per source, or by OpenSSH-style
random early drop) a new connection is closed at once. A clear-text server tells the
client ``REJECT(OVERLOADED)`` first, so that it retries rather than falls back.

The server's :class:`~tether.resources.FdGuard` counts each connection's socket from its
accept until it is closed, so that near ``RLIMIT_NOFILE`` the sessions already there keep
theirs. When it has no descriptor to spare, a new connection is told
``REJECT(OVERLOADED)`` too: a clear-text server writes it at once; a TLS server borrows a
descriptor from the guard's refusal slice and runs the link as far as a client can trust
it (first byte, TLS handshake, client hello and request, all within the handshake
timeout), then rejects the request OVERLOADED and closes (:class:`BusyOwner`). A client
verifies the server before it reads a tether byte, so nothing earlier would be believed.
Past the slice the connection is closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

from ..config import Address
from ..protocol.admission import HandshakeAdmission
from ..protocol.codes import CloseCode
from ..protocol.events import Event, HandshakeFailed, ResumeRequested, SetupRequested
from ..protocol.frames import CLIENT_HELLO_SIZE, MAGIC
from ..protocol.handshake import ServerHandshake, refusal, refusal_version
from ..resources import FdGuard
from .link import LinkProtocol
from .util import describe

__all__ = [
    "TLS_RECORD",
    "BusyOwner",
    "LinkListener",
    "ListenError",
    "open_listening_socket",
    "refusal_for",
    "refuse_and_close",
]

logger = logging.getLogger("tether.server")

TLS_RECORD = 0x16  # a TLS handshake record: what every TLS ClientHello starts with


def refusal_for(conn: socket.socket, code: CloseCode, reason: str) -> bytes:
    """The clear-text refusal of a connection the server will not read (busy, or TLS only):
    in the client's version when its hello has already arrived (peeked, never waited for),
    so that a client from before the refusal rule reads the REJECT (docs/protocol.md,
    "Version negotiation"), else version 2."""
    try:
        hello = conn.recv(CLIENT_HELLO_SIZE, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:  # nothing yet (BlockingIOError), or the connection already gone
        hello = b""
    return refusal(refusal_version(hello), code, reason)


def refuse_and_close(conn: socket.socket, code: CloseCode, reason: str) -> None:
    """Send a clear-text client ``refusal_for`` its connection, then close it gently: what
    it sent is read first, or the kernel would answer the close with a reset, which can
    reach the client before the refusal and discard it (the client then sees "connection
    reset" instead of the code that tells it whether to retry)."""
    with contextlib.suppress(OSError):
        conn.send(refusal_for(conn, code, reason))
    _close_gently(conn)


class LinkListener:
    """Accept links on ``address`` and start each one (with ``tls`` when it is given)."""

    def __init__(
        self,
        link: Callable[[], LinkProtocol],
        tls: ssl.SSLContext | None,
        *,
        handshake_timeout: float,
        admission: HandshakeAdmission,
        refused: Callable[[str, str], None],
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
        fds: FdGuard | None = None,
        busy: Callable[[], LinkProtocol] | None = None,
    ) -> None:
        """``link`` makes each link's protocol; ``refused(source, why)`` hears of every
        connection that never became a link; ``spawn`` runs a task in the service's group;
        ``fds`` counts the accepted sockets (None: no count); ``busy`` makes the protocol
        of a TLS link accepted past the count, to be told REJECT(OVERLOADED) once TLS is up
        (None: such a link is closed at once)."""
        self._link = link
        self._busy = busy
        self._tls = tls
        self._timeout = handshake_timeout
        self.admission = admission
        self._refused = refused
        self._spawn = spawn
        self._fds = fds
        self._sockets: list[socket.socket] = []

    def reconfigure(self, tls: ssl.SSLContext | None, handshake_timeout: float) -> None:
        """Use ``tls`` and ``handshake_timeout`` for links accepted from now on (a reload)."""
        self._tls = tls
        self._timeout = handshake_timeout

    @property
    def addresses(self) -> list[Address]:
        return [Address(*sock.getsockname()[:2]) for sock in self._sockets]

    @property
    def sockets(self) -> list[socket.socket]:
        return list(self._sockets)

    def open(self, address: Address) -> None:
        """Bind and listen (``[::]`` listens on IPv4 too). Raises :class:`ListenError`."""
        self._sockets.append(open_listening_socket(address))

    def adopt(self, sock: socket.socket) -> None:
        """Accept on ``sock``, a listening socket another process handed over (a takeover);
        the connections waiting in its backlog are ours."""
        sock.setblocking(False)
        self._sockets.append(sock)

    async def serve(self) -> None:
        """Accept until cancelled, on every socket."""
        async with asyncio.TaskGroup() as group:
            for sock in self._sockets:
                group.create_task(self._accept(sock))

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()

    async def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while listening.fileno() != -1:  # close() closed it: stop, before the cancellation
            try:
                conn, peer = await loop.sock_accept(listening)
            except (OSError, ValueError) as exc:
                # A socket closed under a pending accept (SIGTERM while connections arrive)
                # raises OSError (EBADF), or ValueError under uvloop (fd -1): not an error.
                if listening.fileno() == -1:
                    return
                if isinstance(exc, ValueError):
                    raise
                # Out of file descriptors, most likely: breathe.
                logger.warning("accept on %s failed: %s", listening.getsockname(), describe(exc))
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            source = str(peer[0]) if isinstance(peer, tuple) else "?"
            fds = self._fds
            if fds is not None and not fds.acquire():
                self._refused(source, "out of file descriptors (near RLIMIT_NOFILE)")
                if self._tls is not None and self._busy is not None and fds.acquire_refusal():
                    # Told OVERLOADED once TLS is up; its end is not logged again.
                    busy = _Once(fds.release_refusal)
                    self._sniff(conn, source, _Once(_nothing), busy, self._busy, _ignore)
                else:
                    self._overloaded(conn)
                continue
            closed = _Once(fds.release if fds is not None else _nothing)
            verdict = self.admission.admit(source)
            if not verdict.admitted:
                try:
                    self._overloaded(conn)
                finally:
                    closed()
                self._refused(source, f"too many handshakes ({verdict.value})")
                continue
            release = _Once(functools.partial(self.admission.release, source))
            self._sniff(conn, source, release, closed, self._link, self._refused)

    def _overloaded(self, conn: socket.socket) -> None:
        if self._tls is None:  # cheap in clear text; past the refusal slice, TLS just closes
            refuse_and_close(conn, CloseCode.OVERLOADED, "server busy")
        else:
            conn.close()

    def _sniff(
        self,
        conn: socket.socket,
        source: str,
        release: _Once,
        closed: _Once,
        link: Callable[[], LinkProtocol],
        refused: Callable[[str, str], None],
    ) -> None:
        """Wait for the first byte (bounded by the handshake timeout), then start the link
        that ``link`` makes; ``refused`` hears why if it never becomes one."""
        loop = asyncio.get_running_loop()
        fd = conn.fileno()
        timer: asyncio.TimerHandle | None = None

        def readable() -> None:
            try:
                first = conn.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                return
            except OSError as exc:
                first = b""
                why = describe(exc)
            else:
                why = "closed before saying anything"
            loop.remove_reader(fd)
            if timer is not None:
                timer.cancel()
            if not first:
                conn.close()
                closed()
                release()
                refused(source, why)
            else:
                self._start(conn, source, first[0], release, closed, link, refused)

        def silent() -> None:
            loop.remove_reader(fd)
            conn.close()
            closed()
            release()
            refused(source, "sent nothing before the handshake timeout")

        loop.add_reader(fd, readable)
        timer = loop.call_later(self._timeout, silent)

    def _start(
        self,
        conn: socket.socket,
        source: str,
        first: int,
        release: _Once,
        closed: _Once,
        link: Callable[[], LinkProtocol],
        refused: Callable[[str, str], None],
    ) -> None:
        tls = self._tls
        if first == TLS_RECORD and tls is not None:
            self._spawn(self._start_link(conn, source, tls, release, closed, link, refused))
            return
        if first == MAGIC[0] and tls is None:
            self._spawn(self._start_link(conn, source, None, release, closed, link, refused))
            return
        release()
        try:
            self._refuse_link(conn, source, first, refused)
        finally:
            closed()

    def _refuse_link(
        self, conn: socket.socket, source: str, first: int, refused: Callable[[str, str], None]
    ) -> None:
        if first == MAGIC[0]:
            # A clear-text client: tell it, in its own terms, why it cannot go on.
            refuse_and_close(conn, CloseCode.TLS_REQUIRED, "this server takes TLS links only")
            refused(source, "the client speaks clear text; this server requires TLS")
        elif first == TLS_RECORD:
            conn.close()
            refused(source, "the client speaks TLS; this server runs with --plaintext")
        else:
            conn.close()
            refused(source, "not a tether client")

    async def _start_link(
        self,
        conn: socket.socket,
        source: str,
        tls: ssl.SSLContext | None,
        release: _Once,
        closed: _Once,
        link: Callable[[], LinkProtocol],
        refused: Callable[[str, str], None],
    ) -> None:
        def made() -> LinkProtocol:
            protocol = link()
            protocol.settled = release  # the link frees its place when its handshake ends
            protocol.on_closed = closed  # and its descriptor when its transport is gone
            return protocol

        loop = asyncio.get_running_loop()
        try:
            if tls is None:
                await loop.connect_accepted_socket(made, conn)
            else:
                await loop.connect_accepted_socket(
                    made, conn, ssl=tls, ssl_handshake_timeout=self._timeout
                )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            conn.close()
            closed()
            release()
            what = "TLS handshake failed: " if tls is not None else ""
            refused(source, what + describe_tls(exc))
        except Exception:  # a bug must cost this connection only, never the server
            conn.close()
            closed()
            release()
            logger.exception("link from %s failed to start", source)


class ListenError(OSError):
    """A listening socket could not be opened; ``filename`` is the address and ``option``
    the command-line option that gave it, for one line naming both: ``--listen
    127.0.0.1:2598: address already in use`` (CONTRIBUTING.md U3, E5)."""

    option = "--listen"


def open_listening_socket(address: Address, backlog: int = 4096) -> socket.socket:
    """A non-blocking socket listening on ``address``.

    An IPv6 address listens on IPv4 too where the system allows it (``IPV6_V6ONLY`` off, so
    ``[::]:2598`` is dual stack; asyncio's ``create_server`` would turn it on). A host name
    takes its first address. Raises :class:`ListenError` in the OS's words.
    """
    try:
        infos = socket.getaddrinfo(
            address.host or None, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ListenError(exc.errno, describe(exc), str(address)) from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        if os.name != "nt":  # on Windows SO_REUSEADDR lets another socket take the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and hasattr(socket, "IPV6_V6ONLY"):
            with contextlib.suppress(OSError):  # a system without dual stack: IPv6 only
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ListenError(exc.errno, describe(exc), str(address)) from None
    return sock


def _close_gently(conn: socket.socket) -> None:
    """Close after an answer: read what the client already sent first, so the kernel
    does not reset the connection (and maybe discard the answer) for unread bytes."""
    conn.setblocking(False)
    with contextlib.suppress(OSError):  # BlockingIOError once nothing is left
        # At most 64 KiB: a client owed an answer has sent its hello (a few dozen bytes)
        # and waits for ours; one that sent more than this is not a tether client, and
        # a refusal must stay cheap for a busy server (its reset is then its own doing).
        for _ in range(4):
            if not conn.recv(16384):
                break
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
    conn.close()


def _nothing() -> None:
    pass


def _ignore(source: str, why: str) -> None:
    pass


class BusyOwner:
    """The owner of a link accepted when the server has no descriptor to spare: whatever
    it requests, SETUP or RESUME, is rejected OVERLOADED (transient: the client retries
    with backoff and never falls back), then the link is closed. Nothing is created."""

    __slots__ = ()

    def link_event(self, link: LinkProtocol, event: Event) -> None:
        handshake = link.handshake
        assert isinstance(handshake, ServerHandshake)
        if isinstance(event, SetupRequested | ResumeRequested):
            handshake.reject(CloseCode.OVERLOADED, "server busy")
        elif isinstance(event, HandshakeFailed):
            link.close()  # after the REJECT, if the client is owed one

    def link_ready(self, link: LinkProtocol) -> None:
        """Never: this handshake is never accepted."""

    def link_lost(self, link: LinkProtocol, exc: Exception | None) -> None:
        """Nothing to do: the handshake is dropped with its link."""


class _Once:
    """A callback that runs the first time it is called, and never again."""

    __slots__ = ("_callback",)

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback: Callable[[], None] | None = callback

    def __call__(self) -> None:
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()


def describe_tls(exc: BaseException) -> str:
    """A TLS failure in a few words: OpenSSL's reason, not its whole message."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    return describe(exc)
