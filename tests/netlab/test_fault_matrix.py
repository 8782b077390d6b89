"""The fault matrix of issue 3, against the real ``tether server`` and ``tether client``.

Every case streams seeded random data both ways at once (``traffic.py``), injects one fault
between the hosts, and checks at both ends that every byte arrived once and in order (SHA-256
of the received stream against the sender's stream). Cases record the bytes moved and the
resume time (restored path -> first byte delivered after it) for docs/reliability.md.

Timing: each case waits for the session to be established (the client's log line) before its
fault, and every wait is bounded; the whole file runs in about four minutes.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from typing import Any

import pytest

from . import netns
from .chain import (
    Backend,
    PeakRss,
    Relay,
    app_report,
    completeness_problems,
    integrity_problems,
    require,
    resume_times,
    start_app,
    start_backend,
    start_tether,
)
from .netns import Proc
from .traffic import expected_digest

pytestmark = [pytest.mark.netns, pytest.mark.slow]

MB = 1_000_000
ESTABLISHED = r"session \S+: established"
LINK_LOST = r"session \S+: link lost"
SERVER_RESUMED = r"session \S+: resumed from (\S+)"


class Flow:
    """Backend and tether pair; ``start()`` adds the application streaming ``rate`` bytes/s
    each way (``size`` bytes, by default ``rate * seconds``) and waits for the session."""

    def __init__(
        self,
        lab: netns.Lab,
        tether: list[str],
        *,
        seed: int,
        rate: float,
        seconds: float = 0.0,
        size: int | None = None,
        deadline: float,
        timeout: float | None = None,
        keepalive: float | None = None,
        buffer: int | None = None,
    ) -> None:
        size = int(rate * seconds) if size is None else size
        self.lab = lab
        self.rate = rate
        # The backend speaks once the application has: the setup race of a backend that
        # speaks first has its own case (test_backend_speaks_first).
        self.backend: Backend = start_backend(
            lab, up=size, down=size, seed=seed, rate=rate, wait_first_byte=True
        )
        extra = ["--buffer", str(buffer)] if buffer else []
        self.relay: Relay = start_tether(
            lab,
            self.backend.port,
            tether,
            timeout=timeout,
            keepalive=keepalive,
            server_args=extra,
            client_args=extra,
        )
        self.deadline = deadline
        self.app: Proc | None = None

    def start(self) -> Flow:
        self.app = start_app(
            self.lab, self.relay, self.backend, rate=self.rate, deadline=self.deadline
        )
        self.established_at = self.wait_client_log(ESTABLISHED, 10)
        return self

    @property
    def procs(self) -> tuple[Proc, ...]:
        app = () if self.app is None else (self.app,)
        return (*app, self.relay.client, self.relay.server, self.backend.proc)

    def wait_client_log(self, pattern: str, timeout: float) -> float:
        self.relay.client.wait_line(pattern, timeout, stream="stderr")
        return time.monotonic()

    def pause(self, seconds: float) -> None:
        """Let the flow run (the fault schedule, never a readiness wait)."""
        time.sleep(seconds)

    def finish(self) -> tuple[dict[str, Any], dict[str, Any]]:
        assert self.app is not None
        a = app_report(self.app, self.deadline + 10)
        b = self.backend.next_report(15)
        return a, b

    def check_intact(self, a: dict[str, Any], b: dict[str, Any]) -> None:
        problems = integrity_problems(a, b, self.backend.seed) + completeness_problems(a, b)
        require(not problems, "; ".join(problems), *self.procs)

    def server_resumes(self) -> list[str]:
        return re.findall(SERVER_RESUMED, self.relay.server.stderr_text())


def moved(a: dict[str, Any], b: dict[str, Any]) -> int:
    return int(a["received"]) + int(b["received"])


# -- link down / up ------------------------------------------------------------------------------


# The long outage: 60 s, near the lab's 60 s session timeout, in the report run (and with
# TETHER_NETLAB_LONG_OUTAGE=60); 30 s in the README's test command, which must stay under 15
# minutes: still ten keepalive intervals, so tether must notice the outage and resume.
LONG_OUTAGE = int(
    os.environ.get(
        "TETHER_NETLAB_LONG_OUTAGE", "60" if os.environ.get("TETHER_NETLAB_REPORT") else "30"
    )
)


@pytest.mark.parametrize(
    ("outage", "side"),
    [
        pytest.param(5, "client", id="5s"),
        pytest.param(LONG_OUTAGE, "server", id=f"{LONG_OUTAGE}s"),
    ],
)
def test_link_down_up(
    lab: netns.Lab, tether: list[str], record: dict[str, Any], outage: int, side: str
) -> None:
    rate = 2 * MB if outage < 30 else 1 * MB
    flow = Flow(
        lab, tether, seed=100 + outage, rate=rate, seconds=outage + 4, deadline=outage + 30
    ).start()
    flow.pause(1.0)
    lab.link_down(side)
    flow.pause(outage)
    restored = lab.link_up(side)
    a, b = flow.finish()
    flow.check_intact(a, b)
    times = resume_times(a, b, restored)
    require(
        times["resume"] is not None and times["resume"] < 5, f"slow resume {times}", *flow.procs
    )
    if outage > 10:  # longer than 2-3 keepalives: tether must have noticed and resumed
        require(len(flow.server_resumes()) >= 1, "no resume logged by the server", *flow.procs)
    if outage == LONG_OUTAGE:
        record["env"] = f"TETHER_NETLAB_LONG_OUTAGE={outage}"
    record.update(
        title=f"link down {outage} s ({side} end), then up",
        bytes=moved(a, b),
        resume=times["resume"],
        note=f"{len(flow.server_resumes())} resume(s)"
        if flow.server_resumes()
        else "no resume: shorter than two 3 s keepalives, TCP retransmission carried the link",
    )


# -- nft -----------------------------------------------------------------------------------------


def test_blackhole_10s(lab: netns.Lab, tether: list[str], record: dict[str, Any]) -> None:
    """Both directions dropped silently for 10 s: the client notices by itself."""
    flow = Flow(lab, tether, seed=110, rate=2 * MB, seconds=12, deadline=40).start()
    flow.pause(1.0)
    down = lab.blackhole("client")
    noticed = flow.wait_client_log(LINK_LOST, 10)
    flow.pause(max(0.0, 10 - (time.monotonic() - down)))
    restored = lab.unblackhole("client")
    a, b = flow.finish()
    flow.check_intact(a, b)
    times = resume_times(a, b, restored)
    require(len(flow.server_resumes()) >= 1, "no resume logged by the server", *flow.procs)
    require(
        times["resume"] is not None and times["resume"] < 3, f"slow resume {times}", *flow.procs
    )
    record.update(
        title="nft blackhole both directions 10 s",
        bytes=moved(a, b),
        resume=times["resume"],
        note=f"client noticed after {noticed - down:.1f} s",
    )


def test_reject_with_reset(lab: netns.Lab, tether: list[str], record: dict[str, Any]) -> None:
    """Every segment answered with a TCP reset for 2 s mid-transfer (new connects refused too)."""
    flow = Flow(lab, tether, seed=120, rate=4 * MB, seconds=6, deadline=30).start()
    flow.pause(1.0)
    rejected = lab.reject_reset()
    lost = flow.wait_client_log(LINK_LOST, 5)
    flow.pause(max(0.0, rejected + 2.0 - time.monotonic()))
    restored = lab.unreject()
    a, b = flow.finish()
    flow.check_intact(a, b)
    times = resume_times(a, b, restored)
    require(len(flow.server_resumes()) >= 1, "no resume logged by the server", *flow.procs)
    require(
        times["resume"] is not None and times["resume"] < 3, f"slow resume {times}", *flow.procs
    )
    record.update(
        title="nft reject with tcp reset 2 s, mid-transfer",
        bytes=moved(a, b),
        resume=times["resume"],
        note=f"client saw the link lost {lost - rejected:.2f} s after the reject",
    )


# -- ss -K ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["client", "server"])
def test_ss_kill(
    lab: netns.Lab, tether: list[str], sock_destroy: None, record: dict[str, Any], side: str
) -> None:
    flow = Flow(lab, tether, seed=130, rate=4 * MB, seconds=4, deadline=30).start()
    flow.pause(1.0)
    killed = lab.kill_sockets(side, flow.relay.server_port)
    at = lab.last_event_at
    require(killed == 1, f"ss -K killed {killed} sockets, expected the one link", *flow.procs)
    a, b = flow.finish()
    flow.check_intact(a, b)
    times = resume_times(a, b, at)
    require(len(flow.server_resumes()) >= 1, "no resume logged by the server", *flow.procs)
    record.update(
        title=f"ss -K the link socket on the {side} host",
        bytes=moved(a, b),
        resume=times["resume"],
        note="resume time counted from the kill",
    )


# -- roaming -------------------------------------------------------------------------------------


def test_roaming(lab: netns.Lab, tether: list[str], record: dict[str, Any]) -> None:
    """The client's address is removed and a new one added mid-transfer; the session resumes
    from the new address (the old TCP connection hangs silently: keepalives notice)."""
    flow = Flow(lab, tether, seed=140, rate=2 * MB, seconds=11, deadline=40).start()
    flow.pause(1.0)
    new = lab.change_client_address()
    changed = lab.last_event_at
    a, b = flow.finish()
    flow.check_intact(a, b)
    times = resume_times(a, b, changed)
    origins = flow.server_resumes()
    require(
        any(o.startswith(f"{new}:") for o in origins),
        f"no resume from the new address {new}: {origins}",
        *flow.procs,
    )
    record.update(
        title="roaming: client address replaced mid-transfer",
        bytes=moved(a, b),
        resume=times["resume"],
        note="counted from the address change, so it includes keepalive detection",
    )


# -- flapping ------------------------------------------------------------------------------------


def flap_schedule(seed: int, count: int = 10, within: float = 20.0) -> list[tuple[float, float]]:
    """``count`` (down, up) durations, random but reproducible, summing to at most ``within``."""
    rng = random.Random(seed)
    pairs = [(rng.uniform(0.2, 2.0), rng.uniform(0.2, 1.0)) for _ in range(count)]
    scale = min(1.0, within / sum(d + u for d, u in pairs))
    return [(d * scale, u * scale) for d, u in pairs]


def test_flapping(lab: netns.Lab, tether: list[str], record: dict[str, Any]) -> None:
    """10 outages of random length within 20 s."""
    schedule = flap_schedule(150)
    # --keepalive 0.5: a link silent for 1 s is dead, so most outages make tether resume,
    # and some resumes are cut by the next outage.
    flow = Flow(lab, tether, seed=150, rate=2 * MB, seconds=24, deadline=60, keepalive=0.5).start()
    flow.pause(1.0)
    restored = 0.0
    for down, up in schedule:
        lab.link_down("client")
        flow.pause(down)
        restored = lab.link_up("client")
        flow.pause(up)
    a, b = flow.finish()
    flow.check_intact(a, b)
    times = resume_times(a, b, restored)
    outages = ", ".join(f"{d:.1f}" for d, _ in schedule)
    record.update(
        title="flapping: 10 outages within 20 s",
        bytes=moved(a, b),
        resume=times["resume"],
        note=f"--keepalive 0.5; outages (s): {outages}; {len(flow.server_resumes())} resume(s); "
        "resume time after the last",
    )


# -- outages during handshakes -------------------------------------------------------------------


def test_outage_during_setup(lab: netns.Lab, tether: list[str], record: dict[str, Any]) -> None:
    """TCP connects but every byte of the setup handshake is lost for 3 s."""
    backend = start_backend(lab, up=8 * MB, down=8 * MB, seed=160, rate=2 * MB)
    relay = start_tether(lab, backend.port, tether)
    lab.drop_payload(relay.server_port, side="server")
    app = start_app(lab, relay, backend, rate=2 * MB, deadline=40)
    time.sleep(3.0)
    restored = lab.undrop_payload("server")
    relay.client.wait_line(ESTABLISHED, 15, stream="stderr")
    established = time.monotonic()
    a = app_report(app, 50)
    b = backend.next_report(15)
    procs = (app, relay.client, relay.server, backend.proc)
    problems = integrity_problems(a, b, backend.seed) + completeness_problems(a, b)
    require(not problems, "; ".join(problems), *procs)
    times = resume_times(a, b, restored)
    record.update(
        title="outage during the setup handshake (3 s, TCP up, frames lost)",
        bytes=moved(a, b),
        resume=times["resume"],
        note=f"established {established - restored:.2f} s after the path came back",
    )


def test_outage_during_resume(lab: netns.Lab, tether: list[str], record: dict[str, Any]) -> None:
    """The link goes down; when it comes back the client's resume handshake is lost for 4 s
    (TCP connects, frames dropped), then the path heals."""
    flow = Flow(lab, tether, seed=170, rate=2 * MB, seconds=10, deadline=50, keepalive=1).start()
    flow.pause(1.0)
    lab.link_down("client")
    flow.wait_client_log(LINK_LOST, 10)
    lab.drop_payload(flow.relay.server_port, side="server")
    lab.link_up("client")
    flow.pause(4.0)
    connected = lab.count_sockets("client", flow.relay.server_port)
    restored = lab.undrop_payload("server")
    a, b = flow.finish()
    flow.check_intact(a, b)
    times = resume_times(a, b, restored)
    require(
        connected >= 1, "no TCP connection reached the server during the resume outage", *flow.procs
    )
    require(len(flow.server_resumes()) >= 1, "no resume logged by the server", *flow.procs)
    record.update(
        title="outage during a resume (resume frames lost 4 s)",
        bytes=moved(a, b),
        resume=times["resume"],
        note=f"--keepalive 1; {connected} TCP link(s) up but mute during the outage",
    )


# -- slow link -----------------------------------------------------------------------------------


def _recv_q(lab: netns.Lab, side: str, selector: list[str]) -> int:
    out = lab.sh(side, "ss", "-Htn", "state", "established", *selector)
    return max((int(line.split()[0]) for line in out.splitlines() if line.strip()), default=0)


def test_slow_link_with_outage(lab: netns.Lab, tether: list[str], record: dict[str, Any]) -> None:
    """tbf 1 Mbit/s both ways, both sides sending as fast as they can, a 4 s outage: the
    256 KiB replay buffers fill, tether stops reading the application and the backend
    (backpressure), memory stays bounded, and everything arrives."""
    buffer = 256 * 1024
    lab.rate_limit("1mbit")
    size = 1 * MB  # 8 s at 1 Mbit/s
    # --keepalive 1: the 4 s outage is long enough for tether to resume (and replay a full
    # buffer), not only for TCP to retransmit.
    flow = Flow(
        lab, tether, seed=180, rate=0, size=size, deadline=60, buffer=buffer, keepalive=1
    ).start()
    with PeakRss(flow.relay.client, flow.relay.server) as peak:
        baseline = dict(peak.peak)
        flow.pause(2.0)
        lab.link_down("client")
        flow.pause(2.0)
        # Mid-outage: the relays hold bytes unread on their local sockets = backpressure.
        held_app = _recv_q(lab, "client", ["sport", "=", f":{flow.relay.entry[1]}"])
        held_backend = _recv_q(lab, "server", ["dport", "=", f":{flow.backend.port}"])
        flow.pause(2.0)
        restored = lab.link_up("client")
        a, b = flow.finish()
    flow.check_intact(a, b)
    times = resume_times(a, b, restored)
    growth = {k: peak.peak[k] - baseline.get(k, 0) for k in peak.peak}
    require(
        held_app > 0 and held_backend > 0,
        f"no backpressure: unread at tether client {held_app}, server {held_backend}",
        *flow.procs,
    )
    require(all(g < 48 * 1024 for g in growth.values()), f"RSS grew {growth} KiB", *flow.procs)
    elapsed = max(a["ended_at"], b["ended_at"]) - min(a["connected_at"], b["connected_at"])
    replayed = re.findall(r"replaying (\d+) bytes", flow.relay.client.stderr_text())
    replayed += re.findall(r"replaying (\d+) bytes", flow.relay.server.stderr_text())
    require(len(replayed) >= 2, "tether did not resume after the outage", *flow.procs)
    record.update(
        title="tbf 1 Mbit/s + 4 s outage (--buffer 256 KiB, --keepalive 1)",
        bytes=moved(a, b),
        resume=times["resume"],
        note=f"unread while away: {held_app // 1024} KiB app side, {held_backend // 1024} KiB "
        f"backend side; replayed {'/'.join(replayed) or 'nothing'} bytes (client/server); "
        f"RSS growth {max(growth.values()) // 1024} MiB; {elapsed:.1f} s total",
    )
    # The bound itself: --buffer is "the replay buffer bound per direction and session".
    # (It overshot by up to one read until 6ec31b4 bounded each read by the free capacity.)
    over = [int(n) for n in replayed if int(n) > buffer]
    require(not over, f"replayed {over} bytes with --buffer {buffer}: over the bound", *flow.procs)


# -- session timeout -----------------------------------------------------------------------------


def test_outage_longer_than_timeout(
    lab: netns.Lab, tether: list[str], record: dict[str, Any]
) -> None:
    """--timeout 5 and an outage that outlasts it, twice: both sides end the session, the
    application sees a close (not a hang), the backend connection is closed, and the server's
    memory after the second session is what it was after the first (nothing kept per session)."""
    flow = Flow(lab, tether, seed=190, rate=2 * MB, seconds=60, deadline=40, timeout=5,
                keepalive=1)  # fmt: skip
    server, client = flow.relay.server, flow.relay.client
    baseline = server.rss_kib() or 0  # listening, before any session
    rss_after: list[int] = []
    client_rss: list[int] = []
    closes: list[str] = []
    total = 0
    for round_ in range(2):
        flow.app = start_app(lab, flow.relay, flow.backend, rate=flow.rate, deadline=40,
                             name=f"app{round_}")  # fmt: skip
        client.wait_line(ESTABLISHED, 10, stream="stderr", skip=round_)
        flow.pause(1.0)
        down = lab.link_down("client")
        a = app_report(flow.app, 20)
        app_closed = time.monotonic() - down
        b = flow.backend.next_report(10)
        backend_closed = time.monotonic() - down
        server.wait_line(r"ended EXPIRED", 5, stream="stderr", skip=round_)
        client.wait_line(r"ended EXPIRED", 5, stream="stderr", skip=round_)
        outage = lab.link_up("client") - down
        rss_after.append(server.rss_kib() or 0)
        client_rss.append(client.rss_kib() or 0)
        total += moved(a, b)
        problems = integrity_problems(a, b, flow.backend.seed)
        require(not problems, "; ".join(problems), *flow.procs)
        require(outage > 5, f"the outage ({outage:.1f} s) did not outlast --timeout", *flow.procs)
        require(not a["deadline_hit"], f"the application hung: {a['error']}", *flow.procs)
        require(a["closed_by"] in ("peer", "reset"), f"app not closed: {a}", *flow.procs)
        require(b["closed_by"] in ("peer", "reset"), f"backend not closed: {b}", *flow.procs)
        require(app_closed < 5 + 3 + 2, f"app closed {app_closed:.1f} s after the outage began",
                *flow.procs)  # fmt: skip
        closes.append(
            f"app closed ({a['closed_by']}) {app_closed:.1f} s, backend ({b['closed_by']}) "
            f"{backend_closed:.1f} s into a {outage:.1f} s outage"
        )
    require(server.running and client.running, "a tether process exited", *flow.procs)
    require(
        rss_after[1] - rss_after[0] < 2 * 1024,
        f"server RSS grew per session: {baseline} -> {rss_after} KiB",
        *flow.procs,
    )
    require(client_rss[1] - client_rss[0] < 2 * 1024,
            f"client RSS grew per session: {client_rss} KiB", *flow.procs)  # fmt: skip
    record.update(
        title="outage > --timeout 5 s, twice",
        bytes=total,
        resume="ends cleanly",
        note=f"{closes[0]}; server RSS {baseline // 1024} MiB idle, {rss_after[0] // 1024} MiB "
        f"after one expired session, {rss_after[1] // 1024} MiB after two (client "
        f"{client_rss[0] // 1024} -> {client_rss[1] // 1024} MiB)",
    )


# -- server killed -------------------------------------------------------------------------------


def test_server_killed(lab: netns.Lab, tether: list[str], record: dict[str, Any]) -> None:
    """SIGKILL to tether server: the client gives up within its reconnect deadline (--timeout)
    and says why; the application sees a close."""
    flow = Flow(
        lab, tether, seed=200, rate=2 * MB, seconds=60, deadline=40, timeout=5, keepalive=1
    ).start()
    flow.pause(1.0)
    flow.relay.server.popen.send_signal(signal.SIGKILL)
    killed = lab.log("tether server killed")
    assert flow.app is not None
    a = app_report(flow.app, 20)
    closed = time.monotonic()
    match = flow.relay.client.wait_line(r"session \S+: ended (\S+) \((.*)\)", 5, stream="stderr")
    require(not a["deadline_hit"], f"the application hung: {a['error']}", *flow.procs)
    require(closed - killed < 5 + 3, f"gave up after {closed - killed:.1f} s", *flow.procs)
    want = expected_digest(flow.backend.seed, "down", int(a["received"]))
    require(a["received_sha256"] == want, "corrupt data at the application", *flow.procs)
    record.update(
        title="tether server killed (SIGKILL), --timeout 5",
        bytes=int(a["received"]) + int(a["sent"]),
        resume=f"gave up after {closed - killed:.1f} s",
        note=f"client: ended {match.group(1)} ({match.group(2)})",
    )
    # A clear reason names what the reconnects met: the dead server's port refuses them.
    require("refused" in match.group(2).lower(),
            f"the client's reason does not say why it could not reconnect: {match.group(0)}",
            flow.relay.client)  # fmt: skip


# -- backend closes during an outage -------------------------------------------------------------


def test_backend_close_during_outage(
    lab: netns.Lab, tether: list[str], record: dict[str, Any]
) -> None:
    """The backend closes while the client is away: after the resume the application gets
    every byte the backend sent, then the close."""
    flow = Flow(lab, tether, seed=210, rate=2 * MB, seconds=60, deadline=40, keepalive=1).start()
    flow.pause(1.0)
    lab.link_down("client")
    flow.wait_client_log(LINK_LOST, 10)
    flow.backend.proc.signal(signal.SIGUSR1)
    lab.log("backend closes")
    flow.pause(1.0)
    restored = lab.link_up("client")
    a, b = flow.finish()
    problems = integrity_problems(a, b, flow.backend.seed)
    require(not problems, "; ".join(problems), *flow.procs)
    require(b["closed_by"] == "backend", f"backend did not close: {b}", *flow.procs)
    require(
        a["received"] == b["sent"],
        f"app got {a['received']} of the {b['sent']} bytes the backend sent",
        *flow.procs,
    )
    require(
        a["eof"] and not a["error"] and not a["deadline_hit"],
        f"app did not see a clean close: {a}",
        *flow.procs,
    )
    times = resume_times(a, b, restored)
    record.update(
        title="backend closes during an outage",
        bytes=moved(a, b),
        resume=times["down"],
        note=f"all {b['sent']} bytes then EOF reached the app after the resume",
    )


# -- setup ---------------------------------------------------------------------------------------


def test_backend_speaks_first(lab: netns.Lab, tether: list[str], record: dict[str, Any]) -> None:
    """A backend that sends as soon as it is connected (SSH, SMTP, a database greeting), ten
    short sessions in a row, no fault: every byte of each must arrive."""
    backend = start_backend(lab, up=1 * MB, down=1 * MB, seed=220)
    relay = start_tether(lab, backend.port, tether)
    failures = []
    total = 0
    for i in range(10):
        app = start_app(lab, relay, backend, deadline=20, name=f"app{i}")
        a = app_report(app, 30)
        b = backend.next_report(10)
        total += moved(a, b)
        problems = integrity_problems(a, b, backend.seed) + completeness_problems(a, b)
        if problems:
            failures.append(f"session {i}: {'; '.join(problems)}")
    ended = [ln for ln in relay.client.stderr_text().splitlines() if "ended" in ln]
    require(not failures, "\n".join(failures + ended), relay.server)
    record.update(
        title="backend speaks first at setup, 10 sessions, no fault",
        bytes=total,
        note="setup race: backend bytes before the link is attached",
    )
