"""The campaign's log check (fuzz/driver.py ``LogWatch``): a known entry is counted, not
failed, at whatever level it is logged, and what follows it in the same entry is still
checked."""

from __future__ import annotations

from pathlib import Path

from fuzz.driver import LogWatch

from tether.logs import UVLOOP_CLOSED_WRITE_LINE

F4 = f"2026-12-04 19:00:00,000 WARNING tether: {UVLOOP_CLOSED_WRITE_LINE}"


def scan(tmp_path: Path, *lines: str) -> LogWatch:
    log = tmp_path / "target.log"
    log.write_text("\n".join(lines) + "\n")
    watch = LogWatch(log)
    watch.scan(final=True)
    return watch


def test_a_known_entry_is_counted_not_failed(tmp_path: Path) -> None:
    watch = scan(tmp_path, "2026-12-04 18:59:59,000 INFO tether: a session", F4, F4)
    assert watch.known == {"F4-uvloop-ssl-write-after-close": 2}
    assert watch.hits == []


def test_a_traceback_after_a_known_line_still_fails(tmp_path: Path) -> None:
    # Python's last-resort handler writes the loop's errors without a timestamp, so they
    # join the entry of the line before them.
    watch = scan(
        tmp_path,
        F4,
        "Fatal error on SSL protocol",
        "Traceback (most recent call last):",
        "RuntimeError: something else",
    )
    assert watch.known == {"F4-uvloop-ssl-write-after-close": 1}
    assert len(watch.hits) == 1 and "RuntimeError: something else" in watch.hits[0]


def test_an_error_entry_fails(tmp_path: Path) -> None:
    watch = scan(tmp_path, "2026-12-04 19:00:01,000 ERROR tether: internal error")
    assert watch.known == {}
    assert len(watch.hits) == 1
