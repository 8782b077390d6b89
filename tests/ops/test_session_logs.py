"""One log line per session event, carrying the session id and the peer; ends other than
NORMAL at WARNING; ``-v`` adds per-link detail (docs/operations.md, "Logs")."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

from tests.aio.faultnet import logged, tether_pair

from .test_reload import LIMIT, App, echo


def _line(log: str, pattern: str) -> str:
    found = [line for line in log.splitlines() if re.search(pattern, line)]
    assert len(found) == 1, (pattern, log)
    return found[0]


def test_session_events_and_verbose_link_detail(tmp_path: Path) -> None:
    async def main() -> tuple[str, str, int]:
        async with (
            echo(b"") as backend,
            tether_pair(backend, str(tmp_path), server_args=("-v",), client_args=("-v",)) as (
                server,
                client,
                relay,
            ),
        ):
            app = await App.open(client)
            assert await app.ask(b"hello", b"") == b"hello"
            relay.kill_all()
            await logged(client, "resumed after")
            await logged(server, "resumed from")
            assert await app.ask(b"again", b"") == b"again"
            app.writer.write_eof()  # the echo backend closes: the session ends NORMAL
            await asyncio.wait_for(app.reader.read(), LIMIT)
            await logged(server, "ended NORMAL")
            await logged(client, "ended NORMAL")
            app.close()
            return server.log(), client.log(), relay.port

    server_log, client_log, relay_port = asyncio.run(main())
    sid = re.search(r"session (\w{12}): new from (\S+), backend", server_log)
    assert sid is not None, server_log
    session, peer = sid[1], sid[2]
    lost = _line(server_log, f"session {session}: link lost")
    assert " INFO " in lost and f"peer {peer}; holding the backend for up to 180s" in lost
    resumed = _line(server_log, f"session {session}: resumed from ")
    assert re.search(r"after \d+\.\d\ds away \(resume 1\), replaying \d+ bytes", resumed), resumed
    ended = _line(server_log, f"session {session}: ended NORMAL")
    assert " INFO " in ended and "; peer 127.0.0.1:" in ended and "1 resumes" in ended
    server = f"127.0.0.1:{relay_port}"
    name = f"#1/{session}"
    assert " INFO " in _line(client_log, f"session {name}: established via {server}")
    assert f"to {server}; reconnecting" in _line(client_log, f"session {name}: link lost")
    assert f"away via {server}, replaying" in _line(client_log, f"session {name}: resumed after")
    assert f"server {server}; application" in _line(client_log, f"session {name}: ended NORMAL")
    # -v: what each link did, in the drivers' words.
    assert re.search(
        r"DEBUG tether.link: link \S+: connected, TLS handshake done \(TLSv1.3, ", server_log
    )
    assert (
        "DEBUG tether.server: link " in server_log and "RESUME received for session" in server_log
    )
    assert re.search(r"DEBUG tether.client: session #1: link \S+: sending SETUP", client_log)
    assert re.search(f"DEBUG tether.client: session {name}: link \\S+: sending RESUME", client_log)
    assert f"session {name}: link 127.0.0.1:{relay_port}: accepted by the server" in client_log
    assert f"DEBUG tether.client: link to {server}: connecting (TLS)" in client_log


def test_an_expiry_is_a_warning_on_both_sides_with_json_fields(tmp_path: Path) -> None:
    async def main() -> tuple[str, str]:
        args = ("--timeout", "1s", "--log-format", "json", "-q")
        async with (
            echo(b"") as backend,
            tether_pair(backend, str(tmp_path), server_args=args, client_args=args) as (
                server,
                client,
                relay,
            ),
        ):
            app = await App.open(client)
            assert await app.ask(b"hello", b"") == b"hello"
            relay.reset_new = True  # no way back: both ends wait out the timeout
            relay.kill_all()
            await logged(server, "ended EXPIRED")
            await logged(client, "ended EXPIRED")
            app.close()
            return server.log(), client.log()

    server_log, client_log = asyncio.run(main())
    for log in (server_log, client_log):
        records = [json.loads(line) for line in log.splitlines()]
        ended = [r for r in records if r.get("event") == "ended"]
        assert len(ended) == 1, records
        assert ended[0]["level"] == "WARNING" and ended[0]["code"] == "EXPIRED"
        assert re.fullmatch(r"[0-9a-f]{12}", ended[0]["session"]) and ended[0]["peer"]
        assert ended[0]["reason"].startswith("session-reliability timeout passed")
        # -q: the INFO lines of the session (new, link lost) are not there.
        assert all(r["level"] != "INFO" for r in records)


def test_verbose_shows_the_keepalive_verdict_with_the_session_counters(tmp_path: Path) -> None:
    async def main() -> tuple[str, str]:
        args = ("--keepalive", "200ms", "-v")
        async with (
            echo(b"") as backend,
            tether_pair(backend, str(tmp_path), server_args=args, client_args=args) as (
                server,
                client,
                relay,
            ),
        ):
            app = await App.open(client)
            assert await app.ask(b"hello", b"") == b"hello"
            relay.blackhole_current()  # silence, no reset: only the keepalive notices
            await logged(client, "link lost (keepalive timed out)")
            await logged(client, "resumed after")
            assert await app.ask(b"again", b"") == b"again"
            app.close()
            return server.log(), client.log()

    _, client_log = asyncio.run(main())
    verdict = _line(client_log, "core gave up the link")
    assert re.search(
        r"DEBUG tether.client: session [0-9a-f]{12}: core gave up the link \(keepalive timed "
        r"out\): 5 bytes sent, \d+ acked, \d+ held for replay, 5 received",
        verdict,
    ), verdict
