"""The real-size bench's inputs: ``bench/real_size.py write`` (and ``export_scale.py``) lay out the tensors of
DeepSeek's released files (checked against transformers 4.57's own model, which keeps experts unfused; the GPU
machine's transformers 5 does not, so the scripts cannot ask it), and the export step runs end to end on a shrunken
copy of the config."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.bench import bench_module

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "nemo_mla_lora" / "models" / "configs" / "deepseek_v2_lite.json"


def test_layout_is_transformers_4_layout_of_v2_lite():
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads(CONFIG.read_text())
    config = AutoConfig.for_model(raw["model_type"], **{k: v for k, v in raw.items() if k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items() if "rotary_emb" not in k}
    ours = bench_module("export_scale").hf_tensors(raw)
    assert sorted(set(ours) ^ set(theirs)) == []
    assert {k: v for k, v in ours.items() if theirs[k] != v} == {}
    assert len(ours) == 5291  # 26 MoE layers x 64 experts x 3 linears and the rest


@pytest.mark.slow  # spawns processes
def test_write_then_export_verifies_on_a_shrunken_v2_lite(tmp_path):
    raw = json.loads(CONFIG.read_text())
    raw.update(
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        n_routed_experts=8,
        num_experts_per_tok=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        vocab_size=256,
    )
    config, tokenizer = tmp_path / "config.json", tmp_path / "tokenizer"
    config.write_text(json.dumps(raw))
    tokenizer.mkdir()
    (tokenizer / "tokenizer_config.json").write_text("{}")
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    write = [
        sys.executable,
        str(ROOT / "bench" / "real_size.py"),
        "write",
        "--out",
        str(base),
        "--tokenizer",
        str(tokenizer),
        "--config",
        str(config),
        "--shard-bytes",
        str(200_000),
        "--adapter",
        str(adapter),
        "--adapter-rank",
        "4",
    ]
    proc = subprocess.run(write, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["shards"] > 1 and (base / "tokenizer_config.json").is_file()
    targets = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert set(targets) == {"q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    export = [
        sys.executable,
        "-m",
        "nemo_mla_lora.recipes.export",
        f"base={base}",
        f"adapter={adapter}",
        f"output={tmp_path / 'export'}",
        "format=mcore",
    ]
    proc = subprocess.run(export, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["verify"]["passed"], manifest["verify"]


def test_summary_gathers_the_parts_and_names_the_missing(tmp_path):
    bench = bench_module("real_size")
    results = tmp_path / "results"
    results.mkdir()
    variants = ["frozen", "nemo_official", "all_linear_r64", "nemo_lora"]
    table = {"card": "NVIDIA H200", "flops_per_token": 1.8e10, "tflops": dict.fromkeys(variants, 1.0)}
    table.update({k: dict.fromkeys(variants, 2.0) for k in ("tokens_per_s", "step_ms", "peak_gib")})
    (results / "real_size_table.json").write_text(json.dumps(table))
    (results / "real_size_export.json").write_text(json.dumps({"seconds": 50.0, "peak_rss_gib": 1.5, "rc": 0}))
    (results / "real_size_cp.json").write_text(json.dumps({"seconds": 40.0}))
    (results / "real_size_load_mcore_0_15.json").write_text(json.dumps({"loaded": True, "max_rel": 0.004}))
    out = tmp_path / "summary.json"
    bench.main(["summary", "--results", str(results), "--out", str(out)])
    s = json.loads(out.read_text())
    assert s["card"] == "NVIDIA H200" and set(s["step_ms"]) == set(variants)
    assert s["export"] == {"seconds": 50.0, "cp_seconds": 40.0, "peak_rss_gib": 1.5, "share_of_cp_rate": 0.8, "rc": 0}
    assert s["megatron_load"] == {"mcore_0_15": {"loaded": True, "max_rel": 0.004}, "mcore_0_19": None}
    assert s["engine"] is None and s["v3_layers"] is None
    assert s["finetune"] is None
    assert s["missing"] == [
        "real_size_engine.json",
        "real_size_finetune.json",
        "real_size_finetune_summary.json",
        "real_size_floor_mcore_0_15.json",
        "real_size_load_mcore_0_19.json",
        "v3_layers.json",
    ]
    run = {
        "trainer": "nemo llm.finetune",
        "steps": 10,
        "train_loss_first_last": [11.7, 11.0],
        "verify": {"passed": True, "max_abs_logit_diff": 0.004, "bound": 0.09},
    }
    (results / "real_size_finetune_summary.json").write_text(json.dumps(run))
    bench.main(["summary", "--results", str(results), "--out", str(out)])
    f = json.loads(out.read_text())["finetune"]
    assert f["verify_passed"] and f["verify_max_abs_logit_diff"] == 0.004 and "seconds" not in f


def test_summary_bounds_both_loads_by_the_floor(tmp_path):
    """The floor (the base alone in 0.15.3's model) bounds both releases' loads, whichever call ran them."""
    bench = bench_module("real_size")
    results = tmp_path / "results"
    results.mkdir()
    load = {"loaded": True, "max_rel": 0.06, "argmax_agreement": 0.9, "floor_rel": None, "bound_rel": 0.02}
    (results / "real_size_load_mcore_0_15.json").write_text(json.dumps(load))
    (results / "real_size_load_mcore_0_19.json").write_text(json.dumps({**load, "max_rel": 0.07}))
    out = tmp_path / "summary.json"
    bench.main(["summary", "--results", str(results), "--out", str(out)])
    assert json.loads(out.read_text())["megatron_load"]["mcore_0_19"] == {"loaded": True, "max_rel": 0.07}
    (results / "real_size_floor_mcore_0_15.json").write_text(json.dumps({"loaded": True, "max_rel": 0.0325}))
    bench.main(["summary", "--results", str(results), "--out", str(out)])
    loads = json.loads(out.read_text())["megatron_load"]
    assert loads["mcore_0_15"] == {
        "loaded": True,
        "max_rel": 0.06,
        "floor_rel": 0.0325,
        "bound_rel": 0.065,
        "within": True,
        "argmax_agreement": 0.9,
    }
    assert loads["mcore_0_19"]["bound_rel"] == 0.065 and not loads["mcore_0_19"]["within"]
    (results / "real_size_floor_mcore_0_15.json").write_text(json.dumps({"loaded": True, "max_rel": 0.001}))
    bench.main(["summary", "--results", str(results), "--out", str(out)])
    assert json.loads(out.read_text())["megatron_load"]["mcore_0_15"]["bound_rel"] == 0.02  # never below 2e-2


def test_table_steps_every_variant_and_profiles_on_cpu(tmp_path):
    """The step table on the shrunken config (CPU, 32 tokens): each variant steps in each of two rounds, NeMo's
    LoRA and MLALoRA ``nemo_official`` train the same number of parameters, and a profiled variant carries its
    profile (taken once)."""
    raw = json.loads(CONFIG.read_text())
    raw.update(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2)
    raw.update(n_routed_experts=4, num_experts_per_tok=2, num_attention_heads=2, num_key_value_heads=2)
    raw.update(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, vocab_size=256)
    config, tokenizer, base, out = tmp_path / "config.json", tmp_path / "tok", tmp_path / "base", tmp_path / "t.json"
    config.write_text(json.dumps(raw))
    tokenizer.mkdir()
    bench = [sys.executable, str(ROOT / "bench" / "real_size.py")]
    write = [*bench, "write", "--out", str(base), "--tokenizer", str(tokenizer), "--config", str(config)]
    assert subprocess.run(write, capture_output=True, text=True, cwd=ROOT).returncode == 0
    variants = ["frozen", "nemo_official", "all_linear_r64", "nemo_lora"]
    table = [*bench, "table", "--base", str(base), "--out", str(out), "--seq", "32", "--warmup", "1", "--iters", "1"]
    proc = subprocess.run([*table, "--variants", *variants, "--profile", "nemo_official", "--rounds", "2"],
                          capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["step_ms"]) == set(variants) and all(ms > 0 for ms in result["step_ms"].values())
    assert all(len(runs) == 2 for runs in result["step_ms_runs"].values())  # two rounds, a median of two each
    assert result["trainable"]["frozen"] == 0
    assert result["trainable"]["nemo_official"] == result["trainable"]["nemo_lora"] > 0
    assert result["trainable"]["all_linear_r64"] > result["trainable"]["nemo_official"]
    assert list(result["profile"]) == ["nemo_official"] and result["profile"]["nemo_official"]["cpu_ms_per_step"] > 0


def test_nvrx_version_is_set_where_nvrx_lacks_it():
    """megatron-core's ``is_nvrx_min_version`` reads ``nvidia_resiliency_ext.__version__``; nvrx 0.4.1 (NeMo 2.7.3's
    pin, installed here) has none. Beside the installed megatron-core (0.15.3: any nvrx will do) the check sets it
    from the distribution's metadata, in a fresh process."""
    code = (
        "import sys; sys.path.insert(0, 'bench'); from real_size_check import fit_nvrx_to_megatron as f; "
        "import nvidia_resiliency_ext as n; before = hasattr(n, '__version__'); print(before, f(), n.__version__, f())"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if "No module named 'nvidia_resiliency_ext'" in proc.stderr:
        pytest.skip("nvidia-resiliency-ext is not installed")
    assert proc.returncode == 0, proc.stderr[-2000:]
    from importlib.metadata import version

    want = version("nvidia-resiliency-ext")
    before, set_to, now, again = proc.stdout.split()
    if before == "True":  # an nvrx that defines it: left alone
        assert set_to == again == "None"
        return
    assert set_to == now == want and again == "None"  # set once, from the metadata


def test_nvrx_older_than_megatron_0_19_needs_is_hidden():
    """megatron-core 0.19.2 asserts nvrx >= 0.6.0 wherever nvrx imports (its checkpoint load then fails); beside
    it, an older nvrx (0.4.1 here) is hidden, so that Megatron goes without it as where none is installed. The
    installed megatron-core is reported as 0.19.2 in a fresh process."""
    code = (
        "import sys, importlib.metadata as md; real = md.version; "
        "md.version = lambda name: '0.19.2' if name == 'megatron-core' else real(name); "
        "sys.path.insert(0, 'bench'); from real_size_check import fit_nvrx_to_megatron as f; print(f())\n"
        "try:\n    import nvidia_resiliency_ext\nexcept ImportError:\n    print('hidden')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("nvidia-resiliency-ext")
    except PackageNotFoundError:
        assert proc.stdout.split() == ["None", "hidden"]
        return
    from packaging.version import Version

    if Version(installed) >= Version("0.6.0"):
        pytest.skip(f"nvidia-resiliency-ext {installed} fits megatron-core 0.19")
    assert proc.stdout.splitlines() == [f"hidden: {installed} < 0.6.0", "hidden"]
