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
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

__all__ = ["b1_ratios", "b2_ratios", "render"]

REFERENCE = {
    "tether": ("socat2-b256k", "socat2"),
    "tether-base": ("socat2-b256k", "socat2"),
    "tether-tls": ("stunnel2", "stunnel2"),
    "tether-tls-base": ("stunnel2", "stunnel2"),
}
TARGET_B1 = {"socat2-b256k": 1.0, "stunnel2": 0.8}
TARGET_B2 = 1.5


def _summary(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def b1_ratios(runs: list[dict[str, object]]) -> dict[tuple[str, str], list[float]]:
    """(peer, case) -> per-repeat GB/s ratios to the peer's B1 reference."""
    speed: dict[tuple[str, str, int], float] = {}
    for r in runs:
        if r.get("intact", True) and "gbps" in r:
            speed[str(r["peer"]), str(r["case"]), int(str(r["repeat"]))] = float(str(r["gbps"]))
    out: dict[tuple[str, str], list[float]] = defaultdict(list)
    for (peer, case, repeat), gbps in sorted(speed.items()):
        ref = REFERENCE.get(peer, (None, None))[0]
        base = speed.get((str(ref), case, repeat))
        if ref is not None and base:
            out[peer, case].append(gbps / base)
    return out


def b2_ratios(runs: list[dict[str, object]]) -> dict[tuple[str, str], tuple[list[float], int]]:
    """(peer, "p50"|"p99") -> (per-repeat added-latency ratios, repeats left out)."""
    lat: dict[tuple[str, int], dict[str, object]] = {}
    for r in runs:
        lat[str(r["peer"]), int(str(r["repeat"]))] = r
    out: dict[tuple[str, str], tuple[list[float], int]] = {}
    for (peer, repeat), r in sorted(lat.items()):
        ref = REFERENCE.get(peer, (None, None))[1]
        direct, base = lat.get(("direct", repeat)), lat.get((str(ref), repeat))
        if ref is None or direct is None or base is None:
            continue
        for q in ("p50", "p99"):
            key = f"{q}_us"
            d = float(str(direct[key]))
            mine, theirs = float(str(r[key])) - d, float(str(base[key])) - d
            ratios, skipped = out.get((peer, q), ([], 0))
            if theirs > 0:
                ratios.append(mine / theirs)
            else:
                skipped += 1
            out[peer, q] = (ratios, skipped)
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
            met = values and statistics.median(values) >= want
            lines.append(
                f"| B1 {case}, GB/s / {ref}'s | {peer} | {_summary(values)} | >= {want:.1f} "
                f"| {'met' if met else 'missed'} |"
            )
    if "B2" in benches:
        for (peer, q), (values, skipped) in sorted(b2_ratios(benches["B2"]["runs"]).items()):
            ref = REFERENCE[peer][1]
            met = values and statistics.median(values) <= TARGET_B2
            note = f" ({skipped} repeats left out)" if skipped else ""
            lines.append(
                f"| B2 added {q} / {ref}'s | {peer} | {_summary(values)}{note} "
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
