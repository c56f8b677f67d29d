"""``bench/run_gpu.sh``'s decode steps decide on a CPU what a GPU window will run: its functions sourced with a fake
``python3`` (records its arguments; a smoke launch of the seesaw kernel can be made to hang) and a pass-through
``timeout``. A schedule of the Gluon kernel that hangs its smoke launch is left out of the tests, the sweep and the
engine run, and the test step fails; otherwise every step takes every schedule."""

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("gluon_smoke", "gluon_running", "gluon_tests", "decode_sweep", "decode_engine_4k")

FAKE_PYTHON = """#!/usr/bin/env bash
printf 'GLUON_SCHEDULES=%s %s\\n' "${GLUON_SCHEDULES:-}" "$*" | tr '\\n' ' ' >> "$CALLS"; echo >> "$CALLS"
if [ -n "$HANG" ] && [ "$1" = -c ] && [ "${@: -1}" = "$HANG" ]; then exit 124; fi
"""
FAKE_TIMEOUT = """#!/usr/bin/env bash
while [[ "$1" == -* ]]; do [ "$1" = -k ] && shift; shift; done; shift; exec "$@"
"""


def _functions() -> str:
    """The smoke program and the step functions, as run_gpu.sh defines them."""
    text = (ROOT / "bench/run_gpu.sh").read_text()
    parts = [re.search(r"^GLUON_SMOKE='[^']*'$", text, re.M)]
    parts += [re.search(rf"^{name}=.*$", text, re.M) for name in ("GLUON_SCHEDULES_ALL", "SMOKED")]
    parts += [re.search(rf"^{step}\(\) {{.*?^}}$", text, re.M | re.S) for step in STEPS]
    assert all(parts), "run_gpu.sh: GLUON_SMOKE, its schedules, SMOKED or a decode step function not found"
    return "\n".join(m.group(0) for m in parts)


def _run(tmp_path: Path, step: str, hang: str) -> tuple[int, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("python3", FAKE_PYTHON), ("timeout", FAKE_TIMEOUT)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls.log"
    calls.unlink(missing_ok=True)
    script = f'set -uo pipefail\n{_functions()}\n{step}\nrc=$?; rm -rf "$SMOKED"; exit $rc\n'
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        OUT=str(tmp_path),
        REPO=str(ROOT),
        NCU="0",
        CALLS=str(calls),
        HANG=hang,
    )
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    lines = [line.strip() for line in calls.read_text().splitlines()] if calls.exists() else []
    return proc.returncode, [line for line in lines if " -c " not in line]


@pytest.mark.parametrize("hang", ["", "seesaw", "seesaw_t32"])
def test_decode_steps_take_a_gluon_schedule_only_where_its_smoke_launch_ran(tmp_path, hang):
    others = [s for s in ("seesaw", "seesaw_t32") if s != hang]
    rc, calls = _run(tmp_path, "gluon_tests", hang)
    (pytest_call,) = [c for c in calls if "pytest" in c]
    assert pytest_call.startswith(f"GLUON_SCHEDULES={','.join(['pingpong', *others])} ") and rc == int(bool(hang))
    rc, calls = _run(tmp_path, "decode_sweep", hang)
    (sweep,) = [c for c in calls if "decode_roofline.py" in c]
    assert sweep.endswith(f"--skip gluon_{hang}" if hang else "--out " + str(tmp_path)) and rc == 0
    assert any("decode_goals.py" in c for c in calls)
    rc, calls = _run(tmp_path, "decode_engine_4k", hang)
    (engine,) = [c for c in calls if "decode_bench.py" in c]
    sections = engine.split("--sections ")[1].split(" --prompt")[0].split()
    assert sections == ["engine", "engine_flashmla", "engine_gluon", *(f"engine_gluon_{s}" for s in others)]
    assert rc == 0
