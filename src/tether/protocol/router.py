"""The server's table of sessions (docs/protocol.md, "Link handshake" and "Resume").

One :class:`Router` per server. It makes the handshake of every new link, admits or
refuses setups, creates sessions, routes each resume to its session by id (never by
address, so a client may come back from anywhere) and remembers how recently ended
sessions ended, so that a late resume is told why. Sans-I/O like the rest of the
core: the asyncio server, the test pair and the fuzz targets all route through it.

The driver's part is small: for ``SetupRequested`` ask :meth:`Router.admit_setup`,
get what the session needs (a backend connection), then :meth:`Router.accept_setup`;
for ``ResumeRequested`` call :meth:`Router.resume`; when a session ends, call
:meth:`Router.forget`. The accepted handshake has already handed its link to the
session (its answer first, then the session's own bytes), so the driver then only
pumps the session.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import StateError
from .admission import Account, MemoryBudget, SessionAdmission
from .codes import CloseCode
from .frames import Resume, Setup
from .handshake import Random, ServerHandshake, SessionIds
from .session import Session, SessionConfig

__all__ = ["ENDED_MEMORY", "Refusal", "Router"]

ENDED_MEMORY = 16384  # recently ended session ids remembered to answer a late resume
TOLD_LATE_RESUMES = frozenset(
    {
        CloseCode.NORMAL,
        CloseCode.PROTOCOL_ERROR,
        CloseCode.EXPIRED,
        CloseCode.BACKEND_RESET,
        CloseCode.APPLICATION_RESET,
        CloseCode.INTERNAL_ERROR,
    }
)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a setup is refused: the REJECT code and its text (no internal detail)."""

    code: CloseCode
    reason: str


class Router:
    """Sessions by id, and the decisions taken for a link before it reaches one."""

    def __init__(
        self,
        config: SessionConfig,
        *,
        max_sessions: int,
        max_sessions_per_source: int | None = None,
        authorize: Callable[[bytes], bool] | None = None,
        memory: MemoryBudget | None = None,
        random: Random = os.urandom,
        session_ids: SessionIds | None = None,
    ) -> None:
        """``authorize(token)``: may a client presenting ``token`` create a session? None:
        any client that reached the handshake may (docs/security.md, "Client credentials").
        Sessions are counted per source (an IPv4 address or an IPv6 /64; admission.py).
        ``memory``: the budget every session's replay buffer is charged to; it grants each
        new session its window (smaller as it fills) and refuses a setup OVERLOADED when
        not even the floor fits. None: no budget (each session bounded by its window).
        ``session_ids``: makes new sessions' ids (routing.py); None: random ones."""
        self.config = config
        self.authorize = authorize
        self.admission = SessionAdmission(max_sessions, max_sessions_per_source or max_sessions)
        self.memory = memory
        # Draining (docs/protocol.md, "Drain"): setups are refused GOING_AWAY, resumes of
        # this server's sessions are still admitted.
        self.draining = False
        self.drain_deadline: float | None = None  # when the sessions left are ended
        self._granted: dict[ServerHandshake, Account] = {}  # admitted, not yet accepted
        self.sessions: dict[bytes, Session] = {}
        self._sources: dict[bytes, str] = {}  # session id -> the source that set it up
        self._ended: OrderedDict[bytes, CloseCode] = OrderedDict()
        self._random = random
        self._session_ids = session_ids

    def open_link(self, now: float) -> ServerHandshake:
        """The handshake that owns a newly accepted link."""
        return ServerHandshake(
            self.config,
            now,
            random=self._random,
            session_ids=self._session_ids,
            draining=self.draining,
        )

    def drain(self, now: float, deadline: float | None) -> None:
        """Start draining: refuse setups from now on, and tell every session (and every one
        still being set up when it is accepted) that this server ends it at ``deadline``
        (None: no limit) if it has not ended by then. The driver pumps the sessions."""
        self.draining, self.drain_deadline = True, deadline
        for session in self.sessions.values():
            session.drain(now, deadline)

    def admit_setup(self, handshake: ServerHandshake, source: str = "?") -> Refusal | None:
        """May the session ``handshake`` asks for be created now, for ``source``? None, and
        a place is held for it until :meth:`accept_setup` or :meth:`cancel_setup`; or why
        not (the client is told no more than the code and a generic text)."""
        setup = handshake.request
        if handshake.done or not isinstance(setup, Setup):
            return Refusal(CloseCode.PROTOCOL_ERROR, "no pending SETUP")
        if self.authorize is not None and not self.authorize(setup.token):
            return Refusal(CloseCode.UNAUTHORIZED, "not authorized")
        if self.draining:
            # docs/protocol.md, "Drain": GOING_AWAY, not OVERLOADED: this server will not take
            # the session later either, so a client with other servers goes there now.
            return Refusal(CloseCode.GOING_AWAY, "server draining")
        if not self.admission.admit(source).admitted:
            # OVERLOADED is transient: the client retries later and does not fall back.
            return Refusal(CloseCode.OVERLOADED, "server busy")
        if self.memory is not None:
            account = self.memory.grant(self.config.window)
            if account is None:  # not even the floor fits: established sessions keep theirs
                self.admission.release(source)
                return Refusal(CloseCode.OVERLOADED, "server busy")
            self._granted[handshake] = account
        return None

    def reserved_for(self, handshake: ServerHandshake) -> int | None:
        """The bytes the memory budget reserved for the admitted setup ``handshake``: what its
        session may be given before it is accepted (a backend that speaks first); None
        without a budget."""
        account = self._granted.get(handshake)
        return None if account is None else account.reserved

    def cancel_setup(self, source: str = "?", handshake: ServerHandshake | None = None) -> None:
        """An admitted setup did not happen (the backend was down, the link died)."""
        self.admission.release(source)
        if handshake is not None and (account := self._granted.pop(handshake, None)):
            account.close()

    def accept_setup(self, handshake: ServerHandshake, now: float, source: str = "?") -> Session:
        """Create and register the session ``handshake`` asked for (admitted for ``source``),
        with the window its memory account was granted."""
        account = self._granted.pop(handshake, None)
        if account is None:
            session = handshake.accept_setup(now)
        else:
            session = handshake.accept_setup(now, window=account.window)
            session.charge_to(account)
        self.sessions[session.session_id] = session
        self._sources[session.session_id] = source
        if self.draining:  # admitted before the drain began
            session.drain(now, self.drain_deadline)
        return session

    def resume(self, handshake: ServerHandshake, now: float) -> Session | None:
        """Move the session the RESUME names onto this link, once its proof verified;
        None when refused (``handshake`` reports why with ``HandshakeFailed``)."""
        request = handshake.request
        if handshake.done or not isinstance(request, Resume):
            return None  # it failed after asking (more bytes than allowed before the answer)
        session = self.sessions.get(request.session_id)
        if session is None:
            code = self._ended.get(request.session_id, CloseCode.UNKNOWN_SESSION)
            handshake.reject(code, "no such session" if code is CloseCode.UNKNOWN_SESSION else "")
            return None
        return session if handshake.accept_resume(session, now) else None

    def adopt(self, state: bytes, now: float, source: str = "?") -> Session:
        """Take over a session another process exported (docs/design.md, "Takeover"): it
        is restored DETACHED with the time it had left, counted for ``source`` and charged
        to the memory budget, past their limits if need be (it exists already). Raises
        :class:`~tether.errors.StateError` for a malformed state or an id held already."""
        session = Session.restore(state, self.config, now)
        sid = session.session_id
        if sid in self.sessions:
            raise StateError(f"session {sid.hex()[:12]} handed over twice")
        self._ended.pop(sid, None)
        self.admission.adopt(source)
        if self.memory is not None:
            session.charge_to(self.memory.adopt(session.config.window))
        self.sessions[sid] = session
        self._sources[sid] = source
        if self.draining:
            session.drain(now, self.drain_deadline)
        return session

    def source_of(self, session_id: bytes) -> str:
        """The source the session ``session_id`` is counted for ("?" if none)."""
        return self._sources.get(session_id, "?")

    def forget(self, session: Session) -> None:
        """``session`` ended: drop it, and remember how for a late resume."""
        sid = session.session_id
        if self.sessions.pop(sid, None) is None:
            return
        self.admission.release(self._sources.pop(sid))
        code = session.close_code
        # What a late resume is told: the end code when it means something to a client,
        # never a local-only or transient one (docs/protocol.md, "Reason codes").
        self._ended[sid] = code if code in TOLD_LATE_RESUMES else CloseCode.UNKNOWN_SESSION
        while len(self._ended) > ENDED_MEMORY:
            self._ended.popitem(last=False)
