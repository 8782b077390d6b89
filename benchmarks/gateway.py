"""B6 a gateway in front of tether servers: what the hop costs one session, against HAProxy
in the same place, and how many idle sessions one gateway carries. On loopback; every process
of a run shares the machine's cores.

- ``path``: one session's bulk throughput (backend to application, ``bulk_bytes`` per run) and
  ``rtt_count`` 64-byte round trips (after 200 warm-up), through three paths to the same
  routed server, all TLS 1.3, each client pinning the certificate it reaches:

  - ``direct``: tether client -> tether server;
  - ``gateway``: tether client -> ``tether gateway`` -> tether server (TLS on both hops);
  - ``haproxy``: tether client -> HAProxy with deploy/haproxy/haproxy.cfg (it ends the
    client's TLS and speaks TLS to the server, as shipped) -> tether server.

  Each repeat visits the paths in turn (direct, gateway, haproxy, direct, ...) so that drift
  on a shared machine falls on all of them alike; the report takes its ratios per repeat.
  Without ``haproxy`` installed that path is skipped with the reason, and the others run.
- ``idle-tls``, ``idle-plaintext``: sessions from one load generator
  (:mod:`benchmarks.swarm`) through one tether client and one gateway to two servers (ids 1
  and 2, one routing key) and an echo backend, opened in steps up to each count in
  ``gateway_sessions``. At the start and after each step: the RSS of every tether process,
  their CPU (utime + stime from /proc) over ``gateway_idle_seconds`` with the default
  keepalive, and 64-byte round trips on one more session while the others sit idle (and
  straight to the echo backend just before, the reference); at the end a probe through
  every session. ``idle-tls`` has TLS on both hops (as deployed);
  ``idle-plaintext`` clear text on both (``--plaintext``, ``--server-plaintext``), as B4
  measures a server without a gateway.
"""

from __future__ import annotations

import base64
import json
import os
import re
import resource
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import MiB, Result, Scale, percentile, progress
from benchmarks.procs import (
    REPO,
    HarnessError,
    Procs,
    endpoint,
    free_port,
    run_tool,
    tether_command,
    wait_listening,
)
from benchmarks.scale import TICK, _slope, command, cpu_seconds, rss_kib, session_limit, swarm
from tether import tls

__all__ = ["PARTS", "haproxy_config", "run_b6"]

PARTS = ("path", "idle-tls", "idle-plaintext")
IDLE_SERVERS = 2  # servers behind the gateway in the idle parts
IDLE_RTT_COUNT = 5000  # round trips per step in the idle parts (at most)
SETTLE_SECONDS = 3.0  # after opening sessions, before reading RSS and CPU


@dataclass
class _Site:
    """Servers behind one gateway, with the routing key and identity they share."""

    key_file: Path
    identity: tls.ServerIdentity
    servers: list[str]
    server_pids: list[int]
    gateway: str
    gateway_pid: int


def _start_site(
    procs: Procs,
    tether: list[str],
    tmp: Path,
    backend: str,
    servers: int,
    plaintext: bool,
    server_args: tuple[str, ...] = (),
) -> _Site:
    key_file = tmp / "routing.key"
    if not key_file.exists():
        key_file.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
        key_file.chmod(0o600)
    identity, _ = tls.load_or_create_identity(tmp / "server")
    clear = ["--plaintext"] if plaintext else []
    addrs, pids = [], []
    for sid in range(1, servers + 1):
        proc, addr = procs.start_ready(
            [*tether, "server", "--listen", "127.0.0.1:0", "--backend", backend,
             "--state-dir", str(tmp / "server"), "--server-id", str(sid),
             "--routing-key-file", str(key_file), *clear, *server_args],
            f"server{sid}")  # fmt: skip
        addrs.append(addr)
        pids.append(proc.pid)
    to_servers = (
        ["--plaintext", "--server-plaintext"]
        if plaintext
        else ["--server-fingerprint", identity.fingerprint, "--state-dir", str(tmp / "server")]
    )
    gw, gateway = procs.start_ready(
        [*tether, "gateway", "--listen", "127.0.0.1:0",
         *(f"--server={sid}={a}" for sid, a in enumerate(addrs, 1)),
         "--routing-key-file", str(key_file), *to_servers], "gateway")  # fmt: skip
    return _Site(key_file, identity, addrs, pids, gateway, gw.pid)


def _client(
    procs: Procs, tether: list[str], front: str, site: _Site, plaintext: bool, name: str
) -> tuple[int, str]:
    trust = ["--plaintext"] if plaintext else ["--server-fingerprint", site.identity.fingerprint]
    proc, entry = procs.start_ready(
        [*tether, "client", "--listen", "127.0.0.1:0", "--server", front, *trust,
         "--require-reliability"], name)  # fmt: skip
    return proc.pid, entry


def haproxy_config(
    tmp: Path, port: int, servers: list[str], key: str, identity: tls.ServerIdentity
) -> Path:
    """deploy/haproxy/haproxy.cfg with loopback addresses, this run's key and certificate
    (clients and HAProxy's health checks trust the servers' self-signed one), and
    ``servers`` as s1, s2, ... (at most the two the shipped file names)."""
    front = tmp / "front.pem"
    front.write_bytes(identity.cert_path.read_bytes() + identity.key_path.read_bytes())
    front.chmod(0o600)
    text = (REPO / "deploy" / "haproxy" / "haproxy.cfg").read_text()
    text = text.replace("bind :443 ", f"bind 127.0.0.1:{port} ")
    text = text.replace("/etc/tether/gateway.pem", str(front))
    text = text.replace("/etc/tether/servers-ca.pem", str(identity.cert_path))
    text = text.replace("ROUTING_KEY_BASE64", key)
    text = text.replace("maxconn 100000", "maxconn 4096")
    for sid in (1, 2):
        if sid <= len(servers):
            text = re.sub(rf"(?m)^(\s+)server s{sid} \S+", rf"\1server s{sid} {servers[sid - 1]}",
                          text)  # fmt: skip
        else:
            text = re.sub(rf"(?m)^\s+server s{sid} \S+\n", "", text)
            text = re.sub(rf"(?m)^\s+use-server s{sid} .*\n", "", text)
    path = tmp / "haproxy.cfg"
    path.write_text(text)
    return path


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, every core (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    return (total - fields[3] - fields[4]) / TICK, total / TICK


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def haproxy_version(haproxy: str) -> str:
    try:
        out = subprocess.run([haproxy, "-v"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    m = re.search(r"version (\S+)", out.stdout)
    return m.group(1) if m else "?"


def run_b6(scale: Scale, logdir: Path, parts: tuple[str, ...] = PARTS) -> Result:
    limit = session_limit()
    result = Result(
        "B6",
        "A gateway in front",
        config={
            "parts": list(parts),
            "bytes": scale.bulk_bytes,
            "count": scale.rtt_count,
            "repeats": scale.repeats,
            "idle_sessions": list(scale.gateway_sessions),
            "idle_seconds": scale.gateway_idle_seconds,
            "idle_servers": IDLE_SERVERS,
            "idle_rtt_count": min(scale.rtt_count, IDLE_RTT_COUNT),
            "settle_seconds": min(SETTLE_SECONDS, scale.gateway_idle_seconds),
            "nofile": limit * 2 + 64,
        },
    )
    tether = tether_command()
    if tether is None:
        result.skipped["tether"] = "the tether command does not work"
        return result
    haproxy = shutil.which("haproxy")
    if haproxy is not None:
        result.config["haproxy"] = haproxy_version(haproxy)
    for part in parts:
        tmp = Path(tempfile.mkdtemp(prefix="tbench-gw-"))
        try:
            if part == "path":
                _paths(scale, logdir / "b6" / "path", result, tether, tmp, haproxy)
            elif part in ("idle-tls", "idle-plaintext"):
                _idle(part, scale, logdir / "b6" / part, result, tether, tmp, limit)
            else:
                raise HarnessError(f"unknown B6 part {part!r}; known: {', '.join(PARTS)}")
        except (HarnessError, OSError, ValueError) as exc:
            result.notes.append(f"{part}: {exc}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def _paths(
    scale: Scale,
    logdir: Path,
    result: Result,
    tether: list[str],
    tmp: Path,
    haproxy: str | None,
) -> None:
    size, count = scale.bulk_bytes, scale.rtt_count
    with Procs(logdir) as procs:
        _, backend = procs.start_ready(endpoint("backend", "--listen", "127.0.0.1:0"), "backend")
        site = _start_site(procs, tether, tmp, backend, 1, plaintext=False)
        fronts = {"direct": site.servers[0], "gateway": site.gateway}
        if haproxy is None:
            result.skipped["haproxy"] = "haproxy is not installed (apt-get install haproxy)"
        else:
            port = free_port()
            key = site.key_file.read_text().strip()
            config = haproxy_config(tmp, port, site.servers, key, site.identity)
            procs.spawn([haproxy, "-db", "-f", str(config)], "haproxy")
            wait_listening(port)
            fronts["haproxy"] = f"127.0.0.1:{port}"
        entries = {
            name: _client(procs, tether, front, site, False, f"client-{name}")[1]
            for name, front in fronts.items()  # one client per path: its own sessions
        }
        for repeat in range(scale.repeats):
            for name, entry in entries.items():
                progress(f"B6 path {name} repeat {repeat} (load average {loadavg():.2f})")
                load1 = loadavg()
                bulk = json.loads(
                    run_tool(
                        endpoint("bulk", "--connect", entry, "--down", str(size), "--verify", "1"),
                        timeout=120 + size / MiB,
                    ).splitlines()[-1]
                )
                if not bulk.get("intact"):
                    raise HarnessError(f"B6 {name}: bulk run not intact: {bulk}")
                rtt = json.loads(
                    run_tool(
                        endpoint("rtt", "--connect", entry, "--count", str(count)),
                        timeout=60 + count * 0.01,
                    ).splitlines()[-1]
                )
                rtts = [x / 1000.0 for x in rtt["rtt_ns"]]
                result.runs.append(
                    {
                        "part": "path",
                        "path": name,
                        "repeat": repeat,
                        "bytes": size,
                        "seconds": bulk["seconds"],
                        "mib_s": size / MiB / bulk["seconds"],
                        "n": len(rtts),
                        "p50_us": percentile(rtts, 50),
                        "p99_us": percentile(rtts, 99),
                        "loadavg": load1,
                    }
                )


def _idle(
    part: str,
    scale: Scale,
    logdir: Path,
    result: Result,
    tether: list[str],
    tmp: Path,
    limit: int,
) -> None:
    plaintext = part == "idle-plaintext"
    # One descriptor per session in the load generator and the backend, two in the client
    # and the gateway (and one more session for the round trips).
    counts = sorted({min(n, limit - 1) for n in scale.gateway_sessions})
    if counts[-1] < max(scale.gateway_sessions):
        note = (
            f"{part}: at most {counts[-1]} sessions instead of {max(scale.gateway_sessions)}: "
            f"RLIMIT_NOFILE is {resource.getrlimit(resource.RLIMIT_NOFILE)[0]} here and cannot "
            "be raised, the gateway and the client hold two descriptors per session, and a "
            "tether process keeps 1/16 of its descriptors in reserve (scale.session_limit)"
        )
        result.notes.append(note)
    rtt_count = min(scale.rtt_count, IDLE_RTT_COUNT)
    many = ("--max-sessions-per-source", str(2 * limit))  # every session comes from 127.0.0.1
    with Procs(logdir) as procs:
        _, backend = procs.start_ready(swarm("backend", "--mode", "echo"), "echo-backend")
        site = _start_site(procs, tether, tmp, backend, IDLE_SERVERS, plaintext, many)
        cpid, entry = _client(procs, tether, site.gateway, site, plaintext, "client")
        load, _ = procs.start_ready(swarm("load", "--connect", entry), "load", stdin=True)
        pids = {"gateway": [site.gateway_pid], "server": site.server_pids, "client": [cpid]}
        opened = 0
        for target in [0, *counts]:
            open_s = 0.0
            if target > opened:
                progress(f"B6 {part}: opening {target - opened} more sessions")
                answer = command(load, f"open {target - opened}", 900)
                opened, open_s = int(answer[1]), float(answer[2])
            time.sleep(min(SETTLE_SECONDS, scale.gateway_idle_seconds))
            row: dict[str, Any] = {"part": part, "sessions": opened, "open_s": open_s}
            for role, ps in pids.items():
                row[f"{role}_rss_kib"] = sum(rss_kib(p) for p in ps)
            before = {role: sum(cpu_seconds(p) for p in ps) for role, ps in pids.items()}
            busy0, _ = machine_busy()
            t0 = time.monotonic()
            time.sleep(scale.gateway_idle_seconds)
            elapsed = time.monotonic() - t0
            ours = 0.0
            for role, ps in pids.items():
                used = sum(cpu_seconds(p) for p in ps) - before[role]
                row[f"{role}_cpu_pct"] = 100 * used / elapsed
                ours += used
            # Everything else the machine did meanwhile (other jobs, the load generator,
            # the backend), in cores: how loaded the shared machine was.
            row["others_cores"] = (machine_busy()[0] - busy0 - ours) / elapsed
            row["loadavg"] = loadavg()
            row["idle_seconds"] = elapsed
            # Straight to the echo backend, then through the chain, back to back: the
            # chain's added latency is the difference (as B2's, over direct).
            ref = command(load, f"rtt {rtt_count} {backend}", 120)
            rtt = command(load, f"rtt {rtt_count}", 300)
            row.update(rtt_p50_us=float(rtt[1]), rtt_p99_us=float(rtt[2]), rtt_n=int(rtt[3]))
            row.update(direct_p50_us=float(ref[1]), direct_p99_us=float(ref[2]))
            result.runs.append(row)
        probe = float(command(load, "probe", 120)[1])
    mine = [r for r in result.runs if r["part"] == part]
    xs = [r["sessions"] for r in mine]
    extra: dict[str, Any] = {"probe_all_s": probe, "sessions": opened}
    for role in pids:
        ys = [r[f"{role}_rss_kib"] for r in mine]
        extra[f"{role}_kib_per_session"] = _slope(xs, ys)
        extra[f"{role}_kib_per_session_delta"] = (ys[-1] - ys[0]) / max(1, opened)
    result.extra[part] = extra
