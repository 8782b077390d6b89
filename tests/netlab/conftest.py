"""Fixtures for the network-namespace lab, and the reliability report.

``lab``        a fresh two-host lab for one test, torn down after it (skips when not root or
               when ``ip netns`` does not work here)
``tether``     the argv that runs the tether CLI (skips while the CLI is not usable)
``sock_destroy`` skips when ``ss -K`` cannot destroy sockets in this kernel
``record``     a dict a test fills with ``case``, ``bytes``, ``resume`` and ``note``; when the
               environment variable ``TETHER_NETLAB_REPORT`` names a file, the session writes
               every recorded case there as a Markdown table (docs/reliability.md is made so)
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from . import netns
from .chain import REPO, tether_command

REPORT_ENV = "TETHER_NETLAB_REPORT"
_records: list[dict[str, Any]] = []
_session_started = time.monotonic()


def _commit() -> str:
    """The checked-out commit, and whether src/ differs from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "?"
    return f"{commit} with uncommitted changes in src/" if dirty else commit


_commit_at_start = _commit()


@pytest.fixture(scope="session")
def netlab_host() -> Iterator[None]:
    reason = netns.netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    netns.sweep_stale()
    # A SIGTERM to pytest (CI cancelling the job) unwinds like Ctrl-C, so every lab's finally
    # runs; atexit covers what is left.
    previous = signal.getsignal(signal.SIGTERM)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if previous in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        if previous in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.fixture
def lab(netlab_host: None, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[netns.Lab]:
    with netns.lab(request.node.name[:40], log_dir=tmp_path / "lab") as instance:
        yield instance


@pytest.fixture(scope="session")
def tether(netlab_host: None) -> list[str]:
    argv = tether_command()
    if argv is None:
        pytest.skip("the tether CLI is not usable yet (`tether server --help` fails)")
    return argv


@pytest.fixture(scope="session")
def sock_destroy(netlab_host: None, tmp_path_factory: pytest.TempPathFactory) -> None:
    with netns.lab("sockdestroy", tmp_path_factory.mktemp("sockdestroy")) as probe:
        if not netns.sock_destroy_works(probe):
            pytest.skip("`ss -K` cannot destroy sockets (kernel without CONFIG_INET_DIAG_DESTROY)")


@pytest.fixture
def record(request: pytest.FixtureRequest) -> dict[str, Any]:
    entry: dict[str, Any] = {"nodeid": request.node.nodeid, "case": request.node.name}
    request.node.netlab_record = entry
    return entry


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    entry = getattr(item, "netlab_record", None)
    if entry is None:
        return report
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        if hasattr(report, "wasxfail"):
            entry["result"] = "xfail" if report.skipped else "XPASS"
            entry["reason"] = report.wasxfail
        elif report.skipped:
            entry["result"] = "skipped"
        else:
            entry["result"] = "pass" if report.passed else "FAIL"
        entry["duration"] = round(report.duration, 1)
        if report.failed and not hasattr(report, "wasxfail"):
            text = str(report.longrepr).strip().splitlines()
            entry["reason"] = next((ln for ln in text if ln.startswith("E ")), text[-1])[2:].strip()
        if entry not in _records:
            _records.append(entry)
    return report


def _fmt_bytes(n: Any) -> str:
    if not isinstance(n, int | float):
        return "-"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{int(n)} B"


def _fmt_resume(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.2f} s"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    target = os.environ.get(REPORT_ENV)
    if not target or not _records:
        return
    commit = _commit()
    if commit != _commit_at_start:
        commit = f"{_commit_at_start} at the start, {commit} at the end (src changed meanwhile)"
    lines = [
        "# Reliability matrix",
        "",
        "Generated by `tests/netlab` (see [testing.md](testing.md)); do not edit by hand. Each "
        "case runs the real `tether server` and `tether client` in two network namespaces joined "
        "by a veth pair and streams seeded random data both ways through them at once, checking "
        "SHA-256 at both ends. The links run with tether's defaults, so **TLS 1.3 is on** (the "
        "client trusts the server on first use, in a temporary directory). Rows marked *(socat)* "
        "come from the harness's own tests: the same traffic through two plain socat relays, for "
        "comparison with what plain TCP does.",
        "",
        f"Run: commit `{commit}`, kernel {platform.release()}, Python {platform.python_version()},"
        f" {len(_records)} cases in {time.monotonic() - _session_started:.0f} s.",
        "",
        "Regenerate: `sudo TETHER_NETLAB_REPORT=docs/reliability.md .venv/bin/python -m pytest "
        "tests/netlab --ignore=tests/netlab/test_gateway_lab.py` (the gateway lab's cases, on "
        "six hosts behind a bridge, are docs/deployment.md's)",
        "",
        "*Bytes* is what crossed the relay, both directions together. *Resume time* is from the "
        "instant the path was restored to the first byte delivered after it, taken in the later "
        "of the two directions (application side for down, backend side for up).",
        "",
        "| Case | Result | Bytes | Resume time | Notes | Reproduce |",
        "|---|---|---|---|---|---|",
    ]
    for entry in _records:
        note = entry.get("note", "")
        reason = entry.get("reason", "")
        if entry.get("result") in ("FAIL", "xfail", "XPASS") and reason:
            note = reason if note in reason else f"{note}; {reason}"
        note = note.replace("|", "\\|").replace("\n", " ")
        env = f"{entry['env']} " if entry.get("env") else ""
        command = f"`sudo {env}.venv/bin/python -m pytest '{entry['nodeid']}'`"
        lines.append(
            f"| {entry.get('title', entry['case'])} | {entry.get('result', '?')} "
            f"| {_fmt_bytes(entry.get('bytes'))} | {_fmt_resume(entry.get('resume'))} "
            f"| {note} | {command} |"
        )
    lines.append("")
    Path(target).write_text("\n".join(lines))
