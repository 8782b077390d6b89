#!/usr/bin/env bash
# Create .venv and install tether with what the tests and benchmarks need (pinned in pyproject.toml).
# With a C compiler and Python's headers, tether's data path is then compiled with mypyc in place
# (setup.py; docs/design.md, "Compiled data path"); without a compiler it stays plain Python,
# which runs the same; a failed build is an error. scripts/test.sh passes --no-deps to refresh
# an existing .venv.
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
raise SystemExit(not (shutil.which(cc) and os.path.exists(sysconfig.get_paths()["include"] + "/Python.h")))'; then
  # A compiler is there: a failed build is a bug in the source (code mypy accepts that
  # mypyc does not), not something to fall back from without a word.
  "${pip[@]}" 'setuptools>=77'
  if ! TETHER_COMPILE=1 "${pip[@]}" --no-deps --no-build-isolation -e . >.venv/mypyc-build.log 2>&1; then
    find src -name '*.so' -delete
    grep -E 'error:' .venv/mypyc-build.log >&2 || tail -20 .venv/mypyc-build.log >&2
    echo "setup: compiling the data path with mypyc failed (log: .venv/mypyc-build.log)" >&2
    exit 1
  fi
  echo "setup: tether's data path compiled with mypyc"
else
  echo "setup: tether as plain Python (no C compiler and Python headers)"
fi
