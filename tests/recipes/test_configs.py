"""Every YAML composes against its typed schema; the DeepSeek-V3 recipe matches NeMo's, value by value;
bad overrides fail before any model is built."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from nemo_mla_lora.config.compose import compose
from nemo_mla_lora.models.architecture import resolve

CONF = Path(__file__).resolve().parents[2] / "conf"
GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONF.iterdir() if g.is_dir()}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_yaml_composes_and_validates(group, option):
    overrides = [f"{group}={option}"]
    if group in ("data", "optim") and option in GROUPS["trainer"]:
        overrides.append(f"trainer={option}")  # these follow the trainer by default
    if option == "megatron" and group in ("trainer", "data", "optim"):
        overrides += ["model=deepseek_v3", "data.tokenizer=byte"]
    cfg = compose("finetune", overrides)
    assert cfg[group] is not None


def test_parts_and_targets_from_the_command_line():
    cfg = compose(
        "finetune",
        [
            "model=tiny_mla_noq",
            "+peft.parts.linear_kv_up_proj=k",
            "peft.target_modules=[linear_kv_up_proj,linear_q_proj]",
        ],
    )
    assert dict(cfg.peft.parts) == {"linear_kv_up_proj": "k"}
    assert list(cfg.peft.target_modules) == ["linear_kv_up_proj", "linear_q_proj"]


def test_export_config_composes():
    cfg = compose("export", ["base=a", "adapter=b", "output=c"])
    assert (cfg.format, cfg.verify, cfg.fold) == ("mcore", "full", False)


@pytest.mark.parametrize("given, mode", [("true", "full"), ("false", "none"), ("sample", "sample"), ("full", "full")])
def test_export_verify_modes_compose(given, mode):
    from nemo_mla_lora.export.verify import check_mode

    cfg = compose("export", ["base=a", "adapter=b", "output=c", f"verify={given}", "verify_layers=[0,3]"])
    assert check_mode(cfg.verify) == mode and list(cfg.verify_layers) == [0, 3]
    with pytest.raises(ValueError, match="verify='most'"):
        check_mode("most")


def test_deepseek_v3_megatron_is_nemo_official_lora_recipe():
    """NeMo 2 recipes/deepseek_v3.py finetune_recipe(peft_scheme='lora'), value by value as NeMo 2.7.3 ships it."""
    cfg = compose("finetune", ["model=deepseek_v3", "trainer=megatron", "data.tokenizer=byte"])
    t, o, p, d, m = cfg.trainer, cfg.optim, cfg.peft, cfg.data, cfg.model
    assert (t.num_nodes, t.devices) == (5, 8)
    assert (t.tensor_parallel, t.pipeline_parallel, t.expert_parallel) == (8, 5, 1)
    assert t.sequence_parallel is True
    assert (t.layers_in_first_pipeline_stage, t.layers_in_last_pipeline_stage) == (13, 12)
    assert p.placement == "nemo_official" and (p.dim, p.alpha, p.dropout) == (32, 32, 0.0)
    from nemo_mla_lora.peft.placements import get

    assert set(get(p.placement).targets) >= {
        "linear_q_down_proj",
        "linear_q_up_proj",
        "linear_kv_down_proj",
        "linear_kv_up_proj",
        "linear_proj",
    }
    assert (o.lr, o.min_lr, o.scheduler, o.warmup_steps) == (1e-4, 0.0, "cosine", 50)
    assert (o.name, o.adam_beta1, o.adam_beta2, o.adam_eps) == ("adam", 0.9, 0.98, 1e-5)
    assert (o.weight_decay, o.clip_grad) == (0.1, 1.0)
    assert t.precision == "bf16-mixed" and m.dtype == "bfloat16"
    assert d.seq_length == 2048 and d.kind == "squad" and d.packed is False
    assert (t.global_batch_size, t.micro_batch_size) == (128, 1)
    assert (t.max_steps, t.val_check_interval, t.checkpoint_every_n_steps) == (1000, 30, 50)
    assert t.use_distributed_optimizer is False and t.cross_entropy_loss_fusion is False
    assert t.gc_interval == 0  # no GarbageCollectionCallback unless performance_mode=True (then 60)
    spec = resolve(m)  # DeepSeek-V3's own config.json (models/configs/deepseek_v3.json)
    assert (spec.num_layers, spec.hidden_size, spec.num_heads, spec.q_lora_rank, spec.kv_lora_rank) == (
        61,
        7168,
        128,
        1536,
        512,
    )
    assert (spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim, spec.num_experts, spec.moe_topk) == (
        128,
        64,
        128,
        256,
        8,
    )
    assert spec.moe_layer_pattern == (0,) * 3 + (1,) * 58
    assert (spec.ffn_hidden_size, spec.moe_ffn_hidden_size, spec.vocab_size) == (18432, 2048, 129280)
    assert (spec.moe_score_function, spec.moe_topk_method, spec.moe_num_groups, spec.moe_group_topk) == (
        "sigmoid",
        "noaux_tc",
        8,
        4,
    )
    assert (spec.rope_type, spec.rope_factor, spec.rope_original_max_positions, spec.max_positions) == (
        "yarn",
        40.0,
        4096,
        163840,
    )


@pytest.mark.parametrize(
    "override,error,message",
    [
        ("trainer.max_stepz=3", ConfigCompositionException, "max_stepz"),
        ("peft.dim=abc", ConfigCompositionException, "dim"),
        ("model=gpt2", ConfigCompositionException, "gpt2"),
    ],
)
def test_bad_overrides_fail_at_composition(override, error, message):
    with pytest.raises(error, match=message):
        compose("finetune", [override])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["model=deepseek_v3", "trainer=megatron", "trainer.tensor_parallel=7"],
            "does not divide the model's num_attention_heads=128",
        ),
        (
            ["model=deepseek_v3", "trainer=megatron", "trainer.expert_parallel=3"],
            "does not divide the model's n_routed_experts=256",
        ),
        (["trainer.tensor_parallel=2"], "trainer=cpu runs one process"),
        (["trainer.gc_interval=-1"], "trainer.gc_interval=-1; expected >= 0"),
        (["export.format=onnx"], "export.format='onnx'"),
        (["+peft.parts.linear_kv_up_proj=latent"], "expected one of"),
        (["peft.placement=everywhere"], "unknown placement"),
        (["model=deepseek_v3", "trainer=megatron"], "needs data.tokenizer"),
        (["trainer=megatron", "data.tokenizer=byte"], "the model's vocab_size=264 is smaller"),
        (["+model.arch.num_hidden_layers=two"], "wrong type"),
        (["+model.arch.num_hiden_layers=2"], "not fields of"),
        (["model.config=no_such_model"], "neither a built-in model"),
        (["+foo=1", "+trainer.max_stepz=3"], r"unknown keys \['trainer.max_stepz', 'foo'\]"),
    ],
)
def test_bad_values_fail_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        compose("finetune", overrides)


def test_gpu_proof_config_validates():
    """What bench/run_gpu.sh runs: V3 attention dims, base made on the GPU, NeMo's byte tokenizer."""
    cfg = compose(
        "finetune",
        [
            "model=deepseek_v3_small",
            "trainer=megatron",
            "data=cpu",
            "data.tokenizer=byte",
            "data.seq_length=64",
            "trainer.global_batch_size=32",
            "trainer.micro_batch_size=8",
        ],
    )
    spec = resolve(cfg.model)
    assert (spec.hidden_size, spec.num_heads, spec.kv_lora_rank) == (7168, 128, 512)
    assert cfg.trainer.devices == 1 and cfg.data.base_pretrain


def test_recipe_rejects_bad_override_before_building(tmp_path):
    """The CLI fails fast (no model, no run directory contents) with the reason."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nemo_mla_lora.recipes.finetune",
            "model=deepseek_v3",
            "trainer=megatron",
            "trainer.tensor_parallel=6",
            f"output_dir={tmp_path}/run",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "does not divide the model's num_attention_heads=128" in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()  # a rejected config leaves nothing behind


def test_cfg_job_prints_composed_config():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nemo_mla_lora.recipes.finetune",
            "--cfg",
            "job",
            "model=deepseek_v3",
            "trainer=megatron",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "tensor_parallel: 8" in proc.stdout or "tensor_parallel: ${model.parallel.tensor}" in proc.stdout
    assert "config: deepseek_v3" in proc.stdout


def test_generate_config_composes():
    cfg = compose("generate", ["checkpoint=/exports/absorbed", "prompt=hi", "+adapters.a=/adapters/a", "adapter=a"])
    assert (cfg.max_new_tokens, cfg.temperature, cfg.attention, cfg.tokenizer) == (32, 0.0, "torch", None)
    assert dict(cfg.adapters) == {"a": "/adapters/a"}
    with pytest.raises(ConfigCompositionException, match="max_new_tokenz"):
        compose("generate", ["checkpoint=x", "max_new_tokenz=3"])


def test_export_config_takes_no_adapter():
    assert compose("export", ["base=a", "adapter=null", "output=c"]).adapter is None


def test_light_schema_lists_match_the_export_code():
    """config/validate.py keeps its own lists so that validating a config imports no torch; they must not drift."""
    from nemo_mla_lora.checkpoints import dist_ckpt
    from nemo_mla_lora.config import validate
    from nemo_mla_lora.export import pipeline, quantize

    assert validate.FORMATS == pipeline.FORMATS
    assert validate.NAMES == dist_ckpt.NAMES
    assert validate.WEIGHT_DTYPES == quantize.WEIGHT_DTYPES
