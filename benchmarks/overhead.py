"""B5 wire overhead: bytes on the client<->server link per payload byte, and idle keepalives.

The link is observed two ways:

- application bytes: a counting relay (:mod:`benchmarks.relay`) sits between ``tether
  client`` and ``tether server`` on loopback; it sees exactly the bytes tether writes
  (frames, acknowledgements, keepalives, handshakes), not TCP/IP headers;
- IP bytes (root only): the client and server run in two namespaces joined by a veth and
  nft counters count every packet in and out of it, headers and bare TCP ACKs included.

Bulk: ``overhead_bytes`` up, then down; overhead = (link bytes - payload) / payload, with
the acknowledgements flowing the other way counted too. At IP level plain TCP across the
same veth is measured too, so that what tether adds can be told from what TCP costs (with
GSO, nft sees segments of up to 64 KiB, so headers are counted per segment, not per
1500-byte wire packet). Keepalive: ``keepalive_sessions``
idle sessions for ``keepalive_seconds``, scaled to bytes per session per minute.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from benchmarks.common import Result, Scale, progress
from benchmarks.endpoint import HEADER, TRAILER
from benchmarks.netns import SERVER_IP, Topology, unavailable
from benchmarks.peers import PEERS, available
from benchmarks.procs import (
    PYTHON,
    HarnessError,
    Procs,
    endpoint,
    plaintext_args,
    read_line,
    run_tool,
    tether_command,
)
from benchmarks.scale import command, swarm


def _count(relay: object) -> tuple[int, int]:
    relay.stdin.write("count\n")  # type: ignore[attr-defined]
    relay.stdin.flush()  # type: ignore[attr-defined]
    parts = read_line(relay, 10).split()  # type: ignore[arg-type]
    return int(parts[1]), int(parts[2])


def run_b5(scale: Scale, logdir: Path) -> Result:
    result = Result(
        "B5",
        "Wire overhead",
        config={
            "bulk_bytes": scale.overhead_bytes,
            "keepalive_sessions": scale.keepalive_sessions,
            "keepalive_seconds": scale.keepalive_seconds,
            "tether_settings": "defaults (keepalive 3 s)",
        },
    )
    why = available(PEERS["tether"])
    if why:
        result.skipped["tether"] = why
        return result
    progress("B5 application-level counts")
    try:
        _app_level(scale, logdir / "b5" / "app", result)
    except (HarnessError, OSError) as exc:
        result.notes.append(f"application-level count: {exc}")
    reason = unavailable()
    if reason:
        result.skipped["ip-level"] = reason
    else:
        progress("B5 IP-level counts")
        try:
            _ip_level(scale, logdir / "b5" / "ip", result)
        except (HarnessError, OSError, RuntimeError) as exc:
            result.notes.append(f"IP-level count: {exc}")
    return result


def _app_level(scale: Scale, logdir: Path, result: Result) -> None:
    cmd = tether_command()
    assert cmd is not None
    clear = plaintext_args()  # framing overhead in clear text, as before TLS (issue 8)
    n = scale.overhead_bytes
    with Procs(logdir) as procs:
        _, backend = procs.start_ready(endpoint("backend"), "backend")
        _, server = procs.start_ready(
            [*cmd, "server", "--listen", "127.0.0.1:0", "--backend", backend, *clear],
            "tether-server",
        )
        relay, link = procs.start_ready(
            [PYTHON, "-m", "benchmarks.relay", "--target", server], "count-relay", stdin=True
        )
        _, entry = procs.start_ready(
            [*cmd, "client", "--listen", "127.0.0.1:0", "--server", link, *clear],
            "tether-client",
        )
        for case, up, down in (("up", n, 0), ("down", 0, n)):
            before = _count(relay)
            out = run_tool(
                endpoint("bulk", "--connect", entry, "--up", str(up), "--down", str(down)), 300
            )
            time.sleep(0.5)  # let the last acknowledgements through
            after = _count(relay)
            c2s, s2c = after[0] - before[0], after[1] - before[1]
            payload_up = up + HEADER.size
            payload_down = down + TRAILER.size
            result.runs.append(
                {
                    "kind": "bulk",
                    "level": "application",
                    "peer": "tether",
                    "case": case,
                    "payload_up": payload_up,
                    "payload_down": payload_down,
                    "link_c2s": c2s,
                    "link_s2c": s2c,
                    "overhead_ratio": (c2s + s2c - payload_up - payload_down)
                    / (payload_up + payload_down),
                    "intact": json.loads(out.strip().splitlines()[-1])["intact"],
                }
            )
        _, backend2 = procs.start_ready(swarm("backend", "--mode", "echo"), "echo-backend")
        _, server2 = procs.start_ready(
            [*cmd, "server", "--listen", "127.0.0.1:0", "--backend", backend2, *clear],
            "tether-server",
        )
        relay2, link2 = procs.start_ready(
            [PYTHON, "-m", "benchmarks.relay", "--target", server2], "count-relay", stdin=True
        )
        _, entry2 = procs.start_ready(
            [*cmd, "client", "--listen", "127.0.0.1:0", "--server", link2, *clear],
            "tether-client",
        )
        load, _ = procs.start_ready(swarm("load", "--connect", entry2), "load", stdin=True)
        command(load, f"open {scale.keepalive_sessions}", 120)
        time.sleep(1.0)
        before = _count(relay2)
        t0 = time.monotonic()
        time.sleep(scale.keepalive_seconds)
        after = _count(relay2)
        secs = time.monotonic() - t0
        k = scale.keepalive_sessions
        total = after[0] - before[0] + after[1] - before[1]
        result.runs.append(
            {
                "kind": "keepalive",
                "level": "application",
                "sessions": k,
                "seconds": secs,
                "link_c2s": after[0] - before[0],
                "link_s2c": after[1] - before[1],
                "bytes_per_session_minute": total / k / secs * 60,
            }
        )


def _ip_level(scale: Scale, logdir: Path, result: Result) -> None:
    cmd = tether_command()
    assert cmd is not None
    clear = plaintext_args()  # framing overhead in clear text, as before TLS (issue 8)
    n = scale.overhead_bytes
    with Topology(tag=f"b5{id(result) % 10000}") as topo, Procs(logdir) as procs:
        _, backend = procs.start_ready(
            swarm("backend", "--mode", "echo", "--listen", "127.0.0.1:0"),
            "echo-backend",
            netns=topo.server_ns,
        )
        _, bulk_backend = procs.start_ready(
            endpoint("backend", "--listen", "127.0.0.1:0"), "backend", netns=topo.server_ns
        )
        servers = {}
        for name, be in (("echo", backend), ("bulk", bulk_backend)):
            _, servers[name] = procs.start_ready(
                [*cmd, "server", "--listen", f"{SERVER_IP}:0", "--backend", be, *clear],
                "tether-server",
                netns=topo.server_ns,
            )
        entries = {}
        for name, srv in servers.items():
            _, entries[name] = procs.start_ready(
                [*cmd, "client", "--listen", "127.0.0.1:0", "--server", srv, *clear],
                "tether-client",
                netns=topo.client_ns,
            )
        _, direct = procs.start_ready(
            endpoint("backend", "--listen", f"{SERVER_IP}:0"), "backend", netns=topo.server_ns
        )
        topo.start_counting()
        for peer, case, up, down in (
            ("tether", "up", n, 0),
            ("tether", "down", 0, n),
            ("direct", "up", n, 0),
            ("direct", "down", 0, n),
        ):
            target = entries["bulk"] if peer == "tether" else direct
            before = topo.counters()
            run_tool(
                endpoint("bulk", "--connect", target, "--up", str(up), "--down", str(down)),
                300,
                netns=topo.client_ns,
            )
            time.sleep(0.5)
            after = topo.counters()
            d = {k: after[k] - before.get(k, 0) for k in after}
            payload = up + down + HEADER.size + TRAILER.size
            link = d["client_to_server_bytes"] + d["server_to_client_bytes"]
            result.runs.append(
                {
                    "kind": "bulk",
                    "level": "ip",
                    "peer": peer,
                    "case": case,
                    "payload": payload,
                    **d,
                    "overhead_ratio": (link - payload) / payload,
                }
            )
        load, _ = procs.start_ready(
            swarm("load", "--connect", entries["echo"]), "load", stdin=True, netns=topo.client_ns
        )
        command(load, f"open {scale.keepalive_sessions}", 120)
        time.sleep(1.0)
        before = topo.counters()
        t0 = time.monotonic()
        time.sleep(scale.keepalive_seconds)
        after = topo.counters()
        secs = time.monotonic() - t0
        d = {k: after[k] - before.get(k, 0) for k in after}
        k = scale.keepalive_sessions
        link = d["client_to_server_bytes"] + d["server_to_client_bytes"]
        packets = d["client_to_server_packets"] + d["server_to_client_packets"]
        result.runs.append(
            {
                "kind": "keepalive",
                "level": "ip",
                "sessions": k,
                "seconds": secs,
                **d,
                "bytes_per_session_minute": link / k / secs * 60,
                "packets_per_session_minute": packets / k / secs * 60,
            }
        )
