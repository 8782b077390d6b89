"""SIGHUP re-reads the config file: real ``tether`` processes, a file edited between two
sessions, and a live session that carries on untouched (CONTRIBUTING.md T3)."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.aio.faultnet import FaultRelay, Proc, logged, start_tether, stop

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="needs SIGHUP")

LIMIT = 20.0  # seconds for any one step


@asynccontextmanager
async def echo(tag: bytes) -> AsyncIterator[tuple[str, int]]:
    """A backend that answers every read with ``tag`` + what it read."""

    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        try:
            while data := await reader.read(65536):
                writer.write(tag + data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[:2]
    finally:
        server.close()
        for writer in writers:
            writer.transport.abort()
        await server.wait_closed()
        await asyncio.sleep(0)  # let the handlers see their connections end


class App:
    """An application connection through the tether client."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, client: Proc) -> App:
        return cls(*await asyncio.open_connection(*client.address))

    async def ask(self, text: bytes, tag: bytes) -> bytes:
        self.writer.write(text)
        return await asyncio.wait_for(self.reader.readexactly(len(tag + text)), LIMIT)

    def close(self) -> None:
        self.writer.close()


async def notified(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.run_in_executor(None, sock.recv, 4096), LIMIT)


def test_server_reload_applies_the_new_backend_to_new_sessions_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notify_path = tmp_path / "notify"
    if len(str(notify_path)) > 100:
        pytest.skip("tmp_path too long for a unix socket")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(LIMIT)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
    config = tmp_path / "server.toml"

    async def main() -> None:
        async with echo(b"A:") as backend_a, echo(b"B:") as backend_b:
            config.write_text(
                'listen = "127.0.0.1:0"\nplaintext = true\n'
                f'backend = "127.0.0.1:{backend_a[1]}"\ntimeout = "3m"\n'
            )
            server = await start_tether("server", "--config", str(config), tmp=str(tmp_path))
            relay = FaultRelay(server.address)
            client = None
            try:
                assert (await notified(notify)).startswith(b"READY=1")
                await relay.start()
                monkeypatch.delenv("NOTIFY_SOCKET")  # the socket is the server's alone
                client = await start_tether(
                    "client", "--listen", "127.0.0.1:0", "--server",
                    f"127.0.0.1:{relay.port}", "--plaintext", tmp=str(tmp_path),
                )  # fmt: skip
                first = await App.open(client)
                assert await first.ask(b"one", b"A:") == b"A:one"

                # A new backend and timeout, and a listen address only a restart changes.
                config.write_text(
                    'listen = "127.0.0.1:1"\nplaintext = true\n'
                    f'backend = "127.0.0.1:{backend_b[1]}"\ntimeout = "2m"\n'
                    'log-level = "debug"\n'
                )
                mark = len(server.log())
                server.popen.send_signal(signal.SIGHUP)
                assert (await notified(notify)).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
                assert (await notified(notify)).startswith(b"READY=1")
                line = await logged(server, "reloaded", mark)
                assert f"backend 127.0.0.1:{backend_a[1]} -> 127.0.0.1:{backend_b[1]}" in line
                assert "timeout 180s -> 120s" in line
                assert "log-level info -> debug" in line
                line = await logged(server, "take effect only after a restart", mark)
                assert "WARNING" in line and "listen" in line

                second = await App.open(client)
                assert await second.ask(b"two", b"B:") == b"B:two"  # a new session: B
                assert "DEBUG" in await logged(server, "SETUP received", mark)  # log-level
                assert await first.ask(b"three", b"A:") == b"A:three"  # the live one: A
                # ...and it still survives an outage, resumed under the new settings.
                relay.kill_all()
                await logged(client, "resumed after")
                assert await first.ask(b"four", b"A:") == b"A:four"

                # A bad file changes nothing and the server carries on.
                config.write_text('backend = "127.0.0.1:x"\n')
                mark = len(server.log())
                server.popen.send_signal(signal.SIGHUP)
                assert (await notified(notify)).startswith(b"RELOADING=1")
                assert (await notified(notify)).startswith(b"READY=1")
                line = await logged(server, "reload failed", mark)
                assert "ERROR" in line
                assert f'{config}: backend = "127.0.0.1:x": port must be a number' in line
                third = await App.open(client)
                assert await third.ask(b"five", b"B:") == b"B:five"
                for app in (first, second, third):
                    app.close()
            finally:
                await relay.close()
                codes = [stop(p) for p in (client, server) if p is not None]
                notify.close()
            assert codes == [0, 0], (client.log() if client else "", server.log())

    asyncio.run(main())


def test_client_reload_points_new_sessions_at_the_new_server(tmp_path: Path) -> None:
    config = tmp_path / "client.toml"

    async def main() -> None:
        async with echo(b"A:") as backend_a, echo(b"B:") as backend_b:
            servers = []
            for backend in (backend_a, backend_b):
                address = f"127.0.0.1:{backend[1]}"
                argv = ("--listen", "127.0.0.1:0", "--plaintext", "--backend", address)
                servers.append(await start_tether("server", *argv, tmp=str(tmp_path)))
            client = None
            try:
                config.write_text(
                    'listen = "127.0.0.1:0"\nplaintext = true\n'
                    f'server = "127.0.0.1:{servers[0].address[1]}"\n'
                )
                client = await start_tether("client", "--config", str(config), tmp=str(tmp_path))
                first = await App.open(client)
                assert await first.ask(b"one", b"A:") == b"A:one"
                config.write_text(
                    'listen = "127.0.0.1:0"\nplaintext = true\n'
                    f'server = "127.0.0.1:{servers[1].address[1]}"\n'
                )
                mark = len(client.log())
                client.popen.send_signal(signal.SIGHUP)
                line = await logged(client, "reloaded", mark)
                assert f"server 127.0.0.1:{servers[0].address[1]} -> 127.0.0.1:" in line
                second = await App.open(client)
                assert await second.ask(b"two", b"B:") == b"B:two"
                assert await first.ask(b"three", b"A:") == b"A:three"
                first.close()
                second.close()
            finally:
                codes = [stop(p) for p in (client, *servers) if p is not None]
            assert codes == [0, 0, 0]

    asyncio.run(main())


def test_sighup_without_a_config_file_is_logged_not_fatal(tmp_path: Path) -> None:
    """It used to kill the server (exit 129, no log line)."""

    async def main() -> None:
        server = await start_tether(
            "server", "--listen", "127.0.0.1:0", "--plaintext", tmp=str(tmp_path)
        )
        try:
            server.popen.send_signal(signal.SIGHUP)
            line = await logged(server, "SIGHUP")
            assert "no --config file to re-read; settings unchanged" in line
        finally:
            code = stop(server)
        assert code == 0, server.log()

    asyncio.run(main())


def test_a_server_keeps_its_routing_identity_and_memory_budget_until_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A server makes its session ids with its server id and routing key at start
    (docs/protocol.md, "Routing"), and its memory budget: a reload that changes them says
    they need a restart and keeps the ones in use, while what can change (the backend) does.
    (A changed memory budget was once logged as applied "for new sessions" and never was.)"""
    import base64
    import os

    from tether.aio.server import TetherServer
    from tether.cli import _OPTIONS
    from tether.config import Address, ServerConfig
    from tether.reload import Reloader, Settings

    keys = []
    for name in ("one.key", "two.key"):
        key = tmp_path / name
        key.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
        key.chmod(0o600)
        keys.append(key)
    base = ServerConfig(
        listen=Address("127.0.0.1", 0),
        plaintext=True,
        server_id=1,
        routing_key_file=keys[0],
        memory_budget=8 << 20,
        state_dir=tmp_path / "state",
    )
    file = tmp_path / "server.toml"
    old = Settings(base, file=file)
    new = Settings(
        ServerConfig(
            listen=Address("127.0.0.1", 0),
            plaintext=True,
            server_id=2,
            routing_key_file=keys[1],
            memory_budget=16 << 20,
            backend=Address("127.0.0.1", 7000),
            state_dir=tmp_path / "state",
        ),
        file=file,
    )

    async def main() -> tuple[ServerConfig, int]:
        async with TetherServer(base) as server:
            reloader = Reloader(server, old, lambda: new, _OPTIONS["server"], lambda *_: None)
            assert reloader.reload()
            memory = server._router.memory
            assert memory is not None
            return server.config, memory.total

    with caplog.at_level("INFO", logger="tether"):
        config, budget = asyncio.run(main())
    assert (config.server_id, config.routing_key_file) == (1, keys[0])
    assert (config.memory_budget, budget) == (8 << 20, 8 << 20)
    assert config.backend == Address("127.0.0.1", 7000)
    restart = [r.getMessage() for r in caplog.records if "after a restart" in r.getMessage()]
    assert restart and "server-id" in restart[0] and "routing-key-file" in restart[0]
    assert "memory-budget" in restart[0]
    applied = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reload")]
    assert not any("server-id 1 -> 2" in line and "restart" not in line for line in applied)
    assert not any("memory-budget" in line and "restart" not in line for line in applied)
