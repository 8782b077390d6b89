"""B4 scale on one server: idle memory and CPU per session, many active sessions, a storm.

All on loopback; the sessions come from one load-generator process (:mod:`benchmarks.swarm`)
through one ``tether client`` process to one ``tether server``. The reference is the same
chain built from two bare uvloop relays (:mod:`benchmarks.relay`), the floor any Python
relay with two sockets per session pays.

- idle: sessions opened in ten steps; server RSS read after each step (the slope of the
  least-squares line is the per-session cost); then ``idle_seconds`` of CPU time
  (utime+stime from /proc) with default keepalives; then a probe proves every session
  still carries data.
- active: ``active_sessions`` each move ``active_bytes / active_sessions`` bytes to a sink
  at once; aggregate throughput, interleaved with the peers.
- storm: ``storm_sessions`` stream numbered 64-byte messages every 0.5 s through an
  echo backend; every client<->server socket is destroyed at once with ``ss -K``; time
  from the kill until every session has echoed a probe sent right after it; then every
  byte sent must have come back once, in order.
"""

from __future__ import annotations

import os
import resource
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Result, Scale, progress, summary
from benchmarks.peers import PEERS, available, start_chain
from benchmarks.procs import PYTHON, HarnessError, Procs, raise_nofile, read_line

TICK = os.sysconf("SC_CLK_TCK")
STORM_INTERVAL = 0.5  # seconds between messages on each session during the storm


def swarm(*args: str) -> list[str]:
    return [PYTHON, "-m", "benchmarks.swarm", *args]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def command(proc: Any, line: str, timeout: float) -> list[str]:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    answer = read_line(proc, timeout).split()
    if not answer or answer[0] == "ERROR":
        raise HarnessError(f"load generator: {line!r} -> {' '.join(answer)}")
    return answer


def _chain(kind: str, procs: Procs, backend: str) -> tuple[str, int | None, int | None]:
    """Start a chain; return (entry, server-side pid, client-side pid)."""
    if kind == "direct":
        return backend, None, None
    if kind == "pyrelay":
        srv, s_addr = procs.start_ready(
            [PYTHON, "-m", "benchmarks.relay", "--target", backend], "relay-s", stdin=True
        )
        cli, c_addr = procs.start_ready(
            [PYTHON, "-m", "benchmarks.relay", "--target", s_addr], "relay-c", stdin=True
        )
        return c_addr, srv.pid, cli.pid
    # Every session comes from 127.0.0.1: lift the per-source cap (4096 by default).
    many = ("--max-sessions-per-source", str(2 * session_limit()))
    entry = start_chain(PEERS[kind], procs, backend, server_args=many)
    tether = [p for p in procs.children if "tether" in " ".join(p.args)]  # type: ignore[arg-type]
    return entry, tether[-2].pid, tether[-1].pid


def run_b4(
    scale: Scale,
    logdir: Path,
    kinds: list[str] | None = None,
    phases: tuple[str, ...] = ("idle", "active", "storm"),
    rounds: int = 1,
) -> Result:
    """``kinds``: the chains measured idle and active (default tether and pyrelay);
    ``phases``: which of idle, active, storm run; ``rounds``: idle measurements per
    kind, interleaved (an A/B of two checkouts: ``tether-base,tether``)."""
    kinds = kinds or ["tether", "pyrelay"]
    result = Result(
        "B4",
        "Scale on one server",
        config={
            "idle_sessions": scale.idle_sessions,
            "idle_seconds": scale.idle_seconds,
            "active_sessions": scale.active_sessions,
            "active_bytes": scale.active_bytes,
            "storm_sessions": scale.storm_sessions,
            "repeats": scale.repeats,
            "peers": {
                "tether": "tether client + server, defaults (keepalive 3 s)",
                "pyrelay": "two bare uvloop Protocol relays (benchmarks/relay.py)",
                "direct": "load generator straight to the backend",
            },
        },
    )
    for kind in list(kinds):
        if kind in PEERS and (why := available(PEERS[kind])):
            result.skipped[kind] = why
            kinds.remove(kind)
    for rnd in range(rounds if "idle" in phases else 0):
        for kind in kinds:
            try:
                _idle(kind, scale, logdir / "b4" / f"idle-{kind}-{rnd}", result)
            except (HarnessError, OSError) as exc:
                result.notes.append(f"idle {kind}: {exc}")
    try:
        if "active" in phases:
            _active([*kinds, "direct"], scale, logdir / "b4" / "active", result)
    except (HarnessError, OSError) as exc:
        result.notes.append(f"active: {exc}")
    if "tether" in kinds and "storm" in phases:
        try:
            _storm(scale, logdir / "b4" / "storm", result)
        except (HarnessError, OSError, subprocess.SubprocessError) as exc:
            result.notes.append(f"storm: {exc}")
    return result


def session_limit() -> int:
    """Sessions one relay process can hold: two descriptors each, under RLIMIT_NOFILE less
    what a tether server keeps in reserve (its FdGuard: 1/16 of the limit,
    tether.resources.default_fd_reserve; beyond that it refuses setups OVERLOADED) and
    64 for its listening sockets, logs and the like."""
    raise_nofile()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (soft - soft // 16 - 64) // 2


def _idle(kind: str, scale: Scale, logdir: Path, result: Result) -> None:
    n = min(scale.idle_sessions, session_limit())
    if n < scale.idle_sessions:
        note = (
            f"idle {kind}: {n} sessions instead of {scale.idle_sessions}: RLIMIT_NOFILE is "
            f"{resource.getrlimit(resource.RLIMIT_NOFILE)[0]} and cannot be raised here (no "
            "CAP_SYS_RESOURCE), and each session holds two descriptors in each relay process; "
            "per-session figures are slopes, CPU is also given scaled to the full count"
        )
        if note not in result.notes:
            result.notes.append(note)
    with Procs(logdir) as procs:
        _, backend = procs.start_ready(swarm("backend", "--mode", "echo"), "echo-backend")
        entry, spid, cpid = _chain(kind, procs, backend)
        assert spid is not None and cpid is not None
        load, _ = procs.start_ready(swarm("load", "--connect", entry), "load", stdin=True)
        time.sleep(0.5)
        curve = [(0, rss_kib(spid), rss_kib(cpid))]
        steps = 10
        for i in range(steps):
            k = n // steps + (1 if i < n % steps else 0)
            progress(f"B4 idle {kind}: opening {k} more sessions")
            command(load, f"open {k}", 300)
            time.sleep(0.5)
            curve.append((curve[-1][0] + k, rss_kib(spid), rss_kib(cpid)))
        time.sleep(3.0)
        s0, c0, t0 = cpu_seconds(spid), cpu_seconds(cpid), time.monotonic()
        time.sleep(scale.idle_seconds)
        s1, c1, t1 = cpu_seconds(spid), cpu_seconds(cpid), time.monotonic()
        probe = float(command(load, "probe", 120)[1])
        final = (rss_kib(spid), rss_kib(cpid))
    xs = [c[0] for c in curve]
    slope_s = _slope(xs, [c[1] for c in curve])
    slope_c = _slope(xs, [c[2] for c in curve])
    result.runs.append(
        {
            "phase": "idle",
            "peer": kind,
            "sessions": n,
            "rss_curve_kib": curve,
            "server_kib_per_session": slope_s,
            "client_kib_per_session": slope_c,
            "server_kib_per_session_delta": (curve[-1][1] - curve[0][1]) / n,
            "server_rss_kib": final[0],
            "client_rss_kib": final[1],
            "idle_seconds": t1 - t0,
            "server_cpu_pct": 100 * (s1 - s0) / (t1 - t0),
            "server_cpu_pct_scaled": 100 * (s1 - s0) / (t1 - t0) * scale.idle_sessions / n,
            "sessions_wanted": scale.idle_sessions,
            "client_cpu_pct": 100 * (c1 - c0) / (t1 - t0),
            "probe_all_s": probe,
        }
    )


def _slope(xs: list[int], ys: list[int]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def _active(kinds: list[str], scale: Scale, logdir: Path, result: Result) -> None:
    n = scale.active_sessions
    per = max(1, scale.active_bytes // n)
    with Procs(logdir) as procs:
        _, backend = procs.start_ready(
            swarm("backend", "--mode", "sink", "--expect", str(per)), "sink-backend"
        )
        loads = {}
        for kind in kinds:
            entry, _, _ = _chain(kind, procs, backend)
            loads[kind], _ = procs.start_ready(
                swarm("load", "--connect", entry, "--sink"), "load", stdin=True
            )
            command(loads[kind], f"open {n}", 300)
        for rep in range(scale.repeats):
            for kind, load in loads.items():
                progress(f"B4 active {kind} repeat {rep}")
                ans = command(load, f"bulk {per}", 600)
                secs, total = float(ans[1]), int(ans[2])
                result.runs.append(
                    {
                        "phase": "active",
                        "peer": kind,
                        "repeat": rep,
                        "sessions": n,
                        "seconds": secs,
                        "bytes": total,
                        "gbps": total / secs / 1e9,
                    }
                )


def _storm(scale: Scale, logdir: Path, result: Result) -> None:
    n = scale.storm_sessions
    trials = max(1, min(3, scale.repeats))
    with Procs(logdir) as procs:
        _, backend = procs.start_ready(swarm("backend", "--mode", "echo"), "echo-backend")
        entry, _, _ = _chain("tether", procs, backend)
        server_addr = _tether_server_addr(procs)
        port = server_addr.rpartition(":")[2]
        load, _ = procs.start_ready(swarm("load", "--connect", entry), "load", stdin=True)
        command(load, f"open {n}", 300)
        for trial in range(trials):
            progress(f"B4 storm trial {trial}")
            command(load, f"stream on {STORM_INTERVAL}", 30)
            time.sleep(2.0)
            t_kill = time.monotonic()
            killed = subprocess.run(
                [
                    "ss",
                    "-K",
                    "-tn",
                    "state",
                    "established",
                    f"( dport = :{port} or sport = :{port} )",
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            t_killed = time.monotonic()
            probe = command(load, "probe", 120)
            t_all = time.monotonic()
            time.sleep(1.0)
            sent, received, bad, lost = (int(x) for x in command(load, "stream off", 60)[1:5])
            result.runs.append(
                {
                    "phase": "storm",
                    "peer": "tether",
                    "trial": trial,
                    "sessions": n,
                    "sockets_killed": max(0, len(killed.stdout.splitlines()) - 1),
                    "kill_seconds": t_killed - t_kill,
                    "all_resumed_s": t_all - t_kill,
                    "probe_s": float(probe[1]),
                    "bytes_sent": sent,
                    "bytes_echoed": received,
                    "bytes_bad": bad,
                    "connections_lost": lost,
                    "zero_loss": sent == received and bad == 0 and lost == 0,
                }
            )
            time.sleep(1.0)


def _tether_server_addr(procs: Procs) -> str:
    for proc in procs.children:
        args = list(proc.args)  # type: ignore[arg-type]
        if "client" in args and "--server" in args:
            return str(args[args.index("--server") + 1])
    raise HarnessError("no tether client found")


def summarize(result: Result) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in result.runs:
        if r["phase"] == "active":
            out.setdefault(f"active/{r['peer']}", []).append(r["gbps"])
    return {k: summary(v) for k, v in out.items()}
