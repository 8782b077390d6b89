"""The gateway on loopback (aio/gateway.py): two routed servers behind it, real TLS on
both sides, sessions spread, resumes land on their own server, through another gateway
too, and a stopped server gets no new sessions (docs/protocol.md, "Routing")."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import ssl
from collections.abc import AsyncIterator, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tether import tls
from tether.aio.client import TetherClient
from tether.aio.gateway import TetherGateway
from tether.aio.server import TetherServer
from tether.config import Address, ClientConfig, GatewayConfig, RoutedServer, ServerConfig
from tether.protocol.codes import CloseCode
from tether.protocol.frames import Reject, Route, client_hello, parse_control
from tether.protocol.routing import parse_routing_key
from tether.protocol.session import SessionConfig

from .endpoints import Backend, Streamer, close_all, connect_app, stream_digest

SIZE = 4 * 1024 * 1024
FAST = SessionConfig(keepalive=0.3, timeout=60.0)


def run(coro: Coroutine[Any, Any, None], limit: float = 120) -> None:
    async def main() -> None:
        task = asyncio.ensure_future(coro)
        try:
            done, _ = await asyncio.wait([task], timeout=limit)
            if not done:  # say where it is stuck, then fail (T6)
                for stuck in asyncio.all_tasks():
                    stuck.print_stack(limit=12)
                task.cancel()
                raise AssertionError(f"the test did not finish within {limit}s")
            task.result()
        finally:
            close_all()
            await asyncio.sleep(0)

    asyncio.run(main())


async def until(check: Any, limit: float, what: str) -> None:
    for _ in range(int(limit / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Any]:
    """A routing key file (mode 600) and the servers' shared TLS identity."""
    key_file = tmp_path / "routing.key"
    key_file.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
    key_file.chmod(0o600)
    identity, _ = tls.load_or_create_identity(tmp_path / "servers")
    return {"key": key_file, "servers": tmp_path / "servers", "gw": tmp_path / "gw",
            "fingerprint": identity.fingerprint}  # fmt: skip


@contextlib.asynccontextmanager
async def server(
    site: dict[str, Any], server_id: int, backend: Backend
) -> AsyncIterator[TetherServer]:
    config = ServerConfig(
        listen=Address("127.0.0.1", 0),
        backend=Address(*backend.address),
        session=FAST,
        state_dir=site["servers"],
        server_id=server_id,
        routing_key_file=site["key"],
    )
    async with TetherServer(config) as running:
        yield running


@contextlib.asynccontextmanager
async def two_servers(
    site: dict[str, Any],
) -> AsyncIterator[tuple[Backend, Backend, TetherServer, TetherServer, TetherGateway]]:
    """Servers 1 and 2, each with its backend, behind one gateway."""
    async with (
        Backend(1, SIZE, eof=False) as b1,
        Backend(1, SIZE, eof=False) as b2,
        server(site, 1, b1) as s1,
        server(site, 2, b2) as s2,
        TetherGateway(gateway_config(site, [s1, s2])) as gw,
    ):
        yield b1, b2, s1, s2, gw


def gateway_config(
    site: dict[str, Any], servers: list[TetherServer], port: int = 0
) -> GatewayConfig:
    return GatewayConfig(
        listen=Address("127.0.0.1", port),
        servers=tuple(RoutedServer(s.config.server_id, s.addresses[0]) for s in servers),
        routing_key_file=site["key"],
        health_interval=0.2,
        state_dir=site["gw"],
        server_fingerprint=site["fingerprint"],
    )


def client_config(gateway: TetherGateway, tmp: Path) -> ClientConfig:
    return ClientConfig(
        listen=Address("127.0.0.1", 0),
        server=gateway.addresses[0],
        server_fingerprint=gateway.fingerprint,
        session=FAST,
        require_reliability=True,
        known_servers=tmp / "known",
    )


def app_address(client: TetherClient) -> tuple[str, int]:
    address = client.addresses[0]
    return address.host, address.port


def where(session_id: str, key_file: Path) -> int | None:
    return parse_routing_key(key_file.read_bytes()).server_of(bytes.fromhex(session_id))


def resumed(s1: TetherServer, s2: TetherServer, times: int) -> bool:
    """Every session of both servers has resumed ``times`` times, and is attached."""
    held = [*s1.sessions(), *s2.sessions()]
    return len(held) == 6 and all(s.resumes == times and s.state == "attached" for s in held)


def more(apps: list[Streamer], size: int) -> None:
    """Each application writes ``size`` more bytes of its seeded stream."""
    for app in apps:
        app.left += size
        app._fill()


async def open_apps(client: TetherClient, n: int) -> list[Streamer]:
    """``n`` applications, each with its session (set up one after the other); the
    backends send their SIZE bytes at once, the applications nothing yet."""
    apps = []
    for _ in range(n):
        apps.append(await connect_app(app_address(client), 1, 0, eof=False))
        await until(lambda: len(client.sessions()) == len(apps)
                    and all(s.state == "attached" for s in client.sessions()),
                    20, "sessions established")  # fmt: skip
    return apps


async def finished(apps: list[Streamer], backends: list[Backend], limit: float) -> None:
    streams = [*apps, *(c for b in backends for c in b.connections)]
    await until(lambda: all(s.received >= SIZE for s in streams), limit, "every byte")
    digest = stream_digest(1, SIZE)
    for stream in streams:
        assert stream.received == SIZE
        assert stream.digest.hexdigest() == digest  # every byte once and in order


def test_sessions_spread_and_resume_on_their_server_through_any_gateway(
    site: dict[str, Any], tmp_path: Path
) -> None:
    """Six sessions through a relay (the network) and gateway 1: spread 3 and 3. Then every
    link closed at gateway 1; then the path switched to gateway 2, running beside it; then
    gateway 2 replaced by a new one on its port. Each time every session resumes on its own
    server, and in the end every byte arrived once, in order, over one backend connection
    per session."""
    from .faultnet import FaultRelay

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            b1 = await stack.enter_async_context(Backend(1, SIZE, eof=False))
            b2 = await stack.enter_async_context(Backend(1, SIZE, eof=False))
            s1 = await stack.enter_async_context(server(site, 1, b1))
            s2 = await stack.enter_async_context(server(site, 2, b2))
            gw1 = await stack.enter_async_context(TetherGateway(gateway_config(site, [s1, s2])))
            relay = FaultRelay((gw1.addresses[0].host, gw1.addresses[0].port))
            await relay.start()
            stack.push_async_callback(relay.close)
            config = replace(client_config(gw1, tmp_path), server=Address("127.0.0.1", relay.port))
            client = await stack.enter_async_context(TetherClient(config))
            apps = await open_apps(client, 6)
            more(apps, SIZE // 4)
            # Spread: the gateway sends each new session to the server with fewest links.
            assert len(b1.connections) == 3 and len(b2.connections) == 3
            ids = {s.session_id for s in client.sessions()}
            on = {sid: where(sid, site["key"]) for sid in ids}
            for srv, number in ((s1, 1), (s2, 2)):
                held = {s.session_id for s in srv.sessions()}
                assert held == {sid for sid, n in on.items() if n == number}

            # 1. The gateway closes every client link: each session resumes, on its server.
            backs = [*b1.connections, *b2.connections]
            await until(lambda: all(b.received > 0 for b in backs), 20, "bytes flowing")
            for link in gw1.client_links:
                link.abort()
            more(apps, SIZE // 4)  # into the replay buffers while detached
            await until(lambda: resumed(s1, s2, 1), 30, "resumes through gateway 1")

            # 2. The path now leads to gateway 2, which has never seen these sessions.
            gw2 = TetherGateway(gateway_config(site, [s1, s2]))
            await gw2.__aenter__()
            gw2_open = [True]

            async def close_gw2() -> None:
                if gw2_open.pop():
                    await gw2.__aexit__(None, None, None)

            stack.push_async_callback(close_gw2)
            relay.target = (gw2.addresses[0].host, gw2.addresses[0].port)
            relay.kill_all()
            more(apps, SIZE // 4)
            await until(lambda: resumed(s1, s2, 2), 30, "resumes through gateway 2")
            assert gw2.forwarded_total == 6 and not gw1.client_links

            # 3. Gateway 2 is replaced by a new process on its port (a restart).
            port = gw2.addresses[0].port
            await close_gw2()
            gw2_open.append(False)
            more(apps, SIZE // 4)
            gw3 = await stack.enter_async_context(
                TetherGateway(gateway_config(site, [s1, s2], port))
            )
            await until(lambda: resumed(s1, s2, 3), 30, "resumes through gateway 3")
            await finished(apps, [b1, b2], 60)
            assert gw3.forwarded_total == 6
            # Every backend saw one connection per session, no more.
            assert len(b1.connections) == 3 and len(b2.connections) == 3

    run(main())


def test_a_stopped_server_gets_no_new_sessions(site: dict[str, Any], tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            Backend(1, SIZE, eof=False) as b1,
            Backend(1, SIZE, eof=False) as b2,
            server(site, 1, b1) as s1,
        ):
            s2 = TetherServer(
                ServerConfig(
                    listen=Address("127.0.0.1", 0),
                    backend=Address(*b2.address),
                    session=FAST,
                    state_dir=site["servers"],
                    server_id=2,
                    routing_key_file=site["key"],
                )
            )
            await s2.__aenter__()
            s2_open = True
            try:
                async with TetherGateway(gateway_config(site, [s1, s2])) as gw:
                    assert gw.snapshot() == {1: (True, 0), 2: (True, 0)}
                    s2_open = False
                    await s2.__aexit__(None, None, None)
                    await until(lambda: not gw.snapshot()[2][0], 10, "server 2 unhealthy")
                    async with TetherClient(client_config(gw, tmp_path)) as client:
                        apps = await open_apps(client, 4)
                        more(apps, SIZE)
                        await finished(apps, [b1], 60)
                    assert len(b1.connections) == 4 and not b2.connections
            finally:
                if s2_open:
                    await s2.__aexit__(None, None, None)

    run(main())


def test_a_draining_server_gets_no_new_sessions_and_keeps_its_own(
    site: dict[str, Any], tmp_path: Path
) -> None:
    """docs/protocol.md, "Health probe": the gateway's check sees the drain, new sessions go
    to the other server, and the draining server's session resumes there across a cut."""

    async def main() -> None:
        async with (
            two_servers(site) as (b1, b2, _, s2, gw),
            TetherClient(client_config(gw, tmp_path)) as client,
        ):
            assert gw.snapshot() == {1: (True, 0), 2: (True, 0)}
            apps = await open_apps(client, 2)  # one on each: the fewest links
            assert len(b1.connections) == 1 and len(b2.connections) == 1
            assert s2.drain()
            await until(lambda: not gw.snapshot()[2][0], 10, "server 2 seen draining")
            # Its session's client was told (DRAINING, through the gateway), the other not.
            told = [relay.core.draining for relay in client.relays()]
            assert sorted(told) == [False, True]
            for n in range(3, 6):
                apps.append(await connect_app(app_address(client), 1, 0, eof=False))
                await until(lambda n=n: len(client.sessions()) == n
                            and all(s.state == "attached" for s in client.sessions()),
                            20, "sessions established")  # fmt: skip
            assert len(b1.connections) == 4 and len(b2.connections) == 1
            for link in list(gw._links):  # a cut: every session resumes, s2's on s2
                link.abort()
            await until(lambda: all(s.resumes >= 1 for s in client.sessions()),
                        20, "every session resumed")  # fmt: skip
            more(apps, SIZE)
            await finished(apps, [b1, b2], 60)
            assert s2.session_count() == 1 and s2.draining

    run(main())


def test_a_resume_whose_server_is_out_of_reach_is_told_so(
    site: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Server 2 stops answering (its listener closed, as a crashed host's would refuse):
    the gateway tells its session's resumes REJECT(SERVER_UNREACHABLE), transient, so the
    client keeps trying and its end reason says why; server 1's session resumes."""

    async def main() -> None:
        async with two_servers(site) as (_, _, s1, s2, gw):
            config = replace(client_config(gw, tmp_path), session=replace(FAST, timeout=3.0))
            async with TetherClient(config) as client:
                await open_apps(client, 2)  # one on each
                s2.stop_listening()
                for link in list(gw._links):
                    link.abort()
                await until(lambda: len(client.sessions()) == 1, 30, "server 2's session to end")
                await until(
                    lambda: client.sessions()[0].resumes >= 1, 20, "server 1's session to resume"
                )
                assert s1.session_count() == 1
            # One backoff per outage: a few attempts a second (cap 0.5 s, up to 4 in
            # flight), not a tight loop of TLS handshakes against the gateway.
            assert gw.forwarded_total + gw.refused_total < 60, gw.refused_total

    with caplog.at_level("INFO", logger="tether"):
        run(main())
    ended = [r.getMessage() for r in caplog.records if "ended EXPIRED" in r.getMessage()]
    assert len(ended) == 1, ended
    assert "SERVER_UNREACHABLE (its server is out of reach)" in ended[0]


def test_a_forged_resume_is_refused_without_reaching_a_server(
    site: dict[str, Any], tmp_path: Path
) -> None:
    async def main() -> None:
        async with (
            Backend(1, SIZE) as b1,
            server(site, 1, b1) as s1,
            TetherGateway(gateway_config(site, [s1])) as gw,
        ):
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            for forged in (bytes(16), b"\x00\x01" + os.urandom(14)):
                address = gw.addresses[0]
                reader, writer = await asyncio.open_connection(
                    address.host, address.port, ssl=context
                )
                writer.write(client_hello(3, 3) + Route(forged).serialize())
                hello = await asyncio.wait_for(reader.readexactly(41), 10)
                assert hello[8] == 3
                header = await asyncio.wait_for(reader.readexactly(4), 10)
                size = int.from_bytes(header[1:], "big")
                payload = await asyncio.wait_for(reader.readexactly(size), 10)
                frame = parse_control(header[0], payload)
                assert isinstance(frame, Reject) and frame.code is CloseCode.UNKNOWN_SESSION
                writer.close()
            assert s1.counters.rejected_total == 0 and s1.counters.handshakes_failed == 0
            assert gw.refused_total == 2

    run(main())


def test_health_needs_a_tether_hello(site: dict[str, Any]) -> None:
    async def main() -> None:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"SSH-2.0-OpenSSH_9.2\r\n")
            await writer.drain()
            writer.close()

        listener = await asyncio.start_server(silent, "127.0.0.1", 0)
        async with listener:
            port = listener.sockets[0].getsockname()[1]
            config = GatewayConfig(
                listen=Address("127.0.0.1", 0),
                servers=(RoutedServer(1, Address("127.0.0.1", port)),),
                routing_key_file=site["key"],
                state_dir=site["gw"],
                server_plaintext=True,
            )
            async with TetherGateway(config) as gw:
                assert gw.snapshot() == {1: (False, 0)}

    run(main())


def test_the_commands_route_and_resume(site: dict[str, Any], tmp_path: Path) -> None:
    """``tether server --server-id``, ``tether gateway`` (servers in clear text behind it,
    clients in TLS) and ``tether client`` as processes; every link cut at a relay in front
    of the gateway; every byte arrives once, each session on one backend connection."""
    from .faultnet import FaultRelay, start_tether, stop

    async def main() -> None:
        tmp = str(tmp_path)
        async with Backend(1, SIZE, eof=False) as b1, Backend(1, SIZE, eof=False) as b2:
            procs = []
            relay: FaultRelay | None = None
            try:
                for number, backend in ((1, b1), (2, b2)):
                    procs.append(await start_tether(
                        "server", "--listen", "127.0.0.1:0", "--plaintext",
                        "--backend", "{}:{}".format(*backend.address), "--keepalive", "0.3",
                        "--server-id", str(number), "--routing-key-file", str(site["key"]),
                        tmp=tmp))  # fmt: skip
                servers = [f"--server={n}={p.address[0]}:{p.address[1]}"
                           for n, p in ((1, procs[0]), (2, procs[1]))]  # fmt: skip
                gateway = await start_tether(
                    "gateway", "--listen", "127.0.0.1:0", *servers, "--server-plaintext",
                    "--routing-key-file", str(site["key"]), "--state-dir", str(site["gw"]),
                    "--health-interval", "200ms", tmp=tmp)  # fmt: skip
                procs.append(gateway)
                pin = tls.load_or_create_identity(site["gw"])[0].fingerprint
                relay = FaultRelay(gateway.address)
                await relay.start()
                client = await start_tether(
                    "client", "--listen", "127.0.0.1:0", "--server",
                    f"127.0.0.1:{relay.port}", "--server-fingerprint", pin,
                    "--keepalive", "0.3", "--require-reliability", tmp=tmp)  # fmt: skip
                procs.append(client)
                apps = []
                for count in range(1, 5):
                    apps.append(await connect_app(client.address, 1, 0, eof=False))
                    await until(lambda c=count: len(b1.connections) + len(b2.connections) == c,
                                20, "a backend connection")  # fmt: skip
                assert len(b1.connections) == 2 and len(b2.connections) == 2
                more(apps, SIZE // 2)
                backs = [*b1.connections, *b2.connections]
                await until(lambda: all(b.received > 0 for b in backs), 20, "bytes flowing")
                relay.kill_all()
                more(apps, SIZE // 2)
                await finished(apps, [b1, b2], 60)
                assert len(b1.connections) == 2 and len(b2.connections) == 2
                assert "resumed" in client.log()
            except BaseException:
                for proc in procs:
                    print(f"--- {proc.popen.args[3]} log ---\n{proc.log()}")
                raise
            finally:
                if relay is not None:
                    await relay.close()
                close_all()
                codes = [stop(proc) for proc in reversed(procs)]
                assert codes == [0] * len(procs), codes

    run(main())


def test_gateway_options_reach_their_fields(site: dict[str, Any]) -> None:
    from tether.cli import build_config, parse_args

    config = build_config(
        parse_args(["gateway", "--listen", "8443", "--server", "10.0.0.11",
                    "--server", "7=[fd00::2]:2600", "--routing-key-file", str(site["key"]),
                    "--server-plaintext", "--health-interval", "500ms"])
    )  # fmt: skip
    assert config == GatewayConfig(
        listen=Address("0.0.0.0", 8443),
        servers=(
            RoutedServer(1, Address("10.0.0.11", 2598)),
            RoutedServer(7, Address("fd00::2", 2600)),
        ),
        routing_key_file=site["key"],
        server_plaintext=True,
        health_interval=0.5,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["gateway", "--server", "0=h:1"], "--server 0=h:1: server id must be within 1-65535"),
        (["gateway", "--server", "a=h:1"], "--server a=h:1: give [ID=]HOST:PORT"),
        (["gateway", "--server", "1=h:1", "--server", "1=g:1"], "two servers have the same id"),
        (["gateway", "--server", "h:1", "--server-plaintext"], "needs the servers' --routing-key"),
        (["gateway", "--server", "h:1", "--routing-key-file", "KEY"], "--server-ca, --server-fin"),
        (["gateway", "--routing-key-file", "KEY", "--server-plaintext"], "at least one --server"),
        (["server", "--server-id", "3"], "server_id and routing_key_file go together"),
        (["server", "--server-id", "70000", "--routing-key-file", "KEY"], "--server-id 70000: "),
        (["server", "--server-id", "2", "--routing-key-file", "BAD"], "routing key file"),
    ],
)  # fmt: skip
def test_gateway_and_routing_options_are_checked_at_start(
    site: dict[str, Any], argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from tether.cli import main

    bad = site["key"].with_name("bad.key")
    bad.write_text("not base64!\n")
    bad.chmod(0o600)
    argv = [{"KEY": str(site["key"]), "BAD": str(bad)}.get(arg, arg) for arg in argv]
    argv += ["--listen", "127.0.0.1:0"]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_clear_text_client_of_a_tls_gateway_is_told_tls_required(
    site: dict[str, Any],
) -> None:
    """The gateway accepts as a server does (aio/listener.py): the first byte decides."""

    async def main() -> None:
        async with (
            Backend(1, SIZE) as b1,
            server(site, 1, b1) as s1,
            TetherGateway(gateway_config(site, [s1])) as gw,
        ):
            address = gw.addresses[0]
            reader, writer = await asyncio.open_connection(address.host, address.port)
            writer.write(client_hello())
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            frame = parse_control(answer[41], answer[45:])
            assert isinstance(frame, Reject) and frame.code is CloseCode.TLS_REQUIRED

    run(main())


def test_the_shipped_haproxy_config_is_what_print_haproxy_config_makes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """deploy/haproxy/haproxy.cfg is the output of the command in its header."""
    from tether.cli import main

    shipped = Path(__file__).resolve().parents[2] / "deploy" / "haproxy" / "haproxy.cfg"
    argv = ["gateway", "--server", "1=10.0.0.11:2598", "--server", "2=10.0.0.12:2598",
            "--server-ca", "/etc/tether/servers-ca.pem", "--print-haproxy-config"]  # fmt: skip
    assert " ".join(argv[1:]) in " ".join(shipped.read_text().replace("#", "").split())
    assert main(argv) == 0
    assert capsys.readouterr().out == shipped.read_text()
