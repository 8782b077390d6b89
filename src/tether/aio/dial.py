"""How a client reaches its server: capped exponential backoff with jitter, one
connection within a time limit, and races of attempts for a reconnect; TLS with the
server's identity checked before a byte of tether is written.

A reconnect starts a fresh attempt every backoff step, even while older ones still
wait: an attempt whose SYNs were lost is stuck in TCP's own backoff (1, 3, 7 s), so
only a fresh SYN uses a restored path at once. Past ``max_attempts_in_flight`` the
oldest attempt gives way.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Callable

from .. import tls
from ..config import Address, ClientConfig
from ..errors import InvalidState
from .link import LinkProtocol
from .util import describe

__all__ = ["Backoff", "Dialer", "TLSPolicy", "Untrusted"]

logger = logging.getLogger("tether.client")

Connection = tuple[asyncio.Transport, LinkProtocol]
# The server is not who it should be: fail closed, never fall back (an attack signal).
Untrusted = (tls.TrustError, ssl.SSLCertVerificationError)


class Backoff:
    """Delays that double from ``initial`` up to ``cap``, each with jitter (50-100 %)."""

    def __init__(self, initial: float, cap: float) -> None:
        self._next = initial
        self._cap = cap

    def next(self) -> float:
        delay = self._next * random.uniform(0.5, 1.0)
        self._next = min(self._next * 2, self._cap)
        return delay


class TLSPolicy:
    """The client's TLS: its context, how it trusts the server, and its session tickets.
    Built once per client (the context reads files)."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.context = tls.client_context(
            ca=config.tls_ca, cert=config.tls_cert, key=config.tls_key
        )
        self.sessions = tls.SessionCache()
        self.known_servers = config.known_servers or tls.default_known_servers()
        if config.server_fingerprint is not None:
            tls.parse_fingerprint(config.server_fingerprint)  # a bad pin fails at start

    def verify(self, server: Address) -> Callable[[bytes], object] | None:
        """The check of ``server``'s certificate, unless the CA does it in the handshake."""
        if self.config.tls_ca is not None:
            return None
        return lambda der: self._verify(server, der)

    def _verify(self, server: Address, der: bytes) -> object:
        result = tls.verify_server(
            der,
            server.host,
            server.port,
            pin=self.config.server_fingerprint,
            known_servers=self.known_servers,
            strict=self.config.strict,
        )
        if result.learned:
            logger.warning(
                "server %s is new: trusting its certificate %s from now on, recorded in %s:%s "
                "(check it against the fingerprint the server logs, or pin it with "
                "--server-fingerprint)",
                server,
                result.fingerprint,
                result.known_servers,
                result.line,
            )
        return result


def _no_link() -> LinkProtocol:
    raise InvalidState("dialing for a session that has ended")


def _no_failure(why: str) -> None:
    """A closed dialer's failures are no one's (none can happen: it does not dial)."""


class Dialer:
    """Connections from a client to ``server``; ``link`` makes each link's protocol."""

    __slots__ = ("_link", "_on_failure", "_tls", "_winner", "config", "server")  # one a session

    def __init__(
        self,
        config: ClientConfig,
        server: Address,
        link: Callable[[], LinkProtocol],
        on_failure: Callable[[str], None],
        tls_policy: TLSPolicy | None,
    ) -> None:
        self.config = config
        self.server = server  # a new session may move on to the next; a resume may not
        self._link = link
        self._on_failure = on_failure
        self._tls = tls_policy
        self._winner: asyncio.Future[Connection | None] | None = None

    def close(self) -> None:
        """The session is over: let go of its callbacks (bound methods of the session,
        which holds this dialer), so that the ended session is freed when it ends rather
        than by the cyclic collector. Dialing after this is a bug."""
        self._link = _no_link
        self._on_failure = _no_failure

    def backoff(self) -> Backoff:
        return Backoff(self.config.backoff_initial, self.config.backoff_cap)

    async def connect(self, limit: float) -> Connection:
        """One connection to the server, within ``limit`` seconds: TCP, then TLS with the
        server's identity verified (raising one of ``Untrusted`` when it is not)."""
        server = self.server
        policy = self._tls
        logger.debug("link to %s: connecting (%s)", server, "TLS" if policy else "clear text")
        async with asyncio.timeout(limit):  # not wait_for (CONTRIBUTING.md C6)
            if policy is None:
                loop = asyncio.get_running_loop()
                return await loop.create_connection(self._link, server.host, server.port)
            return await tls.create_tls_connection(
                self._link,
                server.host,
                server.port,
                context=policy.context,
                server_hostname=self.config.server_hostname or server.host,
                sessions=policy.sessions,
                verify=policy.verify(server),
            )

    async def race(self, backoff: Backoff) -> Connection | None:
        """Race attempts until one connects; None when :meth:`cancel` was called. Raises
        one of ``Untrusted`` when an attempt reached a server that must not be trusted.
        ``backoff`` spaces the attempts; the caller keeps it across races of one outage."""
        loop = asyncio.get_running_loop()
        winner: asyncio.Future[Connection | None] = loop.create_future()
        self._winner = winner
        try:
            async with asyncio.TaskGroup() as attempts:
                in_flight: list[asyncio.Task[None]] = []
                while not winner.done():
                    in_flight = [task for task in in_flight if not task.done()]
                    if len(in_flight) >= self.config.max_attempts_in_flight:
                        in_flight.pop(0).cancel()
                    in_flight.append(attempts.create_task(self._attempt(winner)))
                    await asyncio.wait({winner}, timeout=backoff.next())
                for task in in_flight:
                    task.cancel()
        finally:
            self._winner = None
        return winner.result()

    async def pause(self, delay: float) -> None:
        """Wait ``delay`` seconds between races, or until :meth:`cancel` is called."""
        waiter: asyncio.Future[Connection | None] = asyncio.get_running_loop().create_future()
        self._winner = waiter
        try:
            await asyncio.wait({waiter}, timeout=delay)
        finally:
            self._winner = None
            if not waiter.done():
                waiter.cancel()

    def cancel(self) -> None:
        """End the race under way, if any, with no winner."""
        if self._winner is not None and not self._winner.done():
            self._winner.set_result(None)

    async def _attempt(self, winner: asyncio.Future[Connection | None]) -> None:
        try:
            transport, link = await self.connect(self.config.session.handshake_timeout)
        except Untrusted as exc:
            if not winner.done():
                winner.set_exception(exc)
            return
        except (OSError, TimeoutError) as exc:
            why = describe_link_failure(exc)
            logger.debug("link to %s: attempt failed: %s", self.server, why)
            self._on_failure(why)
            return
        if winner.done():
            transport.close()
        else:
            winner.set_result((transport, link))


def describe_link_failure(exc: BaseException) -> str:
    """A failed connection in a few words, TLS failures included."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"TLS: certificate verify failed: {exc.verify_message.rstrip('.')}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return "TLS: " + exc.reason.lower().replace("_", " ")
    return describe(exc)


# OpenSSL's reasons for bytes that are not TLS at all: whatever answered, it is not a
# tether server with TLS (it may be the service itself, or another protocol).
_NOT_TLS = frozenset(
    {
        "WRONG_VERSION_NUMBER",
        "UNKNOWN_PROTOCOL",
        "HTTP_REQUEST",
        "HTTPS_PROXY_REQUEST",
        "PACKET_LENGTH_TOO_LONG",
        "RECORD_LAYER_FAILURE",
        "UNSUPPORTED_PROTOCOL",
    }
)


def not_tls(exc: BaseException) -> bool:
    """Did the peer answer our TLS handshake with something that is not TLS?"""
    return isinstance(exc, ssl.SSLError) and (exc.reason or "") in _NOT_TLS
