#!/usr/bin/env bash
# Make .venv (repo root) with the pinned stack and this package, if it is missing or out of date.
# Idempotent: a stamp keyed on constraints.txt + setup.cfg skips the install when nothing changed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
key=$(cat constraints.txt setup.cfg pyproject.toml | sha256sum | cut -c1-16)
stamp=.venv/.installed-$key
if [ -f "$stamp" ]; then exit 0; fi
echo "[setup] creating .venv with the pinned stack (first run: about 4 minutes)"
[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
.venv/bin/python -m pip check
rm -f .venv/.installed-*
touch "$stamp"
echo "[setup] done"
