"""The benchmark harness in its smallest mode, so that it cannot rot.

Runs ``python -m benchmarks --smoke`` for B1 and B2 with the direct and socat peers, and
tether when its CLI is installed, and checks only that the results are well formed: no
timing is asserted (issue 4).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run in a new process group, and stop the whole group if it overruns."""
    proc = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"{argv[2:6]} overran {timeout}s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _tether_available() -> bool:
    exe = Path(sys.executable).parent / "tether"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tether"]
    try:
        out = subprocess.run([*cmd, "server", "--help"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


@pytest.mark.timeout(120)
def test_smoke_run_writes_well_formed_results(tmp_path: Path) -> None:
    peers = ["direct"]
    if shutil.which("socat"):
        peers += ["socat1", "socat2", "socat2-b256k"]
    if _tether_available():
        peers += ["tether"]
    out = _run(
        [
            sys.executable, "-m", "benchmarks", "--smoke", "--only", "B1,B2",
            "--peers", ",".join(peers), "--out", str(tmp_path), "--no-docs",
        ],
        timeout=90,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "latest.json").read_text())
    assert data["meta"]["scale"] == "smoke"
    b1, b2 = data["benchmarks"]["B1"], data["benchmarks"]["B2"]
    assert b1["skipped"] == {} and b2["skipped"] == {}, (b1["skipped"], b2["skipped"])
    assert b1["notes"] == [] and b2["notes"] == [], (b1["notes"], b2["notes"], out.stderr)
    for peer in peers:
        runs = [r for r in b1["runs"] if r["peer"] == peer]
        assert {r["case"] for r in runs} == {"up", "down", "both"}
        for r in runs:
            assert r["intact"] is True
            assert r["bytes"] > 0 and r["seconds"] > 0 and math.isfinite(r["gbps"])
        for case in ("up", "down", "both"):
            assert b1["extra"]["verified"][f"{peer}/{case}"] is True
        (lat,) = [r for r in b2["runs"] if r["peer"] == peer]
        assert lat["n"] > 0 and 0 < lat["p50_us"] <= lat["p99_us"]
        assert len(b2["extra"]["cdf_us"][peer]) == 200


def test_report_renders_from_smoke_results(tmp_path: Path) -> None:
    """The docs generator accepts a results file and writes a markdown page."""
    results = tmp_path / "latest.json"
    out = _run(
        [
            sys.executable, "-m", "benchmarks", "--smoke", "--only", "B1",
            "--peers", "direct", "--out", str(tmp_path), "--no-docs",
        ],
        timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    docs = tmp_path / "docs"
    out = subprocess.run(
        [sys.executable, "-c",
         "import sys; from pathlib import Path; from benchmarks.report import write_docs; "
         "write_docs(Path(sys.argv[1]), Path(sys.argv[2]), plots=False)",
         str(results), str(docs)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = (docs / "benchmarks.md").read_text()
    assert "B1" in text and "| direct" in text
