"""The one tree of tether's exceptions.

::

    TetherError
    ├── ProtocolError          the peer broke docs/protocol.md; carries the wire close code
    ├── SessionClosed          the session ended; carries the close code and the reason
    ├── TLSConfigError         a certificate, key or CA file cannot be used (tls.py)
    ├── TrustError             the client must not trust this server (tls.py)
    ├── ClientsFileError       the server's clients file is unreadable or malformed (credentials.py)
    ├── StateError             a session state handed over by another process is malformed
    └── InvalidState           the caller used an object in a way its state forbids

Peer misbehaviour (``ProtocolError``) is kept apart from caller misuse (``InvalidState``).
The sans-I/O core never raises on peer input from ``receive_data()``: it fails the
link or the session and reports why through an event.
"""

from __future__ import annotations

from .protocol.codes import CloseCode

__all__ = ["InvalidState", "ProtocolError", "SessionClosed", "StateError", "TetherError"]


class TetherError(Exception):
    """Base class of every exception tether raises."""


class ProtocolError(TetherError):
    """The peer sent something docs/protocol.md forbids."""

    def __init__(self, message: str, code: CloseCode = CloseCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


class SessionClosed(TetherError):
    """The session has ended."""

    def __init__(self, code: CloseCode, reason: str = "") -> None:
        super().__init__(f"{code.name}: {reason}" if reason else code.name)
        self.code = code
        self.reason = reason


class StateError(TetherError):
    """A session state from :meth:`Session.export_state` that cannot be restored: it
    crossed a process boundary (a takeover), so it is checked like peer input."""


class InvalidState(TetherError):
    """The caller did something the object's current state does not allow."""
