"""The rough edges a newcomer hit at start (issue 10): errors that name the option (a port
in use, a name that does not resolve), ``--listen`` more than once and dual stack, IPv6
peers in brackets.

Real ``tether`` processes on loopback (CONTRIBUTING.md T3). Name lookups happen only inside
a fresh network namespace with nothing but loopback, whose ``/etc/resolv.conf`` names a
fake name server on 127.0.0.1 (T5): no test here ever asks the real DNS.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import tether
from tether.aio.util import describe, describe_lookup
from tether.cli import build_config, parse_args
from tether.config import Address, ClientConfig, ServerConfig, parse_address
from tether.configfile import format_value, load

SRC = Path(tether.__file__).resolve().parents[1]  # this checkout's src, not an installed copy
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1) here")


def _tether(*argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tether", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


def _ready(proc: subprocess.Popen[str], count: int = 1, limit: float = 30) -> list[Address]:
    """The addresses of the first ``count`` ``READY HOST:PORT`` lines, with a deadline.

    Read from the descriptor, not the buffered file: several lines may come in one read."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + limit
    received = b""
    while received.count(b"\n") < count and (left := deadline - time.monotonic()) > 0:
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            assert chunk, ("stdout closed", received, proc.poll(), _stderr(proc))
            received += chunk
    lines = received.decode().splitlines()[:count]
    assert len(lines) == count, f"{len(lines)} of {count} READY lines within {limit}s"
    for line in lines:
        assert line.startswith("READY "), (line, proc.poll(), _stderr(proc))
    return [parse_address(line.split()[1]) for line in lines]


def _stderr(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        return ""
    assert proc.stderr is not None
    return proc.stderr.read()


def _stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM, then its stderr; it must exit 0."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    assert proc.returncode == 0, err
    return err


@contextlib.contextmanager
def _running(*argv: str, count: int = 1) -> Iterator[tuple[subprocess.Popen[str], list[Address]]]:
    proc = _tether(*argv)
    try:
        yield proc, _ready(proc, count)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _exchange(address: tuple[str, int], family: int = socket.AF_INET) -> bytes:
    """Connect, send, read the echo back (bounded)."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(address)
        sock.sendall(b"ping")
        got = b""
        for _ in range(10):
            if len(got) >= 4:
                break
            chunk = sock.recv(64)
            if not chunk:
                break
            got += chunk
        return got


@contextlib.contextmanager
def _echo_backend() -> Iterator[int]:
    """An echo service on 127.0.0.1 (one connection at a time is enough here)."""
    listening = socket.create_server(("127.0.0.1", 0))
    listening.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listening.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(20)
                with contextlib.suppress(OSError):
                    while data := conn.recv(65536):
                        conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listening.getsockname()[1]
    finally:
        done.set()
        thread.join(5)
        listening.close()


# -- a port in use --------------------------------------------------------------------


@pytest.mark.parametrize("role", ["server", "client"])
def test_a_port_in_use_is_one_line_naming_the_option(role: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        extra = ["--backend", "127.0.0.1:9"] if role == "server" else ["--server", "127.0.0.1"]
        # The second --listen is the one in use: the first is closed again, not leaked.
        argv = [role, "--listen", "127.0.0.1:0", "--listen", f"127.0.0.1:{port}", "--plaintext"]
        proc = _tether(*argv, *extra)
        out, err = proc.communicate(timeout=60)
    # Exit 1: the listening socket could not be opened (CONTRIBUTING.md U3).
    assert proc.returncode == 1, err
    assert out == ""
    assert (
        err.splitlines()[-1] == f"tether: error: --listen 127.0.0.1:{port}: address already in use"
    )


def test_an_admin_port_in_use_names_the_admin_option() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        argv = ["server", "--listen", "127.0.0.1:0", "--plaintext", "--admin", f"127.0.0.1:{port}"]
        proc = _tether(*argv, "--backend", "127.0.0.1:9")
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "READY" not in out
    assert (
        err.splitlines()[-1] == f"tether: error: --admin 127.0.0.1:{port}: address already in use"
    )


# -- a file an option names is unusable ---------------------------------------------------


def test_an_unusable_file_is_one_line_naming_its_option(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    readable = tmp_path / "token"
    readable.write_text("x" * 32)
    readable.chmod(0o644)
    client = ["client", "--listen", "127.0.0.1:0", "--server", "127.0.0.1"]
    cases = {
        (*client, "--token-file", str(missing)): (
            f"tether: error: --token-file: cannot read token file {missing}: "
            "No such file or directory"
        ),
        (*client, "--token-file", str(readable)): (
            f"tether: error: --token-file: token file {readable} is accessible by group or "
            f"others (mode 0644); run: chmod 600 {readable}"
        ),
        (*client, "--tls-ca", str(missing)): (
            f"tether: error: --tls-ca: cannot read CA file {missing}: no such file"
        ),
        ("server", "--listen", "127.0.0.1:0", "--clients", str(missing)): (
            f"tether: error: --clients: clients file {missing} does not exist; add a client "
            "first (a token's hash, one line each)"
        ),
    }
    procs = {argv: _tether(*argv) for argv in cases}  # at once: each costs an interpreter
    for argv, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, err
        assert out == ""
        assert err.splitlines()[-1] == cases[argv]


# -- names that do not resolve ----------------------------------------------------------


def test_a_failed_lookup_reads_as_one() -> None:
    final = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert describe(final) == "name does not resolve"  # was os.strerror(-2): "Unknown error -2"
    again = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    assert describe_lookup(again) == "name does not resolve now (no name server answered)"


# A name server for the namespace: every question gets NXDOMAIN. Runs as root inside it.
_FAKE_DNS = """
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 53))
print("up", flush=True)
for _ in range(200):
    data, peer = s.recvfrom(512)
    if len(data) < 17:
        continue
    end = data.index(0, 12) + 5  # the question: its name, type and class
    flags = 0x8000 | (struct.unpack("!H", data[2:4])[0] & 0x0100) | 0x0080 | 3  # NXDOMAIN
    s.sendto(data[:2] + struct.pack("!HHHHH", flags, 1, 0, 0, 0) + data[12:end], peer)
"""

# Inside a fresh network and mount namespace: loopback up, and either a resolv.conf that
# names the fake server (a name that does not exist), or none reachable (no network).
_IN_NAMESPACE = """
set -e
ip link set lo up
mount --bind "$RESOLV" /etc/resolv.conf
if [ "$DNS" = nxdomain ]; then
    "$PY" -c "$FAKE" > "$TMP/dns.out" 2>&1 < /dev/null &
    trap 'kill $!' EXIT
    for i in $(seq 50); do [ -s "$TMP/dns.out" ] && break; sleep 0.1; done
fi
set +e
timeout -s TERM "$RUN_FOR" "$PY" -m tether "$@"
echo "exit $?"
"""


def _in_namespace(tmp_path: Path, dns: str, *argv: str, run_for: int = 30) -> tuple[str, str]:
    """Run ``tether ARGV`` in a namespace of its own, for at most ``run_for`` seconds (then
    SIGTERM: exit 124); its stdout (ending ``exit N``) and stderr. ``dns``: "nxdomain" (a
    fake server answers that no name exists) or "none" (the name server in resolv.conf is
    not reachable: the network is down)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: a network namespace, so that no lookup leaves this machine")
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare (util-linux) and ip (iproute2)")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    proc = subprocess.run(
        ["unshare", "--net", "--mount", "sh", "-c", _IN_NAMESPACE, "sh", *argv],
        capture_output=True,
        text=True,
        timeout=run_for + 30,
        env={
            **ENV,
            "RESOLV": str(resolv),
            "DNS": dns,
            "PY": sys.executable,
            "FAKE": _FAKE_DNS,
            "TMP": str(tmp_path),
            "RUN_FOR": str(run_for),
            "TETHER_NO_UVLOOP": "1",
        },
        check=False,
    )
    if "exit " not in proc.stdout:
        pytest.skip(f"no namespace here: {proc.stderr.strip()[-300:]}")
    return proc.stdout, proc.stderr


UNRESOLVABLE = {
    "client --server": (
        ["client", "--listen", "127.0.0.1:0", "--server", "no-such-host.invalid", "--plaintext"],
        "tether: error: --server no-such-host.invalid: name does not resolve",
    ),
    "client --server, not a name": (
        ["client", "--listen", "127.0.0.1:0", "--server", "a..b", "--plaintext"],
        "tether: error: --server a..b: not a valid host name",
    ),
    "client --fallback": (
        ["client", "--listen", "127.0.0.1:0", "--server", "127.0.0.1", "--plaintext",
         "--fallback", "no-such-host.invalid:22"],
        "tether: error: --fallback no-such-host.invalid: name does not resolve",
    ),
    "gateway --server": (
        ["gateway", "--listen", "127.0.0.1:0", "--server", "1=no-such-host.invalid:2598",
         "--routing-key-file", "{tmp}/routing.key", "--plaintext", "--server-plaintext"],
        "tether: error: --server no-such-host.invalid: name does not resolve",
    ),
    "server --backend": (
        ["server", "--listen", "127.0.0.1:0", "--backend", "no-such-host.invalid:22",
         "--plaintext"],
        "tether: error: --backend no-such-host.invalid: name does not resolve",
    ),
}  # fmt: skip


@pytest.mark.netns
@pytest.mark.parametrize("case", UNRESOLVABLE)
def test_a_name_that_does_not_resolve_is_refused_at_start(case: str, tmp_path: Path) -> None:
    argv, line = UNRESOLVABLE[case]
    key = tmp_path / "routing.key"  # a gateway's: valid, so that only the name is wrong
    key.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    key.chmod(0o600)
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    out, err = _in_namespace(tmp_path, "nxdomain", *argv)
    assert out.splitlines()[-1] == "exit 2", (out, err)
    assert "READY" not in out
    assert err.splitlines()[-1] == line
    assert "Unknown error" not in err


@pytest.mark.netns
def test_with_the_network_down_a_name_only_warns_and_the_client_starts(tmp_path: Path) -> None:
    # No name server can be reached: the name may well be right, so the client starts
    # (it looks the name up again for each session) and says why it could not check.
    argv = ["client", "--listen", "127.0.0.1:0", "--server", "tether.example", "--plaintext"]
    out, err = _in_namespace(tmp_path, "none", *argv, run_for=3)
    assert "READY 127.0.0.1:" in out, (out, err)
    assert out.splitlines()[-1] == "exit 124", (out, err)  # still running when stopped
    assert (
        "WARNING tether: --server tether.example: name does not resolve now (no name server "
        "answered); starting anyway, each session looks it up again"
    ) in err


# -- --listen more than once, dual stack, IPv6 in brackets ------------------------------


def test_listen_may_be_given_more_than_once() -> None:
    args = parse_args(["server", "--listen", "127.0.0.1:0", "--listen", "[::1]:2598"])
    config = build_config(args)
    assert isinstance(config, ServerConfig)
    assert config.listen == (Address("127.0.0.1", 0), Address("::1", 2598))
    one = build_config(parse_args(["client", "--listen", "2222", "--server", "h"]))
    assert isinstance(one, ClientConfig)
    assert one.listen == Address("127.0.0.1", 2222)  # once: a plain address, as before
    with pytest.raises(ValueError, match=r"^--listen 7000: given twice$"):
        build_config(parse_args(["server", "--listen", "0.0.0.0:7000", "--listen", "7000"]))


def test_the_listen_key_takes_a_list_or_a_string(tmp_path: Path) -> None:
    from tether.cli import _OPTIONS, _default

    options = _OPTIONS["server"]
    listen = next(option for option in options if option.flag == "--listen")

    def read(text: str) -> ServerConfig:
        path = tmp_path / "server.toml"
        path.write_text(text)
        config = load(path, options, ServerConfig(), lambda p: _default("server", p)).config
        assert isinstance(config, ServerConfig)
        return config

    both = read('listen = ["[::]:2598", "127.0.0.1:7000"]\n')
    assert both.listen == (Address("::", 2598), Address("127.0.0.1", 7000))
    assert format_value(listen.kind, both.listen) == '["[::]:2598", "127.0.0.1:7000"]'
    assert read('listen = "[::]:2598"\n').listen == Address("::", 2598)
    assert read('listen = ["[::]:2598"]\n').listen == Address("::", 2598)
    with pytest.raises(ValueError, match=r"listen = \[\]: an empty list: give at least one$"):
        read("listen = []\n")
    with pytest.raises(ValueError, match=r'listen = \["1", "1"\]: an address given twice$'):
        read('listen = ["1", "1"]\n')


@needs_ipv6
@pytest.mark.parametrize("role", ["server", "client"])
def test_listen_on_ipv6_any_takes_ipv4_too(role: str) -> None:
    with _echo_backend() as backend:
        server_argv = ["server", "--plaintext", "--backend", f"127.0.0.1:{backend}"]
        with _running(
            *server_argv, "--listen", "[::]:0" if role == "server" else "127.0.0.1:0"
        ) as (
            server,
            (address,),
        ):
            if role == "server":
                assert address.host == "::"
                target = "127.0.0.1"  # an IPv4 client of a [::] listener
            else:
                target = address.host
            client_argv = ["client", "--plaintext", "--server", f"{target}:{address.port}"]
            with _running(*client_argv, "--listen", "[::]:0") as (client, (local,)):
                assert local.host == "::"
                assert _exchange(("127.0.0.1", local.port)) == b"ping"  # IPv4 to [::]
                assert _exchange(("::1", local.port), socket.AF_INET6) == b"ping"
                _stop(client)
            _stop(server)


@needs_ipv6
def test_several_listen_addresses_and_ipv6_peers_in_brackets() -> None:
    with _echo_backend() as backend:
        server_argv = ["server", "--plaintext", "--backend", f"127.0.0.1:{backend}", "-v"]
        listen = ["--listen", "127.0.0.1:0", "--listen", "[::1]:0"]
        with _running(*server_argv, *listen, count=2) as (server, addresses):
            assert [a.host for a in addresses] == ["127.0.0.1", "::1"]
            v6 = addresses[1]
            client_argv = ["client", "--plaintext", "--server", f"[::1]:{v6.port}", "-v"]
            with _running(*client_argv, *listen, count=2) as (client, (four, six)):
                assert (four.host, six.host) == ("127.0.0.1", "::1")
                assert _exchange(("127.0.0.1", four.port)) == b"ping"
                assert _exchange(("::1", six.port), socket.AF_INET6) == b"ping"
                client_log = _stop(client)
            server_log = _stop(server)
    # READY lines and logs write an IPv6 address with its port as [ADDRESS]:PORT.
    assert f"listening on 127.0.0.1:{four.port}, [::1]:{six.port} for applications" in client_log
    assert "established via [::1]:" in client_log
    assert "[::1]:" in server_log
    for log in (client_log, server_log):
        unbracketed = [line for line in log.splitlines() if re.search(r"(?<!\[)::1\]?:\d", line)]
        assert not unbracketed, unbracketed


# -- a client start without Unix-only calls -----------------------------------------------

# As on Windows (and partly macOS): no loop.add_signal_handler (the proactor loop raises
# NotImplementedError), no SIGHUP, no SOCK_CLOEXEC. Nothing else is changed: the real
# loop, real sockets. (The resource module is imported by platform, not emulated here.)
_LIKE_WINDOWS = """
import asyncio.unix_events, signal, socket, sys
del signal.SIGHUP, socket.SOCK_CLOEXEC
def refuse(self, sig, callback, *args):
    raise NotImplementedError
asyncio.unix_events._UnixSelectorEventLoop.add_signal_handler = refuse
from tether.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_client_starts_and_stops_without_unix_only_calls(tmp_path: Path) -> None:
    notify = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(notify))
        systemd.settimeout(30)
        argv = ["client", "--listen", "127.0.0.1:0", "--server", "127.0.0.1:9", "--plaintext"]
        proc = subprocess.Popen(
            [sys.executable, "-c", _LIKE_WINDOWS, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**ENV, "TETHER_NO_UVLOOP": "1", "NOTIFY_SOCKET": str(notify)},
        )
        try:
            (address,) = _ready(proc)
            assert address.host == "127.0.0.1"
            assert systemd.recv(4096).startswith(b"READY=1")
            proc.send_signal(signal.SIGINT)  # Ctrl-C: the signal.signal fallback stops it
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "INFO tether: shutting down" in err


def test_check_config_prints_a_listen_list_and_a_reload_says_it_needs_a_restart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tether.cli import _OPTIONS, main
    from tether.reload import RESTART_KEYS, Reloader, Settings

    path = tmp_path / "server.toml"
    path.write_text('listen = ["[::]:2598", "127.0.0.1:7000"]\n')
    assert main(["check-config", str(path)]) == 0
    assert '\nlisten = ["[::]:2598", "127.0.0.1:7000"]\n' in capsys.readouterr().out
    old = Settings(ServerConfig(), file=path)
    new = Settings(
        ServerConfig(listen=(Address("::", 2598), Address("127.0.0.1", 7000))), file=path
    )
    reloader = Reloader(None, old, lambda: new, _OPTIONS["server"], lambda *_: None)  # type: ignore[arg-type]
    changes = reloader.changes(old, new)
    assert changes == [("listen", "0.0.0.0:2598", '["[::]:2598", "127.0.0.1:7000"]')]
    assert "listen" in RESTART_KEYS


def test_a_sigint_while_the_loop_closes_after_the_work_is_done_is_not_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A SIGINT that lands while the loop closes (its signal handlers gone, so Python raises
    KeyboardInterrupt) after the service finished keeps the exit code; one that lands
    before the work is done still interrupts."""
    import asyncio
    from collections.abc import Coroutine

    from tether import cli

    def closing_interrupted(coro: Coroutine[object, object, int]) -> int:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(coro)
        finally:
            loop.close()
        raise KeyboardInterrupt  # as if SIGINT came during the loop's own shutdown

    monkeypatch.setenv("TETHER_NO_UVLOOP", "1")
    monkeypatch.setattr(cli.asyncio, "run", closing_interrupted)

    async def done() -> int:
        return 3

    assert cli._run(done) == 3

    def interrupted_at_once(coro: Coroutine[object, object, int]) -> int:
        coro.close()
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.asyncio, "run", interrupted_at_once)
    with pytest.raises(KeyboardInterrupt):
        cli._run(done)
