"""Close and reject reason codes (docs/protocol.md, "Reason codes")."""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["LOCAL_ONLY", "CloseCode"]


class CloseCode(enum.IntEnum):
    """Why a session or a link ended; carried by CLOSE and REJECT frames as a u16."""

    NORMAL = 0  # both directions finished and were acknowledged
    PROTOCOL_ERROR = 1  # the peer broke the protocol
    UNSUPPORTED_VERSION = 2  # no common protocol version
    UNKNOWN_SESSION = 3  # resume names a session the server does not hold
    BAD_PROOF = 4  # resume proof did not verify
    EXPIRED = 5  # the session-reliability timeout passed while detached
    BACKEND_UNAVAILABLE = 6  # the server could not reach its backend
    BACKEND_RESET = 7  # the backend aborted its connection
    APPLICATION_RESET = 8  # the application aborted its connection
    GOING_AWAY = 9  # the endpoint is shutting down
    # 10 is reserved: once SUPERSEDED, never sent (a superseded link is dead at the client)
    HANDSHAKE_TIMEOUT = 11  # the link handshake did not finish in time
    OVERLOADED = 12  # the server holds as many sessions as it is allowed
    INTERNAL_ERROR = 13  # a bug; reported rather than hidden
    LINK_LOST = 14  # local only: the link died (never on the wire)
    RESUME_FAILED = 15  # local only: reconnecting failed until the deadline
    UNAUTHORIZED = 16  # the client presented no credential the server accepts
    TLS_REQUIRED = 17  # sent in clear: the server takes only TLS links
    UNTRUSTED_SERVER = 18  # local only: the server's certificate did not verify
    SERVER_UNREACHABLE = 19  # version 4, transient: a gateway cannot reach the session's server

    @classmethod
    def from_wire(cls, value: int) -> CloseCode:
        """The code a received CLOSE or REJECT carries. An unknown code, or one only an end
        itself decides (``LOCAL_ONLY``: never on the wire), reads as PROTOCOL_ERROR: a peer
        cannot make us report that our own check failed (docs/protocol.md, "Reason codes")."""
        try:
            code = cls(value)
        except ValueError:
            return cls.PROTOCOL_ERROR
        return cls.PROTOCOL_ERROR if code in LOCAL_ONLY else code


# docs/protocol.md, "Reason codes": decided by an end itself, never sent.
LOCAL_ONLY: Final = frozenset(
    {CloseCode.LINK_LOST, CloseCode.RESUME_FAILED, CloseCode.UNTRUSTED_SERVER}
)
