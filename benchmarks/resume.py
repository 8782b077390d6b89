"""B3 resume time: blackhole the client<->server path, restore it, time until data flows.

Topology (see :mod:`benchmarks.netns`): the application (a pinger doing 64-byte
request/response every 10 ms) and the client-side hop live in the client namespace; the
server-side hop and the echo backend in the server namespace; between them one veth that
:meth:`Topology.cut` turns into a silent blackhole. For ``direct`` the pinger dials the
backend across the veth.

Each trial: at least 2 s of healthy traffic, cut for a duration taken from a fixed
low-discrepancy sequence over ``[cut_min, cut_max]`` (the same sequence for every peer),
restore, then wait for the pinger's outstanding reply. Resume time = arrival of that reply
minus the moment just before the nft rule was deleted (CLOCK_MONOTONIC is shared by all
processes, so the pinger's timestamps compare directly). One session lives through all of a
peer's trials.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.common import Result, Scale, percentile, progress
from benchmarks.netns import SERVER_IP, Topology, unavailable
from benchmarks.peers import PEERS, Peer, available, start_chain
from benchmarks.procs import HarnessError, Procs, endpoint, read_line

B3_PEERS = [
    "tether",
    "tether-tls",
    "socat2",
    "stunnel2",
    "direct",
    "tether-attempt1s",
    "tether-rtomax",
    "tether-tls-trace",
]
RESUME_WAIT = 60.0  # a trial that has not resumed this long after restore counts as failed
SETTLE = 2.0
GOLDEN = 0.6180339887498949


def cut_durations(scale: Scale, n: int) -> list[float]:
    lo, hi = (1.0, scale.resume_cut) if scale.resume_cut > 1.0 else (scale.resume_cut,) * 2
    return [round(lo + (hi - lo) * ((i * GOLDEN) % 1.0), 2) for i in range(n)]


def run_b3(scale: Scale, peers: list[Peer], logdir: Path) -> Result:
    names = [p.name for p in peers if p.name in B3_PEERS] or ["tether"]
    result = Result(
        "B3",
        "Resume time after the path is restored",
        config={
            "trials_tether": scale.resume_trials,
            "trials_peers": max(1, scale.resume_trials // 2),
            "cut_seconds": cut_durations(scale, scale.resume_trials),
            "pinger_interval_s": 0.01,
            "method": "nft drop of all packets on the client-side veth (blackhole)",
            "tether_settings": "defaults (keepalive 3 s, backoff cap 0.5 s); `tether` and the "
            "experiments with --plaintext, `tether-tls` with TLS 1.3 (trust on first use)",
        },
    )
    reason = unavailable()
    if reason:
        for name in names:
            result.skipped[name] = reason
        return result
    for name in names:
        peer = PEERS[name]
        why = available(peer)
        if why:
            result.skipped[name] = why
            continue
        trials = scale.resume_trials if peer.kind == "tether" else max(1, scale.resume_trials // 2)
        progress(f"B3 {name}: {trials} trials")
        try:
            _run_peer(peer, cut_durations(scale, trials), logdir / "b3", result)
        except (HarnessError, RuntimeError) as exc:
            result.notes.append(f"{name}: {exc}")
    for name in names:
        times = [r["resume_s"] for r in result.runs if r["peer"] == name and r["resumed"]]
        if times:
            result.extra.setdefault("percentiles", {})[name] = {
                "p50_s": percentile(times, 50),
                "p99_s": percentile(times, 99),
                "max_s": max(times),
                "n": len(times),
                "failed": sum(1 for r in result.runs if r["peer"] == name and not r["resumed"]),
            }
    return result


def _run_peer(peer: Peer, cuts: list[float], logdir: Path, result: Result) -> None:
    with Topology() as topo, Procs(logdir / peer.name) as procs:
        _, backend = procs.start_ready(
            endpoint("backend", "--listen", "0.0.0.0:0"), "backend", netns=topo.server_ns
        )
        port = backend.rpartition(":")[2]
        if peer.kind == "direct":
            entry = f"{SERVER_IP}:{port}"
        else:
            entry = start_chain(
                peer,
                procs,
                f"127.0.0.1:{port}",
                server_host=SERVER_IP,
                client_ns=topo.client_ns,
                server_ns=topo.server_ns,
            )
        pinger, _ = procs.start_ready(
            endpoint("pinger", "--connect", entry, "--interval", "0.01", "--slow", "0.05"),
            "pinger",
            netns=topo.client_ns,
            stdin=True,
        )
        for trial, cut in enumerate(cuts):
            progress(f"B3 {peer.name} trial {trial}: cut {cut} s")
            time.sleep(SETTLE)
            topo.cut()
            time.sleep(cut)
            t_restore = time.monotonic()
            topo.restore()
            resumed_at = _wait_reply_after(pinger, t_restore, RESUME_WAIT)
            result.runs.append(
                {
                    "peer": peer.name,
                    "trial": trial,
                    "cut_s": cut,
                    "resumed": resumed_at is not None,
                    "resume_s": (resumed_at - t_restore) if resumed_at is not None else None,
                }
            )
            if resumed_at is None:
                result.notes.append(
                    f"{peer.name} trial {trial}: no data {RESUME_WAIT}s after restore"
                )
                break


def _wait_reply_after(pinger: object, t_restore: float, timeout: float) -> float | None:
    """Read the pinger's STALL lines until one ends after ``t_restore``; return that end."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            line = read_line(pinger, left)  # type: ignore[arg-type]
        except HarnessError:
            return None
        parts = line.split()
        if len(parts) == 3 and parts[0] == "STALL" and float(parts[2]) > t_restore:
            return float(parts[2])
