#!/usr/bin/env bash
# The README's test command: set up a venv (VENV, default .venv), install the pinned
# requirements and the package, install espeak-ng if missing (needed by the synthetic-corpus
# tests), then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating venv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
echo "== installing requirements into $VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements-dev.txt
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .

if ! command -v espeak-ng >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "== installing espeak-ng (apt)"
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null
    else
        echo "espeak-ng is required for the synthetic-corpus tests: sudo apt-get install espeak-ng" >&2
        exit 1
    fi
fi

echo "== running tests"
exec "$VENV/bin/python" -m pytest -q tests "$@"
