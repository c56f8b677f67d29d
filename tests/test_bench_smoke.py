"""The GPU benchmark script runs end to end on the CPU with the tiny layer (so a GPU lease is not
spent on a typo); its numbers here mean nothing."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_lora_overhead_bench_runs_on_tiny_layer(tmp_path):
    out = tmp_path / "overhead.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "lora_overhead.py"), "--dims", "tiny", "--seq", "16",
                           "--dtype", "fp32", "--iters", "1", "--warmup", "0", "--ranks", "2",
                           "--variants", "linear_kv_up_proj", "all_linear", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["base"]["trainable"] == 0 and len(result["base_runs_ms"]) == 2
    assert 0 < rows["linear_kv_up_proj"]["trainable"] < rows["all_linear"]["trainable"]
    assert "| all_linear | 2 |" in proc.stdout
