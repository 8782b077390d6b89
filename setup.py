"""Build hook: with ``TETHER_COMPILE=1``, compile the data path with mypyc (docs/design.md,
"Compiled data path"); otherwise, or without a C compiler, a pure-Python package. The
Python source stays the truth: every module listed here also runs as it is."""

from __future__ import annotations

import os
import shutil
import sysconfig

from setuptools import setup

# The per-message path: the sans-I/O core a round trip runs through and the drivers that
# call it. Not the handshake, the CLI or anything asyncio subclasses would need to see
# as plain Python (aio/client.py and aio/server.py subclass SessionRelay and
# LocalProtocol, which link.py lets interpreted code subclass).
COMPILED = [
    "src/tether/protocol/admission.py",
    "src/tether/protocol/buffer.py",
    "src/tether/protocol/codes.py",
    "src/tether/protocol/events.py",
    "src/tether/protocol/frames.py",
    "src/tether/protocol/ratelimit.py",
    "src/tether/protocol/reader.py",
    "src/tether/protocol/session.py",
    "src/tether/aio/link.py",
    "src/tether/aio/ticker.py",
]


def _ext_modules() -> list[object]:
    if os.environ.get("TETHER_COMPILE") != "1":
        return []
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    headers = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    if shutil.which(compiler) is None or not os.path.exists(headers):
        raise SystemExit(f"TETHER_COMPILE=1 needs {compiler} and {headers}")
    from mypyc.build import mypycify

    return list(mypycify(COMPILED, opt_level="3"))


setup(ext_modules=_ext_modules())
