"""``--config FILE``: a TOML file (read with the standard library's ``tomllib``) that sits
between the config dataclasses' defaults and the command line.

The file is flat: one file per role, one key per command-line option, named as the option
without its dashes (``--max-sessions`` is ``max-sessions``), plus ``log-level`` and
``log-format``. The keys are derived from cli.py's option table, so a new option gets its
key without a change here (CONTRIBUTING.md, "Command line and configuration" U1). Values
are what the option takes, as TOML strings (``timeout = "3m"``, ``listen = "[::]:2598"``;
a list for an option that may be given more than once, ``listen = ["[::]:2598", "[::1]:80"]``,
and a gateway's servers, ``server = ["1=10.0.0.11:2598", "2=10.0.0.12:2598"]``),
or TOML numbers for counts, sizes and durations (``max-sessions = 5000``, ``timeout = 180``)
and booleans for switches (``plaintext = true``). A relative file path is relative to the
directory of the config file, so a unit file can name one file and keep the rest beside it.

Every mistake is one ValueError naming the file, the key and what is expected, for the
caller to print as one line (exit 2, U3)::

    /etc/tether/server.toml: timeout = "-3": must be positive
    /etc/tether/server.toml: unknown key 'tmeout' (did you mean 'timeout'?)
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from .config import Address, format_duration, format_size, replace_field

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "FileSettings",
    "OptionLike",
    "format_value",
    "key_of",
    "load",
    "render",
]

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
LOG_KEYS = ("log-level", "log-format")  # the logging options, which no config field holds

_EXPECTED = {
    "listen": 'an address, "HOST:PORT" or "[ADDRESS]:PORT"',
    "target": 'an address, "HOST:PORT" or "[ADDRESS]:PORT"',
    "duration": 'a duration, seconds or a string such as "90s", "500ms", "3m"',
    "size": 'a size, bytes or a string such as "64K", "4M"',
    "count": "a whole number",
    "file": "a file path (a string)",
    "text": "a string",
    "switch": "true or false",
    "servers": 'a server, "ID=HOST:PORT", or a list of them',
}


class OptionLike(Protocol):
    """What this module uses of cli.py's ``_Option``."""

    @property
    def flag(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def many(self) -> bool: ...
    def parse(self, text: str | list[str], default: object) -> object: ...


def key_of(option: OptionLike) -> str:
    """The option's key in a config file: its flag without the dashes."""
    return option.flag.removeprefix("--")


_Config = TypeVar("_Config")


@dataclass(frozen=True, slots=True)
class FileSettings:
    """What a config file says: the config it makes, and its logging settings (None: not
    set in the file)."""

    path: Path
    config: Any
    keys: frozenset[str] = frozenset()  # the keys the file sets
    log_level: str | None = None
    log_format: str | None = None


def load(
    path: Path,
    options: Sequence[OptionLike],
    base: _Config,
    default_of: Callable[[str], object],
) -> FileSettings:
    """``base`` with every key of the TOML file at ``path`` applied.

    ``default_of(option.path)`` is the option's default (an address option given only a
    host takes its default's port). Raises ValueError naming the file and the key.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    by_key = {key_of(option): option for option in options}
    given: list[tuple[str, Any, OptionLike, object]] = []
    log_level = log_format = None
    for key, value in data.items():
        if key in LOG_KEYS:
            choices = LOG_LEVELS if key == "log-level" else LOG_FORMATS
            if value not in choices:
                raise ValueError(f"{path}: {key} = {_show(value)}: expected one of {choices}")
            if key == "log-level":
                log_level = value
            else:
                log_format = value
            continue
        option = by_key.get(key)
        if option is None:
            raise ValueError(f"{path}: {_unknown(key, [*by_key, *LOG_KEYS], value)}")
        with _about(path, key, value):
            parsed = _parse(option, value, default_of(option.path), path.parent)
        given.append((key, value, option, parsed))
    config = _apply(path, base, given)
    return FileSettings(path, config, frozenset(data), log_level, log_format)


def _apply(path: Path, config: _Config, given: list[tuple[str, Any, OptionLike, object]]) -> Any:
    """All keys at once (some fields are checked together), or, when that fails, one at a
    time to name the key that does; a failure only the whole set shows names the file."""
    changes: dict[str, Any] = {}
    try:
        for _, _, option, value in given:
            name, _, rest = option.path.partition(".")
            inner = changes.get(name, getattr(config, name))
            changes[name] = replace_field(inner, rest, value) if rest else value
        return dataclasses.replace(config, **changes)  # type: ignore[type-var]
    except ValueError as whole:
        failure = whole
    for key, value, option, parsed in given:
        with _about(path, key, value):
            config = replace_field(config, option.path, parsed)  # type: ignore[type-var]
    raise ValueError(f"{path}: {failure}")


@contextlib.contextmanager
def _about(path: Path, key: str, value: object) -> Iterator[None]:
    """Prefix a ValueError with the file, the key and its value."""
    try:
        yield
    except ValueError as exc:
        raise ValueError(f"{path}: {key} = {_show(value)}: {exc}") from None


def _parse(option: OptionLike, value: object, default: object, base_dir: Path) -> object:
    kind = option.kind
    expected = _EXPECTED.get(kind, "a string")
    if kind == "switch":
        if not isinstance(value, bool):
            raise ValueError(f"expected {expected}")
        return value
    if kind == "servers":  # a gateway's: one string per server, as --server takes each
        values = value if isinstance(value, list) else [value]
        if not values:
            raise ValueError("an empty list: give at least one")
        texts = [each for each in values if isinstance(each, str)]
        if len(texts) != len(values):
            raise ValueError(f"expected {expected}")
        return option.parse(texts, default)
    if isinstance(value, list) and option.many:  # listen = ["[::]:2598", "127.0.0.1:2598"]
        return _parse_many(option, value, default, base_dir)
    if isinstance(value, bool | dict | list):
        raise ValueError(f"expected {expected}" + (", or a list of them" if option.many else ""))
    if kind == "count":
        if isinstance(value, int):
            return option.parse(str(value), default)
        raise ValueError(f"expected {expected}")
    if kind in ("duration", "size") and isinstance(value, int | float):
        return option.parse(repr(value), default)
    if kind == "listen" and isinstance(value, int):  # a port alone
        return option.parse(str(value), default)
    if not isinstance(value, str):
        raise ValueError(f"expected {expected}")
    if kind == "file":
        file = Path(value).expanduser()
        return file if file.is_absolute() else base_dir / file
    return option.parse(value, default)


def _parse_many(option: OptionLike, values: list[Any], default: object, base_dir: Path) -> object:
    """A list for an option given more than once: one value alone, or a tuple of them."""
    if not values:
        raise ValueError("an empty list: give at least one")
    parsed = []
    for value in values:
        if isinstance(value, list):
            raise ValueError("a list inside the list")
        try:
            parsed.append(_parse(option, value, default, base_dir))
        except ValueError as exc:
            raise ValueError(f"{_show(value)}: {exc}") from None
    if len(set(parsed)) != len(parsed):
        raise ValueError("an address given twice")
    return parsed[0] if len(parsed) == 1 else tuple(parsed)


def _unknown(key: str, known: Iterable[str], value: object) -> str:
    if isinstance(value, dict):
        return f"[{key}]: sections are not used; write every key at the top level"
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean {close[0]!r}?" if close else "see 'tether check-config --help'"
    return f"unknown key {key!r} ({hint})"


def _show(value: object) -> str:
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{...}"
    if isinstance(value, list):
        return "[" + ", ".join(map(_show, value)) + "]"
    return str(value)


def _toml_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in escaped) + '"'


def render(
    config: object,
    options: Sequence[OptionLike],
    *,
    log_level: str = "info",
    log_format: str = "text",
    notes: Mapping[str, str] | None = None,
) -> str:
    """The effective settings as a config file (TOML that :func:`load` reads back to the
    same config): every key, unset optional ones as comments."""
    lines = []
    for option in options:
        key = key_of(option)
        value = functools.reduce(getattr, option.path.split("."), config)
        text = format_value(option.kind, value)
        if text is None:
            note = (notes or {}).get(key, "none")
            lines.append(f"# {key} = (unset: {note})")
        else:
            lines.append(f"{key} = {text}")
    lines.append(f"log-level = {_toml_string(log_level)}")
    lines.append(f"log-format = {_toml_string(log_format)}")
    return "\n".join(lines) + "\n"


def format_value(kind: str, value: object) -> str | None:
    """``value`` of an option of ``kind`` as TOML, None for an unset one."""
    if value is None or value == ():  # unset, or a gateway without servers
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Address | Path):
        return _toml_string(str(value))
    if isinstance(value, tuple):  # an option given more than once (listen)
        return "[" + ", ".join(format_value(kind, each) or '""' for each in value) + "]"
    if kind == "duration" and isinstance(value, int | float):
        return _toml_string(format_duration(value))
    if kind == "size" and isinstance(value, int):
        return _toml_string(format_size(value))
    if isinstance(value, int):
        return str(value)
    return _toml_string(str(value))
