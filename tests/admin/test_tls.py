"""HTTPS on the admin endpoint beyond loopback (docs/security.md, "Admin endpoint").

Loopback stays plain HTTP. Beyond it the endpoint is HTTPS: a server's with its links'
own identity (the one in --state-dir here), a client's with --admin-tls-cert; clear text
only with --admin-plaintext, which logs a WARNING. ``tether status`` verifies an https://
endpoint (a pinned fingerprint or a CA) and refuses one it cannot verify.

The tests run on loopback (CONTRIBUTING.md T3, T5): TETHER_TEST_ADMIN_NOT_LOOPBACK makes
the endpoint treat its loopback address as any other, which can only make it stricter.
test_beyond_loopback_in_a_network_namespace checks the same on a 198.18.x address, inside a
namespace of its own, as root.
"""

from __future__ import annotations

import asyncio
import os
import select
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tether import tls
from tether.admin.status import admin_url
from tether.cli import main
from tether.config import ADMIN_NOT_LOOPBACK_ENV, Address, ServerConfig

from ..aio.faultnet import Proc, start_tether, stop
from ..netlab.netns import netns_unavailable_reason
from .helpers import SRC, admin_line, tether_cli
from .test_security import TOKEN, _token_file, run

BAD_PIN = "sha256:" + "00" * 32


async def _https(method: str, url: str, pin: str | None, **headers: str) -> tuple[int, bytes]:
    checker: Any = aiohttp.Fingerprint(bytes.fromhex(pin.partition(":")[2])) if pin else None
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.request(method, url, headers=headers, ssl=checker) as response,
    ):
        return response.status, await response.read()


async def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, lambda: tether_cli(*args))


async def _server(tmp_path: Path, *args: str) -> Proc:
    return await start_tether(
        "server",
        "--listen",
        "127.0.0.1:0",
        "--backend",
        "127.0.0.1:9",
        "--state-dir",
        str(tmp_path / "state"),
        "--admin",
        "127.0.0.1:0",
        "--admin-token-file",
        str(_token_file(tmp_path)),
        *args,
        tmp=str(tmp_path),
    )


def test_beyond_loopback_the_options_must_say_how_it_is_protected(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    token = str(_token_file(tmp_path))
    client = ["client", "--listen", "1", "--server", "h", "--admin-token-file", token]
    assert main([*client, "--admin", "192.0.2.1"]) == 2
    assert capsys.readouterr().err == (
        "tether: error: --admin 192.0.2.1: not loopback: a client's admin endpoint needs "
        "admin_token_file (--admin-token-file) there, and admin_tls_cert and admin_tls_key "
        "(--admin-tls-cert, --admin-tls-key) for HTTPS, or admin_plaintext (--admin-plaintext) "
        "for clear text\n"
    )
    assert main(["server", "--admin", "127.0.0.1", "--admin-tls-cert", token]) == 2
    assert "admin_tls_cert and admin_tls_key go together" in capsys.readouterr().err
    assert main(["server", "--admin-plaintext"]) == 2
    assert "admin_plaintext needs admin" in capsys.readouterr().err
    with pytest.raises(ValueError, match="admin_plaintext takes no admin TLS certificate"):
        ServerConfig(
            admin=Address("127.0.0.1", 0),
            admin_tls_cert=Path(token),
            admin_tls_key=Path(token),
            admin_plaintext=True,
        )
    assert main(["status", "--admin-fingerprint", "sha256:12"]) == 2
    assert "bad fingerprint 'sha256:12'" in capsys.readouterr().err


def test_beyond_loopback_a_server_serves_https_with_its_own_identity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ADMIN_NOT_LOOPBACK_ENV, "1")
    token = str(tmp_path / "admin.token")

    async def main_() -> None:
        server = await _server(tmp_path)
        try:
            url, pin = await admin_line(server)
            assert url.startswith("https://127.0.0.1:")
            identity, _ = tls.load_or_create_identity(tmp_path / "state")
            assert pin == identity.fingerprint  # the links' certificate
            assert f"admin endpoint on {url} " in server.log()
            assert f"TLS 1.3, certificate {pin}" in server.log()
            good = {"Authorization": f"Bearer {TOKEN}"}

            # Plain HTTP to it gets nothing.
            with pytest.raises(aiohttp.ClientError):
                await _https("GET", url.replace("https:", "http:") + "readyz", None, **good)
            # HTTPS with the pin: the token is still required.
            assert await _https("GET", url + "readyz", pin, **good) == (200, b'{"ready": true}')
            assert await _https("GET", url + "metrics", pin) == (401, b"")
            # A wrong pin is refused before a request (and its token) is sent.
            with pytest.raises(aiohttp.ServerFingerprintMismatch):
                await _https("GET", url + "readyz", BAD_PIN, **good)

            shown = await _cli(
                "status", "--once", "--admin", url, "--admin-token-file", token,
                "--admin-fingerprint", pin.upper().replace("SHA256", "sha256"),
            )  # fmt: skip
            assert shown.returncode == 0, shown.stderr
            assert f"tether server at {url}" in shown.stdout
            ca = str(tmp_path / "state" / tls.CERT_FILE)  # names 127.0.0.1: verifies as a CA
            shown = await _cli(
                "status", "--once", "--admin", url, "--admin-token-file", token, "--tls-ca", ca
            )
            assert shown.returncode == 0, shown.stderr

            wrong = await _cli(
                "kill", "00", "--admin", url, "--admin-token-file", token,
                "--admin-fingerprint", BAD_PIN,
            )  # fmt: skip
            assert wrong.returncode == 1
            assert wrong.stderr == (
                f"tether: error: {url}api/sessions/00: refused: the admin endpoint presented "
                f"certificate {pin}, not the pinned {BAD_PIN} (--admin-fingerprint)\n"
            )
            unverified = await _cli("status", "--once", "--admin", url, "--admin-token-file", token)
            assert unverified.returncode == 1
            assert unverified.stderr == (
                f"tether: error: {url}api/sessions: refused: cannot verify the admin endpoint's "
                f"certificate {pin}; if that is the fingerprint on its ADMIN line, pass "
                f"--admin-fingerprint {pin} (or --tls-ca FILE)\n"
            )
            no_token = await _cli("status", "--once", "--admin", url, "--admin-fingerprint", pin)
            assert no_token.returncode == 1
            assert "the admin endpoint wants its token" in no_token.stderr
            in_clear = await _cli(
                "status", "--once", "--admin", url.replace("https:", "http:"),
                "--admin-token-file", token,
            )  # fmt: skip
            assert in_clear.returncode == 1
            assert "beyond loopback the admin endpoint is HTTPS: try https://" in in_clear.stderr
            pinned_clear = await _cli(
                "status", "--once", "--admin", url.replace("https:", "http:"),
                "--admin-fingerprint", pin,
            )  # fmt: skip
            assert pinned_clear.returncode == 1
            assert "is plain HTTP, with no certificate to check; use https://" in (
                pinned_clear.stderr
            )
            assert TOKEN not in server.log()
            assert "WARNING" not in server.log()
        finally:
            assert stop(server) == 0

    run(main_())


def test_admin_plaintext_serves_clear_text_beyond_loopback_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ADMIN_NOT_LOOPBACK_ENV, "1")

    async def main_() -> None:
        server = await _server(tmp_path, "--admin-plaintext")
        try:
            words = await admin_line(server)
            assert len(words) == 1 and words[0].startswith("http://127.0.0.1:")
            url = words[0]
            assert (
                f"WARNING tether.admin: the admin endpoint on {url} is in clear text "
                "(--admin-plaintext)" in server.log()
            )
            assert await _https("GET", url + "readyz", None) == (401, b"")
            good = {"Authorization": f"Bearer {TOKEN}"}
            assert await _https("GET", url + "readyz", None, **good) == (200, b'{"ready": true}')
        finally:
            assert stop(server) == 0

    run(main_())


def test_a_server_with_plaintext_links_still_serves_https_beyond_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--plaintext is about links: the admin endpoint makes and uses the state-dir identity."""
    monkeypatch.setenv(ADMIN_NOT_LOOPBACK_ENV, "1")

    async def main_() -> None:
        server = await _server(tmp_path, "--plaintext")
        try:
            url, pin = await admin_line(server)
            assert url.startswith("https://")
            assert pin == tls.fingerprint_of_file(tmp_path / "state" / tls.CERT_FILE)
            good = {"Authorization": f"Bearer {TOKEN}"}
            assert await _https("GET", url + "readyz", pin, **good) == (200, b'{"ready": true}')
        finally:
            assert stop(server) == 0

    run(main_())


def test_status_takes_https_for_a_host_beyond_loopback() -> None:
    assert admin_url("127.0.0.1:2599") == "http://127.0.0.1:2599/"
    assert admin_url("localhost:2597") == "http://localhost:2597/"
    assert admin_url("[::1]:2599") == "http://[::1]:2599/"
    assert admin_url("192.0.2.1:2599") == "https://192.0.2.1:2599/"
    assert admin_url("tether1.example.net:2599") == "https://tether1.example.net:2599/"
    assert admin_url("http://192.0.2.1:2599") == "http://192.0.2.1:2599/"  # as given


def test_a_client_admin_certificate_makes_it_https_even_on_loopback(tmp_path: Path) -> None:
    identity, _ = tls.load_or_create_identity(tmp_path / "client-admin")

    async def main_() -> None:
        client = await start_tether(
            "client",
            "--listen",
            "127.0.0.1:0",
            "--server",
            "127.0.0.1:9",
            "--admin",
            "127.0.0.1:0",
            "--admin-tls-cert",
            str(identity.cert_path),
            "--admin-tls-key",
            str(identity.key_path),
            tmp=str(tmp_path),
        )
        try:
            url, pin = await admin_line(client)
            assert url.startswith("https://127.0.0.1:") and pin == identity.fingerprint
            assert await _https("GET", url + "readyz", pin) == (200, b'{"ready": true}')
            shown = await _cli("status", "--once", "--admin", url, "--admin-fingerprint", pin)
            assert shown.returncode == 0, shown.stderr
            assert f"tether client at {url}" in shown.stdout
        finally:
            assert stop(client) == 0

    run(main_())


def _read_lines(proc: subprocess.Popen[bytes], count: int, limit: float = 20.0) -> list[str]:
    """The first ``count`` lines of its stdout, read from the pipe itself (bounded)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = b""
    deadline = time.monotonic() + limit
    while data.count(b"\n") < count:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(left, 0))
        assert ready, f"{count} lines from the server expected within {limit} s, got {data!r}"
        chunk = os.read(fd, 4096)
        assert chunk, f"the server ended after {data!r}"
        data += chunk
    return data.decode().splitlines()[:count]


@pytest.mark.netns
def test_beyond_loopback_in_a_network_namespace(tmp_path: Path) -> None:
    """The real address decision, no hook: 198.18.0.1 on the namespace's own interface."""
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    ns = f"tether-admin-{uuid.uuid4().hex[:8]}"
    token = _token_file(tmp_path)
    python = [sys.executable, "-m", "tether"]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop(ADMIN_NOT_LOOPBACK_ENV, None)

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, timeout=10, capture_output=True)

    def in_ns(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", ns, *python, *args],
            capture_output=True, text=True, timeout=30, env=env, check=False,
        )  # fmt: skip

    try:
        ip("netns", "add", ns)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create a network namespace: {exc.stderr.decode().strip()}")
    server = None
    try:
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "addr", "add", "198.18.0.1/32", "dev", "lo")  # inside the namespace only
        log = tmp_path / "server.log"
        with open(log, "wb") as err:
            server = subprocess.Popen(
                ["ip", "netns", "exec", ns, *python, "server", "--listen", "127.0.0.1:0",
                 "--backend", "127.0.0.1:9", "--state-dir", str(tmp_path / "state"),
                 "--admin", "198.18.0.1:0", "--admin-token-file", str(token)],
                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, env=env,
            )  # fmt: skip
        lines = _read_lines(server, 2)
        assert lines[0].startswith("READY "), (lines, log.read_text())
        words = lines[1].split()
        assert words[0] == "ADMIN" and words[1].startswith("https://198.18.0.1:"), lines
        url, pin = words[1], words[2]
        shown = in_ns(
            "status", "--once", "--admin", url, "--admin-token-file", str(token),
            "--admin-fingerprint", pin,
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        refused = in_ns("status", "--once", "--admin", url, "--admin-token-file", str(token))
        assert refused.returncode == 1 and f"--admin-fingerprint {pin}" in refused.stderr
        # Given HOST:PORT alone, status takes https for an address beyond loopback.
        bare = url.removeprefix("https://").rstrip("/")
        shown = in_ns(
            "status", "--once", "--admin", bare, "--admin-token-file", str(token),
            "--admin-fingerprint", pin,
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            if server.stdout is not None:
                server.stdout.close()
        subprocess.run(["ip", "netns", "del", ns], timeout=10, check=False)
