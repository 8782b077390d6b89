"""The lab itself, proven with plain socat relays (no tether): what plain TCP does under each
fault, and that every fault helper does what it says."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from . import netns
from .chain import (
    app_report,
    bytes_after,
    completeness_problems,
    integrity_problems,
    resume_times,
    start_app,
    start_backend,
    start_socat,
)
from .traffic import expected_digest

pytestmark = [pytest.mark.netns]

MB = 1_000_000


def test_traffic_through_plain_relay(lab: netns.Lab, record: dict[str, Any]) -> None:
    backend = start_backend(lab, up=32 * MB, down=32 * MB, seed=11)
    relay = start_socat(lab, backend.port)
    app = start_app(lab, relay, backend, deadline=30)
    a = app_report(app, 40)
    b = backend.next_report(10)
    assert not integrity_problems(a, b, backend.seed)
    assert not completeness_problems(a, b)
    assert a["received_sha256"] == expected_digest(11, "down", 32 * MB)
    assert b["received_sha256"] == expected_digest(11, "up", 32 * MB)
    assert b["eof"] and a["closed_by"] == "self"
    record.update(title="plain TCP, no fault (socat)", bytes=a["received"] + b["received"])


def test_plain_tcp_survives_short_link_outage(lab: netns.Lab, record: dict[str, Any]) -> None:
    """TCP itself rides out a 3 s link-down: retransmissions resume once the link is up."""
    backend = start_backend(lab, up=6 * MB, down=6 * MB, seed=12, rate=1 * MB)
    relay = start_socat(lab, backend.port)
    app = start_app(lab, relay, backend, rate=1 * MB, deadline=40)
    app.wait(1.0)
    lab.link_down("client")
    app.wait(3.0)
    restored = lab.link_up("client")
    a = app_report(app, 45)
    b = backend.next_report(10)
    assert not integrity_problems(a, b, backend.seed)
    assert not completeness_problems(a, b), (a, b)
    times = resume_times(a, b, restored)
    assert times["resume"] is not None and times["resume"] < 10
    record.update(
        title="plain TCP, link down 3 s (socat)",
        bytes=a["received"] + b["received"],
        resume=times["resume"],
        note="TCP retransmission backoff decides the resume time",
    )


def test_address_change_hangs_plain_tcp(lab: netns.Lab, record: dict[str, Any]) -> None:
    """After the client's address changes, a plain TCP flow hangs silently: no error and no
    data (the next test shows the new address itself reaches the server fine)."""
    backend = start_backend(lab, up=40 * MB, down=40 * MB, seed=13, rate=4 * MB)
    relay = start_socat(lab, backend.port)
    app = start_app(lab, relay, backend, rate=4 * MB, deadline=6)
    app.wait(1.0)
    lab.change_client_address()
    changed = lab.last_event_at
    a = app_report(app, 15)
    # The backend's side of the flow is hung too, so it has no report yet: check the app's.
    assert a["received_sha256"] == expected_digest(backend.seed, "down", a["received"])
    assert a["deadline_hit"], f"plain TCP flow should hang after the address change: {a}"
    # Nothing beyond what was already in flight arrives after the change (one RTT of slack).
    assert bytes_after(a["timeline"], changed + 0.5) == 0
    record.update(
        title="plain TCP, client address change (socat)",
        bytes=a["received"] + a["sent"],
        resume="never (hangs)",
        note="expected: plain TCP cannot roam",
    )


def test_fresh_connection_from_new_address(lab: netns.Lab) -> None:
    """The roaming helper leaves a working path: a new connection from the new address works."""
    backend = start_backend(lab, up=1 * MB, down=1 * MB, seed=14)
    relay = start_socat(lab, backend.port)
    lab.change_client_address()
    app = start_app(lab, relay, backend, deadline=15)
    a = app_report(app, 20)
    b = backend.next_report(10)
    assert not completeness_problems(a, b) and not integrity_problems(a, b, backend.seed)
    # And link down/up afterwards keeps the roamed routes.
    lab.link_down("client")
    lab.link_up("client")
    app = start_app(lab, relay, backend, deadline=15, name="app2")
    a = app_report(app, 20)
    b = backend.next_report(10)
    assert not completeness_problems(a, b) and not integrity_problems(a, b, backend.seed)


def test_ss_kill_resets_plain_tcp(lab: netns.Lab, sock_destroy: None) -> None:
    backend = start_backend(lab, up=40 * MB, down=40 * MB, seed=15, rate=4 * MB)
    relay = start_socat(lab, backend.port)
    app = start_app(lab, relay, backend, rate=4 * MB, deadline=15)
    app.wait(1.0)
    assert lab.kill_sockets("client", relay.server_port) == 1
    a = app_report(app, 20)
    b = backend.next_report(10)
    assert a["status"] == "incomplete" and not a["deadline_hit"], a
    assert not integrity_problems(a, b, backend.seed)


def test_blackhole_then_reject(lab: netns.Lab) -> None:
    """A 2 s blackhole is silent (plain TCP survives it); a reject resets the flow."""
    backend = start_backend(lab, up=40 * MB, down=40 * MB, seed=16, rate=2 * MB)
    relay = start_socat(lab, backend.port)
    app = start_app(lab, relay, backend, rate=2 * MB, deadline=20)
    app.wait(1.0)
    lab.blackhole("client")
    app.wait(2.0)
    restored = lab.unblackhole("client")
    app.wait(3.0)
    assert app.running, "a silent 2 s blackhole must not end a TCP flow"
    lab.reject_reset()
    a = app_report(app, 20)
    lab.unreject()
    b = backend.next_report(10)
    assert a["status"] == "incomplete" and not a["deadline_hit"], a
    assert bytes_after(a["timeline"], restored) > 0
    assert not integrity_problems(a, b, backend.seed)
    # With the reject in place a new connection is refused at once; without it, it works.
    lab.reject_reset()
    refused = subprocess.run(
        ["ip", "netns", "exec", lab.client.ns, "socat", "-u",
         f"TCP:{lab.server.address}:{relay.server_port},connect-timeout=3", "OPEN:/dev/null"],
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    assert "refused" in refused.stderr.lower(), refused.stderr


def test_rate_limit_is_about_1_mbit(lab: netns.Lab) -> None:
    lab.rate_limit("1mbit")
    size = 250_000  # 2 s at 1 Mbit/s, one direction (a shared queue would add ACK delay)
    backend = start_backend(lab, up=0, down=size, seed=17)
    relay = start_socat(lab, backend.port)
    app = start_app(lab, relay, backend, deadline=30)
    a = app_report(app, 35)
    b = backend.next_report(10)
    assert not completeness_problems(a, b) and not integrity_problems(a, b, backend.seed)
    elapsed = a["ended_at"] - a["connected_at"]
    rate = size * 8 / elapsed
    assert 0.6e6 < rate < 1.3e6, f"{rate / 1e6:.2f} Mbit/s over {elapsed:.2f} s"


def test_teardown_after_failure_and_sweep(netlab_host: None, tmp_path: Path) -> None:
    """A failing test still leaves no namespace and no process behind."""
    names: list[str] = []
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="boom"), netns.lab("teardown", tmp_path) as net:
        names = [net.client.ns, net.server.ns]
        sleeper = net.spawn("server", ["sleep", "300"], "sleeper", ready=None)
        pids.append(sleeper.pid)
        raise RuntimeError("boom")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name in names:
        assert name not in listed
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    # A namespace left by a dead owner is swept.
    stale = f"{netns.NS_PREFIX}999999999-abcdef-c"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    assert stale in netns.sweep_stale()
    assert (
        stale not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    )


def test_process_killed_when_interrupted(netlab_host: None, tmp_path: Path) -> None:
    """SIGINT to a Python process holding a lab (KeyboardInterrupt) still deletes it."""
    script = (
        "import sys, time\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from netlab import netns\n"
        "with netns.lab('interrupted', None) as net:\n"
        "    net.spawn('server', ['sleep', '300'], 'sleeper', ready=None)\n"
        "    print(net.client.ns, net.server.ns, flush=True)\n"
        "    time.sleep(30)\n"
    )
    tests_dir = str(Path(__file__).resolve().parents[1])
    with subprocess.Popen(
        [sys.executable, "-c", script, tests_dir], stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None
        names = proc.stdout.readline().split()
        assert len(names) == 2
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name in names:
        assert name not in listed
