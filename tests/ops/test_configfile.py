"""``--config FILE`` and ``tether check-config``: one key per option, the command line
over the file, and one error line naming the file, the key and what is expected."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest

from tether import cli, configfile
from tether.config import Address, ClientConfig

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "deploy" / "examples"


def _load(path: Path, role: str) -> configfile.FileSettings:
    return configfile.load(
        path,
        cli._OPTIONS[role],
        cli._DEFAULTS[role],
        functools.partial(cli._default, role),
    )


@pytest.mark.parametrize("role", ["server", "client"])
def test_every_option_has_a_key_and_the_rendered_settings_read_back(
    role: str, tmp_path: Path
) -> None:
    options = cli._OPTIONS[role]
    keys = [configfile.key_of(o) for o in options]
    assert len(set(keys)) == len(keys)
    assert all(key == o.flag[2:] for key, o in zip(keys, options, strict=True))
    # Settings that differ from every default, through the command line...
    argv = [role]
    contradicting = {"plaintext", "tls_ca", "require_reliability"}  # with TLS, pin, fallback
    for option in options:
        if option.dest in contradicting:
            continue
        value = {
            "listen": "127.0.0.1:4321",
            "target": "127.0.0.1:4322",
            "duration": "7s",
            "size": "128K",
            "count": "7",
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


@pytest.mark.parametrize(("name", "role"), [("server.toml", "server"), ("client.toml", "client")])
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
