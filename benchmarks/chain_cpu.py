"""CPU per GiB of every process in B1's chain: each relay and the application.

``python -m benchmarks.cpu_per_gib`` counts the two relays with the application inside the
harness; on a machine of two cores B1 is bound by what the whole chain spends, and the
application's share depends on how its relay writes to it (docs/benchmarks.md, "Targets at
src/ 765e56b": the receiving application's copy cost more behind tether's client). This
tool runs B1's own arrangement (the endpoint's backend and its ``bulk`` client in their own
processes, as ``python -m benchmarks --only B1``) and reads every process's user and system
time::

    python -m benchmarks.chain_cpu [--runs 6] [--bytes N] [--cases down,up]
        [--peers socat,tether,tether-base]

``socat`` is B1's ``socat2-b256k`` without ``fork`` (one connection per pair, so that /proc
sees the processes that copy); the ``tether`` peers are those of ``python -m benchmarks``
(``tether-base`` runs ``$TBENCH_BASE_SRC``, an A/B against another checkout). Peers run
interleaved, their order reversed every other run. Each line gives, as medians over the
runs, GB/s, the application's user and system time per GiB (the whole ``bulk`` process,
its interpreter's start-up included, the same for every peer), the backend's CPU (user +
system) per GiB, each relay's, server side first, and the chain's total (the median of each
run's sum, so not the sum of the medians); then each peer's GB/s over socat's per run, as
median (min-max).
Only the tether peers and ``pyrelay`` run as chains here: a peer that forks per connection
would be counted as its parent alone.

Loopback only; every transfer is bounded in size and every process is stopped after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.cpu_per_gib import _cpu_seconds, _socat_pair
from benchmarks.peers import PEERS, start_chain
from benchmarks.procs import REPO, Procs, child_env, endpoint, stop
from benchmarks.targets import ratio_text

CHAINS = {"tether", "pyrelay"}  # peers whose relays are long-lived processes of their own


def _transfer(entry: str, up: int, down: int) -> tuple[float, float, float]:
    """(seconds, user s, system s) of one ``bulk`` client moving ``up`` and ``down`` bytes."""
    proc = subprocess.Popen(
        endpoint("bulk", "--connect", entry, "--up", str(up), "--down", str(down), "--verify", "0"),
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=child_env(None),
    )
    assert proc.stdout is not None
    with proc.stdout:
        try:
            out = proc.stdout.read()
        except BaseException:
            proc.kill()
            raise
        finally:
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"bulk client exited with {proc.returncode}")
    seconds = float(json.loads(out.strip().splitlines()[-1])["seconds"])
    return seconds, usage.ru_utime, usage.ru_stime


def measure(
    peers: list[str], cases: list[str], size: int, runs: int
) -> dict[tuple[str, str], dict[str, list[float]]]:
    """For each (case, peer): per-run GB/s, the application's user and system s/GiB, the
    backend's CPU s/GiB and each relay's (``relay0`` the server side)."""
    gib = size / (1 << 30)
    rows: dict[tuple[str, str], dict[str, list[float]]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="tbench-chain-") as logdir,
        Procs(Path(logdir)) as procs,
    ):
        backend_proc, backend = procs.start_ready(
            endpoint("backend", "--listen", "127.0.0.1:0"), "backend"
        )
        relays: dict[str, list[int]] = {}
        entries: dict[str, str] = {}
        for name in peers:
            if name != "socat":
                first = len(procs.children)
                entries[name] = start_chain(PEERS[name], procs, backend)
                relays[name] = [proc.pid for proc in procs.children[first:]]
        for run in range(runs):
            for name in peers if run % 2 == 0 else peers[::-1]:
                for case in cases:
                    up, down = (size, 0) if case == "up" else (0, size)
                    chain: list[subprocess.Popen[bytes]] = []
                    if name == "socat":
                        chain, port = _socat_pair(int(backend.rsplit(":", 1)[1]))
                        entry, pids = f"127.0.0.1:{port}", [proc.pid for proc in chain]
                    else:
                        entry, pids = entries[name], relays[name]
                    pids = [backend_proc.pid, *pids]
                    try:
                        before = [_cpu_seconds(pid) for pid in pids]
                        seconds, user, system = _transfer(entry, up, down)
                        after = [_cpu_seconds(pid) for pid in pids]
                    finally:
                        for proc in reversed(chain):
                            stop(proc)
                    row = rows.setdefault((case, name), {})
                    row.setdefault("gbps", []).append(size / seconds / 1e9)
                    row.setdefault("app user", []).append(user / gib)
                    row.setdefault("app system", []).append(system / gib)
                    spent = [(a - b) / gib for b, a in zip(before, after, strict=True)]
                    row.setdefault("backend", []).append(spent[0])
                    for i, cpu in enumerate(spent[1:]):
                        row.setdefault(f"relay{i}", []).append(cpu)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, default=1 << 30)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--cases", default="down,up")
    parser.add_argument("--peers", default="socat,tether")
    args = parser.parse_args()
    peers = args.peers.split(",")
    cases = args.cases.split(",")
    unknown = [p for p in peers if p != "socat" and (p not in PEERS or PEERS[p].kind not in CHAINS)]
    if unknown or not set(cases) <= {"up", "down"}:
        parser.error(f"unknown peer or case (peers: socat, tether..., pyrelay): {unknown or cases}")
    rows = measure(peers, cases, args.bytes, args.runs)
    med = statistics.median
    for case in cases:
        for name in peers:
            row = rows[(case, name)]
            relays = [med(row[k]) for k in sorted(row) if k.startswith("relay")]
            total = med([sum(v) for v in zip(*(row[k] for k in row if k != "gbps"), strict=True)])
            print(
                f"{case} {name}: GB/s {med(row['gbps']):.2f}, application user"
                f" {med(row['app user']):.3f} system {med(row['app system']):.3f}, backend"
                f" {med(row['backend']):.3f}, relays"
                f" {' / '.join(f'{r:.3f}' for r in relays)}, chain {total:.3f} CPU s/GiB"
                f" (GB/s per run {[round(x, 2) for x in row['gbps']]})"
            )
        if "socat" in peers:
            for name in peers:
                if name != "socat":
                    ratios = [
                        a / b
                        for a, b in zip(
                            rows[(case, name)]["gbps"], rows[(case, "socat")]["gbps"], strict=True
                        )
                    ]
                    print(f"{case} {name} / socat GB/s per run: {ratio_text(ratios)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
