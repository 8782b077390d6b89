"""The command line: friendly values, one source of defaults, errors that name their option.

In-process through ``tether.cli`` where that is enough; start-up errors and the
READY / SIGTERM contract through ``python -m tether`` in a subprocess, on loopback.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import tether
from tether.aio import link
from tether.cli import build_config, main, parse_args
from tether.config import (
    Address,
    ClientConfig,
    ServerConfig,
    format_duration,
    format_size,
    parse_address,
    parse_duration,
    parse_size,
)
from tether.protocol.session import SessionConfig
from tether.resources import default_memory_budget

SRC = Path(tether.__file__).resolve().parents[1]  # this checkout's src, not an installed copy
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4194304", 4 * MIB),
        ("4M", 4 * MIB),
        ("4m", 4 * MIB),
        ("4MiB", 4 * MIB),
        (" 4 M ", 4 * MIB),
        ("64K", 64 * KIB),
        ("64KiB", 64 * KIB),
        ("1G", GIB),
        ("1gib", GIB),
        ("1.5M", 3 * MIB // 2),
        ("512B", 512),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not a size"),
        ("lots", "not a size"),
        ("4MB", "MB is ambiguous: write M or MiB"),
        ("4kb", "KB is ambiguous"),
        ("4T", "unknown unit 't'"),
        ("-1", "must be positive"),
        ("0", "must be positive"),
        ("0.5", "not a whole number of bytes"),
        ("1e6", "not a size"),
    ],
)
def test_parse_size_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("180", 180.0),
        ("0.3", 0.3),
        (".5", 0.5),
        ("90s", 90.0),
        ("500ms", 0.5),
        ("3m", 180.0),
        ("3min", 180.0),
        ("1h", 3600.0),
        ("1.5h", 5400.0),
        (" 2 s", 2.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("-3", "must be positive"),
        ("0", "must be positive"),
        ("0ms", "must be positive"),
        ("3x", "unknown unit 'x'"),
        ("2d", "unknown unit 'd'"),
        ("", "not a duration"),
        ("inf", "not a duration"),
        ("nan", "not a duration"),
        ("1h30m", "not a duration"),
    ],
)
def test_parse_duration_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(text)


@pytest.mark.parametrize("size", [1, 1000, KIB, 1536 * KIB, 4 * MIB, GIB, 3 * GIB + 1])
def test_format_size_reads_back(size: int) -> None:
    assert parse_size(format_size(size)) == size


@pytest.mark.parametrize("seconds", [0.05, 0.3, 3.0, 180.0, 5400.0])
def test_format_duration_reads_back(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize(
    ("text", "kwargs", "address"),
    [
        ("10.0.0.1:22", {}, Address("10.0.0.1", 22)),
        ("2222", {}, Address("127.0.0.1", 2222)),
        ("9000", {"default_host": "0.0.0.0"}, Address("0.0.0.0", 9000)),
        (":9000", {}, Address("127.0.0.1", 9000)),
        ("server.example", {"default_port": 2598}, Address("server.example", 2598)),
        ("[::1]:80", {}, Address("::1", 80)),
        ("[::1]", {"default_port": 2598}, Address("::1", 2598)),
        ("127.0.0.1:0", {}, Address("127.0.0.1", 0)),
    ],
)
def test_parse_address(text: str, kwargs: dict[str, Any], address: Address) -> None:
    assert parse_address(text, **kwargs) == address


@pytest.mark.parametrize(
    ("text", "kwargs", "message"),
    [
        ("127.0.0.1:x", {}, "port must be a number"),
        ("host", {}, "port missing"),
        ("host:", {"default_port": 2598}, "port missing"),
        ("[::1]", {}, "port missing"),
        ("http://server.example:2598", {}, "not a URL"),
        ("::1", {}, "IPv6 address needs brackets"),
        ("[::1", {}, r"\[ADDRESS\]:PORT"),
        ("user@host:22", {}, "not a host name"),
        ("host:70000", {}, "port must be within 0-65535"),
        ("host:0", {"any_port": False}, "port must be within 1-65535"),
        ("", {}, "empty"),
    ],
)
def test_parse_address_refuses(text: str, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_address(text, **kwargs)


def test_no_options_means_the_dataclass_defaults() -> None:
    assert build_config(parse_args(["server"])) == ServerConfig()
    client = build_config(parse_args(["client", "--listen", "2222", "--server", "h"]))
    assert client == replace(
        ClientConfig(), listen=Address("127.0.0.1", 2222), server=Address("h", 2598)
    )


def test_every_option_reaches_its_field() -> None:
    server = build_config(
        parse_args(
            ["server", "--listen", "[::]:2600", "--backend", "db", "--timeout", "3m",
             "--keepalive", "500ms", "--buffer", "8M"]
        )
    )  # fmt: skip
    assert server == ServerConfig(
        listen=Address("::", 2600),
        backend=Address("db", 1494),
        session=SessionConfig(window=8 * MIB, keepalive=0.5, timeout=180.0),
    )
    client = build_config(
        parse_args(
            ["client", "--listen", "127.0.0.1:2222", "--server", "server.example",
             "--fallback", "server.example:22", "--connect-timeout", "1.5", "--timeout", "1h",
             "--keepalive", "2", "--buffer", "64KiB"]
        )
    )  # fmt: skip
    assert client == replace(
        ClientConfig(),
        listen=Address("127.0.0.1", 2222),
        server=Address("server.example", 2598),
        fallback=Address("server.example", 22),
        connect_timeout=1.5,
        session=SessionConfig(window=64 * KIB, keepalive=2.0, timeout=3600.0),
    )


def test_options_change_only_their_own_fields_of_a_base_config() -> None:
    # What a config file would give: the options go on top of it, field by field.
    base = ServerConfig(max_sessions=7, session=SessionConfig(keepalive=1.0, timeout=60.0))
    config = build_config(parse_args(["server", "--buffer", "1M"]), base)
    assert config == replace(base, session=SessionConfig(window=MIB, keepalive=1.0, timeout=60.0))


def test_memory_budget_takes_a_size_and_refuses_less_than_one_floor(
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = build_config(parse_args(["server", "--memory-budget", "8M"]))
    assert config == replace(ServerConfig(), memory_budget=8 * MIB)
    assert ServerConfig().memory_budget == default_memory_budget()
    assert main(["server", "--memory-budget", "1K"]) == 2
    assert capsys.readouterr().err.startswith(
        "tether: error: --memory-budget 1K: memory_budget must be at least 65536 bytes"
    )


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (["server"], ["--listen HOST:PORT where to accept tether links; give it again to listen "
                      "on several addresses; [::] takes IPv4 too (default 0.0.0.0:2598)",
                      "(default 127.0.0.1:1494)", "(default 180s)", "(default 3s)",
                      "(default 4MiB)"]),
        (["client"], ["(required; default port 1494)", "(required; default port 2598)",
                      "(default none)", "(default 5s)", "(default 180s)", "(default 3s)",
                      "(default 4MiB)"]),
        (["demo"], ["(default 3s)", "(default 8MiB)"]),
        (["gateway"], ["(default 0.0.0.0:443)", "(default none)", "(default 3s)"]),
    ],
)  # fmt: skip
def test_help_shows_every_default(
    argv: list[str], shown: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in shown:
        assert text in out
    # Not "--tls-" (an option named inside a help text, broken at its hyphen by the wrap).
    words = out.split()
    options = [w for w in words if re.fullmatch(r"--[a-z][a-z-]*[a-z]", w) and w != "--help"]
    described = out.split("options:")[1].split("values:")[0]
    for option in dict.fromkeys(options):
        if option not in ("--verbose", "--quiet"):
            after = described.split(f"{option} ")[1].split(" --")[0]
            assert "default" in after, option


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([flag]) == 0
    build = "pure Python" if link.__file__.endswith(".py") else "compiled with mypyc"
    assert capsys.readouterr().out == f"tether {tether.__version__} ({build})\n"


def test_errors_are_returned_not_raised(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["server", "--buffer", "lots"]) == 2
    assert capsys.readouterr().err.startswith("tether: error: --buffer lots: not a size")
    assert main(["server", "--no-such-option"]) == 2  # argparse's own usage error


START_UP_ERRORS = {
    "bad port": (
        ["server", "--listen", "127.0.0.1:x"],
        "tether: error: --listen 127.0.0.1:x: port must be a number",
    ),
    "negative timeout": (
        ["server", "--timeout", "-3"],
        "tether: error: --timeout -3: must be positive",
    ),
    "ambiguous size": (
        ["server", "--buffer", "4MB"],
        "tether: error: --buffer 4MB: MB is ambiguous: write M or MiB (binary)",
    ),
    "buffer too small": (
        ["server", "--buffer", "512"],
        "tether: error: --buffer 512: window must be within [1024, 1073741824] bytes",
    ),
    "url": (
        ["client", "--listen", "2222", "--server", "http://server.example:2598"],
        "tether: error: --server http://server.example:2598: give HOST:PORT, not a URL",
    ),
    "zero connect timeout": (
        ["client", "--listen", "2222", "--server", "h", "--connect-timeout", "0"],
        "tether: error: --connect-timeout 0: must be positive",
    ),
    "negative connect timeout": (
        ["client", "--listen", "2222", "--server", "h", "--connect-timeout", "-1"],
        "tether: error: --connect-timeout -1: must be positive",
    ),
    "fallback without port": (
        ["client", "--listen", "2222", "--server", "h", "--fallback", "db"],
        "tether: error: --fallback db: port missing: give HOST:PORT",
    ),
    "server port 0": (
        ["client", "--listen", "2222", "--server", "h:0"],
        "tether: error: --server h:0: port must be within 1-65535",
    ),
    "missing option": (
        ["client", "--listen", "2222"],
        "tether client: error: the following arguments are required: --server",
    ),
}


@pytest.fixture(scope="module")
def start_up_errors() -> dict[str, subprocess.CompletedProcess[str]]:
    """Every case's ``python -m tether`` at once: each start costs an interpreter."""
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "tether", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for name, (argv, _) in START_UP_ERRORS.items()
    }
    results = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


@pytest.mark.parametrize("case", START_UP_ERRORS)
def test_start_up_error_names_its_option(
    case: str, start_up_errors: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    result = start_up_errors[case]
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == START_UP_ERRORS[case][1]


def _ready(proc: subprocess.Popen[str], limit: float = 30) -> Address:
    """The address of the ``READY HOST:PORT`` line, waited for with a deadline."""
    assert proc.stdout is not None
    deadline = time.monotonic() + limit
    while (left := deadline - time.monotonic()) > 0:
        if select.select([proc.stdout], [], [], left)[0]:
            line = proc.stdout.readline()
            assert line.startswith("READY "), (line, proc.poll())
            return parse_address(line.split()[1])
    raise AssertionError(f"no READY line within {limit}s")


def test_server_and_client_start_with_friendly_values_and_stop_on_sigterm() -> None:
    def start(*argv: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "tether", *argv, "-q"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )

    server = start(
        "server", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9",
        "--timeout", "3m", "--keepalive", "500ms", "--buffer", "1M",
    )  # fmt: skip
    procs = [server]
    try:
        address = _ready(server)
        client = start(
            "client", "--listen", "127.0.0.1:0", "--server", f"127.0.0.1:{address.port}",
            "--connect-timeout", "2s", "--buffer", "64K",
        )  # fmt: skip
        procs.append(client)
        assert _ready(client).host == "127.0.0.1"
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


# -- one-shot commands: fingerprint and token ------------------------------------------------


def test_fingerprint_of_a_state_dir_is_the_identity_a_server_there_uses(tmp_path: Path) -> None:
    from tether import tls

    state = tmp_path / "state"
    out = subprocess.run(
        [sys.executable, "-m", "tether", "fingerprint", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    printed = out.stdout.strip()
    identity, created = tls.load_or_create_identity(state)
    assert not created and printed == identity.fingerprint
    cert = subprocess.run(
        [sys.executable, "-m", "tether", "fingerprint", "--tls-cert", str(identity.cert_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cert.stdout.strip() == printed


def test_token_new_prints_the_token_once_and_stores_only_its_hash(tmp_path: Path) -> None:
    from tether.credentials import ClientTokens

    clients = tmp_path / "clients"
    tokens = []
    for who in ("ana", "bo"):
        out = subprocess.run(
            [sys.executable, "-m", "tether", "token", "new", "--clients", str(clients),
             "--comment", who],
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        tokens.append(out.stdout.strip())
    text = clients.read_text()
    assert all(token not in text for token in tokens)
    assert "ana" in text and "bo" in text and oct(clients.stat().st_mode & 0o777) == "0o600"
    accepted = ClientTokens(clients)
    assert all(accepted.check(token.encode()) for token in tokens)
    assert not accepted.check(b"tether_not-a-token")


def test_json_logs_and_systemd_notifications(tmp_path: Path) -> None:
    """--log-format json writes one JSON object a line; READY=1 and STOPPING=1 reach
    $NOTIFY_SOCKET (as systemd's Type=notify expects)."""
    import json
    import socket as socket_module

    notify_path = tmp_path / "notify"
    notify = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(20)
    err = tmp_path / "server.log"
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
    with err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tether", "server", "--listen", "127.0.0.1:0",
             "--plaintext", "--log-format", "json"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
        )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(b"READY ")
        assert b"READY=1" in notify.recv(4096)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert b"STOPPING=1" in notify.recv(4096)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close() if proc.stdout else None
        notify.close()
    records = [json.loads(line) for line in err.read_text().splitlines()]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any("listening on 127.0.0.1:" in r["message"] for r in records)


@pytest.mark.parametrize("uvloop", ["uvloop", "asyncio"])
def test_the_demo_runs_clean_with_and_without_uvloop(uvloop: str) -> None:
    """The README's first command, shortened: every byte checked, no traceback, with the
    event loop a plain `pip install .` gets (no uvloop) as well."""
    env = {**os.environ, **({"TETHER_NO_UVLOOP": "1"} if uvloop == "asyncio" else {})}
    out = subprocess.run(
        [sys.executable, "-m", "tether", "demo", "--outage", "1", "--bytes", "1M"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "every byte arrived exactly once" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr
