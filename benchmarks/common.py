"""What every benchmark shares: the run settings, statistics and the result record."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.procs import REPO

MiB = 1024 * 1024
GiB = 1024 * MiB


@dataclass(frozen=True)
class Scale:
    """How big each benchmark is; ``full`` is what the issue asks for."""

    name: str
    repeats: int
    bulk_bytes: int
    rtt_count: int
    resume_trials: int
    resume_cut: float
    idle_sessions: int
    idle_seconds: float
    active_sessions: int
    active_bytes: int
    storm_sessions: int
    overhead_bytes: int
    keepalive_sessions: int
    keepalive_seconds: float
    gateway_sessions: tuple[int, ...]  # B6: idle sessions through one gateway, step by step
    gateway_idle_seconds: float  # B6: CPU measured over this long at each step


SCALES = {
    "full": Scale(
        "full",
        repeats=5,
        bulk_bytes=GiB,
        rtt_count=20000,
        resume_trials=20,
        resume_cut=10.0,
        idle_sessions=10000,
        idle_seconds=60.0,
        active_sessions=1000,
        active_bytes=GiB,
        storm_sessions=2000,
        overhead_bytes=256 * MiB,
        keepalive_sessions=100,
        keepalive_seconds=60.0,
        gateway_sessions=(2000, 5000, 10000),
        gateway_idle_seconds=30.0,
    ),
    "quick": Scale(
        "quick",
        repeats=3,
        bulk_bytes=256 * MiB,
        rtt_count=5000,
        resume_trials=5,
        resume_cut=8.0,
        idle_sessions=2000,
        idle_seconds=15.0,
        active_sessions=200,
        active_bytes=256 * MiB,
        storm_sessions=500,
        overhead_bytes=64 * MiB,
        keepalive_sessions=20,
        keepalive_seconds=15.0,
        gateway_sessions=(1000, 2000),
        gateway_idle_seconds=10.0,
    ),
    "smoke": Scale(
        "smoke",
        repeats=1,
        bulk_bytes=4 * MiB,
        rtt_count=50,
        resume_trials=1,
        resume_cut=1.0,
        idle_sessions=20,
        idle_seconds=1.0,
        active_sessions=4,
        active_bytes=4 * MiB,
        storm_sessions=4,
        overhead_bytes=4 * MiB,
        keepalive_sessions=2,
        keepalive_seconds=1.0,
        gateway_sessions=(10, 20),
        gateway_idle_seconds=1.0,
    ),
}


@dataclass
class Result:
    """One benchmark's record, written as JSON."""

    id: str
    title: str
    config: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "config": self.config,
            "runs": self.runs,
            "skipped": self.skipped,
            "notes": self.notes,
            "extra": self.extra,
            "meta": self.meta,
        }


def progress(text: str) -> None:
    """One line on stderr, so a slow or stuck step can be told from the log."""
    print(f"   {time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def fmt(x: float | None, digits: int = 2) -> str:
    """A figure for a table: ``digits`` decimals, "-" for none."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    if not values:
        return math.nan
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100.0 * len(s)) - 1))
    return s[k]


def summary(values: list[float]) -> dict[str, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"median": percentile(vals, 50), "min": min(vals), "max": max(vals), "n": len(vals)}


def machine_meta(command: list[str]) -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except OSError:
            return ""

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import uvloop

        uv = uvloop.__version__
    except ImportError:
        uv = None
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(command),
        "commit": git("rev-parse", "--short", "HEAD"),
        "src_commit": git("log", "-1", "--format=%h", "--", "src"),
        "dirty_src": bool(git("status", "--porcelain", "--", "src")),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": uv,
    }


def load_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data
