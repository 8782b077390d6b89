"""What a gateway in front of a tether server costs, on loopback: bulk throughput and 64-byte
request/response latency of one session, through three paths to the same routed server (all
TLS 1.3, the clients pinning the certificate they reach):

- ``direct``: tether client -> tether server;
- ``gateway``: tether client -> ``tether gateway`` -> tether server (TLS on both hops);
- ``haproxy``: tether client -> HAProxy with deploy/haproxy/haproxy.cfg -> tether server.

Repeats visit the paths in turn (A, B, C, A, B, C) so that drift on a shared machine falls on
all of them alike. Prints one JSON object with every run and the medians::

    python -m benchmarks.gateway --bytes 256M --count 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.common import MiB, machine_meta, percentile
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
from tether import tls
from tether.config import parse_size

__all__ = ["main"]


def _haproxy_config(
    tmp: Path, port: int, server: str, key: str, identity: tls.ServerIdentity
) -> Path:
    front = tmp / "front.pem"
    front.write_bytes(identity.cert_path.read_bytes() + identity.key_path.read_bytes())
    front.chmod(0o600)
    text = (REPO / "deploy" / "haproxy" / "haproxy.cfg").read_text()
    text = text.replace("bind :443 ", f"bind 127.0.0.1:{port} ")
    text = text.replace("/etc/tether/gateway.pem", str(front))
    text = text.replace("/etc/tether/servers-ca.pem", str(identity.cert_path))
    text = text.replace("ROUTING_KEY_BASE64", key)
    text = text.replace("maxconn 100000", "maxconn 4096")
    text = re.sub(r"(?m)^(\s+)server s1 \S+", rf"\1server s1 {server}", text)
    text = re.sub(r"(?m)^\s+server s2 \S+\n", "", text)
    text = re.sub(r"(?m)^\s+use-server s2 .*\n", "", text)
    path = tmp / "haproxy.cfg"
    path.write_text(text)
    return path


def run(size: int, count: int, repeats: int, logdir: Path) -> dict[str, object]:
    tether = tether_command()
    if tether is None:
        raise HarnessError("the tether command does not work")
    tmp = Path(tempfile.mkdtemp(prefix="tbench-gw-"))
    key_file = tmp / "routing.key"
    key_file.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
    key_file.chmod(0o600)
    identity, _ = tls.load_or_create_identity(tmp / "server")
    pin = identity.fingerprint
    entries: dict[str, str] = {}
    skipped: dict[str, str] = {}
    with Procs(logdir) as procs:
        _, backend = procs.start_ready(endpoint("backend", "--listen", "127.0.0.1:0"), "backend")
        _, server = procs.start_ready(
            [*tether, "server", "--listen", "127.0.0.1:0", "--backend", backend,
             "--state-dir", str(tmp / "server"), "--server-id", "1",
             "--routing-key-file", str(key_file)], "server")  # fmt: skip
        _, gateway = procs.start_ready(
            [*tether, "gateway", "--listen", "127.0.0.1:0", f"--server=1={server}",
             "--routing-key-file", str(key_file), "--server-fingerprint", pin,
             "--state-dir", str(tmp / "server")], "gateway")  # fmt: skip
        fronts = {"direct": server, "gateway": gateway}
        haproxy = shutil.which("haproxy")
        if haproxy is None:
            skipped["haproxy"] = "haproxy is not installed"
        else:
            port = free_port()
            config = _haproxy_config(tmp, port, server, key_file.read_text().strip(), identity)
            procs.spawn([haproxy, "-db", "-f", str(config)], "haproxy")
            wait_listening(port)
            fronts["haproxy"] = f"127.0.0.1:{port}"
        for name, front in fronts.items():  # one client per path: its own sessions
            _, entries[name] = procs.start_ready(
                [*tether, "client", "--listen", "127.0.0.1:0", "--server", front,
                 "--server-fingerprint", pin, "--require-reliability"],
                f"client-{name}")  # fmt: skip
        runs: list[dict[str, object]] = []
        for repeat in range(repeats):
            for name, entry in entries.items():
                bulk = json.loads(
                    run_tool(
                        endpoint("bulk", "--connect", entry, "--down", str(size), "--verify", "1"),
                        timeout=120 + size / MiB,
                    ).splitlines()[-1]
                )
                rtt = json.loads(
                    run_tool(
                        endpoint("rtt", "--connect", entry, "--count", str(count)),
                        timeout=60 + count * 0.01,
                    ).splitlines()[-1]
                )
                rtts = [x / 1000.0 for x in rtt["rtt_ns"]]
                runs.append(
                    {
                        "path": name,
                        "repeat": repeat,
                        "bulk": bulk,
                        "p50_us": percentile(rtts, 50),
                        "p99_us": percentile(rtts, 99),
                    }
                )
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    summary: dict[str, dict[str, float]] = {}
    for name in entries:
        mine = [r for r in runs if r["path"] == name]
        summary[name] = {
            "down_MiB_s": statistics.median(_mib_s(r["bulk"], size) for r in mine),
            "rtt_p50_us": statistics.median(float(r["p50_us"]) for r in mine),  # type: ignore[arg-type]
            "rtt_p99_us": statistics.median(float(r["p99_us"]) for r in mine),  # type: ignore[arg-type]
        }
    return {"machine": machine_meta(sys.argv), "bytes": size, "count": count, "repeats": repeats,
            "median": summary, "skipped": skipped, "runs": runs}  # fmt: skip


def _mib_s(bulk: object, size: int) -> float:
    assert isinstance(bulk, dict)
    if not bulk.get("intact", True):
        raise HarnessError(f"bulk run not intact: {bulk}")
    return size / MiB / float(bulk["seconds"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gateway", description=__doc__)
    parser.add_argument("--bytes", default="256M", help="bulk bytes per run (default 256M)")
    parser.add_argument("--count", type=int, default=2000, help="round trips per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--logs", default=str(Path(tempfile.gettempdir()) / "tbench-gw-logs"))
    args = parser.parse_args(argv)
    result = run(parse_size(args.bytes), args.count, args.repeats, Path(args.logs))
    print(json.dumps(result["median"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
