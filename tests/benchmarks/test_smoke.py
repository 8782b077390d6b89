"""The benchmark harness in its smallest mode, so that it cannot rot.

Runs ``python -m benchmarks --smoke`` for B1 and B2 with the direct and socat peers, and
tether (clear text and TLS) when its CLI is installed, then again with the stunnel peer
when stunnel4 is installed, and B6 (a gateway against HAProxy, idle sessions through a
gateway), with HAProxy when it is installed and once with it hidden, and checks only that
the results are well formed: no timing is asserted (issues 4, 8 and 11).
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
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(
    argv: list[str], timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run in a new process group, and stop the whole group if it overruns."""
    proc = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, env=env,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"{argv[2:6]} overran {timeout}s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _tether_help() -> str | None:
    exe = Path(sys.executable).parent / "tether"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tether"]
    try:
        out = subprocess.run([*cmd, "server", "--help"], capture_output=True, timeout=20, text=True)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def _tether_available() -> bool:
    return _tether_help() is not None


def _tether_has_tls() -> bool:
    return "--plaintext" in (_tether_help() or "")


def _smoke_b1_b2(tmp_path: Path, peers: list[str]) -> None:
    """Run B1 and B2 at smoke size with ``peers``; assert every peer's results are sane."""
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
        assert {r["case"] for r in runs} == {"up", "down", "both"}, peer
        for r in runs:
            assert r["intact"] is True
            assert r["bytes"] > 0 and r["seconds"] > 0 and math.isfinite(r["gbps"])
        for case in ("up", "down", "both"):
            assert b1["extra"]["verified"][f"{peer}/{case}"] is True
        (lat,) = [r for r in b2["runs"] if r["peer"] == peer]
        assert lat["n"] > 0 and 0 < lat["p50_us"] <= lat["p99_us"]
        assert len(b2["extra"]["cdf_us"][peer]) == 200


@pytest.mark.timeout(120)
def test_smoke_run_writes_well_formed_results(tmp_path: Path) -> None:
    peers = ["direct", "pyrelay2", "pyrelay2-framed"]  # a Python relay's floor (issue 12)
    if shutil.which("socat"):
        peers += ["socat1", "socat2", "socat2-b256k"]
    if _tether_available():
        peers += ["tether"]
        if _tether_has_tls():
            peers += ["tether-tls"]
    _smoke_b1_b2(tmp_path, peers)


@pytest.mark.timeout(120)
def test_smoke_run_with_stunnel(tmp_path: Path) -> None:
    """The TLS baseline: two stunnel processes (client and server mode), TLS 1.3."""
    if not (shutil.which("stunnel4") or shutil.which("stunnel")):
        pytest.skip("stunnel4 is not installed (apt-get install stunnel4)")
    peers = ["direct", "stunnel2"]
    if _tether_has_tls():
        peers += ["tether-tls"]
    _smoke_b1_b2(tmp_path, peers)


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


def _smoke_b6(tmp_path: Path, parts: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    out = _run(
        [
            sys.executable, "-m", "benchmarks", "--smoke", "--only", "B6", "--b6-parts", parts,
            "--out", str(tmp_path), "--no-docs",
        ],
        timeout=100,
        env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "latest.json").read_text())
    assert data["meta"]["scale"] == "smoke"
    b6: dict[str, Any] = data["benchmarks"]["B6"]
    assert b6["notes"] == [], (b6["notes"], out.stderr)
    return b6


def _check_paths(b6: dict[str, Any], paths: set[str]) -> None:
    runs = [r for r in b6["runs"] if r["part"] == "path"]
    assert {r["path"] for r in runs} == paths
    for r in runs:
        assert r["n"] == 50 and 0 < r["p50_us"] <= r["p99_us"], r
        assert r["mib_s"] > 0 and math.isfinite(r["mib_s"]), r


@pytest.mark.timeout(120)
def test_smoke_b6_gateway_against_haproxy(tmp_path: Path) -> None:
    """B6: one session direct, through ``tether gateway`` and through HAProxy; then idle
    sessions through a gateway to two servers, with TLS and in clear text; and its section
    of the report."""
    if not _tether_available():
        pytest.skip("the tether command does not work")
    b6 = _smoke_b6(tmp_path, "path,idle-tls,idle-plaintext")
    if shutil.which("haproxy"):
        assert b6["skipped"] == {}
        _check_paths(b6, {"direct", "gateway", "haproxy"})
    else:
        assert "not installed" in b6["skipped"]["haproxy"]
        _check_paths(b6, {"direct", "gateway"})
    for part in ("idle-tls", "idle-plaintext"):
        rows = [r for r in b6["runs"] if r["part"] == part]
        assert [r["sessions"] for r in rows] == [0, 10, 20], part
        for r in rows:
            for role in ("gateway", "server", "client"):
                assert r[f"{role}_rss_kib"] > 0 and r[f"{role}_cpu_pct"] >= 0, (part, r)
            assert r["rtt_n"] == 50 and 0 < r["rtt_p50_us"] <= r["rtt_p99_us"], (part, r)
            assert 0 < r["direct_p50_us"] <= r["direct_p99_us"], (part, r)
        extra = b6["extra"][part]
        assert extra["sessions"] == 20 and extra["probe_all_s"] > 0
        assert math.isfinite(extra["gateway_kib_per_session"])
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "benchmarks.md").write_text("# Benchmarks\n\n## B5 wire overhead\n\nx\n")
    out = subprocess.run(
        [sys.executable, "-c",
         "import sys; from pathlib import Path; from benchmarks.report import splice_b6; "
         "splice_b6(Path(sys.argv[1]), Path(sys.argv[2]))",
         str(tmp_path / "latest.json"), str(docs)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = (docs / "benchmarks.md").read_text()
    assert text.index("## B5 wire overhead") < text.index("## B6 a gateway in front")
    assert "| tether client -> `tether gateway` -> tether server |" in text
    assert "#### TLS 1.3 on both hops (as deployed)" in text


@pytest.mark.timeout(120)
def test_smoke_b6_without_haproxy(tmp_path: Path) -> None:
    """With no haproxy on PATH, B6 says why it skipped that path and measures the others."""
    if not _tether_available():
        pytest.skip("the tether command does not work")
    path = os.pathsep.join(
        d for d in os.environ.get("PATH", "").split(os.pathsep)
        if d and not (Path(d) / "haproxy").exists()
    )  # fmt: skip
    b6 = _smoke_b6(tmp_path, "path", env=dict(os.environ, PATH=path))
    assert b6["skipped"] == {"haproxy": "haproxy is not installed (apt-get install haproxy)"}
    _check_paths(b6, {"direct", "gateway"})


def test_session_memory_reports_both_ends(tmp_path: Path) -> None:
    """``benchmarks.session_memory`` in its smallest run: both tethers report traced bytes
    per session, by site and by type, and every session's objects are counted (a session
    and a link each, on each side)."""
    out = tmp_path / "memory.json"
    argv = [sys.executable, "-m", "benchmarks.session_memory", "--warm", "5", "--sessions", "20"]
    done = _run([*argv, "--settle", "0.2", "--json", str(out)], timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = json.loads(out.read_text())
    for name, relay in (("server", "_ServerSession"), ("client", "_ClientSession")):
        report = reports[name]
        assert report["traced"] > 0 and report["sites"], name
        counts = {type_name: count for _, count, type_name in report["types"]}
        assert counts.get(f"tether.aio.{name}.{relay}") == 1.0, (name, report["types"][:10])
        assert counts.get("tether.protocol.session.Session") == 1.0, name
        assert counts.get("tether.aio.link.LinkProtocol") == 1.0, name


@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed")
@pytest.mark.skipif(not _tether_available(), reason="the tether CLI is not installed")
def test_chain_cpu_reads_every_process(tmp_path: Path) -> None:
    """``benchmarks.chain_cpu`` in its smallest run: for each peer and case a line with the
    application's CPU, the backend's, one figure per relay (two) and the chain's total, and
    the ratio to socat; no figure is asserted beyond being a number."""
    argv = [sys.executable, "-m", "benchmarks.chain_cpu", "--runs", "1", "--bytes", "8388608"]
    done = _run([*argv, "--peers", "socat,tether"], timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for case in ("down", "up"):
        for peer in ("socat", "tether"):
            (line,) = [x for x in lines if x.startswith(f"{case} {peer}: GB/s ")]
            relays = line.split(" relays ", 1)[1].split(",", 1)[0].split(" / ")
            assert len(relays) == 2 and all(float(r) >= 0 for r in relays), line
            assert float(line.split(" backend ", 1)[1].split(",", 1)[0]) >= 0, line
            assert " chain " in line and "CPU s/GiB" in line, line
        (ratio,) = [x for x in lines if x.startswith(f"{case} tether / socat GB/s per run: ")]
        median, spread = ratio.rsplit(": ", 1)[1].split(" ", 1)
        assert float(median) > 0 and spread.startswith("(") and spread.endswith(")"), ratio
