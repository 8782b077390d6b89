"""``python -m benchmarks profile``: py-spy on tether client and server during bulk upload.

Starts a backend and a tether chain, runs 1 GiB uploads through it back to back (at most 50,
at most ``--seconds`` + 60 s) while ``py-spy record --native --format raw`` samples both
tether processes for ``--seconds``. Reports, per process: CPU use, minor page faults per GiB
moved (from /proc), and the top functions by self and by inclusive share of the samples
(py-spy leaves out samples where the thread sleeps in epoll). Writes results/profile.json,
the raw stacks under results/, and, with ``--peers``, profiles another tether variant
(for example ``tether-asyncio``).
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

from benchmarks.common import GiB, progress
from benchmarks.peers import PEERS, available, start_chain
from benchmarks.procs import PYTHON, HarnessError, Procs, endpoint, run_tool

TICK = 100


def proc_stat(pid: int) -> tuple[int, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7]), (int(fields[11]) + int(fields[12])) / TICK


def py_spy() -> str | None:
    exe = Path(PYTHON).parent / "py-spy"
    return str(exe) if exe.exists() else shutil.which("py-spy")


def parse_raw(path: Path) -> tuple[int, list[tuple[str, float]], list[tuple[str, float]]]:
    """Collapsed stacks -> (samples, top self, top inclusive) as percentages of samples."""
    self_c: Counter[str] = Counter()
    total_c: Counter[str] = Counter()
    samples = 0
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
        self_c[frames[-1]] += n
        for f in set(frames):
            total_c[f] += n
    if not samples:
        return 0, [], []

    def top(c: Counter[str]) -> list[tuple[str, float]]:
        return [(f, 100.0 * k / samples) for f, k in c.most_common(25)]

    return samples, top(self_c), top(total_c)


def pump(entry: str, stop: threading.Event, moved: list[int]) -> None:
    """1 GiB uploads back to back until ``stop`` (at most 50)."""
    for _ in range(50):
        if stop.is_set():
            return
        try:
            run_tool(endpoint("bulk", "--connect", entry, "--up", str(GiB)), 120)
        except HarnessError:
            return
        moved[0] += GiB


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
        + (f" --peers {args.peers}" if args.peers else ""),
        "description": "1 GiB uploads back to back through tether client and server on "
        f"loopback, `py-spy record --native --rate 200 --format raw` for {args.seconds:g} s "
        "on each process.",
        "roles": {},
    }
    for name in names:
        peer = PEERS[name]
        if why := available(peer):
            print(f"{name}: {why}")
            return 2
        with Procs(out / "logs" / "profile") as procs:
            _, backend = procs.start_ready(endpoint("backend"), "backend")
            entry = start_chain(peer, procs, backend)
            server, client = procs.children[-2], procs.children[-1]
            stop = threading.Event()
            moved = [0]

            before = {p.pid: proc_stat(p.pid) for p in (server, client)}
            t0 = time.monotonic()
            worker = threading.Thread(target=pump, args=(entry, stop, moved))
            worker.start()
            time.sleep(0.5)
            spies = {}
            for role, p in (("server", server), ("client", client)):
                raw = out / f"profile-{name}-{role}.txt"
                spies[role] = (
                    subprocess.Popen(
                        [spy, "record", "--native", "--rate", "200", "--format", "raw",
                         "--duration", str(int(args.seconds)), "--pid", str(p.pid),
                         "--output", str(raw), "--nonblocking"],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                        text=True,
                    ),
                    raw,
                    p.pid,
                )  # fmt: skip
            progress(f"profiling {name} for {args.seconds:g} s")
            for sp, _, _ in spies.values():
                sp.wait(args.seconds + 60)
            stop.set()
            worker.join(180)
            elapsed = time.monotonic() - t0
            for role, (sp, raw, pid) in spies.items():
                flt1, cpu1 = proc_stat(pid)
                flt0, cpu0 = before[pid]
                samples, top_self, top_total = parse_raw(raw) if raw.exists() else (0, [], [])
                doc["roles"][f"{name} {role}"] = {
                    "samples": samples,
                    "cpu_pct": 100 * (cpu1 - cpu0) / elapsed,
                    "minflt_per_gib": (flt1 - flt0) / max(1, moved[0] / GiB),
                    "gib_moved": moved[0] / GiB,
                    "self": top_self,
                    "total": top_total,
                    "py_spy_error": (sp.stderr.read()[-500:] if sp.stderr else "")
                    if not samples
                    else "",
                }
    (out / "profile.json").write_text(json.dumps(doc, indent=1))
    for role, data in doc["roles"].items():
        print(f"== {role}: {data['samples']} samples, {data['cpu_pct']:.0f}% CPU, "
              f"{data['minflt_per_gib']:.0f} minflt/GiB")  # fmt: skip
        for f, p in data["self"][:15]:
            print(f"  self {p:5.1f}%  {f}")
        for f, p in data["total"][:15]:
            print(f"  total {p:5.1f}%  {f}")
    return 0
