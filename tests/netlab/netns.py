"""A two-host lab in fresh network namespaces, with processes and faults.

``Lab`` builds a *client host* and a *server host*, each its own network namespace, joined by one
veth pair. Addresses come only from 198.18.0.0/15 (RFC 2544 benchmarking space): the client is
``198.18.N.1/24``, the server ``198.18.N.2/24``, with ``N`` unique per lab in this process.
Nothing in a lab can reach any other network: the namespaces have no other interface and no
default route.

Everything a lab creates is torn down by ``Lab.close()``: processes (SIGTERM, then SIGKILL to the
whole process group, then every pid still in the namespace), then the namespaces (``ip netns del``,
which also removes the veth pair and every nft table and qdisc inside). ``close()`` runs from the
context manager's ``finally`` and from ``atexit`` for a lab still open at interpreter exit, and
``sweep_stale()`` removes labs whose owning process died without cleaning up (names carry the
owner's pid).

Readiness is explicit: ``Lab.spawn(..., ready=...)`` returns once the process printed the line
that says it listens (``READY HOST:PORT`` for tether and the traffic tool, socat's
``listening on`` with ``-d -d``), or raises with the process's stderr when it exits or the timeout
passes first. Nothing here sleeps to wait for readiness.

Faults, each with its undo: ``link_down``/``link_up``, ``blackhole``/``clear_nft``,
``reject_reset``, ``drop_payload``, ``kill_sockets`` (``ss -K``), ``change_client_address``,
``rate_limit``/``clear_rate_limit``. Each fault and undo is logged in ``Lab.events`` with its
``time.monotonic()``, which is also the clock the traffic tool stamps its timelines with.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

NS_PREFIX = "tth"
# Namespace names: tth<owner pid>-<random hex>-<c|s>; sweep_stale() relies on this shape.
NS_NAME = re.compile(rf"^{NS_PREFIX}(\d+)-([0-9a-f]+)-([cs])$")
LAB_NETWORK = ipaddress.ip_network("198.18.0.0/15")
CLIENT_IF = "tthc0"
SERVER_IF = "tths0"
COMMAND_TIMEOUT = 15.0  # seconds for any one ip/nft/tc/ss command
STOP_GRACE = 3.0  # seconds between SIGTERM and SIGKILL at teardown
SECOND_TERM_AFTER = 0.3  # then a second SIGTERM: apart, so the two are not merged into one
READY_TIMEOUT = 15.0

_subnets = itertools.count(random.randrange(250))
_open_labs: set[Lab] = set()
_open_labs_lock = threading.Lock()


class LabError(RuntimeError):
    """A lab command failed, or a process did not become ready."""


def netns_unavailable_reason() -> str | None:
    """Why this host cannot run lab tests, or None when it can."""
    if os.geteuid() != 0:
        return "network-namespace tests need root (run pytest as root or in CI)"
    for tool in ("ip", "nft", "tc", "ss"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (install iproute2 and nftables)"
    probe = f"{NS_PREFIX}{os.getpid()}-probe{random.randrange(1 << 16):x}-c"
    try:
        subprocess.run(["ip", "netns", "add", probe], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        return f"`ip netns add` does not work here: {exc} {detail.decode(errors='replace')}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


def sweep_stale() -> list[str]:
    """Delete lab namespaces whose owner process is gone; return their names."""
    out = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT
    ).stdout
    removed = []
    for line in out.splitlines():
        name = line.split()[0] if line.strip() else ""
        match = NS_NAME.match(name)
        if match is None or Path(f"/proc/{match.group(1)}").exists():
            continue
        _kill_namespace_pids(name)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=COMMAND_TIMEOUT)
        removed.append(name)
    return removed


def _kill_namespace_pids(ns: str) -> None:
    pids = subprocess.run(
        ["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=COMMAND_TIMEOUT
    ).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


@dataclass
class Host:
    """One side of the lab: a namespace, its veth end, its current address."""

    role: str  # "client" or "server"
    ns: str
    ifname: str
    address: str
    prefixlen: int = 24
    # Routes we added beyond the connected one; a link that goes down loses them.
    extra_routes: list[list[str]] = field(default_factory=list)


class Proc:
    """A process running in a lab namespace, with its output captured line by line."""

    def __init__(
        self,
        name: str,
        host: Host,
        argv: list[str],
        popen: subprocess.Popen[bytes],
        log_dir: Path,
        ready_stream: str,
    ) -> None:
        self.name = name
        self.host = host
        self.argv = argv
        self.popen = popen
        self.pid = popen.pid
        self.stdout_path = log_dir / f"{name}.stdout"
        self.stderr_path = log_dir / f"{name}.stderr"
        self.lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.cond = threading.Condition()
        self.ready_stream = ready_stream
        self.readers = [
            threading.Thread(target=self._pump, args=(s,), daemon=True)
            for s in ("stdout", "stderr")
        ]
        for reader in self.readers:
            reader.start()

    def _pump(self, stream_name: str) -> None:
        stream = getattr(self.popen, stream_name)
        path = self.stdout_path if stream_name == "stdout" else self.stderr_path
        with open(path, "wb") as log:
            # Bounded by the process: readline returns b"" at EOF.
            for raw in iter(stream.readline, b""):
                log.write(raw)
                log.flush()
                with self.cond:
                    self.lines[stream_name].append(raw.decode(errors="replace").rstrip("\n"))
                    self.cond.notify_all()
        stream.close()
        with self.cond:
            self.cond.notify_all()

    def wait_line(
        self, pattern: str, timeout: float, stream: str | None = None, skip: int = 0
    ) -> re.Match[str]:
        """Wait for the line matching ``pattern`` after ``skip`` earlier matches; raise
        LabError when the process ends or the timeout passes first."""
        regex = re.compile(pattern)
        stream = stream or self.ready_stream
        deadline = time.monotonic() + timeout
        seen = 0
        matches = 0
        with self.cond:
            while True:
                lines = self.lines[stream]
                for line in lines[seen:]:
                    match = regex.search(line)
                    if match is not None:
                        matches += 1
                        if matches > skip:
                            return match
                seen = len(lines)
                left = deadline - time.monotonic()
                if self.popen.poll() is not None and all(not r.is_alive() for r in self.readers):
                    raise LabError(
                        f"{self.name} exited with {self.popen.returncode} before printing "
                        f"/{pattern}/; stderr:\n{self.stderr_tail()}"
                    )
                if left <= 0:
                    raise LabError(
                        f"{self.name} did not print /{pattern}/ within {timeout} s; "
                        f"stderr:\n{self.stderr_tail()}"
                    )
                self.cond.wait(min(left, 0.2))

    def wait_ready(
        self, pattern: str = r"^READY (\S+):(\d+)$", timeout: float = READY_TIMEOUT
    ) -> tuple[str, int]:
        match = self.wait_line(pattern, timeout)
        return match.group(1), int(match.group(2))

    def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` for exit; return the exit code or None if still running."""
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        for reader in self.readers:
            reader.join(timeout=2.0)
        return code

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(signum)

    def stop(self, grace: float = STOP_GRACE) -> int | None:
        """SIGTERM, a second SIGTERM after a moment (a tether server drains on the first
        and stops on the second: docs/operations.md, "Drain"), then SIGKILL to the process
        group after ``grace`` seconds."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            if self.wait(SECOND_TERM_AFTER) is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGTERM)
                self.wait(grace)
        # Whatever is left of the group (forked children holding our pipes) goes now.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.wait(grace)
        for reader in self.readers:
            reader.join(timeout=2.0)
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        return self.popen.returncode

    def rss_kib(self) -> int | None:
        """Resident set size from /proc, or None when the process is gone."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        return int(match.group(1)) if match else None

    def stdout_text(self) -> str:
        with self.cond:
            return "\n".join(self.lines["stdout"])

    def stderr_text(self) -> str:
        with self.cond:
            return "\n".join(self.lines["stderr"])

    def stderr_tail(self, n: int = 30) -> str:
        with self.cond:
            return "\n".join(self.lines["stderr"][-n:])


class Lab:
    """Client host and server host in two fresh namespaces joined by a veth pair."""

    def __init__(self, name: str = "lab", log_dir: Path | None = None) -> None:
        self.name = name
        self.id = f"{random.randrange(1 << 24):06x}"
        self.subnet = next(_subnets) % 250 + 1
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix=f"tether-netlab-{name}-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        owner = f"{NS_PREFIX}{os.getpid()}-{self.id}"
        self.client = Host("client", f"{owner}-c", CLIENT_IF, f"198.18.{self.subnet}.1")
        self.server = Host("server", f"{owner}-s", SERVER_IF, f"198.18.{self.subnet}.2")
        self.procs: list[Proc] = []
        self.events: list[tuple[float, str]] = []
        self.nft_tables: dict[str, set[str]] = {"client": set(), "server": set()}
        self.closed = False
        self._roam_count = 0

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        with _open_labs_lock:
            _open_labs.add(self)
        try:
            for host in (self.client, self.server):
                for address in (host.address,):
                    assert ipaddress.ip_address(address) in LAB_NETWORK
                self._ip("netns", "add", host.ns)
                self.sh(host, "ip", "link", "set", "lo", "up")
            self._ip(
                "link",
                "add",
                CLIENT_IF,
                "netns",
                self.client.ns,
                "type",
                "veth",
                "peer",
                "name",
                SERVER_IF,
                "netns",
                self.server.ns,
            )
            for host in (self.client, self.server):
                self.sh(
                    host,
                    "ip",
                    "addr",
                    "add",
                    f"{host.address}/{host.prefixlen}",
                    "dev",
                    host.ifname,
                )
                self.sh(host, "ip", "link", "set", host.ifname, "up")
            self.log("lab up")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop every process and delete both namespaces; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        try:
            for proc in reversed(self.procs):
                with contextlib.suppress(Exception):
                    proc.stop()
            for host in (self.client, self.server):
                with contextlib.suppress(Exception):
                    _kill_namespace_pids(host.ns)
                subprocess.run(
                    ["ip", "netns", "del", host.ns], capture_output=True, timeout=COMMAND_TIMEOUT
                )
        finally:
            with _open_labs_lock:
                _open_labs.discard(self)

    def host(self, side: str | Host) -> Host:
        if isinstance(side, Host):
            return side
        return {"client": self.client, "server": self.server}[side]

    @property
    def last_event_at(self) -> float:
        """``time.monotonic()`` of the last fault or undo."""
        return self.events[-1][0]

    def log(self, what: str) -> float:
        now = time.monotonic()
        self.events.append((now, what))
        return now

    # -- commands ------------------------------------------------------------------------------
    def _ip(self, *args: str) -> str:
        return self._run(["ip", *args])

    def _run(self, argv: list[str], stdin: str | None = None, check: bool = True) -> str:
        result = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT
        )
        if check and result.returncode != 0:
            raise LabError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}")
        return result.stdout

    def sh(self, side: str | Host, *argv: str, stdin: str | None = None, check: bool = True) -> str:
        """Run a short command inside a host's namespace and return its stdout."""
        return self._run(["ip", "netns", "exec", self.host(side).ns, *argv], stdin, check)

    def spawn(
        self,
        side: str | Host,
        argv: Sequence[str],
        name: str,
        *,
        ready: str | None = r"^READY (\S+):(\d+)$",
        ready_stream: str = "stdout",
        ready_timeout: float = READY_TIMEOUT,
        stdin: int | None = subprocess.DEVNULL,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> Proc:
        """Start ``argv`` in a host's namespace; with ``ready``, return once it is listening."""
        host = self.host(side)
        full = ["ip", "netns", "exec", host.ns, *argv]
        popen = subprocess.Popen(
            full,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,  # its own process group, killed as one at teardown
        )
        proc = Proc(name, host, list(argv), popen, self.log_dir, ready_stream)
        self.procs.append(proc)
        if ready is not None:
            proc.wait_line(ready, ready_timeout)
        return proc

    # -- faults: link --------------------------------------------------------------------------
    def link_down(self, side: str = "client") -> float:
        host = self.host(side)
        self.sh(host, "ip", "link", "set", host.ifname, "down")
        return self.log(f"link down ({host.role})")

    def link_up(self, side: str = "client") -> float:
        """Bring a veth end up again, restore the routes it lost; return when it happened."""
        host = self.host(side)
        self.sh(host, "ip", "link", "set", host.ifname, "up")
        for route in host.extra_routes:
            self.sh(host, "ip", "route", "replace", *route)
        return self.log(f"link up ({host.role})")

    # -- faults: nft ---------------------------------------------------------------------------
    def nft_table(
        self, side: str, table: str, input_rules: Sequence[str], output_rules: Sequence[str]
    ) -> float:
        """Install a table of our own in a host's namespace (``inet`` family, filter hooks)."""
        host = self.host(side)
        script = (
            f"table inet {table} {{\n"
            f"  chain input {{ type filter hook input priority 0; policy accept;\n"
            + "".join(f"    {rule}\n" for rule in input_rules)
            + "  }\n"
            "  chain output { type filter hook output priority 0; policy accept;\n"
            + "".join(f"    {rule}\n" for rule in output_rules)
            + "  }\n}\n"
        )
        self.sh(host, "nft", "-f", "-", stdin=script)
        self.nft_tables[host.role].add(table)
        return self.log(f"nft {table} on ({host.role})")

    def clear_nft(self, side: str, table: str) -> float:
        host = self.host(side)
        self.sh(host, "nft", "delete", "table", "inet", table)
        self.nft_tables[host.role].discard(table)
        return self.log(f"nft {table} removed ({host.role})")

    def blackhole(self, side: str = "client") -> float:
        """Drop every packet in and out of the host's veth, silently (no reset, no ICMP)."""
        host = self.host(side)
        return self.nft_table(
            side,
            "tth_blackhole",
            [f'iifname "{host.ifname}" drop'],
            [f'oifname "{host.ifname}" drop'],
        )

    def unblackhole(self, side: str = "client") -> float:
        return self.clear_nft(side, "tth_blackhole")

    def reject_reset(self, sides: Sequence[str] = ("client", "server")) -> float:
        """Answer every TCP segment that arrives over the veth with a reset (both hosts).

        Each host rejects what it receives, so the *sender* gets the RST: a live connection is
        reset on both ends as soon as either sends, and a new connect is refused.
        """
        t = 0.0
        for side in sides:
            host = self.host(side)
            t = self.nft_table(
                side,
                "tth_reject",
                [
                    # Let the resets through, or each host would eat the other's.
                    f'iifname "{host.ifname}" tcp flags & rst == rst accept',
                    f'iifname "{host.ifname}" meta l4proto tcp reject with tcp reset',
                    f'iifname "{host.ifname}" drop',
                ],
                [],
            )
        return t

    def unreject(self, sides: Sequence[str] = ("client", "server")) -> float:
        t = 0.0
        for side in sides:
            t = self.clear_nft(side, "tth_reject")
        return t

    def drop_payload(self, port: int, side: str = "server") -> float:
        """Let TCP handshakes and bare ACKs through but drop every segment carrying data to or
        from ``port``: a connection establishes, then whatever it says is lost.

        A segment with no payload has an IP total length of at most 60 (20 IP + up to 40 TCP
        header); tether's frames are longer than 8 bytes, so every frame is dropped.
        """
        return self.nft_table(
            side,
            "tth_payload",
            [f"tcp dport {port} ip length > 60 drop", f"tcp sport {port} ip length > 60 drop"],
            [f"tcp dport {port} ip length > 60 drop", f"tcp sport {port} ip length > 60 drop"],
        )

    def undrop_payload(self, side: str = "server") -> float:
        return self.clear_nft(side, "tth_payload")

    # -- faults: sockets -----------------------------------------------------------------------
    def kill_sockets(self, side: str, server_port: int) -> int:
        """``ss -K`` the established TCP sockets between the hosts on ``server_port``.

        Only the sockets on the veth addresses are touched (never loopback ones, so the
        backend's and the application's connections survive). Returns how many were killed;
        needs CONFIG_INET_DIAG_DESTROY (checked by ``sock_destroy_works``).
        """
        host = self.host(side)
        if host.role == "client":
            selector = ["dst", self.server.address, "dport", "=", f":{server_port}"]
        else:
            selector = ["src", self.server.address, "sport", "=", f":{server_port}"]
        out = self.sh(host, "ss", "-K", "-H", "-tn", "state", "established", *selector)
        killed = len([line for line in out.splitlines() if line.strip()])
        self.log(f"ss -K killed {killed} socket(s) on ({host.role}) port {server_port}")
        return killed

    def count_sockets(self, side: str, server_port: int) -> int:
        host = self.host(side)
        port_sel = "dport" if host.role == "client" else "sport"
        out = self.sh(
            host, "ss", "-H", "-tn", "state", "established", port_sel, "=", f":{server_port}"
        )
        return len([line for line in out.splitlines() if line.strip()])

    # -- faults: addressing --------------------------------------------------------------------
    def change_client_address(self) -> str:
        """Roam: remove the client's address, give it a new one from another /24 of the lab
        network, route to the server from it (and back). Returns the new address."""
        self._roam_count += 1
        old = self.client.address
        new_net = ipaddress.ip_network(f"198.19.{self.subnet}.0/24")
        new = str(new_net.network_address + self._roam_count)
        assert ipaddress.ip_address(new) in LAB_NETWORK
        self.sh(
            self.client, "ip", "addr", "del", f"{old}/{self.client.prefixlen}", "dev", CLIENT_IF
        )
        self.sh(self.client, "ip", "addr", "add", f"{new}/24", "dev", CLIENT_IF)
        client_route = [f"{self.server.address}/32", "dev", CLIENT_IF, "src", new]
        server_route = [str(new_net), "dev", SERVER_IF]
        self.sh(self.client, "ip", "route", "replace", *client_route)
        self.sh(self.server, "ip", "route", "replace", *server_route)
        self.client.extra_routes = [client_route]
        if server_route not in self.server.extra_routes:
            self.server.extra_routes.append(server_route)
        self.client.address = new
        self.client.prefixlen = 24
        self.log(f"client address {old} -> {new}")
        return new

    # -- faults: rate --------------------------------------------------------------------------
    def rate_limit(self, rate: str = "1mbit", sides: Sequence[str] = ("client", "server")) -> float:
        """Token-bucket limit on the egress of each side's veth (so both directions)."""
        t = 0.0
        for side in sides:
            host = self.host(side)
            self.sh(
                host,
                "tc",
                "qdisc",
                "replace",
                "dev",
                host.ifname,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "16kb",
                "latency",
                "400ms",
            )
            t = self.log(f"tbf {rate} on ({host.role})")
        return t

    def clear_rate_limit(self, sides: Sequence[str] = ("client", "server")) -> float:
        t = 0.0
        for side in sides:
            host = self.host(side)
            self.sh(host, "tc", "qdisc", "del", "dev", host.ifname, "root")
            t = self.log(f"tbf removed ({host.role})")
        return t


def sock_destroy_works(lab: Lab) -> bool:
    """True when ``ss -K`` really destroys sockets here (kernel CONFIG_INET_DIAG_DESTROY)."""
    listener = lab.spawn(
        "server",
        ["socat", "-d", "-d", f"TCP-LISTEN:9,bind={lab.server.address},reuseaddr", "STDIO"],
        "probe-listener",
        ready=r"listening on",
        ready_stream="stderr",
        stdin=subprocess.PIPE,
    )
    talker = lab.spawn(
        "client",
        ["socat", "-d", "-d", "STDIO", f"TCP:{lab.server.address}:9"],
        "probe-talker",
        ready=r"starting data transfer loop",
        ready_stream="stderr",
        stdin=subprocess.PIPE,
    )
    try:
        killed = lab.kill_sockets("client", 9)
        return killed == 1 and talker.wait(5.0) is not None
    finally:
        talker.stop()
        listener.stop()


@contextlib.contextmanager
def lab(name: str = "lab", log_dir: Path | None = None) -> Iterator[Lab]:
    """``with lab("case") as net:`` a fresh two-host lab, always torn down."""
    instance = Lab(name, log_dir)
    try:
        instance.open()
        yield instance
    finally:
        instance.close()


@atexit.register
def _close_open_labs() -> None:
    with _open_labs_lock:
        labs = list(_open_labs)
    for instance in labs:
        with contextlib.suppress(Exception):
            instance.close()
