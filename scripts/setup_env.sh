#!/usr/bin/env bash
# Source me: creates/updates the venv $VENV (default .venv) with the pinned requirements and the
# package, and installs espeak-ng with apt when it is missing (synthetic corpus; root only).
# Usage: source scripts/setup_env.sh [requirements file]
set -euo pipefail
VENV="${VENV:-.venv}"
REQS="${1:-requirements.txt}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating venv $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
fi
# reinstall only when the requirements changed since the last successful install
stamp="$VENV/.installed-$(cat "$REQS" requirements.txt setup.py | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    echo "== installing $REQS into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQS"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
    touch "$stamp"
fi
if ! command -v espeak-ng >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "== installing espeak-ng (apt)"
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null
    else
        echo "espeak-ng is missing; install it with: sudo apt-get install espeak-ng" >&2
        exit 1
    fi
fi
PY="$VENV/bin/python"
