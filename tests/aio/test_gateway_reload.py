"""A gateway's reload (SIGHUP, tether/reload.py and aio/gateway.py ``reconfigure``): servers
added, removed and moved, its certificate and its trust in the servers changed, a bad file
that changes nothing; live sessions through it untouched. Real processes on loopback for the
signal path, a real gateway in process for what a log line cannot show (CONTRIBUTING.md T3)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.aio.faultnet import FaultRelay, Proc, start_tether, stop
from tests.ops.test_reload import App, echo, logged, notified
from tether import tls
from tether.aio.client import TetherClient
from tether.aio.gateway import TetherGateway
from tether.cli import _OPTIONS
from tether.config import Address, RoutedServer
from tether.reload import Reloader, Settings

from .endpoints import Backend, connect_app
from .test_gateway import (
    app_address,
    client_config,
    gateway_config,
    open_apps,
    run,
    server,
    until,
)

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="needs SIGHUP")

LIMIT = 20.0


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Any]:
    """As test_gateway.py's: a routing key file and the servers' shared TLS identity."""
    identity, _ = tls.load_or_create_identity(tmp_path / "servers")
    return {"key": _key(tmp_path), "servers": tmp_path / "servers", "gw": tmp_path / "gw",
            "fingerprint": identity.fingerprint}  # fmt: skip


def _key(tmp_path: Path) -> Path:
    key = tmp_path / "routing.key"
    key.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
    key.chmod(0o600)
    return key


def _gateway_file(path: Path, key: Path, servers: list[str], extra: str = "") -> None:
    listed = ", ".join(f'"{s}"' for s in servers)
    path.write_text(
        f'listen = "127.0.0.1:0"\nplaintext = true\nserver = [{listed}]\n'
        f'routing-key-file = "{key}"\nserver-plaintext = true\nhealth-interval = "200ms"\n' + extra
    )


def test_sighup_adds_and_removes_servers_and_keeps_live_sessions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tether gateway --config FILE`` with server 1; SIGHUP adds server 2 (checked, then
    new sessions reach it), then removes server 1 (no new sessions there, but a session of
    its own still resumes on it through the gateway), then a bad file changes nothing. The
    first session, through the gateway all along, carries on across every reload."""
    notify_path = tmp_path / "notify"
    if len(str(notify_path)) > 100:
        pytest.skip("tmp_path too long for a unix socket")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    key = _key(tmp_path)
    config = tmp_path / "gateway.toml"
    tmp = str(tmp_path)

    async def main() -> None:
        async with echo(b"A:") as backend_a, echo(b"B:") as backend_b:
            procs: list[Proc] = []
            relay: FaultRelay | None = None
            try:
                for number, backend in ((1, backend_a), (2, backend_b)):
                    procs.append(await start_tether(
                        "server", "--listen", "127.0.0.1:0", "--plaintext",
                        "--backend", f"127.0.0.1:{backend[1]}", "--keepalive", "0.3",
                        "--server-id", str(number), "--routing-key-file", str(key), tmp=tmp,
                    ))  # fmt: skip
                s1, s2 = (f"{n + 1}=127.0.0.1:{p.address[1]}" for n, p in enumerate(procs))
                _gateway_file(config, key, [s1])
                monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
                gateway = await start_tether("gateway", "--config", str(config), tmp=tmp)
                monkeypatch.delenv("NOTIFY_SOCKET")  # the socket is the gateway's alone
                procs.append(gateway)
                assert (await notified(notify)).startswith(b"READY=1")
                relay = FaultRelay(gateway.address)
                await relay.start()
                client = await start_tether(
                    "client", "--listen", "127.0.0.1:0", "--server", f"127.0.0.1:{relay.port}",
                    "--plaintext", "--keepalive", "0.3", "--require-reliability", tmp=tmp,
                )  # fmt: skip
                procs.append(client)
                first = await App.open(client)
                assert await first.ask(b"one", b"A:") == b"A:one"

                # 1. Server 2 added (and the listen address, which only a restart changes).
                _gateway_file(config, key, [s1, s2], 'connect-timeout = "3s"\n')
                config.write_text(config.read_text().replace('"127.0.0.1:0"', '"127.0.0.1:1"'))
                mark = len(gateway.log())
                gateway.popen.send_signal(signal.SIGHUP)
                assert (await notified(notify)).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
                assert (await notified(notify)).startswith(b"READY=1")
                line = await logged(gateway, "reloaded", mark)
                assert "INFO" in line
                assert f"servers added {s2}" in line, line
                assert "changed connect-timeout 5s -> 3s (for new links)" in line, line
                line = await logged(gateway, "take effect only after a restart", mark)
                assert "WARNING" in line and "listen" in line
                await logged(gateway, f"server 2 (127.0.0.1:{procs[1].address[1]}): healthy", mark)
                second = await App.open(client)
                assert await second.ask(b"two", b"B:") == b"B:two"  # the fewest links: 2
                assert await first.ask(b"three", b"A:") == b"A:three"  # untouched

                # 2. Server 1 removed: new sessions go to 2 only; 1's session still resumes.
                _gateway_file(config, key, [s2])
                mark = len(gateway.log())
                gateway.popen.send_signal(signal.SIGHUP)
                line = await logged(gateway, "reloaded", mark)
                assert f"servers removed {s1}" in line and "added" not in line, line
                apps = [await App.open(client) for _ in range(3)]
                for n, app in enumerate(apps):
                    assert await app.ask(b"x%d" % n, b"B:") == b"B:x%d" % n
                client_mark = len(client.log())
                relay.kill_all()  # every link cut: each session resumes through the gateway
                for _ in range(5):
                    await logged(client, "resumed after", client_mark)
                    client_mark = client.log().index("resumed after", client_mark) + 1
                assert await first.ask(b"four", b"A:") == b"A:four"  # on server 1, removed
                assert await second.ask(b"five", b"B:") == b"B:five"

                # 3. A bad file: one ERROR, the settings in use kept, the gateway serving.
                config.write_text(config.read_text().replace(s2, "2=127.0.0.1:x"))
                mark = len(gateway.log())
                gateway.popen.send_signal(signal.SIGHUP)
                assert (await notified(notify)).startswith(b"RELOADING=1")
                assert (await notified(notify)).startswith(b"READY=1")
                line = await logged(gateway, "reload failed", mark)
                assert "ERROR" in line and '"2=127.0.0.1:x"' in line and "port must be" in line
                late = await App.open(client)
                assert await late.ask(b"six", b"B:") == b"B:six"
                assert await first.ask(b"seven", b"A:") == b"A:seven"
                assert gateway.popen.poll() is None
                for app in (first, second, *apps, late):
                    app.close()
            except BaseException:
                for proc in procs:
                    print(f"--- {proc.popen.args[3]} log ---\n{proc.log()}")
                raise
            finally:
                if relay is not None:
                    await relay.close()
                codes = [stop(proc) for proc in reversed(procs)]
                notify.close()
            assert codes == [0] * len(procs), codes

    asyncio.run(asyncio.wait_for(main(), LIMIT * 6))


async def _fingerprint(address: Address) -> str:
    context = tls.client_context()
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(address.host, address.port, ssl=context), LIMIT
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.transport.abort()
    return tls.fingerprint(der)


def test_reload_moves_a_server_and_swaps_certificate_and_trust(
    site: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """In process, real TLS both sides: a wrong pin for the servers makes them fail their
    checks and the right one brings them back; a server id moved to another address gets
    the new sessions there while the live one goes on; the gateway's new certificate is
    what new links see; an unreadable CA changes nothing."""
    second, _ = tls.load_or_create_identity(tmp_path / "second")
    file = tmp_path / "gateway.toml"  # named in the log; the rereads below stand for it

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            b1 = await stack.enter_async_context(Backend(1, 1024, eof=False))
            b1b = await stack.enter_async_context(Backend(1, 1024, eof=False))
            s1 = await stack.enter_async_context(server(site, 1, b1))
            s1b = await stack.enter_async_context(server(site, 1, b1b))  # id 1, elsewhere
            wanted = [gateway_config(site, [s1])]
            gw = await stack.enter_async_context(TetherGateway(wanted[0]))
            reloader = Reloader(gw, Settings(wanted[0], file=file),
                                lambda: Settings(wanted[-1], file=file),
                                _OPTIONS["gateway"], lambda level, fmt: None)  # fmt: skip

            def reload(**changes: Any) -> bool:
                wanted.append(dataclasses.replace(wanted[-1], **changes))
                return reloader.reload()

            client = await stack.enter_async_context(TetherClient(client_config(gw, tmp_path)))
            apps = await open_apps(client, 1)
            assert len(b1.connections) == 1

            # A wrong pin for the servers: checks fail; the right one: they pass again.
            assert reload(server_fingerprint="sha256:" + "00" * 32)
            await until(lambda: gw.snapshot() == {1: (False, 1)}, LIMIT, "server 1 unhealthy")
            assert reload(server_fingerprint=site["fingerprint"])
            await until(lambda: gw.snapshot()[1][0], LIMIT, "server 1 healthy again")

            # Server 1 moved: new sessions reach it at its new address; the live one goes on.
            moved = RoutedServer(1, s1b.addresses[0])
            assert reload(servers=(moved,))
            assert not gw.snapshot()[1][0]  # unchecked there yet
            await until(lambda: gw.snapshot()[1][0], LIMIT, "server 1 healthy at its new address")
            apps.append(await connect_app(app_address(client), 1, 0, eof=False))
            await until(
                lambda: len(b1b.connections) == 1, LIMIT, "the new session at 1's new address"
            )
            assert len(b1.connections) == 1 and all(
                s.state == "attached" for s in client.sessions()
            )

            # The gateway's certificate, for new links.
            address = gw.addresses[0]
            first = gw.fingerprint
            assert await _fingerprint(address) == first
            assert reload(tls_cert=second.cert_path, tls_key=second.key_path)
            assert await _fingerprint(address) == second.fingerprint == gw.fingerprint != first

            # An unreadable CA for the servers: nothing changes.
            assert not reload(server_fingerprint=None, server_ca=tmp_path / "missing-ca.pem")
            assert gw.config == wanted[-2]
            assert await _fingerprint(address) == second.fingerprint
            assert gw.snapshot()[1][0]

    with caplog.at_level(logging.INFO, logger="tether"):
        run(main())
    messages = [r.getMessage() for r in caplog.records if r.name == "tether.gateway"]
    assert any(m.startswith(f"TLS certificate for new links: {second.fingerprint} (was ")
               for m in messages), messages  # fmt: skip
    messages = [r.getMessage() for r in caplog.records if r.name == "tether.reload"]
    assert any("server 1 moved 127.0.0.1:" in m for m in messages), messages
    failed = [r for r in caplog.records if r.getMessage().startswith(f"reload of {file} failed")]
    assert len(failed) == 1 and failed[0].levelname == "ERROR"
