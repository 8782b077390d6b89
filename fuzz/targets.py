"""Fuzz targets for the sans-I/O core (CONTRIBUTING.md, "Testing" T4).

Each target takes a list of byte chunks from the fuzzer and checks the documented
contract for peer input:

- ``FrameReader.feed`` returns frames or raises :class:`~tether.errors.ProtocolError`,
  nothing else;
- ``ServerHandshake``, ``ClientHandshake`` and ``Session`` ``receive_data`` never
  raise: they report a failure with ``HandshakeFailed``, ``LinkLost`` or
  ``SessionEnded``, and what they report is consistent with their state afterwards;
- ``Session.restore`` (a session state another process handed over, a takeover) returns
  a detached session or raises :class:`~tether.errors.StateError`, nothing else.

The server side routes through the same :class:`Router` as the asyncio server.
Run them under pytest with hypothesis (tests/protocol/test_fuzz.py), or with atheris
when it is installed: ``python -m fuzz.targets reader|handshake|client-<state>|server|state``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from tether.errors import ProtocolError, StateError
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
from tether.protocol.frames import NONCE_SIZE, PROTOCOL_VERSION, server_hello
from tether.protocol.handshake import ClientHandshake, HandshakeStage, ServerHandshake
from tether.protocol.reader import FrameReader
from tether.protocol.router import Router
from tether.protocol.session import Session, SessionConfig, SessionState

__all__ = [
    "CLIENT_STATES",
    "VICTIM_ID",
    "client_target",
    "reader_target",
    "server_handshake_target",
    "server_session_target",
    "state_target",
]

CONFIG = SessionConfig(window=64 * 1024, keepalive=1.0, timeout=30.0, handshake_timeout=5.0)
VICTIM_ID = b"\x01" * 16  # the session id every fuzzed server holds, so a RESUME can name it
CLIENT_STATES = ("hello", "setup", "resume", "established")

SESSION_EVENTS = (
    DataReceived,
    EofReceived,
    SessionEstablished,
    SessionResumed,
    LinkLost,
    SessionEnded,
)
HANDSHAKE_EVENTS = (SetupRequested, ResumeRequested, HandshakeFailed)


def _fixed(n: int) -> bytes:
    return b"\x01" * n


def established(now: float = 0.0) -> tuple[Session, Session, Router]:
    """A client and a server session on one link, with session id ``VICTIM_ID``, and
    the router that holds the server's."""
    client = Session.client(CONFIG, now)
    client_hs = ClientHandshake(client, now)
    router = Router(CONFIG, max_sessions=10, random=_fixed)
    hs = router.open_link(now)
    hs.receive_data(b"".join(client_hs.data_to_send()))
    assert isinstance(hs.next_event(), SetupRequested)
    server = router.accept_setup(hs, now)
    client_hs.receive_data(b"".join(server.data_to_send()))
    assert isinstance(client.next_event(), SessionEstablished)
    assert server.session_id == VICTIM_ID
    assert isinstance(server.next_event(), SessionEstablished)
    return client, server, router


def _drain(
    obj: Session | ServerHandshake | ClientHandshake, allowed: tuple[type, ...]
) -> list[Event]:
    events = list(iter(obj.next_event, None))
    for event in events:
        assert isinstance(event, allowed), event
    return events


def _check_session(session: Session, events: list[Event], ended_before: bool) -> bool:
    """What a session reported agrees with its state. Returns whether it has ended."""
    ends = [e for e in events if isinstance(e, SessionEnded)]
    assert len(ends) <= 1 and not (ends and ended_before), events
    if ends:
        assert session.closed and session.close_code is ends[0].code
        assert session.next_timer() is None
    if any(isinstance(e, LinkLost) for e in events) and not session.closed:
        assert session.state is SessionState.DETACHED
    if session.closed:
        assert ended_before or ends
    return session.closed


# -- targets ------------------------------------------------------------------------------


def reader_target(chunks: list[bytes]) -> None:
    reader = FrameReader()
    for chunk in chunks:
        try:
            reader.feed(chunk)
        except ProtocolError as exc:
            assert isinstance(exc.code, CloseCode)
            return


def server_handshake_target(chunks: list[bytes]) -> None:
    """Random bytes from a client into a fresh link of a server whose router holds a
    live session with id ``VICTIM_ID``; SETUP is accepted, RESUME routed."""
    victim_client, victim, router = established()
    victim_stats = victim.statistics()
    hs = router.open_link(0.0)
    session: Session | None = None
    ended = False
    for chunk in chunks:
        if session is not None:
            session.receive_data(chunk)
            ended = _check_session(session, _drain(session, SESSION_EVENTS), ended)
            continue
        hs.receive_data(chunk)
        for event in _drain(hs, HANDSHAKE_EVENTS):
            if isinstance(event, SetupRequested):
                if router.admit_setup(hs) is None:
                    session = router.accept_setup(hs, 1.0)
            elif isinstance(event, ResumeRequested):
                session = router.resume(hs, 1.0)  # only the real secret gets a session
            else:
                assert hs.failed and hs.next_timer() is None
        if session is not None:
            assert hs.stage is HandshakeStage.DONE and hs.data_to_send() == []
            ended = _check_session(session, _drain(session, SESSION_EVENTS), ended)
        hs.data_to_send()
    hs.handle_timer(100.0)
    _drain(hs, HANDSHAKE_EVENTS)
    assert hs.done or hs.next_timer() is None or hs.next_timer() > 100.0
    if session is not victim:  # a failed or forged resume leaves the live session alone
        assert victim.statistics() == victim_stats
        victim_client.send(b"still flowing")
        victim.receive_data(b"".join(victim_client.data_to_send()))
        assert _drain(victim, SESSION_EVENTS) == [DataReceived(b"still flowing")]


def client_target(state: str, chunks: list[bytes]) -> None:
    """Random bytes from a server into a client whose current link is in ``state``."""
    hs: ClientHandshake | None = None
    if state == "established":
        client, _, _ = established()
    else:
        client = Session.client(CONFIG, 0.0)
        if state == "resume":
            client, _, _ = established()
            client.link_lost(1.0)
            assert client.state is SessionState.DETACHED
        hs = ClientHandshake(client, 1.0)
        if state in ("setup", "resume"):
            hs.receive_data(server_hello(PROTOCOL_VERSION, b"\x02" * NONCE_SIZE))
            assert hs.stage is HandshakeStage.ANSWER
        hs.data_to_send()
    _drain(client, SESSION_EVENTS)
    client.data_to_send()
    ended = False
    now = 2.0
    for chunk in chunks:
        if hs is not None and not hs.done:
            hs.receive_data(chunk)
            for event in _drain(hs, (HandshakeFailed,)):
                assert isinstance(event, HandshakeFailed) and hs.failed
            hs.data_to_send()
        elif hs is None or not hs.failed:
            client.receive_data(chunk)
        ended = _check_session(client, _drain(client, SESSION_EVENTS), ended)
        client.data_to_send()
        if not client.closed:
            client.send(b"x")
            dead = hs.failed if hs is not None else client.state is not SessionState.ATTACHED
            if dead and client.state is not SessionState.ATTACHED:
                hs = ClientHandshake(client, now)  # the driver reconnects
                hs.data_to_send()
        now += 0.5
        client.handle_timer(now)
        if hs is not None:
            hs.handle_timer(now)
            _drain(hs, (HandshakeFailed,))
        ended = _check_session(client, _drain(client, SESSION_EVENTS), ended)


def server_session_target(chunks: list[bytes]) -> None:
    """Random bytes from a client into an established server session."""
    _, server, _ = established()
    ended = False
    for chunk in chunks:
        server.receive_data(chunk)
        ended = _check_session(server, _drain(server, SESSION_EVENTS), ended)
        server.data_to_send()
        if not server.closed:
            server.send(b"y")


def state_target(chunks: list[bytes]) -> None:
    """Bytes as a session state to restore: alone, after the first half of a real state,
    and written over a real one (each chunk: a position byte, then what goes there)."""
    valid = _valid_state()
    data = b"".join(chunks)
    patched = bytearray(valid)
    for chunk in chunks:
        if chunk:
            at = chunk[0] * len(valid) // 256
            patched[at : at + len(chunk) - 1] = chunk[1:]
    for state in (data, valid[: len(valid) // 2] + data, bytes(patched)):
        try:
            session = Session.restore(state, CONFIG, 0.0)
        except StateError:
            continue
        assert session.state is SessionState.DETACHED and session.expires_at is not None
        session.handle_timer(session.expires_at)
        assert session.closed, "a restored session must expire at its deadline"


_VALID: list[bytes] = []


def _valid_state() -> bytes:
    """A real server session's state, with bytes held and both stream offsets moved."""
    if not _VALID:
        client, server, _ = established()
        client.send(b"u" * 300)
        server.receive_data(b"".join(client.data_to_send()))
        server.send(b"d" * 500)
        server.data_to_send()
        server.link_lost(1.0)
        _VALID.append(server.export_state(2.0))
    return _VALID[0]


TARGETS: dict[str, Callable[[list[bytes]], None]] = {
    "reader": reader_target,
    "state": state_target,
    "handshake": server_handshake_target,
    "server": server_session_target,
    **{
        f"client-{state}": (lambda chunks, state=state: client_target(state, chunks))
        for state in CLIENT_STATES
    },
}


def main(argv: list[str]) -> int:  # pragma: no cover - needs atheris
    import atheris  # type: ignore[import-not-found]

    name = argv[1] if len(argv) > 1 else "reader"
    target = TARGETS[name]

    def one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        chunks = []
        while fdp.remaining_bytes():
            chunks.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 256)))
        target(chunks)

    atheris.Setup([argv[0], *argv[2:]], one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv))
