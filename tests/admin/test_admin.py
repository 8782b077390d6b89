"""The admin endpoint of a real server and client on loopback: sessions, metrics (parsed
by prometheus_client), an outage seen as detached with a countdown then resumed, DELETE
ending a session at the application, and ``tether status`` / ``tether kill``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from typing import Any

from ..aio.endpoints import Backend, connect_app
from .helpers import SRC, get_json, metrics, poll, request, run, tether_cli, tethers

SIZE = 64 * 1024


def test_sessions_metrics_and_an_outage_through_the_admin_endpoints(tmp_path: Any) -> None:
    async def main() -> None:
        async with (
            Backend(seed=1, size=SIZE, eof=False) as backend,
            tethers(backend.address, str(tmp_path)) as t,
        ):
            app = await connect_app(t.client.address, seed=2, size=SIZE, eof=False)
            await asyncio.wait_for(backend.connected.wait(), 10)
            far = backend.connections[0]

            async def delivered() -> bool:
                return app.received == far.received == SIZE

            await poll("both streams delivered", delivered)

            served = await get_json(t.server_admin + "api/sessions")
            assert served["role"] == "server"
            assert served["totals"]["attached"] == 1
            (session,) = served["sessions"]
            assert session["state"] == "attached"
            assert session["backend"] == f"{backend.address[0]}:{backend.address[1]}"
            assert session["peer"].startswith("127.0.0.1:")
            assert session["bytes_received"] == session["bytes_sent"] == SIZE
            assert session["expires_in"] is None
            sid = session["id"]
            assert len(sid) == 32
            assert (await get_json(t.server_admin + "api/sessions/" + sid[:6]))["id"] == sid

            mine = await get_json(t.client_admin + "api/sessions")
            assert mine["role"] == "client"
            (own,) = mine["sessions"]
            assert own["id"] == sid  # the same session, seen from both ends
            assert own["application"].startswith("127.0.0.1:")
            assert [e["kind"] for e in mine["events"]] == ["new"]

            before = await metrics(t.server_admin)
            assert before['tether_sessions{state="attached"}'] == 1
            assert before['tether_sessions{state="detached"}'] == 0
            assert before["tether_session_starts_total"] == 1
            assert before["tether_bytes_received_total"] == SIZE
            assert before["tether_bytes_sent_total"] == SIZE
            assert before["tether_resumes_total"] == 0
            assert before['tether_info{role="server",version="0.1.0"}'] == 1
            assert before["tether_accepting"] == 1

            # An outage: the path resets and stays down, so both ends hold the session.
            t.relay.reset_new = True
            t.relay.kill_all()

            async def detached() -> Any:
                found = (await get_json(t.server_admin + "api/sessions"))["sessions"]
                return found[0] if found and found[0]["state"] == "detached" else None

            held = await poll("the server to see the session detached", detached)
            assert 0 < held["expires_in"] <= 60
            assert held["detached_for"] >= 0
            during = await metrics(t.server_admin)
            assert during['tether_sessions{state="detached"}'] == 1

            t.relay.reset_new = False  # the path comes back: the client resumes

            async def resumed() -> Any:
                m = await metrics(t.client_admin)
                return m if m["tether_resumes_total"] == 1 else None

            client_metrics = await poll("the client to resume", resumed, limit=400)
            assert client_metrics["tether_outage_seconds_count"] == 1
            assert client_metrics['tether_outage_seconds_bucket{le="+Inf"}'] == 1
            assert client_metrics["tether_resume_seconds_count"] == 1

            async def server_resumed() -> Any:
                m = await metrics(t.server_admin)
                return m if m["tether_resumes_total"] == 1 else None

            server_metrics = await poll("the server to count the resume", server_resumed)
            assert server_metrics["tether_resume_seconds_count"] == 1
            assert server_metrics['tether_sessions{state="attached"}'] == 1
            kinds = [e["kind"] for e in (await get_json(t.server_admin + "api/sessions"))["events"]]
            assert kinds[0] == "resumed" and "link lost" in kinds and kinds[-1] == "new"

            for base in (t.server_admin, t.client_admin):
                assert (await get_json(base + "healthz"))["ok"] is True
                assert (await get_json(base + "readyz"))["ready"] is True

            # tether status, once, in both forms.
            loop = asyncio.get_running_loop()
            text = await loop.run_in_executor(
                None, lambda: tether_cli("status", "--once", "--admin", t.server_admin)
            )
            assert text.returncode == 0, text.stderr
            assert sid[:12] in text.stdout and "attached" in text.stdout
            assert "1 session (1 attached, 0 detached); 1 started, 1 resume, 0 ended" in text.stdout
            as_json = await loop.run_in_executor(
                None, lambda: tether_cli("status", "--json", "--admin", t.client_admin)
            )
            assert as_json.returncode == 0, as_json.stderr
            assert json.loads(as_json.stdout)["sessions"][0]["id"] == sid

    run(main())


def test_delete_and_tether_kill_end_the_session_at_the_application(tmp_path: Any) -> None:
    async def main() -> None:
        async with (
            Backend(seed=3, size=SIZE, eof=False) as backend,
            tethers(backend.address, str(tmp_path)) as t,
        ):
            loop = asyncio.get_running_loop()
            first = await connect_app(t.client.address, seed=4, size=SIZE, eof=False)
            second = await connect_app(t.client.address, seed=5, size=SIZE, eof=False)

            async def both_up() -> Any:
                found = (await get_json(t.server_admin + "api/sessions"))["sessions"]
                return found if len(found) == 2 else None

            sessions = await poll("two sessions on the server", both_up)
            shown = await get_json(t.server_admin + "api/sessions?limit=1")
            assert (shown["sessions_shown"], shown["totals"]["sessions"]) == (1, 2)
            status, _, _ = await request("GET", t.server_admin + "api/sessions?limit=x")
            assert status == 400
            status, body, _ = await request("DELETE", t.server_admin + "api/sessions/ffff0000")
            assert (status, json.loads(body)) == (404, {"error": "no such session"})

            # DELETE on the server ends one session: its backend connection and, once
            # the client hears the CLOSE, its application connection are closed.
            victim = sessions[0]["id"]
            status, body, _ = await request("DELETE", t.server_admin + "api/sessions/" + victim)
            assert status == 200 and json.loads(body) == {"id": victim, "ended": True}

            async def one_closed() -> bool:
                return first.peer_eof.is_set() or second.peer_eof.is_set()

            await poll("an application connection to close", one_closed)
            assert first.peer_eof.is_set() != second.peer_eof.is_set()  # only that one

            async def backend_closed() -> bool:
                return any(c.peer_eof.is_set() for c in backend.connections)

            await poll("its backend connection to close", backend_closed)
            assert sum(c.peer_eof.is_set() for c in backend.connections) == 1
            m = await metrics(t.server_admin)
            assert m['tether_session_ends_total{code="GOING_AWAY"}'] == 1
            assert f"session {victim[:12]}: ended by the admin endpoint, asked by 127.0.0.1:" in (
                t.server.log()
            )

            # tether kill on the client, by a prefix, ends the other one.
            (left,) = (await get_json(t.client_admin + "api/sessions"))["sessions"]
            killed = await loop.run_in_executor(
                None, lambda: tether_cli("kill", left["id"][:8], "--admin", t.client_admin)
            )
            assert killed.returncode == 0, killed.stderr
            assert killed.stdout.strip() == f"session {left['id'][:12]} ended"

            async def all_closed() -> bool:
                return first.peer_eof.is_set() and second.peer_eof.is_set()

            await poll("the other application connection to close", all_closed)

            async def none_left() -> bool:
                found = await get_json(t.server_admin + "api/sessions")
                return not found["sessions"]

            await poll("the server to hold no session", none_left)
            again = await loop.run_in_executor(
                None, lambda: tether_cli("kill", left["id"][:8], "--admin", t.client_admin)
            )
            assert again.returncode == 1
            assert "no such session" in again.stderr

    run(main())


def test_the_live_status_view_redraws_until_interrupted(tmp_path: Any) -> None:
    async def main() -> None:
        async with (
            Backend(seed=1, size=0, eof=False) as backend,
            tethers(backend.address, str(tmp_path)) as t,
        ):
            loop = asyncio.get_running_loop()
            view = subprocess.Popen(
                [sys.executable, "-m", "tether", "status", "--admin", t.server_admin],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": str(SRC)},
            )
            try:
                assert view.stdout is not None
                seen = b""
                for _ in range(100):  # two views drawn: it refreshes by itself
                    seen += await loop.run_in_executor(None, view.stdout.read1, 4096)
                    if seen.count(b"tether server at ") >= 2:
                        break
                assert seen.count(b"tether server at ") >= 2
                assert b"\x1b[2J" in seen  # each view replaces the last
                view.send_signal(signal.SIGINT)
                _, err = await loop.run_in_executor(None, lambda: view.communicate(timeout=10))
                assert view.returncode == 0
                assert b"Traceback" not in err
            finally:
                if view.poll() is None:
                    view.kill()
                    view.wait()

    run(main())


def test_a_detached_session_ended_on_the_server_ends_at_the_client_when_it_returns(
    tmp_path: Any,
) -> None:
    async def main() -> None:
        async with (
            Backend(seed=1, size=SIZE, eof=False) as backend,
            tethers(backend.address, str(tmp_path)) as t,
        ):
            app = await connect_app(t.client.address, seed=2, size=SIZE, eof=False)

            async def one() -> Any:
                found = (await get_json(t.server_admin + "api/sessions"))["sessions"]
                return found[0] if found else None

            sid = (await poll("the session on the server", one))["id"]
            t.relay.reset_new = True
            t.relay.kill_all()

            async def detached() -> Any:
                found = await one()
                return found if found and found["state"] == "detached" else None

            await poll("the server to see it detached", detached)
            status, _, _ = await request("DELETE", t.server_admin + "api/sessions/" + sid)
            assert status == 200

            async def backend_closed() -> bool:
                return backend.connections[0].peer_eof.is_set()

            await poll("the backend connection to close", backend_closed)
            assert not app.peer_eof.is_set()  # the client cannot know yet
            t.relay.reset_new = False  # it comes back, and is told

            async def ended() -> bool:
                return app.peer_eof.is_set()

            await poll("the application connection to close", ended, limit=400)
            left = await get_json(t.client_admin + "api/sessions")
            assert left["sessions"] == []

    run(main())
