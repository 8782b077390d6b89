"""Who may use the admin endpoint: loopback only unless a token file is given, then the
bearer token on every route but the static page (401 and nothing more); a Host header
that is not the endpoint's (DNS rebinding) and another site's Origin get 403."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from tether.cli import main

from ..aio.faultnet import start_tether, stop
from .helpers import admin_url, request, tether_cli

TOKEN = "s3cret-admin-token-for-tests"


def run(coro: Coroutine[Any, Any, None], limit: float = 60) -> None:
    asyncio.run(asyncio.wait_for(coro, limit))


def _token_file(tmp_path: Path, mode: int = 0o600) -> Path:
    path = tmp_path / "admin.token"
    path.write_text(TOKEN + "\n")
    os.chmod(path, mode)
    return path


def test_a_non_loopback_admin_address_needs_a_token_file(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["server", "--admin", "0.0.0.0:2599"]) == 2
    assert capsys.readouterr().err == (
        "tether: error: --admin 0.0.0.0:2599: not loopback: the admin endpoint needs "
        "admin_token_file (--admin-token-file) there\n"
    )
    assert main(["client", "--listen", "1", "--server", "h", "--admin", "192.0.2.1"]) == 2
    assert "--admin 192.0.2.1: not loopback" in capsys.readouterr().err
    assert main(["server", "--admin-token-file", "/nonexistent"]) == 2
    assert "admin_token_file needs admin" in capsys.readouterr().err


def test_a_token_file_others_can_read_is_refused_at_start(tmp_path: Path) -> None:
    token = _token_file(tmp_path, 0o644)
    done = tether_cli(
        "server",
        "--listen",
        "127.0.0.1:0",
        "--backend",
        "127.0.0.1:9",
        "--admin",
        "127.0.0.1:0",
        "--admin-token-file",
        str(token),
    )
    assert done.returncode == 2
    assert f"admin token file {token} is accessible by group or others" in done.stderr


def test_with_a_token_every_route_but_the_page_needs_it(tmp_path: Path) -> None:
    token = _token_file(tmp_path)

    async def main_() -> None:
        server = await start_tether(
            "server",
            "--listen",
            "127.0.0.1:0",
            "--backend",
            "127.0.0.1:9",
            "--admin",
            "127.0.0.1:0",
            "--admin-token-file",
            str(token),
            tmp=str(tmp_path),
        )
        try:
            base = await admin_url(server)
            port = base.rstrip("/").rsplit(":", 1)[1]
            good = {"Authorization": f"Bearer {TOKEN}"}
            for path in ("metrics", "api/sessions", "api/sessions/00", "healthz", "readyz"):
                for headers in (
                    {},
                    {"Authorization": "Bearer wrong"},
                    {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"},
                ):
                    status, body, _ = await request("GET", base + path, **headers)
                    assert (status, body) == (401, b""), (path, headers)
            status, _, _ = await request("DELETE", base + "api/sessions/00")
            assert status == 401
            status, _, _ = await request("POST", base + "api/drain")  # guarded as DELETE
            assert status == 401
            for path in ("metrics", "api/sessions", "healthz", "readyz"):
                status, _, headers = await request("GET", base + path, **good)
                assert status == 200, path
            # The page itself carries no data: it loads without the token.
            status, body, headers = await request("GET", base)
            assert status == 200 and b'src="status.js"' in body
            assert "script-src 'self'" in headers["Content-Security-Policy"]
            assert "default-src 'none'" in headers["Content-Security-Policy"]
            assert headers["X-Content-Type-Options"] == "nosniff"
            status, body, headers = await request("GET", base + "status.js")
            assert status == 200 and headers["Content-Type"].startswith("text/javascript")
            # DNS rebinding: a page on another name that resolves here.
            status, body, _ = await request(
                "GET", base + "metrics", Host=f"evil.example:{port}", **good
            )
            assert (status, body) == (403, b"")
            status, _, _ = await request("GET", base, Host=f"evil.example:{port}")
            assert status == 403
            status, _, _ = await request("GET", base + "readyz", Host=f"localhost:{port}", **good)
            assert status == 200
            # Another site's page cannot end a session.
            status, _, _ = await request(
                "DELETE", base + "api/sessions/00", Origin="http://evil.example", **good
            )
            assert status == 403
            status, _, _ = await request(
                "DELETE", base + "api/sessions/00", Origin=base.rstrip("/"), **good
            )
            assert status == 404  # allowed through; there is no such session

            loop = asyncio.get_running_loop()
            refused = await loop.run_in_executor(
                None, lambda: tether_cli("status", "--once", "--admin", base)
            )
            assert refused.returncode == 1
            assert "the admin endpoint wants its token (--admin-token-file)" in refused.stderr
            shown = await loop.run_in_executor(
                None,
                lambda: tether_cli(
                    "status", "--once", "--admin", base, "--admin-token-file", str(token)
                ),
            )
            assert shown.returncode == 0, shown.stderr
            assert "tether server at" in shown.stdout and "(no sessions)" in shown.stdout
            assert TOKEN not in server.log()
        finally:
            assert stop(server) == 0

    run(main_())


def test_status_names_an_endpoint_that_is_not_there() -> None:
    done = tether_cli("status", "--once", "--admin", "127.0.0.1:1")
    assert done.returncode == 1
    assert done.stderr.startswith("tether: error: cannot reach the admin endpoint at ")
    assert "Connection refused" in done.stderr
