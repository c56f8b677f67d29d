"""The GPU benchmark script runs end to end on the CPU with the tiny layer (so a GPU lease is not
spent on a typo); its numbers here mean nothing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # spawns processes: more than 5 s a test


def test_lora_overhead_bench_runs_on_tiny_layer(tmp_path):
    out = tmp_path / "overhead.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "lora_overhead.py"),
            "--dims",
            "tiny",
            "--seq",
            "16",
            "--dtype",
            "fp32",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--ranks",
            "2",
            "--variants",
            "linear_kv_up_proj",
            "all_linear",
            "--profile",
            "all_linear:2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["base"]["trainable"] == rows["base_grouped"]["trainable"] == 0
    assert [len(v) for v in result["base_runs_ms"].values()] == [2, 2]
    assert result["profiles"]["all_linear:2"]["cpu_ms_per_step"] > 0
    assert 0 < rows["linear_kv_up_proj"]["trainable"] < rows["all_linear"]["trainable"]
    assert "| all_linear | 2 |" in proc.stdout


def test_decode_bench_runs_on_tiny_dims(tmp_path):
    out = tmp_path / "decode.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "decode_bench.py"),
            "--dims",
            "tiny",
            "--batch",
            "2",
            "--context",
            "16",
            "--iters",
            "1",
            "--dtype",
            "fp32",
            "--no-triton",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    # tiny dims: latent (40 + 8) x 4 B per token per layer vs materialized 4 heads x (32 + 28) x 4 B
    assert result["attention"]["latent_bytes_per_token"] == 48 * 4
    assert result["attention"]["materialized_bytes_per_token"] == 4 * 60 * 4
    assert result["adapters"]["adapters"] == 8
    assert result["adapters"]["attention"]["ms_multi_adapter"] > 0 and result["adapters"]["layer"]["ratio"] > 0
    assert result["fold"]["bytes_folded"] == 4 * result["fold"]["cost"]["folded"]["params_per_layer"]
