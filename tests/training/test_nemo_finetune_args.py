"""The GPU path's llm.finetune arguments, built on CPU (fitting needs CUDA: bench/run_gpu.sh runs it)."""

import json
import re

import pytest
import torch

from nemo_mla_lora.config.compose import compose
from nemo_mla_lora.recipes.finetune import make_peft
from nemo_mla_lora.training import nemo_finetune

GPU_PROOF = [
    "model=deepseek_v3_small",
    "trainer=megatron",
    "data=cpu",
    "data.tokenizer=byte",
    "data.seq_length=64",
    "data.base_pretrain_steps=80",
    "data.base_pretrain_lr=3e-4",
    "trainer.max_steps=60",
    "optim.lr=1e-3",
]


@pytest.fixture
def no_gpu_trainer(monkeypatch):
    monkeypatch.setattr(
        nemo_finetune, "trainer", lambda cfg, steps, callbacks: {"steps": steps, "callbacks": callbacks}
    )


def test_base_stage_trains_every_parameter_on_the_generic_task(tmp_path, no_gpu_trainer):
    cfg = compose("finetune", GPU_PROOF + [f"output_dir={tmp_path}"])
    args = nemo_finetune.build(cfg, make_peft(cfg), stage="base")
    assert args["peft"] is None and args["resume"].restore_config is None
    assert args["trainer"]["steps"] == 80 and args["optim"].config.lr == 3e-4
    first = json.loads((tmp_path / "nemo_data" / "base" / "training.jsonl").read_text().splitlines()[0])
    assert set(first) == {"input", "output"} and first["input"].startswith("copy:")
    assert args["model"].config.hidden_size == 7168 and args["model"].tokenizer.vocab_size >= 256


def test_lora_stage_restores_the_base_and_applies_mla_lora(tmp_path, no_gpu_trainer):
    cfg = compose("finetune", GPU_PROOF + [f"output_dir={tmp_path}"])
    marker = object()
    args = nemo_finetune.build(cfg, make_peft(cfg), callbacks=[marker], stage="lora", restore="/ckpt/base")
    assert type(args["peft"]).__name__ == "MLALoRA" and args["peft"].placement == "nemo_official"
    restore = args["resume"].restore_config
    assert restore.path == "/ckpt/base" and restore.load_model_state and not restore.load_optim_state
    assert args["trainer"]["steps"] == 60 and args["optim"].config.lr == 1e-3
    assert marker in args["trainer"]["callbacks"]
    first = json.loads((tmp_path / "nemo_data" / "lora" / "validation.jsonl").read_text().splitlines()[0])
    assert first["input"].startswith("upper:")


def test_last_checkpoint_finds_the_newest_weights_dir(tmp_path):
    for name in ["step=10", "step=20-last"]:
        (tmp_path / "checkpoints" / name / "weights").mkdir(parents=True)
    assert nemo_finetune.last_checkpoint(tmp_path).endswith("step=20-last")
    with pytest.raises(FileNotFoundError, match="no NeMo checkpoint"):
        nemo_finetune.last_checkpoint(tmp_path / "checkpoints" / "step=10" / "weights")


def test_export_callback_unwraps_nemo_wrappers(mcore):
    """NeMo hands callbacks its LightningModule; the adapters sit under DDP / Float16Module wrappers."""
    from nemo_mla_lora.callbacks.export import find_megatron_model
    from nemo_mla_lora.models.tiny import tiny_mla
    from nemo_mla_lora.peft import MLALoRA

    model = MLALoRA(placement="kv_up", dim=2, alpha=2)(tiny_mla())
    wrapper = torch.nn.Module()
    wrapper.module = torch.nn.Module()
    wrapper.module.module = model  # e.g. DDP(Float16Module(GPTModel))
    lightning_module = torch.nn.Module()
    lightning_module.module = wrapper
    assert find_megatron_model(lightning_module) is model


def test_strategy_reads_and_writes_checkpoints_without_the_fully_parallel_exchange():
    """megatron-core 0.15.3's fully-parallel save and load call np.product (gone in NumPy 2); on the GPU
    machine they failed under TP=2 (save) and EP=2 (the LoRA stage's restore). Both must stay off."""
    cfg = compose("finetune", GPU_PROOF + ["trainer.devices=2", "trainer.expert_parallel=2"])
    s = nemo_finetune.strategy(cfg)
    assert not s.parallel_save and not s.parallel_load
    assert s.expert_model_parallel_size == 2 and s.tensor_model_parallel_size == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.fp8=e5m2"], "model.fp8='e5m2'; expected one of ('blockwise', 'tensorwise', 'delayed')"),
        (["trainer=cpu", "model.fp8=blockwise"], "trainer=megatron (got trainer.kind='cpu')"),
        (["model.fp8=blockwise", "trainer.precision=32"], "needs trainer.precision=bf16-mixed (got '32')"),
        (["export.weight_dtype=fp8_block"], "which only export.format=hf holds (got export.format='mcore')"),
        (["export.format=hf", "export.weight_dtype=fp8"], "export.weight_dtype='fp8'; expected one of ('fp8_block',)"),
    ],
)
def test_fp8_is_refused_where_it_cannot_run(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        compose("finetune", GPU_PROOF + ["trainer.precision=bf16-mixed"] + overrides)


def test_fp8_reaches_nemo_s_precision_plugin(monkeypatch):
    from nemo_mla_lora.runtime import te_compat

    cfg = compose("finetune", GPU_PROOF + ["trainer.precision=bf16-mixed", "model.fp8=blockwise"])
    with pytest.raises(RuntimeError, match="transformer_engine does not import here"):
        nemo_finetune.precision_plugin(cfg)  # no TE on this machine
    monkeypatch.setattr(te_compat, "transformer_engine_absent", lambda: False)
    dtypes = nemo_finetune.precision_plugin(cfg).dtype_config
    assert (dtypes.fp8, dtypes.fp8_recipe, dtypes.fp8_param, dtypes.bf16) == ("e4m3", "blockwise", True, True)
    cfg.model.fp8, cfg.model.fp8_param = "tensorwise", False
    dtypes = nemo_finetune.precision_plugin(cfg).dtype_config
    assert (dtypes.fp8, dtypes.fp8_recipe, dtypes.fp8_param) == ("hybrid", "tensorwise", False)
    cfg.model.fp8 = None
    assert nemo_finetune.precision_plugin(cfg).dtype_config.fp8 is None
