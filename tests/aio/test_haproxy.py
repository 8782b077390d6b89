"""deploy/haproxy/haproxy.cfg with the real HAProxy on loopback: two routed servers behind
it, sessions spread, every link killed, each session resumes on its own server with every
byte intact, and a forged resume is closed by HAProxy itself (docs/protocol.md,
"Routing"). Skips without haproxy (.ci/run installs it)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tether import tls
from tether.aio.client import TetherClient
from tether.config import Address, ClientConfig
from tether.protocol.frames import Route, client_hello

from .faultnet import FaultRelay
from .test_gateway import FAST, SIZE, finished, more, open_apps, run, server, site, until

__all__ = ["site"]  # the fixture, shared with test_gateway

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy" / "haproxy.cfg"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def haproxy_config(site: dict[str, Any], port: int, servers: list[Address], tmp: Path) -> Path:
    """The shipped file, with loopback addresses, the test's key and certificates, faster
    health checks and fewer connections; nothing else changed."""
    identity, _ = tls.load_or_create_identity(site["servers"])
    front = tmp / "front.pem"
    front.write_bytes(identity.cert_path.read_bytes() + identity.key_path.read_bytes())
    front.chmod(0o600)
    text = CONFIG.read_text()
    text = text.replace("bind :443 ", f"bind 127.0.0.1:{port} ")
    text = text.replace("/etc/tether/gateway.pem", str(front))
    text = text.replace("/etc/tether/servers-ca.pem", str(identity.cert_path))
    text = text.replace("ROUTING_KEY_BASE64", site["key"].read_text().strip())
    text = text.replace("inter 3s", "inter 200ms")
    text = text.replace("maxconn 100000", "maxconn 4096")  # this machine's file limit
    for number, address in enumerate(servers, 1):
        text = re.sub(rf"(?m)^(\s+)server s{number} \S+", rf"\1server s{number} {address}", text)
    path = tmp / "haproxy.cfg"
    path.write_text(text)
    return path


@pytest.mark.skipif(
    shutil.which("haproxy") is None, reason="needs haproxy (apt-get install haproxy)"
)
def test_haproxy_routes_resumes_by_the_routing_field(site: dict[str, Any], tmp_path: Path) -> None:
    from .endpoints import Backend

    haproxy = shutil.which("haproxy")
    assert haproxy is not None

    async def main() -> None:
        port = _free_port()
        async with (
            Backend(1, SIZE, eof=False) as b1,
            Backend(1, SIZE, eof=False) as b2,
            server(site, 1, b1) as s1,
            server(site, 2, b2) as s2,
        ):
            config = haproxy_config(site, port, [s1.addresses[0], s2.addresses[0]], tmp_path)
            log = (tmp_path / "haproxy.log").open("wb")
            proc = subprocess.Popen([haproxy, "-db", "-f", str(config)], stdout=log, stderr=log)
            relay = FaultRelay(("127.0.0.1", port))
            try:
                await until(lambda: _listening(port) or proc.poll() is not None, 20, "haproxy")
                assert proc.poll() is None, (tmp_path / "haproxy.log").read_text()
                await relay.start()
                client_config = ClientConfig(
                    listen=Address("127.0.0.1", 0),
                    server=Address("127.0.0.1", relay.port),
                    server_fingerprint=tls.fingerprint_of_file(
                        tls.load_or_create_identity(site["servers"])[0].cert_path
                    ),
                    session=FAST,
                    require_reliability=True,
                    known_servers=tmp_path / "known",
                )
                async with TetherClient(client_config) as client:
                    apps = await open_apps(client, 4)
                    assert len(b1.connections) == 2 and len(b2.connections) == 2  # leastconn
                    more(apps, SIZE // 2)
                    backs = [*b1.connections, *b2.connections]
                    await until(lambda: all(b.received > 0 for b in backs), 20, "bytes flowing")
                    relay.kill_all()  # every link, mid-stream
                    more(apps, SIZE // 2)
                    held = lambda: [*s1.sessions(), *s2.sessions()]  # noqa: E731
                    await until(lambda: len(held()) == 4 and all(
                        s.resumes == 1 and s.state == "attached" for s in held()),
                        30, "every session resumed")  # fmt: skip
                    await finished(apps, [b1, b2], 60)
                    # Each resume landed where its session lives: one backend connection
                    # per session, and each server still holds exactly its two.
                    assert len(b1.connections) == 2 and len(b2.connections) == 2
                    assert len(s1.sessions()) == 2 and len(s2.sessions()) == 2

                # A made-up id, for server 1: HAProxy checks the tag and closes, silently.
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
                reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
                writer.write(client_hello(3, 3) + Route(b"\x00\x01" + os.urandom(14)).serialize())
                answer = await asyncio.wait_for(reader.read(100), 10)
                assert answer == b""
                writer.close()
                # The health checks (a tether hello, every 200 ms here) kept passing.
                await asyncio.sleep(0.5)
                text = (tmp_path / "haproxy.log").read_text()
                assert "is DOWN" not in text, text
            finally:
                await relay.close()
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
                log.close()

    run(main())


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.skipif(
    shutil.which("haproxy") is None, reason="needs haproxy (apt-get install haproxy)"
)
def test_a_printed_config_with_a_key_and_clear_text_servers_is_valid(
    site: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tether.cli import main

    argv = ["gateway", "--server", "127.0.0.1:2598", "--server", "7=127.0.0.2:2600",
            "--routing-key-file", str(site["key"]), "--server-plaintext",
            "--print-haproxy-config"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "use-server s7 if { req.payload(14,2) -m bin 0007 }" in text
    assert "hmac(sha256," + site["key"].read_text().strip() + ")" in text
    assert " ssl " not in text.split("backend")[1]  # clear text to the servers
    identity, _ = tls.load_or_create_identity(site["servers"])
    front = tmp_path / "front.pem"
    front.write_bytes(identity.cert_path.read_bytes() + identity.key_path.read_bytes())
    config = tmp_path / "printed.cfg"
    config.write_text(text.replace("/etc/tether/gateway.pem", str(front)))
    haproxy = shutil.which("haproxy")
    assert haproxy is not None
    check = subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
