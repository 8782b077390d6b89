"""Settings every test shares."""

from __future__ import annotations

import importlib.machinery
import logging
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

import tether


def pytest_configure(config: pytest.Config) -> None:
    """A module compiled with mypyc (scripts/setup.sh) shadows its source: if the source is
    newer, the tests would run the old compiled code without a word. Refuse to start."""
    package = Path(tether.__file__).parent
    stale = []
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for compiled in package.rglob(f"*{suffix}"):
            source = compiled.with_name(compiled.name[: -len(suffix)] + ".py")
            if source.exists() and source.stat().st_mtime > compiled.stat().st_mtime:
                stale.append(str(source.relative_to(package.parent)))
    if stale:
        raise pytest.UsageError(
            f"compiled modules older than their source: {', '.join(sorted(stale))}; "
            "run ./scripts/setup.sh (or ./scripts/test.sh) to rebuild them, or delete the "
            "*.so files under src/ to test the plain Python"
        )


@pytest.fixture(autouse=True)
def tether_state_dirs(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TLS is on by default: every tether the tests start, in process or as a child, keeps
    its identity (server) and its known servers (client) in a temporary directory, never
    in the user's own. One per test: a server made with a fresh key on an ephemeral port
    that an earlier test's server had used would otherwise meet that server's recorded
    fingerprint and be refused as an interceptor (trust on first use doing its job). Tests
    that bring other certificates pass their own paths."""
    base = tmp_path_factory.mktemp("xdg")
    monkeypatch.setenv("XDG_STATE_HOME", str(base / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(base / "config"))


LOG_TAIL = 8192  # bytes of each tether log a failed test's report shows


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test that started tether processes (their logs, ``*.log``, are in its
    ``tmp_path``) shows the end of each log in its report: CI keeps no temporary files."""
    report = yield
    tmp = getattr(item, "funcargs", {}).get("tmp_path")
    if report.failed and isinstance(tmp, Path):
        for log in sorted(tmp.rglob("*.log")):
            with log.open("rb") as f:
                size = f.seek(0, 2)
                f.seek(max(0, size - LOG_TAIL))
                tail = f.read().decode(errors="replace")
            report.sections.append((f"log {log.relative_to(tmp)} (last {LOG_TAIL} bytes)", tail))
    return report


@pytest.fixture(autouse=True)
def tether_logger_restored() -> Iterator[None]:
    """A test that runs ``tether.cli.main`` in this process installs a handler on the
    ``tether`` logger that writes to its captured stderr and stops propagation
    (logs.setup_logging): put the logger back, so later tests' caplog sees records and no
    handler writes to a closed stream."""
    logger = logging.getLogger("tether")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    for handler in [h for h in logger.handlers if h not in handlers]:
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(level)
    logger.propagate = propagate
