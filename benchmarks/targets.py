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
from pathlib import Path

from benchmarks.common import percentile
from benchmarks.report import added_latency, added_ratios, ratio_text, ratios

__all__ = ["b1_ratios", "b2_ratios", "render"]

REFERENCE = {
    "tether": ("socat2-b256k", "socat2"),
    "tether-base": ("socat2-b256k", "socat2"),
    "tether-tls": ("stunnel2", "stunnel2"),
    "tether-tls-base": ("stunnel2", "stunnel2"),
}
TARGET_B1 = {"socat2-b256k": 1.0, "stunnel2": 0.8}
TARGET_B2 = 1.5


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
