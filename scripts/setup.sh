#!/usr/bin/env bash
# Create .venv and install tether with what the tests and benchmarks need (pinned in pyproject.toml).
# With a C compiler and Python's headers, tether's data path is then compiled with mypyc in place
# (setup.py; docs/design.md, "Compiled data path"); without, or if that build fails, it stays
# plain Python, which runs the same. scripts/test.sh passes --no-deps to refresh an existing .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" != --no-deps ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
find src -name '*.so' -delete  # a compiled module left from an older source would shadow it
"${pip[@]}" -e '.[test]' "$@"
# Built against the venv's own mypy (pinned in '.[test]') and packages, so that mypyc sees
# the types `mypy` checks; hence no build isolation.
if .venv/bin/python -c 'import os, shutil, sysconfig
cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
raise SystemExit(not (shutil.which(cc) and os.path.exists(sysconfig.get_paths()["include"] + "/Python.h")))' \
  && "${pip[@]}" 'setuptools>=77' \
  && TETHER_COMPILE=1 "${pip[@]}" --no-deps --no-build-isolation -e .; then
  echo "setup: tether's data path compiled with mypyc"
else
  find src -name '*.so' -delete
  echo "setup: tether as plain Python (no C compiler and Python headers, or the build failed)"
fi
