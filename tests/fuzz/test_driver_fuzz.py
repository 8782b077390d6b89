"""Driver-level fuzzing in CI (issue 9; docs/fuzzing.md): a short run of the campaign in
fuzz/driver.py against real ``tether server`` and ``tether client`` processes, with the
same checks as the full run, and the reproducers of what the campaign found.

The full campaign (a million inputs) is ``python -m fuzz.driver --inputs 1000000``; this
runs 20,000 inputs or 30 s of fuzzing, whichever comes first, with a fixed seed (set
TETHER_FUZZ_SEED to try another).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tether import tls
from tether.aio.client import TetherClient
from tether.config import Address, ClientConfig

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("TETHER_FUZZ_SEED", "20261128"))


def test_a_short_driver_campaign_finds_nothing(tmp_path: Path) -> None:
    """Both targets, plain and TLS: no traceback, no ERROR, no hang, no death; fds back to
    the baseline and RSS bounded afterwards (the runner asserts them: exit status 1)."""
    figures = tmp_path / "figures.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "src"), str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    # fmt: off
    command = [
        sys.executable, "-m", "fuzz.driver", "--inputs", "20000", "--seconds", "30",
        "--target", "both", "--seed", str(SEED), "--json", str(figures),
    ]
    # fmt: on
    run = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    report = run.stdout + run.stderr[-20000:]
    assert run.returncode == 0, report
    result = json.loads(figures.read_text())
    assert result["ok"], report
    phases = {phase["phase"]: phase for phase in result["phases"]}
    assert set(phases) == {"server-plain", "server-tls", "client-plain", "client-tls"}
    for phase in phases.values():
        assert phase["inputs"] > 100, report  # each target really got inputs
        assert phase["exit_status"] == 0, report
    assert phases["server-plain"]["probes"] > 0, report


# -- reproducers of findings ----------------------------------------------------------------


def test_an_application_that_leaves_while_its_link_connects_costs_no_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """F1: the application resets its connection while the client's link to the server
    is still in its TLS handshake. The session has ended when the TLS handshake completes;
    the client must then drop that link, not start a handshake for the ended session
    (which raised InvalidState: "internal error" and a traceback in the log, and left the
    link open)."""

    async def main() -> None:
        identity, _ = tls.load_or_create_identity(tmp_path / "server")
        context = tls.server_context(identity)
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        port = listener.getsockname()[1]
        config = ClientConfig(
            listen=Address("127.0.0.1", 0),
            server=Address("127.0.0.1", port),
            known_servers=tmp_path / "known_servers",
            require_reliability=True,
        )
        loop = asyncio.get_running_loop()
        async with TetherClient(config) as client:
            app = socket.create_connection((client.addresses[0].host, client.addresses[0].port))
            # The client's link: TCP is up, its TLS ClientHello waits for an answer.
            link, _ = await asyncio.wait_for(loop.sock_accept(listener), 10)
            app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            app.close()  # the application resets: its session ends
            for _ in range(250):
                if client.counters.ended_total:
                    break
                await asyncio.sleep(0.02)
            assert client.counters.ended_total == 1
            closed = loop.create_future()

            class Server(asyncio.Protocol):
                def connection_lost(self, exc: Exception | None) -> None:
                    if not closed.done():
                        closed.set_result(None)

            # Now the TLS handshake completes, for a session that has ended.
            transport: asyncio.BaseTransport | None = None
            with contextlib.suppress(OSError):
                transport, _ = await asyncio.wait_for(
                    loop.connect_accepted_socket(Server, link, ssl=context), 10
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(closed), 5)
            dropped.append(closed.done())  # the client dropped the link
            if transport is not None:
                transport.abort()
            link.close()
        listener.close()

    dropped: list[bool] = []
    with caplog.at_level(logging.INFO, logger="tether"):
        asyncio.run(main())
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert dropped == [True], "the link of the ended session was left open"
