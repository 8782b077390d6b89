"""The generated page's targets table (``write_docs``): the thresholds in force (issue 12's
where it raised issue 4's), each judged on per-repeat ratios, from hand-made results (no
timing, no subprocess). The figures are chosen so that a ratio of medians, or issue 4's
thresholds, would give another verdict than the rule the page states."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmarks.report import write_docs

STORM_FAILURE = "storm: load generator: 'probe' -> ERROR ConnectionError('conn 747 lost: None')"


def _b4(server_cpu: float, client_cpu: float, storm_failed: bool) -> dict[str, object]:
    """B4 with 5,000 of the 10,000 idle sessions wanted (so CPU is scaled by 2), an RSS of
    7.0 KiB per session (under issue 4's 8, over issue 12's 6.7), and one storm trial."""
    idle = {"phase": "idle", "peer": "tether", "sessions": 5000, "rss_curve_kib": [],
            "server_kib_per_session": 7.0, "client_kib_per_session": 6.0,
            "server_kib_per_session_delta": 7.1, "server_rss_kib": 60000,
            "client_rss_kib": 70000, "idle_seconds": 60.0, "server_cpu_pct": server_cpu / 2,
            "server_cpu_pct_scaled": server_cpu, "sessions_wanted": 10000,
            "client_cpu_pct": client_cpu / 2, "probe_all_s": 1.0}  # fmt: skip
    storm = {"phase": "storm", "peer": "tether", "sessions": 2000, "trial": 0,
             "sockets_killed": 4000, "all_resumed_s": 2.2, "bytes_sent": 640,
             "bytes_echoed": 640, "bytes_bad": 0, "connections_lost": 0,
             "zero_loss": True}  # fmt: skip
    return {
        "config": {"idle_sessions": 10000, "idle_seconds": 60.0, "storm_sessions": 2000,
                   "peers": {"pyrelay": "a relay"}},
        "runs": [idle, storm],
        "notes": [STORM_FAILURE] if storm_failed else [],
        "meta": {"command": "python -m benchmarks", "commit": "abc1234", "src_commit": "def5678"},
    }  # fmt: skip


def _results(
    server_cpu: float = 4.0, client_cpu: float = 2.0, storm_failed: bool = False
) -> dict[str, object]:
    b1, b2 = [], []
    # tether / socat -b 262144 per repeat: up 1.1, 0.9, 1.05 (median 1.05; of the medians
    # 1.10); down 0.95, 0.95, 2.1 (median 0.95, missed; of the medians 1.05, met)
    for rep, (up_s, up_t, down_s, down_t) in enumerate(
        ((1.0, 1.1, 1.0, 0.95), (0.8, 0.72, 2.0, 1.9), (1.25, 1.3125, 0.5, 1.05))
    ):
        for peer, up, down in (("socat2-b256k", up_s, down_s), ("tether", up_t, down_t)):
            for case, gbps in (("up", up), ("down", down)):
                b1.append({"peer": peer, "case": case, "repeat": rep, "seconds": 1.0,
                           "bytes": 1, "gbps": gbps, "intact": True})  # fmt: skip
    # added over direct's 60 / 100 us, per repeat: p50 socat2 40 / 80 / 30, tether 56 / 100
    # / 90 (1.4, 1.25, 3.0x: median 1.4, met; of the medians 90 / 40 = 2.25, missed); p99
    # socat2 100 / 0 / 100 (the 0 left out), tether 140 / 200 / 160 (1.4 and 1.6x: the
    # nearest-rank median of two is the lower, met; of the medians 160 / 100, missed)
    for rep, (s50, t50, s99, t99) in enumerate(
        ((100, 116, 200, 240), (140, 160, 100, 300), (90, 150, 200, 260))
    ):
        for peer, p50, p99 in (("direct", 60, 100), ("socat2", s50, s99), ("tether", t50, t99)):
            b2.append({"peer": peer, "repeat": rep, "n": 10, "p50_us": p50, "p99_us": p99})
    meta = {"command": "python -m benchmarks", "commit": "abc1234", "src_commit": "def5678"}
    return {
        "meta": {"cpu": "x", "cores": 2},
        "benchmarks": {
            "B1": {"config": {"bytes": 2**30, "repeats": 3, "cases": ["up", "down"]},
                   "runs": b1, "meta": meta},
            "B2": {"config": {"count": 10, "repeats": 3}, "runs": b2, "meta": meta},
            "B4": _b4(server_cpu, client_cpu, storm_failed),
        },
    }  # fmt: skip


def _targets(tmp_path: Path, **kwargs: object) -> dict[str, list[str]]:
    results = tmp_path / "latest.json"
    results.write_text(json.dumps(_results(**kwargs)))  # type: ignore[arg-type]
    text = write_docs(results, tmp_path / "docs", plots=False).read_text()
    table = text.partition("## Targets")[2].partition("\n## ")[0]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| B")]
    return {row[0].removeprefix("| "): row[1:] for row in rows}


def test_b1_is_judged_on_per_repeat_ratios_against_issue_12s_threshold(tmp_path: Path) -> None:
    rows = _targets(tmp_path)
    up = rows["B1 up: >= 1.0x socat -b 262144 two hops (issue 12; issue 4: 0.8x)"]
    assert up[0] == "1.05 (0.90-1.10) per repeat; medians 1.10 vs 1.00 GB/s"
    assert up[1] == "**met**"
    down = rows["B1 down: >= 1.0x socat -b 262144 two hops (issue 12; issue 4: 0.8x)"]
    assert down[0] == "0.95 (0.95-2.10) per repeat; medians 1.05 vs 1.00 GB/s"
    assert down[1] == "**missed**" and down[2] == "-5% against 1.0x |"


def test_b2_is_judged_on_per_repeat_added_ratios(tmp_path: Path) -> None:
    rows = _targets(tmp_path)
    p50 = rows["B2 p50: added latency <= 1.5x socat two hops'"]
    assert p50[0] == "1.40 (1.25-3.00) per repeat; medians +90.0 vs +40.0 us"
    assert p50[1] == "**met**"
    p99 = rows["B2 p99: added latency <= 1.5x socat two hops'"]
    assert p99[0].startswith("1.40 (1.40-1.60) per repeat (1 left out: socat added nothing)")
    assert p99[1] == "**met**"


@pytest.mark.parametrize(
    ("server", "client", "verdict"),
    [(4.0, 2.0, "met"), (5.4, 2.0, "missed"), (4.0, 5.2, "missed")],
)
def test_b4_idle_cpu_counts_the_server_and_the_client(
    tmp_path: Path, server: float, client: float, verdict: str
) -> None:
    rows = _targets(tmp_path, server_cpu=server, client_cpu=client)
    cpu = rows["B4: idle CPU < 5% of a core in each process, server and client (10000 sessions)"]
    # the client's share of 5,000 sessions is scaled to 10,000 as the server's is
    assert cpu[0] == f"server {server:.2f}%, client {client:.2f}% (scaled from 5000)"
    assert cpu[1] == f"**{verdict}**"


def test_b4_memory_is_held_to_issue_12s_bound(tmp_path: Path) -> None:
    rows = _targets(tmp_path)
    key = "B4: server RSS <= 6.7 KiB per idle session (5000 sessions; issue 12; issue 4: 8 KiB)"
    assert rows[key][:2] == ["7.00 KiB (delta 7.10)", "**missed**"]  # 7.0 passed issue 4's 8


@pytest.mark.parametrize("failed", [False, True])
def test_a_storm_trial_that_failed_misses_the_target(tmp_path: Path, failed: bool) -> None:
    """The harness keeps no row for a trial that failed, only a note: the trials that
    completed must not pass the target alone (B4's run of 2026-12-04 showed 2 of 3)."""
    rows = _targets(tmp_path, storm_failed=failed)
    storm = rows["B4: 2000-session storm fully resumed within 5 s, zero bytes lost"]
    assert storm[0].startswith("worst 2.200 s over 1 trials; zero loss")
    assert storm[1] == ("**missed**" if failed else "**met**")
    assert ("conn 747 lost" in storm[0]) is failed
