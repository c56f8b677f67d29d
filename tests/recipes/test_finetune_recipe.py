"""The finetune recipe end to end on the tiny model (shortened), then a resume, then the export CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SHORT = [
    "data.base_pretrain_steps=30",
    "trainer.max_steps=24",
    "trainer.val_check_interval=12",
    "trainer.checkpoint_every_n_steps=12",
    "trainer.limit_val_batches=2",
]


def run(args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_finetune_writes_summary_adapter_and_verified_export(tmp_path):
    out = tmp_path / "run"
    proc = run(["nemo_mla_lora.recipes.finetune", f"output_dir={out}", *SHORT])
    assert str(out / "summary.json") in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heldout_loss_after"] < summary["heldout_loss_before"]
    assert summary["verify"]["passed"] and summary["verify"]["max_abs_logit_diff"] < 1e-3
    assert summary["kv_cache"]["bytes_per_token"]["latent"] == 3 * (40 + 8) * 4
    for key in ("adapter_path", "export_path", "base_checkpoint"):
        assert (
            (out.parent / summary[key]).exists() or (tmp_path / summary[key]).exists() or Path(summary[key]).exists()
        ), key
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    assert manifest["format"] == "mcore" and manifest["latent_cache"] and "Megatron" in manifest["loaded_by"]
    from nemo_mla_lora.training.metrics import read

    logged = read(out / "lora_metrics.jsonl")
    assert [r["step"] for r in logged if "val_loss" in r] == [12, 24]
    assert sum("train_loss" in r for r in logged) >= 2

    # resume: same output_dir, more steps -> continues from checkpoints/last.ckpt and reuses the base
    resumed = run(
        [
            "nemo_mla_lora.recipes.finetune",
            f"output_dir={out}",
            *SHORT[:-4],
            "trainer.max_steps=36",
            "trainer.val_check_interval=12",
            "trainer.checkpoint_every_n_steps=12",
            "trainer.limit_val_batches=2",
        ]
    )
    summary2 = json.loads((out / "summary.json").read_text())
    assert summary2["resumed_from"] and summary2["resumed_from"].endswith("last.ckpt"), resumed.stdout[-500:]

    # standalone export to HF format from the run's base + adapter
    proc = run(
        [
            "nemo_mla_lora.recipes.export",
            f"base={out}/base",
            f"adapter={out}/adapter",
            f"output={tmp_path}/hf",
            "format=hf",
        ]
    )
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists() and '"passed": true' in proc.stdout
    report = json.loads(proc.stdout[proc.stdout.index("{\n") : proc.stdout.rindex("wrote ")])
    started = report["started"]  # the process's start, in order: main(), the imports, Megatron up, export()
    order = ["main", "imports", "megatron_import", "process_group", "parallel_state", "megatron"]
    assert started["main"] > 0 and [started[k] for k in order] == sorted(started[k] for k in order), started
    assert started["megatron"] <= report["timing"]["before_export"]
