"""A reload swaps the TLS identity for new links and takes up a clients file; a reload that
cannot read its certificate changes nothing. A real server, real TLS, in process."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
from pathlib import Path

import pytest

from tether import credentials, tls
from tether.aio.server import TetherServer
from tether.cli import _OPTIONS
from tether.config import Address, ServerConfig
from tether.reload import Reloader, Settings

LIMIT = 20.0


async def _fingerprint(address: Address) -> str:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(address.host, address.port, ssl=context), LIMIT
    )
    ssl_object = writer.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True)
    writer.transport.abort()
    return tls.fingerprint(der)


def test_reload_swaps_the_certificate_for_new_links(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first, _ = tls.load_or_create_identity(tmp_path / "first")
    second, _ = tls.load_or_create_identity(tmp_path / "second")
    clients = tmp_path / "clients"
    credentials.append_client(clients, credentials.token_hash(credentials.new_token()), "ana")
    base = ServerConfig(
        listen=Address("127.0.0.1", 0), tls_cert=first.cert_path, tls_key=first.key_path
    )
    file = tmp_path / "server.toml"  # named in the log; the rereads below stand for it
    wanted: list[Settings] = []

    async def main() -> None:
        async with TetherServer(base) as server:
            reloader = Reloader(
                server, Settings(base, file=file), lambda: wanted[-1], _OPTIONS["server"],
                lambda level, fmt: None,
            )  # fmt: skip
            address = server.addresses[0]
            assert await _fingerprint(address) == first.fingerprint
            new = dataclasses.replace(
                base, tls_cert=second.cert_path, tls_key=second.key_path, clients=clients
            )
            wanted.append(Settings(new, file=file))
            assert reloader.reload()
            assert await _fingerprint(address) == second.fingerprint
            assert server.fingerprint == second.fingerprint
            assert server._router.authorize is not None  # the clients file is in force
            broken = dataclasses.replace(new, tls_cert=tmp_path / "gone.pem")
            wanted.append(Settings(broken, file=file))
            assert not reloader.reload()
            assert await _fingerprint(address) == second.fingerprint
            assert server.config == new

    with caplog.at_level(logging.INFO, logger="tether"):
        asyncio.run(asyncio.wait_for(main(), LIMIT * 3))
    messages = [r.getMessage() for r in caplog.records if r.name == "tether.reload"]
    assert any(
        m.startswith(f"TLS certificate for new links: {second.fingerprint} (was ") for m in messages
    )
    assert any(f"clients none -> {clients}" in m for m in messages)
    failed = [r for r in caplog.records if r.getMessage().startswith(f"reload of {file} failed")]
    assert len(failed) == 1 and failed[0].levelname == "ERROR"
