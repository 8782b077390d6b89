"""The relay chain of a lab: backend, relays, application, and what their reports mean.

::

    client host (namespace)                         server host (namespace)
    app ──> 127.0.0.1:E  relay-client ══ veth ══>  S:P  relay-server ──> 127.0.0.1:B  backend

The relays are either the real ``tether client`` / ``tether server`` (``start_tether``) or two
plain ``socat`` processes (``start_socat``), so one test body can show what plain TCP does and
what tether does under the same fault. ``S`` is the server host's veth address; only the link
between the relays crosses the veth, the application and the backend use loopback.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .netns import Lab, Proc
from .traffic import expected_digest

TRAFFIC = Path(__file__).with_name("traffic.py")
REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
REPORT_LINE = r"^REPORT (\{.*\})$"


def tether_command() -> list[str] | None:
    """How to run the tether CLI here, or None when it is not usable yet."""
    candidates = []
    script = Path(PYTHON).with_name("tether")
    if script.exists():
        candidates.append([str(script)])
    if shutil.which("tether"):
        candidates.append([str(shutil.which("tether"))])
    candidates.append([PYTHON, "-m", "tether"])
    for argv in candidates:
        try:
            result = subprocess.run(
                [*argv, "server", "--help"], capture_output=True, text=True, timeout=20
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if result.returncode == 0 and "--backend" in result.stdout:
            return argv
    return None


@dataclass
class Backend:
    proc: Proc
    port: int
    seed: int
    up: int
    down: int
    reports_seen: int = 0

    def next_report(self, timeout: float) -> dict[str, Any]:
        """The report of the next connection to finish (in finishing order)."""
        match = self.proc.wait_line(REPORT_LINE, timeout, skip=self.reports_seen)
        self.reports_seen += 1
        return json.loads(match.group(1))  # type: ignore[no-any-return]


def start_backend(lab: Lab, *, up: int, down: int, seed: int, rate: float = 0.0,
                  wait_first_byte: bool = False, name: str = "backend") -> Backend:  # fmt: skip
    proc = lab.spawn(
        "server",
        [PYTHON, str(TRAFFIC), "backend", "--listen", "127.0.0.1:0", "--seed", str(seed),
         "--up-bytes", str(up), "--down-bytes", str(down), "--rate", str(rate),
         *(["--wait-first-byte"] if wait_first_byte else [])],
        name,
    )  # fmt: skip
    _, port = proc.wait_ready()
    return Backend(proc, port, seed, up, down)


@dataclass
class Relay:
    kind: str  # "tether" or "socat"
    entry: tuple[str, int]  # where the application connects, on the client host
    server_port: int  # where relay-client connects, on the server host's veth address
    server: Proc
    client: Proc
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def entry_text(self) -> str:
        return f"{self.entry[0]}:{self.entry[1]}"


SOCAT_SERVER_PORT = 7001
SOCAT_CLIENT_PORT = 7000


def start_socat(lab: Lab, backend_port: int) -> Relay:
    """Two plain TCP relays: what an application gets without tether."""
    server = lab.spawn(
        "server",
        ["socat", "-d", "-d", "-b", "262144",
         f"TCP-LISTEN:{SOCAT_SERVER_PORT},bind={lab.server.address},reuseaddr,fork",
         f"TCP:127.0.0.1:{backend_port}"],
        "socat-server",
        ready=r"listening on",
        ready_stream="stderr",
    )  # fmt: skip
    client = lab.spawn(
        "client",
        ["socat", "-d", "-d", "-b", "262144",
         f"TCP-LISTEN:{SOCAT_CLIENT_PORT},bind=127.0.0.1,reuseaddr,fork",
         f"TCP:{lab.server.address}:{SOCAT_SERVER_PORT}"],
        "socat-client",
        ready=r"listening on",
        ready_stream="stderr",
    )  # fmt: skip
    return Relay("socat", ("127.0.0.1", SOCAT_CLIENT_PORT), SOCAT_SERVER_PORT, server, client)


def start_tether(
    lab: Lab,
    backend_port: int,
    tether: list[str],
    *,
    timeout: float | None = None,
    keepalive: float | None = None,
    server_args: list[str] | None = None,
    client_args: list[str] | None = None,
) -> Relay:
    """The real ``tether server`` on the server host and ``tether client`` on the client host."""
    common: list[str] = []
    if timeout is not None:
        common += ["--timeout", str(timeout)]
    if keepalive is not None:
        common += ["--keepalive", str(keepalive)]
    env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO / "src")}
    server = lab.spawn(
        "server",
        [*tether, "server", "--listen", f"{lab.server.address}:0",
         "--backend", f"127.0.0.1:{backend_port}", *common, *(server_args or [])],
        "tether-server",
        env=env,
    )  # fmt: skip
    _, server_port = server.wait_ready()
    client = lab.spawn(
        "client",
        [*tether, "client", "--listen", "127.0.0.1:0",
         "--server", f"{lab.server.address}:{server_port}", *common, *(client_args or [])],
        "tether-client",
        env=env,
    )  # fmt: skip
    entry = client.wait_ready()
    return Relay("tether", entry, server_port, server, client)


def start_app(lab: Lab, relay: Relay, backend: Backend, *, rate: float = 0.0,
              deadline: float = 60.0, name: str = "app") -> Proc:  # fmt: skip
    """Start the application side; it connects at once (no READY line)."""
    return lab.spawn(
        "client",
        [PYTHON, str(TRAFFIC), "app", "--connect", relay.entry_text, "--seed", str(backend.seed),
         "--up-bytes", str(backend.up), "--down-bytes", str(backend.down),
         "--rate", str(rate), "--deadline", str(deadline)],
        name,
        ready=None,
    )  # fmt: skip


def app_report(app: Proc, timeout: float) -> dict[str, Any]:
    match = app.wait_line(REPORT_LINE, timeout)
    return json.loads(match.group(1))  # type: ignore[no-any-return]


def integrity_problems(app: dict[str, Any], backend: dict[str, Any], seed: int) -> list[str]:
    """Compare what each side received with the seeded stream the other side sent.

    Checks the received digest against the digest of the same-length prefix of the stream, so a
    stream cut short is still checked for loss, duplication and reordering up to where it
    stopped. Returns an empty list when everything matches.
    """
    problems = []
    for who, report, direction in (("app", app, "down"), ("backend", backend, "up")):
        want = expected_digest(seed, direction, report["received"])
        if report["received_sha256"] != want:
            problems.append(
                f"{who} received {report['received']} bytes whose SHA-256 is not the {direction}"
                f" stream's: data lost, duplicated or reordered"
            )
    if app["sent_sha256"] != expected_digest(seed, "up", app["sent"]):
        problems.append("app sent something else than the up stream (traffic tool bug)")
    return problems


def completeness_problems(app: dict[str, Any], backend: dict[str, Any]) -> list[str]:
    problems = []
    if app["status"] != "complete":
        problems.append(
            f"app incomplete: received {app['received']}/{app['expected_receive']}, sent "
            f"{app['sent']}/{app['expected_send']}, closed_by={app['closed_by']!r} "
            f"error={app['error']!r}"
        )
    if backend["received"] != backend["expected_receive"]:
        problems.append(
            f"backend received {backend['received']}/{backend['expected_receive']} "
            f"(closed_by={backend['closed_by']!r} error={backend['error']!r})"
        )
    return problems


def first_after(timeline: list[list[float]], t: float) -> float | None:
    """Time of the first receive burst that started after ``t``."""
    for stamp, _total in timeline:
        if stamp > t:
            return float(stamp)
    return None


def resume_times(app: dict[str, Any], backend: dict[str, Any], restored_at: float
                 ) -> dict[str, float | None]:  # fmt: skip
    """Seconds from ``restored_at`` to the first byte delivered after it, per direction.

    ``down`` is at the application, ``up`` at the backend; ``resume`` is the later of the two
    (both directions moving again), or the one that exists if a direction had already finished.
    """
    down = first_after(app["timeline"], restored_at)
    up = first_after(backend["timeline"], restored_at)
    result: dict[str, float | None] = {
        "down": None if down is None else round(down - restored_at, 3),
        "up": None if up is None else round(up - restored_at, 3),
    }
    present = [v for v in result.values() if v is not None]
    result["resume"] = max(present) if present else None
    return result


def bytes_after(timeline: list[list[float]], t: float) -> int:
    """Bytes received in bursts that started after ``t``."""
    before = 0
    for stamp, total in timeline:
        if stamp > t:
            break
        before = int(total)
    return int(timeline[-1][1]) - before if timeline else 0


def proc_logs(*procs: Proc) -> str:
    """The tail of each process's stderr, for assertion messages."""
    parts = []
    for proc in procs:
        parts.append(f"--- {proc.name} (pid {proc.pid}, rc {proc.popen.poll()}) stderr tail:\n"
                     f"{proc.stderr_tail(40)}")  # fmt: skip
    return "\n".join(parts)


def require(condition: bool, message: str, *procs: Proc) -> None:
    if not condition:
        raise AssertionError(f"{message}\n{proc_logs(*procs)}")


class PeakRss:
    """Sample the resident memory of some processes every ``interval`` seconds in a thread,
    keeping the peak of each, for as long as the ``with`` block lasts."""

    def __init__(self, *procs: Proc, interval: float = 0.2) -> None:
        self.procs = procs
        self.interval = interval
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for proc in self.procs:
            rss = proc.rss_kib()
            if rss is not None:
                self.peak[proc.name] = max(self.peak.get(proc.name, 0), rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakRss:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()
