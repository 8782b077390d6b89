"""deploy/systemd: the unit files say what docs/operations.md promises, their command lines
parse, and ``systemd-analyze verify`` accepts them (skipped where it is missing)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tether import cli

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
SERVER, CLIENT = UNITS / "tether-server.service", UNITS / "tether-client@.service"


def _settings(unit: Path) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


@pytest.mark.parametrize("unit", [SERVER, CLIENT], ids=["server", "client"])
def test_units_are_notify_reloadable_and_hardened(unit: Path) -> None:
    settings = _settings(unit)
    expected = {
        "Type": ["notify"],
        "ExecReload": ["/bin/kill -HUP $MAINPID"],
        "Restart": ["on-failure"],
        "User": ["tether"],
        "StateDirectory": ["tether"],
        "NoNewPrivileges": ["yes"],
        "ProtectSystem": ["strict"],
        "ProtectHome": ["yes"],
        "PrivateTmp": ["yes"],
        "CapabilityBoundingSet": [""],
    }
    for key, value in expected.items():
        assert settings.get(key) == value, key
    argv = shlex.split(settings["ExecStart"][0])
    assert argv[0] == "/usr/local/bin/tether"
    args = cli.parse_args(argv[1:])  # the command line the unit runs is one tether takes
    if unit == SERVER:
        assert args.config == "/etc/tether/server.toml"
    else:
        assert args.config == "/etc/tether/%i.toml"  # the instance names the file


def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("needs systemd-analyze")
    # verify checks that ExecStart's program exists: point it at this checkout's tether.
    tether = Path(sys.executable).with_name("tether")
    if not tether.exists():
        pytest.skip(f"needs the tether script beside {sys.executable}")
    names = []
    for unit, name in ((SERVER, "tether-server.service"), (CLIENT, "tether-client@demo.service")):
        text = unit.read_text().replace("/usr/local/bin/tether", str(tether))
        (tmp_path / name).write_text(text)
        names.append(str(tmp_path / name))
    done = subprocess.run(
        [analyze, "verify", "--man=no", *names],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    ours = [line for line in done.stderr.splitlines() if str(tmp_path) in line]
    assert done.returncode == 0 and not ours, done.stderr
