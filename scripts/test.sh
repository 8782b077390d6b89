#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: lint, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pytest ] && .venv/bin/python -c 'import tether, hypothesis, uvloop' 2>/dev/null \
  && .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' --no-deps >/dev/null 2>&1 \
  || ./scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/mypy
.venv/bin/pytest "$@"
