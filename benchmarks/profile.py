"""``python -m benchmarks profile``: py-spy on tether client and server during bulk upload.

Starts a backend and a tether chain, runs 1 GiB uploads through it back to back (at most 50,
at most ``--seconds`` + 60 s) while ``py-spy record --native --format raw`` samples both
tether processes for ``--seconds``. Reports, per process: CPU use, minor page faults per GiB
moved (from /proc), and the top functions by self and by inclusive share of the samples
(py-spy leaves out samples where the thread sleeps in epoll). Writes results/profile.json,
the raw stacks under results/. ``--peers`` picks the chains: tether variants are sampled
with py-spy; for any chain (socat too) the CPU seconds of all its processes (reaped
children included) per GiB or per million round trips are reported, which is what decides
throughput when four busy processes share two cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.common import GiB, machine_meta, progress
from benchmarks.peers import PEERS, available, start_chain
from benchmarks.procs import PYTHON, HarnessError, Procs, endpoint, run_tool
from benchmarks.scale import command, session_limit, swarm

TICK = 100


def proc_stat(pid: int) -> tuple[int, float]:
    """(minor faults, CPU seconds) of a process and its reaped children (socat forks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    faults = int(fields[7]) + int(fields[8])
    return faults, sum(int(f) for f in fields[11:15]) / TICK


def py_spy() -> str | None:
    exe = Path(PYTHON).parent / "py-spy"
    return str(exe) if exe.exists() else shutil.which("py-spy")


IDLE = ("epoll_wait", "epoll_pwait")


def parse_raw(
    path: Path,
) -> tuple[int, int, list[tuple[str, float]], list[tuple[str, float]]]:
    """Collapsed stacks -> (samples, idle samples, top self, top inclusive).

    Percentages are of the busy samples: those whose innermost frame is not the event
    loop waiting in epoll (py-spy --native samples idle threads too).
    """
    self_c: Counter[str] = Counter()
    total_c: Counter[str] = Counter()
    samples = 0
    idle = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [f for f in stack.split(";") if f]
        if frames and frames[0].startswith("process "):
            frames = frames[1:]
        if frames and frames[0].startswith("thread "):
            frames = frames[1:]
        if not frames:
            continue
        if frames[-1].startswith(IDLE):
            idle += n
            continue
        self_c[frames[-1]] += n
        for f in set(frames):
            total_c[f] += n
    busy = samples - idle
    if not busy:
        return samples, idle, [], []

    def top(c: Counter[str]) -> list[tuple[str, float]]:
        return [(f, 100.0 * k / busy) for f, k in c.most_common(25)]

    return samples, idle, top(self_c), top(total_c)


def pump(entry: str, stop: threading.Event, moved: list[int], workload: str) -> None:
    """1 GiB uploads (or 20,000 64-byte round trips) back to back until ``stop``; at most 50."""
    if workload == "idle":
        stop.wait(600)
        return
    for _ in range(50):
        if stop.is_set():
            return
        try:
            if workload == "bulk":
                run_tool(endpoint("bulk", "--connect", entry, "--up", str(GiB)), 120)
            else:
                run_tool(endpoint("rtt", "--connect", entry, "--count", "20000"), 120)
        except HarnessError:
            return
        moved[0] += GiB if workload == "bulk" else 20000


def run_profile(args: argparse.Namespace) -> int:
    spy = py_spy()
    if spy is None:
        print("py-spy is not installed (pip install py-spy)")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.peers.split(",") if args.peers else ["tether"]
    doc: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": f"python -m benchmarks profile --seconds {args.seconds:g}"
        + (f" --peers {args.peers}" if args.peers else "")
        + (f" --workload {args.workload}" if args.workload != "bulk" else "")
        + (f" --sessions {args.sessions}" if args.workload == "idle" else ""),
        **{k: v for k, v in machine_meta([]).items() if k in ("commit", "src_commit", "dirty_src")},
        "workload": args.workload,
        "description": {
            "bulk": "1 GiB uploads back to back",
            "rtt": "runs of 20,000 64-byte round trips back to back",
            "idle": f"{args.sessions} idle sessions (default keepalive)",
        }[args.workload]
        + " through tether client and server on loopback, `py-spy record --native --rate 100 "
        f"--format raw` for {args.seconds:g} s on each process.",
        "roles": {},
    }
    for name in names:
        peer = PEERS[name]
        if why := available(peer):
            print(f"{name}: {why}")
            return 2
        with Procs(out / "logs" / "profile") as procs:
            if args.workload == "idle":
                _, backend = procs.start_ready(swarm("backend", "--mode", "echo"), "backend")
            else:
                _, backend = procs.start_ready(endpoint("backend"), "backend")
            first = len(procs.children)
            many = ("--max-sessions-per-source", str(2 * session_limit()))  # all from 127.0.0.1
            entry = start_chain(
                peer, procs, backend, server_args=many if peer.kind == "tether" else ()
            )
            chain = procs.children[first:]
            server, client = chain[0], chain[-1]
            if args.workload == "idle":
                load, _ = procs.start_ready(swarm("load", "--connect", entry), "load", stdin=True)
                n = min(args.sessions, session_limit())
                command(load, f"open {n}", 300)
                time.sleep(3.0)
            stop = threading.Event()
            moved = [0]

            before = {p.pid: proc_stat(p.pid) for p in chain}
            t0 = time.monotonic()
            worker = threading.Thread(target=pump, args=(entry, stop, moved, args.workload))
            worker.start()
            time.sleep(0.5)
            spies = {}
            roles = (("server", server), ("client", client)) if peer.kind == "tether" else ()
            for role, p in roles:
                raw = out / f"profile-{name}-{args.workload}-{role}.txt"
                spies[role] = (
                    subprocess.Popen(
                        [spy, "record", "--native", "--rate", "100", "--format", "raw",
                         "--duration", str(int(args.seconds)), "--pid", str(p.pid),
                         "--output", str(raw)],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                        text=True,
                    ),
                    raw,
                    p.pid,
                )  # fmt: skip
            progress(f"profiling {name} for {args.seconds:g} s")
            if not spies:
                time.sleep(args.seconds)
            for sp, _, _ in spies.values():
                sp.wait(args.seconds + 60)
            stop.set()
            worker.join(180)
            time.sleep(0.5)  # socat reaps its per-connection children
            elapsed = time.monotonic() - t0
            per = {"bulk": moved[0] / GiB, "rtt": moved[0] / 1e6}.get(args.workload, 1.0)
            cpu_chain = sum(proc_stat(p.pid)[1] - before[p.pid][1] for p in chain)
            doc.setdefault("chains", {})[name] = {
                "processes": len(chain),
                "cpu_seconds": cpu_chain,
                "moved": moved[0],
                "cpu_s_per_unit": cpu_chain / max(1e-9, per),
            }
            for role, (sp, raw, pid) in spies.items():
                flt1, cpu1 = proc_stat(pid)
                flt0, cpu0 = before[pid]
                samples, idle, top_self, top_total = (
                    parse_raw(raw) if raw.exists() else (0, 0, [], [])
                )
                doc["roles"][f"{name} {role}"] = {
                    "samples": samples,
                    "idle_samples": idle,
                    "cpu_s_per_unit": (cpu1 - cpu0) / max(1e-9, per),
                    "cpu_pct": 100 * (cpu1 - cpu0) / elapsed,
                    "minflt_per_unit": (flt1 - flt0) / max(1e-9, per),
                    "unit": {"bulk": "GiB", "rtt": "million round trips"}.get(
                        args.workload, f"{args.seconds:g} s"
                    ),
                    "moved": moved[0],
                    "self": top_self,
                    "total": top_total,
                    "py_spy_error": (sp.stderr.read()[-500:] if sp.stderr else "")
                    if not samples
                    else "",
                }
    suffix = "" if args.workload == "bulk" else f"-{args.workload}"
    (out / f"profile{suffix}.json").write_text(json.dumps(doc, indent=1))
    for name, data in doc.get("chains", {}).items():
        print(f"== chain {name}: {data['cpu_s_per_unit']:.3f} CPU s per unit")
    for role, data in doc["roles"].items():
        print(f"== {role}: {data['samples']} samples, {data['cpu_pct']:.0f}% CPU, "
              f"{data['cpu_s_per_unit']:.3f} CPU s and "
              f"{data['minflt_per_unit']:.0f} minflt per {data['unit']}")  # fmt: skip
        for f, p in data["self"][:15]:
            print(f"  self {p:5.1f}%  {f}")
        for f, p in data["total"][:15]:
            print(f"  total {p:5.1f}%  {f}")
    return 0
