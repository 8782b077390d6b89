"""Events the core emits (docs/protocol.md, "Session lifecycle").

Drivers take them with ``next_event()`` and act on each; they never decide
protocol questions themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, final

from .codes import CloseCode

__all__ = [
    "DataReceived",
    "EofReceived",
    "Event",
    "HandshakeFailed",
    "LinkLost",
    "ResumeRequested",
    "ServerDraining",
    "SessionEnded",
    "SessionEstablished",
    "SessionResumed",
    "SetupRequested",
]


@final
class DataReceived:
    """Stream bytes for the local application, in order, each exactly once. Written out
    as ``frames.Data`` is (one per message; CONTRIBUTING.md F1, D6)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | memoryview) -> None:
        self.data: Final = data

    def __repr__(self) -> str:
        return f"DataReceived(data={self.data!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DataReceived):
            return NotImplemented
        return self.data == other.data

    def __hash__(self) -> int:
        return hash((self.data,))


@dataclass(frozen=True, slots=True)
class EofReceived:
    """The peer's direction has ended: half-close the local side's writing."""


@dataclass(frozen=True, slots=True)
class SessionEstablished:
    """The setup completed: the session has its id and its first link."""

    session_id: bytes


@dataclass(frozen=True, slots=True)
class SessionResumed:
    """A new link carries the session; ``replayed`` bytes are being sent again."""

    replayed: int
    peer_received: int


@dataclass(frozen=True, slots=True)
class LinkLost:
    """The session's link is dead (keepalive silence): the driver closes that transport
    and the session waits for a resume."""

    reason: str
    code: CloseCode


@dataclass(frozen=True, slots=True)
class ServerDraining:
    """Client: the server said it is draining (DRAINING). The session goes on; the server
    ends it within ``within`` seconds if it has not ended by then (None: no limit)."""

    within: float | None


@dataclass(frozen=True, slots=True)
class SessionEnded:
    """The session is over; the driver closes everything that belongs to it."""

    code: CloseCode
    reason: str
    by_peer: bool


@dataclass(frozen=True, slots=True)
class SetupRequested:
    """Server handshake: a client asks for a new session."""


@dataclass(frozen=True, slots=True)
class ResumeRequested:
    """Server handshake: a client asks to resume ``session_id`` (not yet verified)."""

    session_id: bytes


@dataclass(frozen=True, slots=True)
class HandshakeFailed:
    """A link failed before it reached a session; the driver closes it.

    ``peer_is_tether``: the peer sent the whole tether magic on this link (a client
    falls back only when it did not).
    """

    code: CloseCode
    reason: str
    peer_is_tether: bool = True


Event = (
    DataReceived
    | EofReceived
    | SessionEstablished
    | SessionResumed
    | LinkLost
    | ServerDraining
    | SessionEnded
    | SetupRequested
    | ResumeRequested
    | HandshakeFailed
)
