"""The core is sans-I/O: nothing under src/tether/protocol/ may import I/O, clocks or threads.

CONTRIBUTING.md, "Layers" L1. The walk is syntactic (ast), so an import hidden inside a function,
a ``try`` or an ``if TYPE_CHECKING`` block is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "src" / "tether" / "protocol"
FORBIDDEN = frozenset({"asyncio", "socket", "ssl", "time", "threading", "selectors"})


def forbidden_imports(source: str, filename: str = "<source>") -> list[str]:
    """Every forbidden module ``source`` imports, as ``line: name``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] in FORBIDDEN:
                found.append(f"{node.lineno}: {name}")
    return found


def core_modules() -> list[Path]:
    return sorted(CORE.rglob("*.py"))


def test_the_core_exists() -> None:
    names = {path.name for path in core_modules()}
    assert {"frames.py", "reader.py", "session.py", "handshake.py", "buffer.py"} <= names


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: p.name)
def test_core_module_does_no_io(path: Path) -> None:
    assert forbidden_imports(path.read_text(), str(path)) == []


@pytest.mark.parametrize(
    "source",
    [
        "import asyncio",
        "import os, socket",
        "import ssl as tls",
        "from time import monotonic",
        "import threading.local",
        "from selectors import DefaultSelector",
        "def f():\n    import time\n",
        "try:\n    import asyncio\nexcept ImportError:\n    pass\n",
        "from asyncio.events import AbstractEventLoop",
    ],
)
def test_the_walk_catches_every_form(source: str) -> None:
    assert forbidden_imports(source)


@pytest.mark.parametrize(
    "source", ["import os", "from . import time", "from .time import x", "import timeit"]
)
def test_the_walk_allows_the_rest(source: str) -> None:
    assert forbidden_imports(source) == []
