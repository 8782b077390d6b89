"""Outage hooks: a real client runs a real script on detach, resume and end; hooks are
bounded in time and in number, and never run through a shell."""

from __future__ import annotations

import asyncio
import logging
import shlex
import sys
from pathlib import Path

import pytest

from tests.aio.faultnet import FaultRelay, logged, start_tether, stop
from tether.config import HookConfig
from tether.hooks import HookRunner

from .test_reload import LIMIT, App, echo

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the hook is a shell script")

SCRIPT = """#!/bin/sh
# $1: the file to append to; $2: an argument that must arrive unexpanded
printf '%s|%s|%s|%s|%s|%s|%s|%s|%s\\n' "$TETHER_EVENT" "$TETHER_SESSION" "$TETHER_SERVER" \\
    "$TETHER_REASON" "$TETHER_OUTAGE_SECONDS" "$TETHER_EXPIRES_SECONDS" \\
    "$TETHER_REPLAYED_BYTES" "$TETHER_CLOSE_CODE" "$2" >> "$1"
"""


def _script(tmp_path: Path) -> Path:
    where = tmp_path / "hook dir"  # a space: the command line is split as a shell would
    where.mkdir()
    script = where / "hook.sh"
    script.write_text(SCRIPT)
    script.chmod(0o755)
    return script


async def _lines(path: Path, count: int) -> list[list[str]]:
    for _ in range(int(LIMIT / 0.05)):
        if path.exists():
            lines = path.read_text().splitlines()
            if len(lines) >= count:
                return [line.split("|") for line in lines]
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path}: fewer than {count} lines within {LIMIT}s")


def test_a_client_runs_its_hooks_on_detach_resume_and_end(tmp_path: Path) -> None:
    script, out = _script(tmp_path), tmp_path / "events"
    hook = f"{shlex.quote(str(script))} {shlex.quote(str(out))} '$HOME'"

    async def main() -> None:
        async with echo(b"") as backend:
            server = await start_tether(
                "server", "--listen", "127.0.0.1:0", "--plaintext",
                "--backend", f"127.0.0.1:{backend[1]}", tmp=str(tmp_path),
            )  # fmt: skip
            relay = FaultRelay(server.address)
            await relay.start()
            client = None
            try:
                client = await start_tether(
                    "client", "--listen", "127.0.0.1:0", "--plaintext",
                    "--server", f"127.0.0.1:{relay.port}", "--timeout", "2m",
                    "--on-detach", hook, "--on-resume", hook, "--on-end", hook,
                    tmp=str(tmp_path),
                )  # fmt: skip
                app = await App.open(client)
                assert await app.ask(b"hello", b"") == b"hello"
                relay.kill_all()
                detach = (await _lines(out, 1))[0]
                await logged(client, "resumed after")
                assert await app.ask(b"again", b"") == b"again"
                resume = (await _lines(out, 2))[1]
                app.writer.write_eof()  # the echo backend closes: the session ends NORMAL
                await asyncio.wait_for(app.reader.read(), LIMIT)
                end = (await _lines(out, 3))[2]
                app.close()
            finally:
                await relay.close()
                codes = [stop(p) for p in (client, server) if p is not None]
            assert codes == [0, 0]
            server_address = f"127.0.0.1:{relay.port}"
            event, session, server_name, reason, outage, expires, _, _, literal = detach
            assert (event, server_name, literal) == ("detach", server_address, "$HOME")
            assert session.startswith("#1/") and reason
            assert outage == "0.0" and 0 < float(expires) <= 120
            event, session2, _, reason, outage, _, replayed, _, _ = resume
            assert (event, session2, reason) == ("resume", session, "resumed")
            assert float(outage) >= 0 and int(replayed) >= 0
            event, session3, _, reason, _, _, _, code, _ = end
            assert (event, session3, code) == ("end", session, "NORMAL")
            assert reason

    asyncio.run(main())


def test_hooks_are_killed_after_their_timeout_and_bounded_in_number(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "ran"
    slow = f"{shlex.quote(sys.executable)} -c 'import time; time.sleep(60)'"
    writer = tmp_path / "write.py"
    writer.write_text("import sys\nwith open(sys.argv[1], 'a') as f:\n    f.write('ran\\n')\n")
    quick = shlex.join([sys.executable, str(writer), str(out)])

    async def main() -> HookRunner:
        async with asyncio.TaskGroup() as group:
            runner = HookRunner(
                HookConfig(on_detach=slow, on_end=quick, timeout=0.5, max_running=1),
                group.create_task,
            )
            assert runner.fire("detach", "#1/abc", {"reason": "test"})
            assert not runner.fire("detach", "#2/def", {"reason": "test"})  # one at a time
            assert not runner.fire("resume", "#1/abc", {})  # none configured
        # The group waited for the slow hook: killed at its timeout, not after 60 s.
        assert runner.running == 0
        async with asyncio.TaskGroup() as group:
            runner.config = HookConfig(on_end=quick)
            runner._spawn = group.create_task
            assert runner.fire("end", "#1/abc", {})
        return runner

    with caplog.at_level(logging.INFO, logger="tether"):
        runner = asyncio.run(asyncio.wait_for(main(), LIMIT))
    assert runner.dropped == 1
    messages = [r.getMessage() for r in caplog.records if r.name == "tether.hooks"]
    assert "session #2/def: detach hook not run: 1 hooks already running (--max-hooks)" in messages
    assert any(
        m.startswith("session #1/abc: detach hook ") and "killed after 0.5s" in m for m in messages
    )
    assert out.read_text() == "ran\n"


def test_a_hook_that_cannot_start_is_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with asyncio.TaskGroup() as group:
            runner = HookRunner(HookConfig(on_end="/nonexistent/hook --x"), group.create_task)
            assert runner.fire("end", "#3/abc", {})

    with caplog.at_level(logging.INFO, logger="tether"):
        asyncio.run(asyncio.wait_for(main(), LIMIT))
    messages = [r.getMessage() for r in caplog.records if r.name == "tether.hooks"]
    assert messages == [
        "session #3/abc: end hook /nonexistent/hook could not start: No such file or directory"
    ]


@pytest.mark.parametrize("desktop", [True, False])
def test_the_example_notify_hook_notifies_and_logs(tmp_path: Path, desktop: bool) -> None:
    """deploy/examples/notify-hook.sh, with stand-ins for notify-send, wall and logger."""
    import os
    import subprocess

    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("notify-send", "wall", "logger"):
        stand_in = bin_dir / tool
        stand_in.write_text(f'#!/bin/sh\necho "{tool} $*" >> {shlex.quote(str(calls))}\n')
        stand_in.chmod(0o755)
    script = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "notify-hook.sh"
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "TETHER_EVENT": "detach",
        "TETHER_SESSION": "#1/2dd9c6618d39",
        "TETHER_SERVER": "tether.example.net:2598",
        "TETHER_REASON": "keepalive timed out",
        "TETHER_EXPIRES_SECONDS": "180.0",
        **({"DISPLAY": ":0"} if desktop else {}),
    }
    done = subprocess.run([str(script)], env=env, timeout=LIMIT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = calls.read_text().splitlines()
    assert lines[0].startswith("logger -t tether-hook -- session #1/2dd9c6618d39: Connection")
    tool = "notify-send" if desktop else "wall"
    assert len(lines) == 2 and lines[1].startswith(tool)
    if desktop:
        assert "--urgency=critical Connection interrupted Reconnecting to tether.exa" in lines[1]
    os.remove(calls)
    quiet = {**env, "TETHER_EVENT": "end", "TETHER_CLOSE_CODE": "NORMAL"}
    assert subprocess.run([str(script)], env=quiet, timeout=LIMIT).returncode == 0
    assert not calls.exists()  # a normal end is not worth a notice
