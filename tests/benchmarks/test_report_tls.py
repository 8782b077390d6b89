"""The "With TLS (issue 8)" section: rendered from results that hold the TLS peers, and
spliced into an existing page without touching the other sections (no subprocess)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.report import TLS_BEGIN, TLS_END, Page, splice_tls, tls_section


def _results() -> dict[str, object]:
    b1 = []
    b2 = []
    for rep in range(3):
        for peer, gbps, p50 in (
            ("direct", 3.0, 60.0),
            ("socat2-b256k", 1.2, 100.0),
            ("socat2", 0.6, 110.0),
            ("tether", 1.0, 200.0),
            ("stunnel2", 0.8, 120.0),
            ("tether-tls", 0.6, 260.0),
        ):
            for case in ("up", "down", "both"):
                b1.append(
                    {"peer": peer, "case": case, "repeat": rep, "seconds": 1.0,
                     "bytes": 1, "gbps": gbps, "intact": True}
                )  # fmt: skip
            b2.append({"peer": peer, "repeat": rep, "n": 10, "p50_us": p50, "p99_us": 2 * p50})
    meta = {"command": "python -m benchmarks", "commit": "abc1234", "src_commit": "def5678"}
    return {
        "benchmarks": {
            "B1": {"config": {"bytes": 2**30, "repeats": 3, "cases": ["up", "down", "both"]},
                   "runs": b1, "meta": meta},
            "B2": {"config": {"count": 10, "repeats": 3}, "runs": b2, "meta": meta},
        }
    }  # fmt: skip


def test_section_holds_targets_with_per_repeat_ratios() -> None:
    page = Page()
    tls_section(page, _results()["benchmarks"], None)  # type: ignore[arg-type]
    text = "\n".join(page.lines)
    assert "## With TLS (issue 8)" in text
    assert "### Targets with TLS (issues 8 and 12" in text
    # 0.6 / 0.8 GB/s = 0.75x stunnel: missed; (260 - 60) / (120 - 60) = 3.33x: missed
    assert "| B1 up: tether-tls >= 0.8x stunnel two hops | 0.75 (0.75-0.75) per repeat" in text
    assert "B2 p50: tether-tls added latency <= 1.5x stunnel2's | +200.0 vs +60.0 us" in text
    # clear text's targets are the top table's (issue 12's thresholds), not this section's
    assert "B1 both: tether >=" not in text and "tether added latency" not in text
    assert "| / socat2-b256k: 0.83 (0.83-0.83) |" in text  # its ratio is still shown
    assert "commit abc1234 (src/ at def5678)" in text


def test_splice_replaces_only_its_section(tmp_path: Path) -> None:
    results = tmp_path / "latest.json"
    results.write_text(json.dumps(_results()))
    docs = tmp_path / "docs"
    docs.mkdir()
    old = "# Benchmarks\n\n## B1 bulk throughput\n\nold figures\n\n## Profile: bulk\n\nx\n"
    (docs / "benchmarks.md").write_text(old + "\n## Analysis\n\nstale\n")
    splice_tls(results, docs, plots=False)
    once = (docs / "benchmarks.md").read_text()
    splice_tls(results, docs, plots=False)
    twice = (docs / "benchmarks.md").read_text()
    assert once == twice
    assert once.count(TLS_BEGIN) == 1 and once.count(TLS_END) == 1
    assert once.index("old figures") < once.index(TLS_BEGIN) < once.index("## Profile: bulk")
    # the analysis is benchmarks/analysis.md again, after the section
    assert "stale" not in once and once.index(TLS_END) < once.index("\n## Analysis\n")
