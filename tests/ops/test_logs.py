"""Logging setup (text and JSON Lines) and the flood summariser, on a fake clock."""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from tether import cli
from tether.logs import RateLimitedLog, loop_exception_handler, setup_logging


@pytest.fixture
def tether_logger() -> Iterator[logging.Logger]:
    """The 'tether' logger, restored afterwards (setup_logging stops its propagation)."""
    logger = logging.getLogger("tether")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield logger
    for handler in logger.handlers[:]:
        if handler not in saved[0]:
            logger.removeHandler(handler)
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def test_text_is_todays_format(tether_logger: logging.Logger) -> None:
    out = io.StringIO()
    setup_logging(logging.INFO, "text", out)
    logging.getLogger("tether.server").info("listening on %s", "0.0.0.0:2598")
    logging.getLogger("tether.server").debug("not shown")
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO tether.server: listening on 0.0.0.0:2598\n",
        out.getvalue(),
    )


def test_json_lines_carry_structured_fields_and_tracebacks(tether_logger: logging.Logger) -> None:
    out = io.StringIO()
    setup_logging(logging.DEBUG, "json", out)
    log = logging.getLogger("tether.server")
    log.info(
        "session %s: link lost",
        "ab12",
        extra={
            "tether": {
                "session": b"\xab\x12",
                "peer": "198.18.0.7:5000",
                "event": "lost",
                "code": 4001,
                "message": "clash",
            }
        },
    )
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("handler failed")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["level"] == "INFO"
    assert first["logger"] == "tether.server"
    assert first["message"] == "session ab12: link lost"
    assert first["session"] == "ab12"  # bytes as hex
    assert (first["peer"], first["event"], first["code"]) == ("198.18.0.7:5000", "lost", 4001)
    assert first["field_message"] == "clash"  # a reserved name does not overwrite
    when = datetime.datetime.fromisoformat(first["time"].replace("Z", "+00:00"))
    assert first["time"].endswith("Z") and when.utcoffset() == datetime.timedelta(0)
    assert abs((datetime.datetime.now(datetime.UTC) - when).total_seconds()) < 60
    assert second["level"] == "ERROR"
    assert second["traceback"].startswith("Traceback (most recent call last):")
    assert second["traceback"].endswith("RuntimeError: boom")


def test_setup_again_replaces_its_handler(tether_logger: logging.Logger) -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging(logging.INFO, "text", first)
    setup_logging(logging.WARNING, "json", second)
    log = logging.getLogger("tether.client")
    log.info("quiet now")
    log.warning("loud")
    assert first.getvalue() == ""
    assert [json.loads(line)["message"] for line in second.getvalue().splitlines()] == ["loud"]
    with pytest.raises(ValueError, match="log format"):
        setup_logging(logging.INFO, "xml", second)  # type: ignore[arg-type]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def limited(caplog: pytest.LogCaptureFixture) -> tuple[RateLimitedLog, Clock]:
    caplog.set_level(logging.INFO, logger="tether.test")
    clock = Clock()
    return RateLimitedLog(logging.getLogger("tether.test"), window=10, clock=clock), clock


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    out = [r.getMessage() for r in caplog.records]
    caplog.clear()
    return out


KEY = "link from 198.18.0.7 refused"


def test_first_at_once_then_one_summary_per_window(
    limited: tuple[RateLimitedLog, Clock], caplog: pytest.LogCaptureFixture
) -> None:
    log, clock = limited
    assert log.hit(KEY, "handshake timed out") is True
    assert messages(caplog) == [f"{KEY}: handshake timed out"]
    for _ in range(522):
        clock.now += 0.01
        assert log.hit(KEY, "handshake timed out") is False
    assert messages(caplog) == []  # counted, not logged
    assert log.next_timer() == 1010.0
    clock.now = 1010.0
    log.handle_timer()
    assert messages(caplog) == [f"{KEY} 523 times in the last 10 s: handshake timed out"]
    log.handle_timer()
    assert messages(caplog) == []  # at most one summary per window

    # still flooding: the next window is summarised too, the next hit is not logged at once
    clock.now = 1012.5
    assert log.hit(KEY, "bad magic") is False
    clock.now = 1020.0
    assert log.hit(KEY, "bad magic") is False
    assert messages(caplog) == [f"{KEY} once in the last 10 s: bad magic"]
    # quiet for a whole window: forgotten, the next hit is logged at once
    clock.now = 1031.0
    log.handle_timer()
    assert messages(caplog) == [f"{KEY} once in the last 11 s: bad magic"]
    clock.now = 1042.0
    log.handle_timer()
    assert messages(caplog) == [] and len(log) == 0
    assert log.hit(KEY, "bad magic") is True


def test_a_single_hit_needs_no_summary(
    limited: tuple[RateLimitedLog, Clock], caplog: pytest.LogCaptureFixture
) -> None:
    log, clock = limited
    log.hit("a", "x")
    clock.now += 60
    log.handle_timer()
    log.flush()
    assert messages(caplog) == ["a: x"]
    assert log.next_timer() is None


def test_keys_are_independent_and_flush_writes_what_is_pending(
    limited: tuple[RateLimitedLog, Clock], caplog: pytest.LogCaptureFixture
) -> None:
    log, clock = limited
    log.hit("a", "x")
    log.hit("b", "y")
    log.hit("a", "x")
    clock.now += 2.5
    log.flush()
    assert messages(caplog) == ["a: x", "b: y", "a 2 times in the last 2.5 s: x"]


def test_memory_is_bounded_and_the_overflow_summarised(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tether.test")
    clock = Clock()
    log = RateLimitedLog(logging.getLogger("tether.test"), window=10, max_keys=3, clock=clock)
    for i in range(1000):
        log.hit(f"link from 198.18.{i // 256}.{i % 256} refused", "handshake timed out")
    assert len(log) == 3
    logged = messages(caplog)
    assert len(logged) == 4  # three tracked keys, and the first of the others
    assert logged[3] == "link from 198.18.0.3 refused: handshake timed out"
    clock.now += 10
    log.handle_timer()
    assert messages(caplog) == [
        "other sources (beyond 3 tracked) 997 times in the last 10 s, the latest: "
        "link from 198.18.3.231 refused: handshake timed out"
    ]
    assert len(log) == 0
    assert log.hit("link from 198.18.9.9 refused", "bad magic") is True  # room again


def test_a_summary_names_the_other_reasons_its_window_saw_up_to_a_bound(
    limited: tuple[RateLimitedLog, Clock], caplog: pytest.LogCaptureFixture
) -> None:
    """A reason that came between two others is not lost to the latest one (a client
    refused for a forged certificate between resets), and a flood of distinct reasons
    still writes one line per window, naming at most ALSO_MAX of them besides the latest."""
    log, clock = limited
    for why in ("no certificate", "verify failed", "reset", "reset", "verify failed", "reset"):
        log.hit("a", why)
    clock.now += 1
    log.flush()
    assert messages(caplog) == [
        "a: no certificate",
        "a 6 times in the last 1 s: reset; also: no certificate; verify failed",
    ]
    caplog.clear()
    for i in range(100):
        log.hit("b", f"reason {i}")
    log.flush()
    assert messages(caplog) == [
        "b: reason 0",
        "b 100 times in the last 0 s: reason 99; also: reason 0; reason 1; reason 2, and others",
    ]


# uvloop's own words (handles/handle.pyx, UVHandle._ensure_alive; its repr ends with the id)
def closed(transport: object) -> RuntimeError:
    return RuntimeError(
        f"unable to perform operation on <TCPTransport closed=True reading=False "
        f"{id(transport):#x}>; the handler is closed"
    )


def test_uvloops_known_tls_error_is_one_warning_line(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.new_event_loop()
    transport = object()
    try:
        with caplog.at_level(logging.DEBUG):
            loop_exception_handler(
                loop,
                {
                    "message": "Fatal error on SSL protocol",
                    "exception": closed(transport),
                    "transport": transport,
                },
            )
    finally:
        loop.close()
    assert [(r.name, r.levelname, r.exc_info) for r in caplog.records] == [
        ("tether", "WARNING", None)
    ]
    assert "dropped with it (uvloop; docs/fuzzing.md, F4)" in caplog.text


OWN, OTHER = object(), object()


@pytest.mark.parametrize(
    "context",
    [
        {"message": "Fatal error on SSL protocol", "exception": RuntimeError("something else")},
        {"message": "Fatal error on SSL protocol", "exception": OSError(str(closed(OWN)))},
        {"message": "Task exception was never retrieved", "exception": closed(OWN)},
        {"message": "Fatal error on SSL protocol"},
        # tether's own write to another closed transport, made from the TLS protocol's call
        {"message": "Fatal error on SSL protocol", "exception": closed(OTHER)},
    ],
)
def test_any_other_loop_error_is_the_loops_as_before(
    caplog: pytest.LogCaptureFixture, context: dict[str, object]
) -> None:
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.DEBUG):
            loop_exception_handler(loop, {**context, "transport": OWN})
    finally:
        loop.close()
    assert [(r.name, r.levelname) for r in caplog.records] == [("asyncio", "ERROR")]


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_the_cli_runs_its_loops_with_that_handler(
    loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if loop == "asyncio":
        monkeypatch.setenv("TETHER_NO_UVLOOP", "1")
    else:
        pytest.importorskip("uvloop")

    async def main() -> int:
        running = asyncio.get_running_loop()
        uses = "uvloop" if type(running).__module__.startswith("uvloop") else "asyncio"
        handler = running.get_exception_handler()
        return 0 if handler is loop_exception_handler and uses == loop else 1

    assert cli._run(main) == 0
