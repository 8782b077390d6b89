"""``tether ports``: /proc parsing on fixed text, real listeners of this process, the
2598 warnings on made-up listeners, and the message without /proc."""

from __future__ import annotations

import io
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether.ports import (
    Listener,
    Process,
    format_text,
    is_tether,
    listening_sockets,
    parse_proc_net_tcp,
    report,
    run_ports,
    to_json,
)

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")

OUR_COMM = Path("/proc/self/comm").read_text().strip()

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  inode"
TAIL = "00000000:00000000 00:00000000 00000000"  # tx/rx queue, timer, retransmits


def line(local: str, remote: str, state: str, uid: int, inode: int) -> str:
    return f"   0: {local} {remote} {state} {TAIL} {uid:5d}        0 {inode} 1 0 100 0 0 10 0"


V6_ANY, V6_LOOPBACK = "0" * 32, "0" * 24 + "01000000"
TCP = "\n".join(
    [
        HEADER,
        line("00000000:0A26", "00000000:0000", "0A", 1000, 4242),
        line("0100007F:05D6", "00000000:0000", "0A", 0, 4343),
        line("0100007F:9DB7", "0100007F:AE5C", "06", 0, 0),  # an established connection
    ]
)
TCP6 = "\n".join(
    [
        HEADER,
        line(f"{V6_LOOPBACK}:01BB", f"{V6_ANY}:0000", "0A", 0, 77),
        line(f"{V6_ANY}:0050", f"{V6_ANY}:0000", "0A", 33, 78),
    ]
)


@pytest.mark.skipif(
    sys.byteorder != "little", reason="the sample was taken on a little-endian host"
)
def test_parse_proc_net_tcp_keeps_listeners_only() -> None:
    v4 = parse_proc_net_tcp(TCP, "ipv4")
    assert [(lst.address, lst.port, lst.uid, lst.inode) for lst in v4] == [
        ("0.0.0.0", 2598, 1000, 4242),
        ("127.0.0.1", 1494, 0, 4343),
    ]
    v6 = parse_proc_net_tcp(TCP6, "ipv6")
    assert [lst.endpoint for lst in v6] == ["[::1]:443", "[::]:80"]


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


def test_a_listener_of_ours_shows_with_our_pid_and_comm(listening: socket.socket) -> None:
    port = listening.getsockname()[1]
    rows = report({port})
    assert [row.port for row in rows][:4] == [2598, 1494, 443, 80]
    [row] = [row for row in rows if row.port == port]
    [listener] = row.listeners
    assert listener.endpoint == f"127.0.0.1:{port}"
    assert listener.uid == os.getuid()
    [process] = listener.processes
    assert process.pid == os.getpid()
    assert process.comm == OUR_COMM
    assert "pytest" in process.cmdline or "python" in process.cmdline
    assert not row.warnings  # only 2598 is watched
    text = format_text(rows)
    assert f"127.0.0.1:{port}  pid {os.getpid()} ({OUR_COMM})" in text


def test_an_ipv6_listener_shows_with_brackets() -> None:
    try:
        sock = socket.socket(socket.AF_INET6)
        sock.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    with sock:
        sock.listen()
        port = sock.getsockname()[1]
        found = [lst for lst in listening_sockets() if lst.port == port]
        assert [lst.endpoint for lst in found] == [f"[::1]:{port}"]
        assert found[0].processes[0].pid == os.getpid()


def fake(port: int, *processes: Process) -> Listener:
    return Listener("ipv4", "0.0.0.0", port, 1000, 1, processes)


def test_2598_warnings_name_the_stranger_and_spare_tether() -> None:
    nc = Process(1234, "nc", ("nc", "-l", "2598"))
    module = Process(10, "python3", ("/usr/bin/python3", "-m", "tether", "server"))
    script = Process(11, "tether", ("/usr/bin/python3", "/usr/local/bin/tether", "server"))
    assert not is_tether(nc) and is_tether(module) and is_tether(script)

    rows = report(listeners=[fake(2598, nc)])
    assert rows[0].warnings == ("unexpected listener on 2598: pid 1234 (nc)",)
    assert report(listeners=[fake(2598, module), fake(2598, script)])[0].warnings == ()
    [warning] = report(listeners=[fake(2598)])[0].warnings
    assert "unknown owner, uid 1000: run as root" in warning
    assert report(listeners=[fake(1494, nc)])[1].warnings == ()  # ICA on 1494 is expected


def test_run_ports_exit_code_follows_the_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    import tether.ports as ports

    nc = Process(1234, "nc", ("nc", "-l", "2598"))
    monkeypatch.setattr(ports, "listening_sockets", lambda: [fake(2598, nc)])
    out = io.StringIO()
    assert run_ports(out=out) == 1
    assert out.getvalue().endswith("warning: unexpected listener on 2598: pid 1234 (nc)\n")
    monkeypatch.setattr(ports, "listening_sockets", lambda: [])
    out = io.StringIO()
    assert run_ports([22], json=True, out=out) == 0
    assert [row["port"] for row in json.loads(out.getvalue())] == [2598, 1494, 443, 80, 22]


def test_json_and_text_layers() -> None:
    tether = Process(10, "tether", ("tether", "server", "--listen", "0.0.0.0:2598"))
    rows = report([8080], listeners=[fake(2598, tether), fake(8080)])
    [first, *_rest, last] = json.loads(to_json(rows))
    assert first["port"] == 2598 and first["role"] == "CGP / tether"
    assert first["listeners"][0]["endpoint"] == "0.0.0.0:2598"
    assert first["listeners"][0]["processes"][0]["cmdline"] == "tether server --listen 0.0.0.0:2598"
    assert last["port"] == 8080 and last["role"] == ""
    lines = format_text(rows).splitlines()
    assert lines[0].split() == ["PORT", "ROLE", "LISTENER", "OWNER"]
    assert "pid 10 (tether) tether server --listen 0.0.0.0:2598" in lines[1]
    assert lines[2].split() == ["1494", "ICA", "-", "nothing", "listening"]


def test_without_proc_the_message_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import tether.ports as ports

    real = ports.listening_sockets
    monkeypatch.setattr(ports, "listening_sockets", lambda: real(tmp_path))
    assert run_ports() == 1
    assert "this needs Linux /proc" in capsys.readouterr().err
