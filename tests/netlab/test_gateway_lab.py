"""Issue 11's proof in network namespaces: ``tether gateway`` in front of three real
``tether server`` hosts, a ``tether client`` carrying many sessions through it.

::

    client host             gateway host(s)               server hosts (x3)
    app ──> tether client ══>  tether gateway  ══plain══>  tether server N ──> backend N
    198.18.S.1 (roams)      198.18.S.2:443                198.18.S.1N:2598    (127.0.0.1)
                            (198.18.S.3, the second;
                             198.18.S.100 moves between)

Every host is its own namespace with one veth into a switch namespace that holds a bridge; all
addresses are in 198.18.S.0/24 (``S`` unique per lab). The links are in clear text on both
sides of the gateway (``--plaintext`` client and gateway, ``--server-plaintext`` to servers that
run ``--plaintext``): what is proved here is routing, not TLS, which tests/aio/test_gateway.py
covers. The servers share one routing key and have ids 1..3.

The application is one ``traffic.py app --sessions N`` process: N connections at once, each
streaming the seeded streams both ways and hashing what it receives; each server host's backend
hashes its side. Which server holds a session is read from its id (the first two bytes are the
server id, docs/protocol.md "Routing") in the client's log, and checked against the servers' own
logs. N is 300, or ``TETHER_GWLAB_SESSIONS``. Every wait is bounded; the file runs in about a
minute and a half on a 2-core machine. Figures: docs/deployment.md. The outage case runs
through one gateway, through two (the first killed, its address moved), and through HAProxy
with the configuration ``tether gateway --print-haproxy-config`` writes (skipped without
``haproxy``). Then a server killed, a server drained, and a server added under live sessions
(the gateway's config file edited and SIGHUP, or HAProxy's configuration regenerated and
reloaded).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tether import tls

from . import netns
from .chain import PYTHON, REPORT_LINE, TRAFFIC, Backend, first_after
from .netns import Host, Proc
from .traffic import expected_digest

pytestmark = [pytest.mark.netns, pytest.mark.slow]

SESSIONS = int(os.environ.get("TETHER_GWLAB_SESSIONS", "300"))
SERVERS = (1, 2, 3)
KB = 1000
RATE = 40 * KB  # bytes/s each way, per session
KEEPALIVE = 1.0  # seconds; a link silent for two is dead
HEALTH_INTERVAL = 2.0  # the gateway's, seconds
GATEWAY_PORT = 443
SERVER_PORT = 2598
VIP = 100  # last byte of the moving gateway address
ESTABLISHED = re.compile(r"session #\d+/([0-9a-f]{12}): established")
CLIENT_RESUMED = re.compile(r"session #\d+/([0-9a-f]{12}): resumed after")
CLIENT_ENDED = re.compile(r"session #\d+/([0-9a-f]{12}): ended (\S+) \((.*)\)")
SERVER_NEW = re.compile(r"session ([0-9a-f]{12}): new from")
SERVER_RESUMED = re.compile(r"session ([0-9a-f]{12}): resumed from")
SERVER_RESUMED_FROM = re.compile(r"session [0-9a-f]{12}: resumed from ([0-9.]+):")
ENV = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}


def server_of(sid: str) -> int:
    """The server id a session id carries (docs/protocol.md, "Routing")."""
    return int(sid[:4], 16)


class GatewayLab(netns.Lab):
    """Hosts ``client``, ``gateway``, ``server1``..``server3`` on one bridge (a switch
    namespace). Names keep netns.py's ``tth<pid>-<hex>-<c|s>`` shape so sweep_stale() finds
    them; each namespace has its own hex."""

    def __init__(self, log_dir: Path) -> None:
        super().__init__("gwlab", log_dir)
        owner = f"{netns.NS_PREFIX}{os.getpid()}"
        net = f"198.18.{self.subnet}"

        def make(role: str, last: int, kind: str = "s") -> Host:
            return Host(
                role, f"{owner}-{random.randrange(1 << 24):06x}-{kind}", "eth0", f"{net}.{last}"
            )

        self.switch = make("switch", 254)
        self.client = make("client", 1, "c")
        self.gateway = make("gateway", 2)
        self.gateway2 = make("gateway2", 3)
        self.vip = f"{net}.{VIP}"  # the address clients use with two gateways: it moves
        self.servers = {n: make(f"server{n}", 10 + n) for n in SERVERS}
        self.hosts = [self.client, self.gateway, self.gateway2, *self.servers.values()]

    def open(self) -> None:
        with netns._open_labs_lock:
            netns._open_labs.add(self)
        try:
            for host in (self.switch, *self.hosts):
                self._ip("netns", "add", host.ns)
                self.sh(host, "ip", "link", "set", "lo", "up")
            self.sh(self.switch, "ip", "link", "add", "br0", "type", "bridge")
            self.sh(self.switch, "ip", "link", "set", "br0", "up")
            for i, host in enumerate(self.hosts):
                port = f"p{i}"
                self._ip("link", "add", host.ifname, "netns", host.ns, "type", "veth",
                         "peer", "name", port, "netns", self.switch.ns)  # fmt: skip
                self.sh(self.switch, "ip", "link", "set", port, "master", "br0")
                self.sh(self.switch, "ip", "link", "set", port, "up")
                self.sh(host, "ip", "addr", "add", f"{host.address}/24", "dev", host.ifname)
                self.sh(host, "ip", "link", "set", host.ifname, "up")
            self.log("lab up")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            for proc in reversed(self.procs):
                with contextlib.suppress(Exception):
                    proc.stop()
            for host in (*self.hosts, self.switch):
                with contextlib.suppress(Exception):
                    netns._kill_namespace_pids(host.ns)
                subprocess.run(["ip", "netns", "del", host.ns], capture_output=True,
                               timeout=netns.COMMAND_TIMEOUT)  # fmt: skip
        finally:
            with netns._open_labs_lock:
                netns._open_labs.discard(self)

    def host(self, side: str | Host) -> Host:
        if isinstance(side, Host):
            return side
        return {h.role: h for h in self.hosts}[side]

    def roam_client(self, last: int) -> str:
        """Replace the client's address with another one of the lab's /24."""
        old, new = self.client.address, f"198.18.{self.subnet}.{last}"
        self.sh(self.client, "ip", "addr", "del", f"{old}/24", "dev", self.client.ifname)
        self.sh(self.client, "ip", "addr", "add", f"{new}/24", "dev", self.client.ifname)
        self.client.address = new
        self.log(f"client address {old} -> {new}")
        return new


class Site:
    """The running site: backends, servers, what is in front of them (``front``: one
    ``gateway``, ``two-gateways`` sharing a moving address, or ``haproxy`` with
    deploy/haproxy/haproxy.cfg), the client; and the application."""

    def __init__(self, lab: GatewayLab, tether: list[str], *, seed: int, size: int,
                 client_timeout: float, front: str = "gateway",
                 running: tuple[int, ...] = SERVERS, server_args: tuple[str, ...] = ()
                 ) -> None:  # fmt: skip
        self.lab = lab
        self.tether = tether
        self.seed = seed
        self.size = size
        self.front = front
        self.key = key = lab.log_dir / "routing.key"
        key.write_text(base64.b64encode(random.randbytes(32)).decode() + "\n")
        key.chmod(0o600)
        common = ["--keepalive", str(KEEPALIVE)]
        # HAProxy as shipped speaks TLS on both sides: the servers share one identity, which
        # HAProxy presents to the clients too and trusts as the servers' CA; clients pin it.
        security: list[str] = ["--plaintext"]
        client_security: list[str] = ["--plaintext"]
        if front == "haproxy":
            identity, _ = tls.load_or_create_identity(lab.log_dir / "identity")
            self.identity = identity
            security = ["--tls-cert", str(identity.cert_path), "--tls-key", str(identity.key_path)]
            pin = tls.fingerprint_of_file(identity.cert_path)
            client_security = ["--server-fingerprint", pin, "--known-servers",
                               str(lab.log_dir / "known")]  # fmt: skip
        self.server_argv = [*security, "--routing-key-file", str(key), "--timeout", "60",
                            *common, *server_args]  # fmt: skip
        self.backends: dict[int, Backend] = {}
        self.servers: dict[int, Proc] = {}
        for n in running:
            self.start_server(n)
        self.listed = list(running)  # the servers the gateway (or HAProxy) is given
        self.gateways: list[Proc] = []
        target = lab.gateway.address
        if front == "haproxy":
            self.gateways.append(self._haproxy())
        else:
            # With two gateways both listen on every address and the clients use the moving
            # one, as behind keepalived: held by the first gateway host until it fails.
            hosts = [lab.gateway] if front == "gateway" else [lab.gateway, lab.gateway2]
            if front == "two-gateways":
                target = lab.vip
                lab.sh(lab.gateway, "ip", "addr", "add", f"{lab.vip}/32", "dev", "eth0")
            # The server list in the gateway's config file (what a reload re-reads); the rest
            # on its command line.
            self.gateway_file = lab.log_dir / "gateway.toml"
            self._write_gateway_file()
            for host in hosts:
                listen = f"{host.address if front == 'gateway' else '0.0.0.0'}:{GATEWAY_PORT}"
                self.gateways.append(lab.spawn(
                    host,
                    [*tether, "gateway", "--config", str(self.gateway_file), "--listen", listen,
                     "--routing-key-file", str(key), "--server-plaintext", "--plaintext",
                     "--health-interval", str(HEALTH_INTERVAL)],
                    host.role,
                    env=ENV,
                ))  # fmt: skip
        self.gateway = self.gateways[0]
        self.client = lab.spawn(
            "client",
            [*tether, "client", "--listen", "127.0.0.1:0",
             "--server", f"{target}:{GATEWAY_PORT}", *client_security,
             "--timeout", str(client_timeout), *common],
            "client",
            env=ENV,
        )  # fmt: skip
        entry_host, entry_port = self.client.wait_ready()
        self.entry = f"{entry_host}:{entry_port}"
        self.apps: list[Proc] = []

    def start_server(self, n: int) -> None:
        """Server ``n`` on its host, with its own backend."""
        lab, host = self.lab, self.lab.servers[n]
        proc = lab.spawn(
            host,
            [PYTHON, str(TRAFFIC), "backend", "--listen", "127.0.0.1:0", "--seed", str(self.seed),
             "--up-bytes", str(self.size), "--down-bytes", str(self.size), "--rate", str(RATE),
             "--wait-first-byte"],
            f"backend{n}",
        )  # fmt: skip
        _, port = proc.wait_ready()
        self.backends[n] = Backend(proc, port, self.seed, self.size, self.size)
        self.servers[n] = lab.spawn(
            host,
            [*self.tether, "server", "--listen", f"{host.address}:{SERVER_PORT}",
             "--backend", f"127.0.0.1:{port}", "--server-id", str(n), *self.server_argv],
            f"server{n}",
            env=ENV,
        )  # fmt: skip

    def _servers(self) -> list[str]:
        return [f"{n}={self.lab.servers[n].address}:{SERVER_PORT}" for n in self.listed]

    def _write_gateway_file(self) -> None:
        listed = ", ".join(f'"{server}"' for server in self._servers())
        self.gateway_file.write_text(f"server = [{listed}]\n")

    def add_server(self, n: int) -> float:
        """Start server ``n`` and give it to what is in front: the gateway's file edited and
        SIGHUP, or HAProxy's configuration regenerated and reloaded (master-worker, SIGUSR2:
        the old worker keeps its connections until they end). When that was asked."""
        self.start_server(n)
        self.listed.append(n)
        if self.front == "haproxy":
            self._haproxy_config()
            asked = self.lab.log("HAProxy reload (SIGUSR2)")
            self.gateway.signal(signal.SIGUSR2)
            return asked
        self._write_gateway_file()
        asked = self.lab.log(f"gateway reload (SIGHUP): server {n} added")
        for gateway in self.gateways:
            gateway.signal(signal.SIGHUP)
        return asked

    def _haproxy_config(self) -> Path:
        """The configuration ``--print-haproxy-config`` writes for the listed servers (the
        shipped file is that, test_gateway.py checks), with the lab's address, certificate,
        health interval and a connection limit this host allows."""
        lab, identity = self.lab, self.identity
        front = lab.log_dir / "front.pem"
        front.write_bytes(identity.cert_path.read_bytes() + identity.key_path.read_bytes())
        front.chmod(0o600)
        text = subprocess.run(
            [*self.tether, "gateway", *(f"--server={s}" for s in self._servers()),
             "--routing-key-file", str(self.key), "--server-ca", str(identity.cert_path),
             "--print-haproxy-config"],
            capture_output=True, text=True, check=True, timeout=30, env={**os.environ, **ENV},
        ).stdout  # fmt: skip
        text = text.replace("bind :443 ", f"bind {lab.gateway.address}:{GATEWAY_PORT} ")
        text = text.replace("/etc/tether/gateway.pem", str(front))
        text = text.replace("inter 3s", f"inter {HEALTH_INTERVAL:g}s")
        text = text.replace("maxconn 100000", "maxconn 4096")
        config = lab.log_dir / "haproxy.cfg"
        config.write_text(text)
        return config

    def _haproxy(self) -> Proc:
        """HAProxy on the gateway host, in master-worker mode (as Debian's unit runs it) so
        that SIGUSR2 reloads it."""
        haproxy = shutil.which("haproxy")
        if haproxy is None:
            pytest.skip("needs haproxy (apt-get install haproxy)")
        lab = self.lab
        config = self._haproxy_config()
        proc = lab.spawn("gateway", [haproxy, "-W", "-db", "-f", str(config)], "haproxy",
                         ready=None)  # fmt: skip
        deadline = time.monotonic() + 15
        while not lab.sh("gateway", "ss", "-Hltn", "sport", "=", f":{GATEWAY_PORT}").strip():
            if time.monotonic() > deadline or not proc.running:
                pytest.fail(f"haproxy did not listen: {proc.stderr_tail()} {proc.stdout_text()}")
            time.sleep(0.1)
        return proc

    @property
    def procs(self) -> list[Proc]:
        return [*self.apps, self.client, *self.gateways, *self.servers.values(),
                *(b.proc for b in self.backends.values())]  # fmt: skip

    def start_app(self, sessions: int, deadline: float) -> Proc:
        app = self.lab.spawn(
            "client",
            [PYTHON, str(TRAFFIC), "app", "--connect", self.entry, "--seed", str(self.seed),
             "--up-bytes", str(self.size), "--down-bytes", str(self.size),
             "--rate", str(RATE), "--deadline", str(deadline), "--sessions", str(sessions)],
            f"app{len(self.apps)}",
            ready=None,
        )  # fmt: skip
        self.apps.append(app)
        return app

    def established(self, count: int, timeout: float) -> list[str]:
        """Wait for ``count`` sessions established at the client; their ids, in order."""
        self.client.wait_line(ESTABLISHED.pattern, timeout, stream="stderr", skip=count - 1)
        return ESTABLISHED.findall(self.client.stderr_text())[:count]

    def reports(self, app: Proc, count: int, timeout: float) -> list[dict[str, Any]]:
        app.wait_line(REPORT_LINE, timeout, skip=count - 1)
        return [json.loads(m) for m in re.findall(r"^REPORT (\{.*\})$", app.stdout_text(), re.M)]

    def backend_reports(self, n: int, count: int, timeout: float) -> list[dict[str, Any]]:
        proc = self.backends[n].proc
        if count:
            proc.wait_line(REPORT_LINE, timeout, skip=count - 1)
        return [json.loads(m) for m in re.findall(r"^REPORT (\{.*\})$", proc.stdout_text(), re.M)]

    def server_log(self, n: int, pattern: re.Pattern[str]) -> list[str]:
        return pattern.findall(self.servers[n].stderr_text())

    def sessions_made(self, n: int, count: int) -> list[str]:
        """The sessions server ``n`` logged as new, once it logged ``count`` of them (or
        after 5 s): its log is read by another thread than the client's, and may lag it."""
        if count:
            with contextlib.suppress(netns.LabError):  # fewer: the caller's check says so
                self.servers[n].wait_line(SERVER_NEW.pattern, 5, stream="stderr", skip=count - 1)
        return self.server_log(n, SERVER_NEW)

    def require(self, condition: bool, message: str) -> None:
        if not condition:
            tails = "\n".join(f"--- {p.name}:\n{p.stderr_tail(15)}" for p in self.procs)
            pytest.fail(f"{message}\n{tails}\n(logs in {self.lab.log_dir})")


def stream_problems(site: Site, apps: list[dict[str, Any]], backends: list[dict[str, Any]]
                    ) -> list[str]:  # fmt: skip
    """Every stream whole and intact: what each end received hashed against the seeded stream
    the other end sends (each report on its own: which backend connection served which
    application connection is not known here, and every one carries the same streams)."""
    problems = []
    for a in apps:
        if a["status"] != "complete":
            problems.append(f"app session {a['index']}: {a['status']} ({a['error']})")
        if a["received_sha256"] != expected_digest(site.seed, "down", a["received"]):
            problems.append(f"app session {a['index']}: down stream lost, duplicated or reordered")
        if a["sent_sha256"] != expected_digest(site.seed, "up", a["sent"]):
            problems.append(f"app session {a['index']}: sent other than the up stream")
    for b in backends:
        if b["received"] != b["expected_receive"]:
            problems.append(f"a backend received {b['received']}/{b['expected_receive']}")
        if b["received_sha256"] != expected_digest(site.seed, "up", b["received"]):
            problems.append("a backend's up stream lost, duplicated or reordered")
    return problems


@pytest.fixture
def gwlab(netlab_host: None, tmp_path: Path) -> Any:
    with GatewayLab(tmp_path / "lab") as lab:
        yield lab


@pytest.mark.parametrize("front", ["gateway", "two-gateways", "haproxy"])
def test_outage_with_address_change(gwlab: GatewayLab, tether: list[str],
                                    record: dict[str, Any], front: str) -> None:  # fmt: skip
    """Every session resumes on its own server after the client is cut off and comes back
    from another address; every byte once and in order; one backend connection each.

    With two gateways, the first one is SIGKILLed during the outage and its address moves to
    the second (as keepalived moves a virtual address): every resume crosses to the gateway
    that never saw the session. With HAProxy, TLS from the client (pinned) and to the
    servers."""
    size = int(RATE * 12)
    seed = 1100 + len(front)
    site = Site(gwlab, tether, seed=seed, size=size, client_timeout=60, front=front)
    app = site.start_app(SESSIONS, deadline=60)
    sids = site.established(SESSIONS, 20)
    per_server = Counter(server_of(s) for s in sids)
    site.require(set(per_server) == set(SERVERS), f"sessions not spread: {per_server}")
    for n in SERVERS:
        made = site.sessions_made(n, per_server[n])
        theirs = [s for s in sids if server_of(s) == n]
        site.require(sorted(made) == sorted(theirs),
                     f"server {n} made other sessions than the ids naming it: not at the "
                     f"client {sorted(set(made) - set(theirs))}, not at the server "
                     f"{sorted(set(theirs) - set(made))}")  # fmt: skip
    time.sleep(2.0)  # the fault schedule: streams running
    down = gwlab.link_down("client")
    gwlab.roam_client(101)
    if front == "two-gateways":
        site.gateway.signal(signal.SIGKILL)
        gwlab.sh(gwlab.gateway, "ip", "addr", "del", f"{gwlab.vip}/32", "dev", "eth0")
        gwlab.sh(gwlab.gateway2, "ip", "addr", "add", f"{gwlab.vip}/32", "dev", "eth0")
        gwlab.log("gateway address moved to the second gateway")
    time.sleep(max(0.0, down + 3.0 - time.monotonic()))
    restored = gwlab.link_up("client")
    site.client.wait_line(CLIENT_RESUMED.pattern, 30, stream="stderr", skip=SESSIONS - 1)
    all_resumed_at = time.monotonic()
    apps = site.reports(app, SESSIONS, 60)
    backends = [r for n in SERVERS for r in site.backend_reports(n, per_server[n], 15)]
    resumed = CLIENT_RESUMED.findall(site.client.stderr_text())
    site.require(sorted(resumed) == sorted(sids), "not every session resumed exactly once")
    via: Counter[str] = Counter()
    for n in SERVERS:
        theirs = sorted(s for s in sids if server_of(s) == n)
        site.require(sorted(site.server_log(n, SERVER_RESUMED)) == theirs,
                     f"server {n} resumed other sessions than its own")  # fmt: skip
        via.update(site.server_log(n, SERVER_RESUMED_FROM))
        site.require(len(site.backend_reports(n, 0, 0)) == per_server[n],
                     f"backend {n} saw other than one connection per session")  # fmt: skip
    last = gwlab.gateway2 if front == "two-gateways" else gwlab.gateway
    site.require(set(via) == {last.address}, f"resumes came from {dict(via)}, not {last.address}")
    problems = stream_problems(site, apps, backends)
    site.require(not problems, "; ".join(problems[:10]))
    resume = sorted(t - restored for a in apps
                    if (t := first_after(a["timeline"], restored)) is not None)  # fmt: skip
    site.require(len(resume) == SESSIONS, "a session got no data after the link came back")
    moved = sum(a["received"] for a in apps) + sum(b["received"] for b in backends)
    what = {
        "gateway": "one gateway",
        "two-gateways": "first gateway killed, resumes through the second",
        "haproxy": "HAProxy (TLS both sides)",
    }[front]
    record.update(
        title=f"gateway: {SESSIONS} sessions on 3 servers, 3 s outage + client address change, "
        f"{what}",
        bytes=moved,
        resume=resume[len(resume) // 2],
        note=f"per server {dict(sorted(per_server.items()))}; resume median "
        f"{resume[len(resume) // 2]:.2f} s, max {resume[-1]:.2f} s; all resumed "
        f"{all_resumed_at - restored:.2f} s after link up; outage {restored - down:.1f} s",
    )


@pytest.mark.parametrize("front", ["gateway", "haproxy"])
def test_server_killed(gwlab: GatewayLab, tether: list[str], record: dict[str, Any],
                       front: str) -> None:  # fmt: skip
    """SIGKILL one server: its sessions end with a clear reason, the others carry on, the
    gateway (or HAProxy) marks it unhealthy within one health interval and sends new
    sessions elsewhere. Through the gateway the reason names the cause (protocol version 4:
    REJECT(SERVER_UNREACHABLE) to each resume attempt); HAProxy only closes the link."""
    size = int(RATE * 10)
    client_timeout = 5.0
    site = Site(gwlab, tether, seed=1201, size=size, client_timeout=client_timeout, front=front)
    app = site.start_app(SESSIONS, deadline=60)
    sids = site.established(SESSIONS, 20)
    per_server = Counter(server_of(s) for s in sids)
    site.require(set(per_server) == set(SERVERS), f"sessions not spread: {per_server}")
    time.sleep(2.0)
    victim = 2
    killed = time.monotonic()
    site.servers[victim].signal(signal.SIGKILL)
    if front == "haproxy":
        site.gateway.wait_line(rf"Server \S+/s{victim} is DOWN", HEALTH_INTERVAL + 3,
                               stream="stdout")  # fmt: skip
    else:
        site.gateway.wait_line(rf"server {victim} \(.*\): unhealthy", HEALTH_INTERVAL + 3,
                               stream="stderr")  # fmt: skip
    unhealthy_after = time.monotonic() - killed
    site.require(unhealthy_after <= HEALTH_INTERVAL + 0.5,
                 f"{front} took {unhealthy_after:.2f} s to mark the server unhealthy")  # fmt: skip
    # New sessions now: none may go to the dead server.
    extra = 9
    late = site.start_app(extra, deadline=40)
    new_sids = site.established(SESSIONS + extra, 20)[SESSIONS:]
    late_servers = Counter(server_of(s) for s in new_sids)
    site.require(
        victim not in late_servers, f"new sessions went to the dead server: {late_servers}"
    )
    lost = sorted(s for s in sids if server_of(s) == victim)
    site.client.wait_line(r": ended EXPIRED", client_timeout + 15, stream="stderr",
                          skip=len(lost) - 1)  # fmt: skip
    all_ended_after = time.monotonic() - killed
    apps = site.reports(app, SESSIONS, 60)
    late_apps = site.reports(late, extra, 40)
    ended = {
        sid: (code, reason) for sid, code, reason in CLIENT_ENDED.findall(site.client.stderr_text())
    }
    site.require(
        all(s in ended and ended[s][0] == "EXPIRED" for s in lost),
        f"the dead server's sessions did not all end EXPIRED: {[ended.get(s) for s in lost]}",
    )
    complete = [a for a in apps if a["status"] == "complete"]
    site.require(len(complete) == SESSIONS - len(lost),
                 f"{len(complete)} sessions complete, want {SESSIONS - len(lost)}")  # fmt: skip
    site.require(all(a["status"] == "complete" for a in late_apps), "a new session failed")
    backends = [r for n in SERVERS if n != victim
                for r in site.backend_reports(n, per_server[n] + late_servers[n], 15)]  # fmt: skip
    problems = stream_problems(site, [*complete, *late_apps], backends)
    site.require(not problems, "; ".join(problems[:10]))
    reason = ended[lost[0]][1]
    if front == "gateway":
        unreachable = "SERVER_UNREACHABLE (its server is out of reach)"
        site.require(all(unreachable in ended[s][1] for s in lost),
                     f"an end reason does not name the unreachable server: {reason}")  # fmt: skip
    record.update(
        title=f"{front}, {SESSIONS} sessions, server {victim} of 3 SIGKILLed",
        bytes=sum(a["received"] for a in [*complete, *late_apps])
        + sum(b["received"] for b in backends),
        note=f"{len(lost)} ended EXPIRED ({reason}), the last {all_ended_after:.1f} s after "
        f"the kill (client --timeout {client_timeout:g} s); {len(complete)} complete; "
        f"unhealthy after "
        f"{unhealthy_after:.2f} s (interval {HEALTH_INTERVAL:g} s); {extra} new sessions on "
        f"{dict(sorted(late_servers.items()))}",
    )


def test_server_drained(gwlab: GatewayLab, tether: list[str], record: dict[str, Any]) -> None:
    """SIGTERM to server 2 (a drain, with a long ``--drain-timeout``): its live sessions
    finish intact, the gateway marks it unhealthy within one health interval (a draining
    server fails the health probe), new sessions go only to servers 1 and 3, no session is
    lost, and the drained server exits by itself (0) once its last session ended."""
    size = int(RATE * 8)
    drain_timeout = 120
    site = Site(gwlab, tether, seed=1301, size=size, client_timeout=60,
                server_args=("--drain-timeout", str(drain_timeout)))  # fmt: skip
    app = site.start_app(SESSIONS, deadline=60)
    sids = site.established(SESSIONS, 20)
    per_server = Counter(server_of(s) for s in sids)
    site.require(set(per_server) == set(SERVERS), f"sessions not spread: {per_server}")
    time.sleep(2.0)  # streams running
    victim = 2
    drained = gwlab.log(f"SIGTERM to server {victim}: drain")
    site.servers[victim].signal(signal.SIGTERM)
    site.gateway.wait_line(rf"server {victim} \(.*\): unhealthy", HEALTH_INTERVAL + 3,
                           stream="stderr")  # fmt: skip
    unhealthy_after = time.monotonic() - drained
    site.require(unhealthy_after <= HEALTH_INTERVAL + 0.5,
                 f"gateway took {unhealthy_after:.2f} s to mark the server unhealthy")  # fmt: skip
    extra = 30
    late = site.start_app(extra, deadline=40)
    new_sids = site.established(SESSIONS + extra, 20)[SESSIONS:]
    late_servers = Counter(server_of(s) for s in new_sids)
    site.require(victim not in late_servers and sum(late_servers.values()) == extra,
                 f"new sessions after the drain went to {dict(late_servers)}")  # fmt: skip
    code = site.servers[victim].wait(30)  # once its last session ended (the others go on)
    exited_after = time.monotonic() - drained
    apps = site.reports(app, SESSIONS, 60)
    late_apps = site.reports(late, extra, 40)
    site.require(code == 0, f"the drained server did not exit 0 by itself: {code}")
    log = site.servers[victim].stderr_text()
    drained_line = re.search(r"drained: every session ended, after ([0-9.]+)s", log)
    site.require(drained_line is not None, "the drained server did not log 'drained: ...'")
    assert drained_line is not None
    ended = CLIENT_ENDED.findall(site.client.stderr_text())
    codes = Counter(code for _, code, _ in ended)
    site.require(set(codes) <= {"NORMAL"}, f"sessions ended other than NORMAL: {dict(codes)}")
    made = sorted(site.sessions_made(victim, per_server[victim]))
    site.require(made == sorted(s for s in sids if server_of(s) == victim),
                 f"server {victim} made sessions after its drain")  # fmt: skip
    backends = [r for n in SERVERS
                for r in site.backend_reports(n, per_server[n] + late_servers[n], 15)]  # fmt: skip
    problems = stream_problems(site, [*apps, *late_apps], backends)
    site.require(not problems, "; ".join(problems[:10]))
    record.update(
        title=f"gateway, {SESSIONS} sessions, server {victim} of 3 drained (SIGTERM)",
        bytes=sum(a["received"] for a in [*apps, *late_apps])
        + sum(b["received"] for b in backends),
        note=f"its {per_server[victim]} sessions finished intact; unhealthy at the gateway "
        f"after {unhealthy_after:.2f} s (interval {HEALTH_INTERVAL:g} s); {extra} new sessions "
        f"on {dict(sorted(late_servers.items()))}; it exited 0 by itself "
        f"{exited_after:.1f} s after the SIGTERM, its last session having ended "
        f"{float(drained_line.group(1)):.1f} s into the drain (--drain-timeout {drain_timeout} s)",
    )


@pytest.mark.parametrize("front", ["gateway", "haproxy"])
def test_server_added(gwlab: GatewayLab, tether: list[str], record: dict[str, Any],
                      front: str) -> None:  # fmt: skip
    """Servers 1 and 2 carry every session; then server 3 is started and given to what is
    in front while the sessions stream: the gateway's config file edited and SIGHUP, or
    HAProxy's configuration regenerated and reloaded (master-worker, SIGUSR2). New sessions
    then reach server 3; every stream, through the reload too, arrives intact."""
    size = int(RATE * 8)
    site = Site(gwlab, tether, seed=1400 + len(front), size=size, client_timeout=60,
                front=front, running=(1, 2))  # fmt: skip
    app = site.start_app(SESSIONS, deadline=60)
    sids = site.established(SESSIONS, 20)
    per_server = Counter(server_of(s) for s in sids)
    site.require(set(per_server) == {1, 2}, f"sessions not on servers 1 and 2: {per_server}")
    time.sleep(1.0)  # streams running
    added = 3
    asked = site.add_server(added)
    if front == "haproxy":
        site.gateway.wait_line(r"Loading success", 15, stream="stderr", skip=1)
    else:
        site.gateway.wait_line(rf"reloaded .*: servers added {added}=", 10, stream="stderr")
        site.gateway.wait_line(rf"server {added} \(.*\): healthy", HEALTH_INTERVAL + 3,
                               stream="stderr")  # fmt: skip
    in_rotation_after = time.monotonic() - asked
    extra = 30
    late = site.start_app(extra, deadline=40)
    new_sids = site.established(SESSIONS + extra, 20)[SESSIONS:]
    late_servers = Counter(server_of(s) for s in new_sids)
    site.require(added in late_servers, f"no new session reached server {added}: {late_servers}")
    if front == "gateway":  # the fewest links: every one of them, until it holds as many
        site.require(late_servers == {added: extra}, f"new sessions on {late_servers}")
    for n in SERVERS:
        made = site.sessions_made(n, per_server[n] + late_servers[n])
        site.require(sorted(made) == sorted(s for s in [*sids, *new_sids] if server_of(s) == n),
                     f"server {n} made other sessions than the ids naming it")  # fmt: skip
    apps = site.reports(app, SESSIONS, 60)
    late_apps = site.reports(late, extra, 40)
    resumed = CLIENT_RESUMED.findall(site.client.stderr_text())
    backends = [r for n in SERVERS
                for r in site.backend_reports(n, per_server[n] + late_servers[n], 15)]  # fmt: skip
    problems = stream_problems(site, [*apps, *late_apps], backends)
    site.require(not problems, "; ".join(problems[:10]))
    what = {
        "gateway": "gateway config file edited + SIGHUP",
        "haproxy": "HAProxy config regenerated + reload (master-worker, SIGUSR2)",
    }[front]
    record.update(
        title=f"{front}: server 3 added to 1 and 2 under {SESSIONS} live sessions, {what}",
        bytes=sum(a["received"] for a in [*apps, *late_apps])
        + sum(b["received"] for b in backends),
        note=f"live sessions {dict(sorted(per_server.items()))}, all intact, "
        f"{len(resumed)} resumed; in rotation {in_rotation_after:.2f} s after the reload was "
        f"asked; {extra} new sessions on {dict(sorted(late_servers.items()))}",
    )
