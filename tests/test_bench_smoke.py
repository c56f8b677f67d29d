"""The GPU benchmark script runs end to end on the CPU with the tiny layer (so a GPU lease is not
spent on a typo); its numbers here mean nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # spawns processes: more than 5 s a test


def test_lora_overhead_bench_runs_on_tiny_layer(tmp_path):
    """The table (with NeMo's LoRA as a variant) and the --summary cells, in one process (--fp8 none on the CPU)."""
    out, summary = tmp_path / "overhead.json", tmp_path / "summary.json"
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
            "--rounds",
            "2",
            "--variants",
            "linear_kv_up_proj",
            "all_linear",
            "all_linear@torchadd",
            "nemo_lora",
            "--profile",
            "all_linear:2",
            "all_linear@torchadd:2",
            "--out",
            str(out),
            "--summary",
            str(summary),
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
    assert rows["all_linear@torchadd"]["trainable"] == rows["all_linear"]["trainable"]  # the same adapters, other adds
    assert all(len(rows[v]["round_ms"]) == 2 for v in ("linear_kv_up_proj", "all_linear", "nemo_lora"))
    assert result["profiles"]["all_linear@torchadd:2"]["cpu_ms_per_step"] > 0
    assert "| all_linear | 2 |" in proc.stdout
    # tiny dims (models/configs/tiny_mla.json): hidden 80, q_lora_rank 56, kv_lora_rank 40, 4 heads, qk_nope 24,
    # qk_rope 8, v 28; NeMo's LoRA on the five attention linears (in, out): r x (in + out) each
    attention = [(80, 56), (56, 4 * 32), (80, 40 + 8), (40, 4 * (24 + 28)), (4 * 28, 80)]
    assert rows["nemo_lora"]["trainable"] == sum(2 * (i + o) for i, o in attention)

    cells = json.loads(summary.read_text())
    keys = {f"{n}_fp32" for n in ("frozen", "nemo_official_r16", "all_linear_r16", "all_linear_r64", "nemo_lora_r16")}
    assert cells["complete"] and cells["errors"] == {} and cells["card"] == "cpu" and cells["fp8"] is None
    assert set(cells["step_ms"]) == set(cells["peak_gib"]) == keys
    assert all(ms > 0 for ms in cells["step_ms"].values())
    assert len(cells["step_ms_runs"]["frozen_fp32"]) == 3  # in each of the two rounds, and last
    assert len(cells["step_ms_runs"]["all_linear_r64_fp32"]) == 2 and cells["rounds"] == 2
    assert cells["trainable"]["frozen_fp32"] == 0
    trainable = cells["trainable"]
    assert trainable["nemo_lora_r16_fp32"] == trainable["nemo_official_r16_fp32"] == 8 * rows["nemo_lora"]["trainable"]
    assert trainable["all_linear_r64_fp32"] == 4 * trainable["all_linear_r16_fp32"]
    assert "| nemo_lora_r16 | fp32 |" in proc.stdout


def test_nemo_lora_fused_refused_where_nemo_falls_back(mcore):
    """``nemo_lora_fused`` (NeMo's LoRA through TE's op fuser) refuses a layer where NeMo's ``LoRA.transform`` wrapped
    the targets in its plain ``LoRALinear`` instead (here: no Transformer Engine), rather than timing the wrong peer."""
    import torch
    from support.bench import bench_module

    bench = bench_module("lora_overhead")
    holder, config = bench.build_layer("tiny", 16, torch.float32, 0)
    with pytest.raises(RuntimeError, match=r"nemo_lora_fused: 0 of 5 targets got NeMo's TEFusedLoRALinear"):
        bench.with_lora(holder, "nemo_lora_fused", 2)
    assert config.use_transformer_engine_op_fuser is True  # what NeMo's LoRA.transform reads from the linear's config
    from nemo.collections.llm.peft.lora import LoRALinear

    plain, config = bench.build_layer("tiny", 16, torch.float32, 0)
    assert sum(isinstance(m, LoRALinear) for m in bench.with_lora(plain, "nemo_lora", 2).modules()) == 5
    assert not hasattr(config, "use_transformer_engine_op_fuser")  # the plain peer leaves the config as built


def test_the_te_summary_measures_the_op_fuser_peer_after_the_required_cells(monkeypatch, tmp_path):
    """On the TE spec the summary also measures NeMo's op-fuser LoRA, once per round after every required cell (then
    the frozen base again); its failure is recorded and leaves the summary complete (the measurements faked)."""
    import argparse
    import types

    from support.bench import bench_module

    bench, lora_summary = bench_module("lora_overhead"), bench_module("lora_summary")
    monkeypatch.setitem(sys.modules, "transformer_engine", types.SimpleNamespace(__version__="2.20.2"))
    calls = []

    def measure(args, variant, rank, fp8=None):
        calls.append(variant)
        if variant == "nemo_lora_fused":
            raise RuntimeError("nemo_lora_fused: 0 of 5 targets got NeMo's TEFusedLoRALinear")
        return {"median_ms": 1.0 + len(calls), "trainable": rank, "fp8_weights": 0}

    fake = types.SimpleNamespace(
        measure=measure, rounds=bench.rounds, card=lambda: "cpu", FP8=bench.FP8, write_json=bench.write_json
    )
    args = argparse.Namespace(
        summary=str(tmp_path / "s.json"),
        fp8="none",
        dtype="bf16",
        spec="te",
        dims="v3",
        seq=4096,
        batch=1,
        experts=None,
        warmup=0,
        iters=1,
        rounds=2,
        ddp=False,
    )
    assert lora_summary.summary(args, fake) == 0
    required = [variant for _, variant, _ in lora_summary.SUMMARY]
    assert calls == required + required[::-1] + ["nemo_lora_fused"] * 2 + ["base"]
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["complete"] and "nemo_lora_fused_r16_bf16" not in result["step_ms"]
    assert result["errors"] == {
        "nemo_lora_fused_r16_bf16": "RuntimeError: nemo_lora_fused: 0 of 5 targets got NeMo's TEFusedLoRALinear"
    }


def test_lora_overhead_fp8_refused_on_cpu():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "lora_overhead.py"), "--spec", "te", "--fp8", "blockwise"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = "--fp8 blockwise: FP8 needs a CUDA GPU with Transformer Engine, and this machine has no CUDA device"
    assert proc.stderr.strip().splitlines()[-1] == message  # before it, at most torch's own import warnings
    assert "Traceback" not in proc.stderr and proc.stdout == ""


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
    for schedule in ("seesaw", "seesaw_t32"):  # tiny dims: refused, with why
        assert "attention backend 'gluon'" in result[f"engine_gluon_{schedule}"]["skipped"]


def test_a_section_under_another_gluon_schedule_restores_the_default():
    """``decode_bench.with_schedule``: the engine sections see the schedule asked for, and the default comes back
    after, also when the section raises."""
    from support.bench import bench_module

    from nemo_mla_lora.inference.kernels import gluon_launch

    def failing():
        raise RuntimeError("section failed")

    bench, default = bench_module("decode_bench"), gluon_launch.SCHEDULE
    assert set(bench.SEESAW_SCHEDULES) == set(gluon_launch.KERNELS) - {default}  # an engine section per schedule
    assert bench.with_schedule("seesaw", lambda: gluon_launch.SCHEDULE) == "seesaw"
    with pytest.raises(RuntimeError, match="section failed"):
        bench.with_schedule("seesaw", failing)
    assert default == gluon_launch.SCHEDULE


def test_moe_decode_bench_runs_on_a_tiny_config(tmp_path):
    """``bench/moe_decode.py`` on the tiny V3 variant: both layers run, outputs checked equal, a row per batch."""
    from support.hf import MAKER

    config = tmp_path / "config.json"
    config.write_text(json.dumps(MAKER.hf_config("v3_noaux_yarn_q").to_dict()))
    out = tmp_path / "moe.json"
    script = [sys.executable, str(ROOT / "bench" / "moe_decode.py"), "--config", str(config), "--out", str(out)]
    proc = subprocess.run([*script, "--batches", "1", "4", "--iters", "2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 4] and all(r["megatron_ms"] > 0 and r["grouped_ms"] > 0 for r in rows)


def test_lora_traffic_widths_are_the_layer_the_gpu_trained():
    """``bench/lora_traffic.py``'s widths of the V3-shaped layer against the trainable parameters ``lora_overhead.py``
    counted on the Megatron layer it built on an H100 (r x (i + o) per adapter, each routed expert its own), and its
    floor against the passes counted by hand for one linear."""
    from support.bench import bench_module

    lora_traffic = bench_module("lora_traffic")
    layer, rank = lora_traffic.V3_LAYER, 16
    linears = lora_traffic.adapted_linears(layer, tokens=4096)
    trained = json.loads((ROOT / "bench/results/h100_te_fp8/rounds_ddp/summary.json").read_text())["trainable"]
    for placement in lora_traffic.PLACEMENTS:
        chosen = lora_traffic.placement_leaves(linears, placement)
        params = sum(
            rank * (i + o) * (layer["num_moe_experts"] if leaf.startswith("experts.") else 1)
            for leaf, (_, i, o) in linears.items()
            if leaf in chosen
        )
        assert params == trained[f"{placement}_r16_bf16"], placement
    t, i, o = 4096, 7168, 1536  # linear_q_down_proj: forward x, y twice; backward g twice, dx twice, x: bf16
    forward, backward = 2 * (t * i + 2 * t * o), 2 * (2 * t * o + 2 * t * i + t * i)
    assert lora_traffic.floor_bytes({"q": (t, i, o)}) == forward + backward


def test_decode_goals_read_a_committed_sweep():
    """The goal table of a committed H100 sweep (FlashMLA's row beside ours): each goal checked against the rows'
    own shares and times, misses listed apart where FlashMLA meets the bar."""
    from support.bench import bench_module

    goals = bench_module("decode_goals")
    sweep = json.loads((ROOT / "bench/results/h100_decode_gluon_sweep/decode_roofline.json").read_text())
    s = goals.summary(sweep)
    assert len(s["rows"]) == len(sweep["shapes"]) == 36
    for shape, row in zip(sweep["shapes"], s["rows"]):
        ours = [shape["best"][k]["ms"] for k in goals.OURS if k in shape["best"]]
        assert row["ours_us"] == pytest.approx(min(ours) * 1e3)
        assert row["vs_flashmla"] == pytest.approx(shape["best"]["flashmla"]["ms"] / min(ours))
        engine = shape["best"]["ours"]["ms"]  # what the engine's triton backend ran
        assert row["engine_vs_flashmla"] == pytest.approx(shape["best"]["flashmla"]["ms"] / engine)
    missed = s["misses"]["flashmla_goal_met"]
    assert missed and all(r["vs_flashmla"] < 0.95 for r in s["rows"] if f"h{r['h']} b{r['b']} t{r['t']}" in missed)
    assert set(s["misses"]["copy_goal_met_where_flashmla_meets_it"]) <= set(s["misses"]["copy_goal_met"])
    assert "| 64 | 128 | 32768 |" in goals.table(s)
    assert s["failed_checks"] == []
    sweep["checks"]["gluon_128"] = 0.5  # a kernel off the equations does not count, at that head count only
    wrong = goals.summary(sweep)
    assert wrong["failed_checks"] == ["gluon_128"]
    assert all(r["best_ours"] != "gluon" for r in wrong["rows"] if r["h"] == 128)
    assert any(r["best_ours"] == "gluon" for r in wrong["rows"] if r["h"] == 64)
    with pytest.raises(ValueError, match="expected decode_roofline.py's JSON"):
        goals.summary({"rows": []})
