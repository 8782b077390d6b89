#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: lint, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pytest ] && .venv/bin/python -c 'import tether, hypothesis, uvloop' 2>/dev/null \
  && ./scripts/setup.sh --no-deps >/dev/null 2>&1 \
  || ./scripts/setup.sh
.venv/bin/tether --version
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/mypy
.venv/bin/pytest "$@"
# With the data path compiled (setup.sh), the core's and the drivers' tests run again on the
# plain Python source, which is what runs where there is no compiler (about 2 minutes). The
# tests of whole CLI processes (test_integration.py) run once, compiled: the drivers' own
# tests already run the same code in process, and the README's command must stay under 15
# minutes; so do the tests marked `once` (slow waits whose logic has a plain-source test).
if [ $# = 0 ] && .venv/bin/tether --version | grep -q mypyc; then
  pure=$(mktemp -d)
  trap 'rm -rf "$pure"' EXIT
  cp -r src "$pure/" && find "$pure" -name '*.so' -delete
  PYTHONPATH="$pure/src" .venv/bin/tether --version | grep -q 'pure Python'
  PYTHONPATH="$pure/src" .venv/bin/pytest -q tests/protocol tests/aio \
    --ignore=tests/aio/test_integration.py -m "not once"
fi
