#!/usr/bin/env bash
# The README's test command: set up the venv (VENV, default .venv) with the pinned requirements,
# the package and espeak-ng, then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh requirements-dev.txt
echo "== running tests"
exec "$PY" -m pytest -q tests "$@"
