"""B1 bulk throughput and B2 request/response latency, on loopback, all peers interleaved.

Every peer's chain is started once, in front of one backend process; then each repeat
visits every peer in turn (A, B, C, A, B, C, ...) so that drift on a shared machine falls on
all of them alike. Before the timed runs each peer moves a smaller verified transfer
(CRC-32 both ways), so a fast wrong answer cannot pass.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.common import MiB, Result, Scale, percentile, progress
from benchmarks.peers import Peer, available, start_chain
from benchmarks.procs import HarnessError, Procs, endpoint, run_tool

CASES = {"up": (1, 0), "down": (0, 1), "both": (1, 1)}


def _chains(peers: list[Peer], procs: Procs, result: Result) -> dict[str, str]:
    _, backend = procs.start_ready(endpoint("backend", "--listen", "127.0.0.1:0"), "backend")
    entries: dict[str, str] = {}
    for peer in peers:
        reason = available(peer)
        if reason:
            result.skipped[peer.name] = reason
            continue
        try:
            entries[peer.name] = start_chain(peer, procs, backend)
        except HarnessError as exc:
            result.skipped[peer.name] = f"did not start: {exc}"
    return entries


def bulk_once(entry: str, up: int, down: int, verify: bool, timeout: float) -> dict[str, object]:
    out = run_tool(
        endpoint(
            "bulk",
            "--connect",
            entry,
            "--up",
            str(up),
            "--down",
            str(down),
            "--verify",
            str(int(verify)),
        ),
        timeout=timeout,
    )
    data: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return data


def run_b1(scale: Scale, peers: list[Peer], logdir: Path, cases: list[str]) -> Result:
    n = scale.bulk_bytes
    result = Result(
        "B1",
        "Bulk throughput",
        config={"bytes": n, "repeats": scale.repeats, "cases": cases, "unit": "GB/s (1e9 B/s)"},
    )
    with Procs(logdir / "b1") as procs:
        entries = _chains(peers, procs, result)
        verify_n = min(n, 64 * MiB)
        for name, entry in list(entries.items()):
            for case in cases:
                u, d = CASES[case]
                try:
                    r = bulk_once(entry, u * verify_n, d * verify_n, True, 20 + verify_n / MiB)
                except HarnessError as exc:
                    result.skipped[name] = f"verified transfer failed: {exc}"
                    entries.pop(name)
                    break
                result.extra.setdefault("verified", {})[f"{name}/{case}"] = r["intact"]
        timeout = 20 + n / (20 * MiB)  # even at 20 MiB/s a run ends
        for rep in range(scale.repeats):
            for case in cases:
                u, d = CASES[case]
                for name, entry in entries.items():
                    progress(f"B1 {case} {name} repeat {rep}")
                    try:
                        r = bulk_once(entry, u * n, d * n, False, timeout)
                    except HarnessError as exc:
                        result.notes.append(f"{name} {case} repeat {rep}: {exc}")
                        continue
                    secs = float(r["seconds"])  # type: ignore[arg-type]
                    moved = (u + d) * n
                    result.runs.append(
                        {
                            "peer": name,
                            "case": case,
                            "repeat": rep,
                            "seconds": secs,
                            "bytes": moved,
                            "gbps": moved / secs / 1e9,
                            "intact": r["intact"],
                        }
                    )
    return result


def run_b2(scale: Scale, peers: list[Peer], logdir: Path) -> Result:
    result = Result(
        "B2",
        "Request/response latency, 64 bytes",
        config={"count": scale.rtt_count, "repeats": scale.repeats, "size": 64, "unit": "us"},
    )
    pooled: dict[str, list[float]] = {}
    with Procs(logdir / "b2") as procs:
        entries = _chains(peers, procs, result)
        for rep in range(scale.repeats):
            for name, entry in entries.items():
                progress(f"B2 {name} repeat {rep}")
                try:
                    out = run_tool(
                        endpoint("rtt", "--connect", entry, "--count", str(scale.rtt_count)),
                        timeout=20 + scale.rtt_count * 0.005,
                    )
                except HarnessError as exc:
                    result.notes.append(f"{name} repeat {rep}: {exc}")
                    continue
                rtts = [x / 1000.0 for x in json.loads(out.strip().splitlines()[-1])["rtt_ns"]]
                pooled.setdefault(name, []).extend(rtts)
                result.runs.append(
                    {
                        "peer": name,
                        "repeat": rep,
                        "n": len(rtts),
                        "p50_us": percentile(rtts, 50),
                        "p99_us": percentile(rtts, 99),
                        "p999_us": percentile(rtts, 99.9),
                        "mean_us": sum(rtts) / len(rtts),
                    }
                )
    # A CDF per peer for the plot: 200 quantiles of the pooled sample.
    result.extra["cdf_us"] = {
        name: [percentile(v, q / 2) for q in range(1, 201)] for name, v in pooled.items()
    }
    return result
