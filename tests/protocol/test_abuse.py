"""A peer that abuses the established link, and a link the driver cannot write to,
through the core alone (tests/protocol/pair.py; no event loop, no clock).

- Keepalive: silence in an interval during which receiving was paused at any time is
  not death, and the peer of a side that does not read keeps hearing from it.
"""

from __future__ import annotations

from tether.protocol.session import SessionConfig, SessionState

from .pair import Pair

KEEPALIVE = 3.0
CONFIG = SessionConfig(window=256 * 1024, keepalive=KEEPALIVE, timeout=60.0)


def established() -> Pair:
    p = Pair(CONFIG)
    p.establish()
    return p


# -- keepalive while receiving is paused now and then ---------------------------------------


def test_paused_at_any_time_since_the_last_tick_is_not_silence() -> None:
    """Receiving is paused for most of each interval and resumed just before each tick,
    and nothing arrives (the peer's bytes wait): the link must not be declared dead."""
    for side in ("client", "server"):
        p = established()
        session, other = (p.client, p.server) if side == "client" else (p.server, p.client)
        other.pause_receiving(True)  # not under test here
        for _ in range(6):
            deadline = session.next_timer()
            assert deadline is not None
            session.pause_receiving(True)
            p.advance(deadline - p.now - 0.01, transfer=False)
            session.pause_receiving(False)
            p.advance(0.02, transfer=False)
            assert session.state is SessionState.ATTACHED, side
        assert not p.app.link_losses and not p.backend.link_losses
        other.pause_receiving(False)
        p.transfer()
        p.advance(KEEPALIVE * 2)
        assert p.client.state is p.server.state is SessionState.ATTACHED


def test_a_receiver_that_stops_reading_keeps_its_peer_hearing_from_it() -> None:
    """The server's backend is slow, so it reads nothing from the link for many
    intervals while the client keeps uploading: the client hears the server's PINGs
    (sent while it does not read) and does not declare the link dead."""
    p = established()
    p.server.pause_receiving(True)
    for _ in range(40):
        p.client_send(b"u" * 1000)
        p.advance(KEEPALIVE / 4, transfer=False)
        p.deliver(to_server=0)  # toward the client only: the server reads nothing
    assert p.client.state is p.server.state is SessionState.ATTACHED
    assert not p.app.link_losses and not p.backend.link_losses
    p.server.pause_receiving(False)
    p.transfer()
    assert len(p.backend.received) == 40_000
