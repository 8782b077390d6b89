"""SIGHUP and the admin endpoint: its address, token and TLS settings are read once at
start, so a reload that changes them keeps them and says they need a restart. In process."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

import pytest

from tether import tls
from tether.aio.server import TetherServer
from tether.cli import _OPTIONS
from tether.config import Address, ServerConfig
from tether.reload import Reloader, Settings


def test_a_reload_keeps_the_admin_address_for_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = ServerConfig(
        listen=Address("127.0.0.1", 0), plaintext=True, admin=Address("127.0.0.1", 0)
    )
    file = tmp_path / "server.toml"  # named in the log; the reread below stands for it
    new = dataclasses.replace(base, admin=Address("127.0.0.2", 2599), max_sessions=7)

    async def main() -> None:
        async with TetherServer(base) as server:
            reloader = Reloader(
                server, Settings(base, file=file), lambda: Settings(new, file=file),
                _OPTIONS["server"], lambda level, fmt: None,
            )  # fmt: skip
            assert reloader.reload()
            assert server.config.admin == base.admin  # kept
            assert server.config.max_sessions == 7  # the rest applies

    with caplog.at_level(logging.INFO, logger="tether"):
        asyncio.run(asyncio.wait_for(main(), 20))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"reload: admin changed in {file} but take effect only after a restart" in warnings


def test_a_reload_keeps_the_admin_tls_settings_for_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    identity, _ = tls.load_or_create_identity(tmp_path / "admin-identity")
    base = ServerConfig(
        listen=Address("127.0.0.1", 0), plaintext=True, admin=Address("127.0.0.1", 0)
    )
    file = tmp_path / "server.toml"
    new = dataclasses.replace(
        base, admin_tls_cert=identity.cert_path, admin_tls_key=identity.key_path
    )
    plain = dataclasses.replace(base, admin_plaintext=True)

    async def main() -> None:
        async with TetherServer(base) as server:
            for wanted in (new, plain):
                reloader = Reloader(
                    server, Settings(base, file=file), lambda w=wanted: Settings(w, file=file),
                    _OPTIONS["server"], lambda level, fmt: None,
                )  # fmt: skip
                assert reloader.reload()
                assert server.config.admin_tls_cert is None  # kept
                assert not server.config.admin_plaintext

    with caplog.at_level(logging.INFO, logger="tether"):
        asyncio.run(asyncio.wait_for(main(), 20))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert (
        f"reload: admin-tls-cert, admin-tls-key changed in {file} but take effect only after "
        "a restart" in warnings
    )
    assert f"reload: admin-plaintext changed in {file} but take effect only after a restart" in (
        warnings
    )
