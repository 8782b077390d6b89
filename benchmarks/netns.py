"""Two network namespaces joined by one veth pair, with a switchable blackhole and counters.

The benchmarks own this small helper so that they do not depend on tests/netlab. Only
addresses from 198.18.0.0/15 (RFC 2544 benchmarking) are used, and the namespaces have no
route anywhere else::

    [client ns]  lo 127.0.0.1   veth "tbc0" 198.18.0.1/30  <--->  198.18.0.2/30 "tbs0"  [server ns]

``cut()`` installs an nft table in the client namespace that drops every packet in and out
of the veth (a silent blackhole: no RST, no ICMP, the link stays up), ``restore()`` deletes
it. ``counters()`` reads IP-level byte and packet counts on the veth (headers included).
Needs root; :func:`unavailable` says why not when it cannot run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time

CLIENT_IP = "198.18.0.1"
SERVER_IP = "198.18.0.2"
PREFIX = 30
CLIENT_IF = "tbc0"
SERVER_IF = "tbs0"
CUT_TABLE = "tbench_cut"
COUNT_TABLE = "tbench_count"


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces (ip netns, veth, nft)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iproute2 nftables)"
    return None


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=20)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {out.stderr.strip()}")
    return out


class Topology:
    """Create with ``with Topology() as topo:``; everything is deleted on exit."""

    def __init__(self, tag: str | None = None) -> None:
        tag = tag or str(os.getpid())
        self.client_ns = f"tbench-c-{tag}"
        self.server_ns = f"tbench-s-{tag}"
        self.is_cut = False

    def __enter__(self) -> Topology:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def ns(self, ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", ns, *argv, check=check)

    def up(self) -> None:
        self.down()
        _run("ip", "netns", "add", self.client_ns)
        _run("ip", "netns", "add", self.server_ns)
        _run(
            "ip", "link", "add", CLIENT_IF, "netns", self.client_ns,
            "type", "veth", "peer", "name", SERVER_IF, "netns", self.server_ns,
        )  # fmt: skip
        for ns, dev, ip in (
            (self.client_ns, CLIENT_IF, CLIENT_IP),
            (self.server_ns, SERVER_IF, SERVER_IP),
        ):
            self.ns(ns, "ip", "link", "set", "lo", "up")
            self.ns(ns, "ip", "addr", "add", f"{ip}/{PREFIX}", "dev", dev)
            self.ns(ns, "ip", "link", "set", dev, "up")
        self.ns(self.client_ns, "sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 65000")
        self.ns(self.server_ns, "sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 65000")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # wait for the veth to carry traffic
            if (
                self.ns(self.client_ns, "ping", "-c1", "-W1", SERVER_IP, check=False).returncode
                == 0
            ):
                break
            time.sleep(0.1)

    def down(self) -> None:
        for ns in (self.client_ns, self.server_ns):
            _run("ip", "netns", "del", ns, check=False)

    def cut(self) -> None:
        rules = (
            f"add table inet {CUT_TABLE}\n"
            f"add chain inet {CUT_TABLE} in {{ type filter hook input priority -10; }}\n"
            f"add chain inet {CUT_TABLE} out {{ type filter hook output priority -10; }}\n"
            f'add rule inet {CUT_TABLE} in iifname "{CLIENT_IF}" drop\n'
            f'add rule inet {CUT_TABLE} out oifname "{CLIENT_IF}" drop\n'
        )
        self._nft(rules)
        self.is_cut = True

    def restore(self) -> None:
        self.ns(self.client_ns, "nft", "delete", "table", "inet", CUT_TABLE)
        self.is_cut = False

    def start_counting(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.ns(self.client_ns, "nft", "delete", "table", "inet", COUNT_TABLE)
        rules = (
            f"add table inet {COUNT_TABLE}\n"
            f"add chain inet {COUNT_TABLE} in {{ type filter hook input priority -20; }}\n"
            f"add chain inet {COUNT_TABLE} out {{ type filter hook output priority -20; }}\n"
            f'add rule inet {COUNT_TABLE} in iifname "{CLIENT_IF}" counter\n'
            f'add rule inet {COUNT_TABLE} out oifname "{CLIENT_IF}" counter\n'
        )
        self._nft(rules)

    def counters(self) -> dict[str, int]:
        """IP bytes and packets through the veth as seen from the client namespace."""
        out = self.ns(self.client_ns, "nft", "-j", "list", "table", "inet", COUNT_TABLE).stdout
        result: dict[str, int] = {}
        for item in json.loads(out)["nftables"]:
            rule = item.get("rule")
            if not rule:
                continue
            for expr in rule["expr"]:
                if "counter" in expr:
                    name = "client_to_server" if rule["chain"] == "out" else "server_to_client"
                    result[f"{name}_bytes"] = expr["counter"]["bytes"]
                    result[f"{name}_packets"] = expr["counter"]["packets"]
        return result

    def _nft(self, rules: str) -> None:
        out = subprocess.run(
            ["ip", "netns", "exec", self.client_ns, "nft", "-f", "-"],
            input=rules,
            capture_output=True,
            text=True,
            timeout=20,
        )
        if out.returncode != 0:
            raise RuntimeError(f"nft: {out.stderr.strip()}")
