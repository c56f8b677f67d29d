#!/usr/bin/env bash
# Make .venv (repo root) with the pinned stack and this package, if it is missing or out of date.
# Idempotent: a stamp keyed on what decides the install (constraints.txt, and pyproject.toml's build-system,
# project and tool.setuptools tables; not its ruff or pytest settings) skips the install when nothing changed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
key=$("$py" - <<'PY'
import hashlib, json, tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)
install = {k: project.get(k) for k in ("build-system", "project")}
install["setuptools"] = project.get("tool", {}).get("setuptools")
text = open("constraints.txt").read() + json.dumps(install, sort_keys=True)
print(hashlib.sha256(text.encode()).hexdigest()[:16])
PY
)
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
