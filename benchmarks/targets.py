"""Issue 12's targets from one run of B1 and B2, as per-repeat ratios (markdown).

    python -m benchmarks --only B1,B2 --repeats 5 --no-docs --out results/issue12 \\
        --peers direct,socat2,socat2-b256k,stunnel2,tether,tether-tls[,tether-base,tether-tls-base]
    python -m benchmarks.targets --out results/issue12

Each ratio is taken within one repeat (the peers of a repeat ran back to back, CONTRIBUTING.md
P1) and then summarised as the median (min-max) over repeats:

- B1: a tether peer's GB/s over its reference's: ``socat2-b256k`` for clear text, ``stunnel2``
  for TLS (targets 1.0x and 0.8x);
- B2: a tether peer's *added* round trip (its p50 or p99 minus direct TCP's in the same repeat)
  over its reference's added round trip: ``socat2`` for clear text, ``stunnel2`` for TLS (target
  1.5x). A repeat where the reference added nothing measurable is left out, and counted.

``-base`` peers (an A/B against ``$TBENCH_BASE_SRC``) are compared with the same reference, so
the table shows before and after from one run.

The thresholds and the ratios here are also what docs/benchmarks.md's targets tables judge by
(report.py), together with B4's (idle CPU of each process, RSS per idle session).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.common import fmt, percentile

__all__ = [
    "REFERENCE",
    "TARGET_B1",
    "TARGET_B2",
    "TARGET_B4_CPU_PCT",
    "TARGET_B4_KIB",
    "added_latency",
    "added_ratios",
    "b1_ratios",
    "b2_ratios",
    "ratio_text",
    "ratios",
    "render",
]

REFERENCE = {
    "tether": ("socat2-b256k", "socat2"),
    "tether-base": ("socat2-b256k", "socat2"),
    "tether-tls": ("stunnel2", "stunnel2"),
    "tether-tls-base": ("stunnel2", "stunnel2"),
}
TARGET_B1 = {"socat2-b256k": 1.0, "stunnel2": 0.8}  # issue 12 (issue 4 asked 0.8x of socat)
TARGET_B2 = 1.5
TARGET_B4_CPU_PCT = 5.0  # idle CPU of each process (server and client), 10,000 sessions
TARGET_B4_KIB = 6.7  # server RSS per idle session: no worse than when issue 12 was filed


def ratios(runs: list[dict[str, Any]], key: str, a: str, b: str, group: str) -> list[float]:
    """Per-repeat ratio a/b of ``key`` (the runs of one repeat were made back to back)."""
    by: dict[Any, dict[str, float]] = {}
    for r in runs:
        by.setdefault(r[group], {})[r["peer"]] = r[key]
    return [v[a] / v[b] for v in by.values() if a in v and b in v and v[b]]


def ratio_text(rr: list[float]) -> str:
    """Per-repeat ratios as "median (min-max)"; empty for none."""
    return f"{fmt(percentile(rr, 50))} ({fmt(min(rr))}-{fmt(max(rr))})" if rr else ""


def added_latency(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[int, float]]]:
    """B2: peer -> "p50_us" / "p99_us" -> repeat -> its latency minus direct TCP's in that
    repeat (what the peer *added*)."""
    direct = {r["repeat"]: r for r in runs if r["peer"] == "direct"}
    added: dict[str, dict[str, dict[int, float]]] = {}
    for r in runs:
        d = direct.get(r["repeat"])
        if d is not None:
            for q in ("p50_us", "p99_us"):
                added.setdefault(r["peer"], {}).setdefault(q, {})[r["repeat"]] = r[q] - d[q]
    return added


def added_ratios(
    added: dict[str, dict[str, dict[int, float]]], a: str, b: str, q: str
) -> list[float]:
    """Per-repeat ratio of ``a``'s added latency to ``b``'s; a repeat where ``b`` added
    nothing measurable is left out (a ratio to zero or less means nothing)."""
    mine, theirs = added.get(a, {}).get(q, {}), added.get(b, {}).get(q, {})
    return [mine[k] / theirs[k] for k in mine if k in theirs and theirs[k] > 0]


def b1_ratios(runs: list[dict[str, object]]) -> dict[tuple[str, str], list[float]]:
    """(peer, case) -> per-repeat GB/s ratios to the peer's B1 reference (broken runs
    left out)."""
    whole = [r for r in runs if r.get("intact", True)]
    out: dict[tuple[str, str], list[float]] = {}
    for case in dict.fromkeys(str(r["case"]) for r in whole):
        of_case = [r for r in whole if r["case"] == case]
        for peer in dict.fromkeys(str(r["peer"]) for r in of_case):
            if peer in REFERENCE:
                rr = ratios(of_case, "gbps", peer, REFERENCE[peer][0], "repeat")
                if rr:
                    out[peer, case] = rr
    return out


def b2_ratios(runs: list[dict[str, object]]) -> dict[tuple[str, str], tuple[list[float], int]]:
    """(peer, "p50"|"p99") -> (per-repeat added-latency ratios, repeats left out because
    the reference added nothing)."""
    added = added_latency(runs)
    out: dict[tuple[str, str], tuple[list[float], int]] = {}
    for peer, (_, ref) in REFERENCE.items():
        for q in ("p50", "p99"):
            mine, theirs = added.get(peer, {}).get(f"{q}_us", {}), added.get(ref, {})
            common = [k for k in mine if k in theirs.get(f"{q}_us", {})]
            if common:
                rr = added_ratios(added, peer, ref, f"{q}_us")
                out[peer, q] = (rr, len(common) - len(rr))
    return out


def render(data: dict[str, object]) -> str:
    benches = data["benchmarks"]
    assert isinstance(benches, dict)
    meta = data.get("meta", {})
    assert isinstance(meta, dict)
    lines = [
        f"Run of {meta.get('time', '?')}, commit {str(meta.get('commit', '?'))[:7]} "
        f"(src/ {str(meta.get('src_commit', '?'))[:7]}), command: `{meta.get('command', '?')}`",
        "",
        "| target | peer | median (min-max) per repeat | target | verdict |",
        "|---|---|---|---|---|",
    ]
    if "B1" in benches:
        ratios = b1_ratios(benches["B1"]["runs"])
        for (peer, case), values in sorted(ratios.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            ref = REFERENCE[peer][0]
            want = TARGET_B1[ref]
            met = values and percentile(values, 50) >= want
            lines.append(
                f"| B1 {case}, GB/s / {ref}'s | {peer} | {ratio_text(values) or 'n/a'} "
                f"| >= {want:.1f} | {'met' if met else 'missed'} |"
            )
    if "B2" in benches:
        for (peer, q), (values, skipped) in sorted(b2_ratios(benches["B2"]["runs"]).items()):
            ref = REFERENCE[peer][1]
            met = values and percentile(values, 50) <= TARGET_B2
            note = f" ({skipped} repeats left out)" if skipped else ""
            lines.append(
                f"| B2 added {q} / {ref}'s | {peer} | {ratio_text(values) or 'n/a'}{note} "
                f"| <= {TARGET_B2} | {'met' if met else 'missed'} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results", help="results directory of the run")
    args = parser.parse_args()
    data = json.loads((Path(args.out) / "latest.json").read_text())
    print(render(data), end="")


if __name__ == "__main__":
    main()
