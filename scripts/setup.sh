#!/usr/bin/env bash
# Create .venv and install tether with what the tests and benchmarks need (pinned in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
