"""``--config FILE`` and ``tether check-config``: one key per option, the command line
over the file, and one error line naming the file, the key and what is expected."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest

from tether import cli, configfile
from tether.config import Address, ClientConfig, GatewayConfig, RoutedServer

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "deploy" / "examples"


def _load(path: Path, role: str) -> configfile.FileSettings:
    return configfile.load(
        path,
        cli._OPTIONS[role],
        cli._DEFAULTS[role],
        functools.partial(cli._default, role),
    )


@pytest.mark.parametrize("role", ["server", "client", "gateway"])
def test_every_option_has_a_key_and_the_rendered_settings_read_back(
    role: str, tmp_path: Path
) -> None:
    options = cli._OPTIONS[role]
    keys = [configfile.key_of(o) for o in options]
    assert len(set(keys)) == len(keys)
    assert all(key == o.flag[2:] for key, o in zip(keys, options, strict=True))
    # Settings that differ from every default, through the command line...
    argv = [role]
    # With TLS, a pin, a fallback; a gateway's CA with its pin.
    contradicting = {"plaintext", "tls_ca", "require_reliability", "server_ca"}
    for option in options:
        if option.dest in contradicting:
            continue
        value = {
            "listen": "127.0.0.1:4321",
            "target": "127.0.0.1:4322",
            "duration": "7s",
            "size": "128K",
            "count": "7",
            "servers": "3=127.0.0.1:4323",
            "file": str(tmp_path / option.dest),
            "text": "sha256:" + "ab" * 32 if option.dest == "server_fingerprint" else "true",
        }.get(option.kind)
        if value is not None:
            argv += [option.flag, value]
    given = cli.build_config(cli.parse_args(argv))
    # ...rendered as a file, read back as the same settings.
    text = configfile.render(given, options, log_level="debug", log_format="json")
    path = tmp_path / "rendered.toml"
    path.write_text(text)
    back = _load(path, role)
    assert back.config == given
    assert (back.log_level, back.log_format) == ("debug", "json")
    rendered_keys = {line.split(" = ")[0].lstrip("# ") for line in text.splitlines()}
    assert set(keys) <= rendered_keys


@pytest.mark.parametrize(
    ("name", "role"),
    [("server.toml", "server"), ("client.toml", "client"), ("gateway.toml", "gateway")],
)
def test_the_shipped_examples_parse_and_check(
    name: str, role: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = _load(EXAMPLES / name, role)
    assert settings.log_level == "info"
    assert cli.main(["check-config", str(EXAMPLES / name)]) == 0
    out = capsys.readouterr().out
    assert f"valid for 'tether {role}'" in out
    if role == "client":
        assert settings.config.server == Address("tether.example.net", 2598)
        assert 'server = "tether.example.net:2598"' in out
    elif role == "gateway":
        assert settings.config.servers == (
            RoutedServer(1, Address("10.0.0.11", 2598)),
            RoutedServer(2, Address("10.0.0.12", 2598)),
        )
        assert 'server = ["1=10.0.0.11:2598", "2=10.0.0.12:2598"]' in out
        assert cli.main(["check-config", "--gateway", str(EXAMPLES / name)]) == 0
        assert capsys.readouterr().out == out
    else:
        assert settings.config.backend == Address("127.0.0.1", 1494)


ERRORS = {
    "unknown key": ('tmeout = "3m"\n', "unknown key 'tmeout' (did you mean 'timeout'?)"),
    "bad duration": ('timeout = "-3"\n', 'timeout = "-3": must be positive'),
    "bad unit": ('buffer = "4MB"\n', 'buffer = "4MB": MB is ambiguous: write M or MiB (binary)'),
    "wrong type": ('max-sessions = "lots"\n', 'max-sessions = "lots": expected a whole number'),
    "switch": ('plaintext = "yes"\n', 'plaintext = "yes": expected true or false'),
    "address": ('backend = "h:x"\n', 'backend = "h:x": port must be a number'),
    "section": ("[server]\nlisten = 1\n", "[server]: sections are not used"),
    "log level": ('log-level = "loud"\n', "log-level = \"loud\": expected one of ('debug',"),
    "together": ('tls-cert = "a.pem"\n', 'tls-cert = "a.pem": tls_cert and tls_key go together'),
    "toml": ("timeout = \n", "not valid TOML: Invalid value (at line 1, column 11)"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_an_error_is_one_line_naming_the_file_and_key(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, expected = ERRORS[case]
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert cli.main(["server", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"tether: error: {path}: {expected}"), err
    assert cli.main(["check-config", "--server", str(path)]) == 2
    assert capsys.readouterr().err == err


def test_a_missing_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nowhere.toml"
    assert cli.main(["client", "--config", str(path)]) == 2
    assert capsys.readouterr().err == f"tether: error: {path}: No such file or directory\n"


def test_the_command_line_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "client.toml"
    path.write_text(
        'listen = "127.0.0.1:7000"\nserver = "198.18.0.1"\ntimeout = "2m"\n'
        'keepalive = 1\nlog-level = "warning"\nlog-format = "json"\n'
        'token-file = "secret/token"\non-detach = "notify-send \'link lost\'"\n'
    )
    args = cli.parse_args(["client", "--config", str(path), "--timeout", "30s", "-v"])
    settings = cli._settings(args)
    config = settings.config
    assert isinstance(config, ClientConfig)
    assert config.listen == Address("127.0.0.1", 7000)
    assert config.server == Address("198.18.0.1", 2598)  # a host alone: the default port
    assert config.session.timeout == 30  # the command line wins
    assert config.session.keepalive == 1  # the file, where the command line is silent
    assert config.token_file == tmp_path / "secret" / "token"  # beside the file
    assert config.hooks.on_detach == "notify-send 'link lost'"
    assert (settings.log_level, settings.log_format) == ("debug", "json")
    assert settings.file == path
    assert cli._settings(cli.parse_args(["client", "--config", str(path)])).log_level == "warning"


def test_required_options_may_come_from_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "client.toml"
    path.write_text('listen = "127.0.0.1:7000"\n')
    assert cli.main(["client", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == "tether client: error: the following arguments are required: --server\n"
    args = cli.parse_args(["client", "--config", str(path), "--server", "127.0.0.1:9"])
    assert cli._settings(args).config == dataclasses.replace(
        ClientConfig(), listen=Address("127.0.0.1", 7000), server=Address("127.0.0.1", 9)
    )


def test_check_config_guesses_the_role_and_notes_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text('fallback = "127.0.0.1:1494"\non-end = "logger tether ended"\n')
    assert cli.main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "valid for 'tether client'" in out
    assert "# required, so give them on the command line: listen, server" in out
    assert 'on-end = "logger tether ended"' in out
    path.write_text('on-end = "sh -c \'unterminated"\n')
    assert cli.main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tether: error: {path}: on-end = ")
    assert "not a command line (No closing quotation)" in err


GATEWAY_ERRORS = {
    "bad id": ('server = ["0=h:1"]\n', 'server = ["0=h:1"]: 0=h:1: server id must be within 1-'),
    "not a string": ("server = [1]\n", 'server = [1]: expected a server, "ID=HOST:PORT", or a'),
    "empty": ("server = []\n", "server = []: an empty list: give at least one"),
    "twice": ('server = ["1=h:1", "1=g:1"]\n', 'server = ["1=h:1", "1=g:1"]: two servers have'),
}


@pytest.mark.parametrize("case", GATEWAY_ERRORS)
def test_a_gateway_s_servers_in_its_file(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``server`` is a list of "ID=HOST:PORT" strings (or one string); each mistake is one
    line naming the file and the key."""
    path = tmp_path / "gateway.toml"
    path.write_text('server = ["1=10.0.0.11", "7=[fd00::2]:2600"]\nserver-plaintext = true\n')
    config = _load(path, "gateway").config
    assert config == GatewayConfig(
        servers=(
            RoutedServer(1, Address("10.0.0.11", 2598)),
            RoutedServer(7, Address("fd00::2", 2600)),
        ),
        server_plaintext=True,
    )
    path.write_text('server = "h"\n')  # one string, its id its position
    assert _load(path, "gateway").config.servers == (RoutedServer(1, Address("h", 2598)),)
    text, expected = GATEWAY_ERRORS[case]
    path.write_text(text + "server-plaintext = true\n")
    assert cli.main(["check-config", str(path)]) == 2  # a list of servers: a gateway's file
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"tether: error: {path}: {expected}"), err
