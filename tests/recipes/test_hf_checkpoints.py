"""Real HF checkpoints in: tiny checkpoints made by transformers' own DeepseekV2/V3 classes
(``scripts/make_tiny_hf.py``), every routing and RoPE variant, read from their own config.json only.

The oracle is transformers' model on the same files. One divergence is stated, not hidden: transformers'
``DeepseekV2Attention`` leaves out DeepSeek's YaRN softmax factor mscale(factor, mscale_all_dim)^2, which
DeepSeek's own modeling_deepseek.py (V2 and V3), transformers' own DeepseekV3Attention, vLLM and
Megatron-Core apply; for V2 + YaRN the HF model gets that factor set on its ``scaling`` attribute.
"""

import json
from pathlib import Path

import pytest
import torch
from support.hf import MAKER, VARIANTS, hf_model, prompt_tokens

from nemo_mla_lora.arch import hf_config
from nemo_mla_lora.checkpoints.sources import HFBase
from nemo_mla_lora.reference.model import forward


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_hf")
    return {name: MAKER.make(name, root / name) for name in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_read_from_checkpoint(hf_checkpoints, variant):
    config = json.loads((hf_checkpoints[variant] / "config.json").read_text())
    spec = hf_config.spec_from_hf(config)
    model_type, fields = MAKER.VARIANTS[variant]
    assert spec.model_type == model_type
    assert spec.q_lora_rank == fields["q_lora_rank"]
    assert spec.rope_type == ("yarn" if fields["rope_scaling"] else "rope")
    assert spec.moe_score_function == ("softmax" if model_type == "deepseek_v2" else "sigmoid")
    assert spec.moe_topk_method == fields.get("topk_method", "noaux_tc")
    # what we would write back reads as the same model
    assert hf_config.spec_from_hf(hf_config.hf_config_dict(spec, "float32", config)) == spec
    assert hf_config.spec_from_hf(hf_config.hf_config_dict(spec, "float32")) == spec


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_and_megatron_match_transformers(mcore, hf_checkpoints, variant):
    from nemo_mla_lora.checkpoints import dist_ckpt
    from nemo_mla_lora.models.from_spec import config_from_spec
    from nemo_mla_lora.models.tiny import build_model

    base = HFBase(hf_checkpoints[variant], dtype=torch.float32)
    state = base.load(base.names)
    tokens = prompt_tokens(base.spec.vocab_size)
    with torch.no_grad():
        expected = hf_model(hf_checkpoints[variant])(tokens).logits
        reference = forward(tokens, state, base.spec)
        model = dist_ckpt.load_weights(build_model(config_from_spec(base.spec)), state, variant).eval()
        s = tokens.shape[1]
        megatron = model(tokens, torch.arange(s).expand_as(tokens), torch.ones(1, 1, s, s, dtype=torch.bool).triu(1))
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(reference, expected, atol=2e-5, rtol=0)
    torch.testing.assert_close(megatron, expected, atol=2e-5, rtol=0)


def test_shape_preserving_mismatch_refused(hf_checkpoints):
    from omegaconf import OmegaConf

    from nemo_mla_lora.models.architecture import resolve

    directory = str(hf_checkpoints["v3_noaux_yarn_q"])
    ok = OmegaConf.create(
        {"name": "x", "checkpoint": directory, "config": None, "arch": {"routed_scaling_factor": 2.5}}
    )
    assert resolve(ok).moe_scaling_factor == 2.5
    for field, value in (
        ("routed_scaling_factor", 1.0),
        ("rope_theta", 20000.0),
        ("rope_scaling", dict(MAKER.YARN, factor=8.0)),
    ):
        bad = OmegaConf.create({"name": "x", "checkpoint": directory, "config": None, "arch": {field: value}})
        with pytest.raises(ValueError, match="contradicts the checkpoint"):
            resolve(bad)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("topk_method", "sinkhorn", "topk_method"),
        ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling.type"),
        ("hidden_act", "gelu", "hidden_act"),
        ("norm_topk_prob", False, "norm_topk_prob"),
        ("rope_interleave", False, "rope_interleave"),
    ],
)
def test_unrepresentable_config_refused(hf_checkpoints, field, value, message):
    config = json.loads((hf_checkpoints["v3_noaux_yarn_q"] / "config.json").read_text())
    with pytest.raises(hf_config.UnsupportedConfig, match=message):
        hf_config.spec_from_hf(dict(config, **{field: value}))


def finetune_from_hf(directory, out):
    """``recipes.finetune`` on the HF directory with no model overrides (a few steps, a learning rate that
    moves B well away from 0), exporting the adapter as HF PEFT through the callback."""
    from nemo_mla_lora.config.compose import compose
    from nemo_mla_lora.recipes import finetune

    cfg = compose(
        "finetune",
        [
            f"model.checkpoint={directory}",
            f"output_dir={out}",
            "trainer.max_steps=4",
            "trainer.val_check_interval=4",
            "trainer.limit_val_batches=1",
            "optim.lr=0.02",
            "optim.warmup_steps=0",
            "export=hf_peft",
        ],
    )
    return finetune.run_cpu(cfg, Path(out))


def megatron_logits(export_dir, tokens):
    from nemo_mla_lora.checkpoints import dist_ckpt
    from nemo_mla_lora.export.pipeline import read_export
    from nemo_mla_lora.models.from_spec import config_from_spec
    from nemo_mla_lora.models.tiny import build_model

    model = build_model(config_from_spec(dist_ckpt.read_spec(export_dir)))
    dist_ckpt.load_weights(model.eval(), read_export(export_dir, "mcore"), str(export_dir))
    s = tokens.shape[1]
    with torch.no_grad():
        return model(tokens, torch.arange(s).expand_as(tokens), torch.ones(1, 1, s, s, dtype=torch.bool).triu(1))


def engine_logits(engine, tokens, prefill: int, bank=None, ids=None):
    """Prefill ``prefill`` tokens, then decode the rest one at a time: logits [b, s, vocab]."""
    cache = engine.new_cache(tokens.shape[0], tokens.shape[1])
    steps = [engine.forward(tokens[:, :prefill], cache, bank, ids)]
    steps += [engine.forward(tokens[:, i : i + 1], cache, bank, ids) for i in range(prefill, tokens.shape[1])]
    return torch.cat(steps, dim=1)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_finetune_export_and_serve_match_transformers_and_peft(mcore, hf_checkpoints, tmp_path, variant):
    from nemo_mla_lora.export.pipeline import export
    from nemo_mla_lora.inference.adapters import AdapterBank
    from nemo_mla_lora.inference.engine import AbsorbedMLAEngine

    directory = hf_checkpoints[variant]
    summary = finetune_from_hf(directory, tmp_path / "run")
    assert summary["verify"] is None  # hf_peft: nothing merged to verify
    adapter, peft_dir = tmp_path / "run" / "adapter", tmp_path / "run" / "export"
    tokens = prompt_tokens(json.loads((directory / "config.json").read_text())["vocab_size"])
    with torch.no_grad():
        base = hf_model(directory)(tokens).logits
        adapted = hf_model(directory, adapter=peft_dir)(tokens).logits  # transformers + peft, unmerged
    assert (adapted - base).abs().max() > 1e-2  # B moved: the comparisons below can tell adapter from base

    for fmt in ("hf", "mcore", "absorbed"):
        report = export(directory, adapter, tmp_path / fmt, fmt=fmt, progress=False)
        assert report["verify"]["passed"], report["verify"]
    hf_config_written = json.loads((tmp_path / "hf" / "config.json").read_text())
    source_config = json.loads((directory / "config.json").read_text())
    assert hf_config_written["model_type"] == source_config["model_type"]
    assert hf_config_written["torch_dtype"] == "float32"
    assert hf_config_written["max_position_embeddings"] == source_config["max_position_embeddings"]
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    with torch.no_grad():
        merged_hf = hf_model(tmp_path / "hf")(tokens).logits
    torch.testing.assert_close(merged_hf, adapted, atol=1e-4, rtol=0)
    torch.testing.assert_close(megatron_logits(tmp_path / "mcore", tokens), adapted, atol=1e-4, rtol=0)
    engine = AbsorbedMLAEngine.load(tmp_path / "absorbed")
    torch.testing.assert_close(engine_logits(engine, tokens, prefill=6), adapted, atol=1e-4, rtol=0)

    # the base alone, absorbed, serving the adapter unmerged (AdapterBank) next to a row without it
    export(directory, None, tmp_path / "absorbed_base", fmt="absorbed", progress=False)
    engine = AbsorbedMLAEngine.load(tmp_path / "absorbed_base")
    bank = AdapterBank.load(engine.spec, {"tuned": str(adapter)})
    rows = engine_logits(engine, tokens, prefill=6, bank=bank, ids=bank.ids(["tuned", None]))
    torch.testing.assert_close(rows[0], adapted[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(rows[1], base[1], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_generate_cli_on_plain_rope_matches_transformers(hf_checkpoints, tmp_path):
    """The CLI (which crashed on plain RoPE): token ids in, every prompt position's logits and the greedy
    tokens out, equal to transformers' on the same ids."""
    import subprocess
    import sys

    directory = hf_checkpoints["v3_noaux_rope_noq"]
    out = tmp_path / "absorbed"
    for args in (
        ["nemo_mla_lora.recipes.export", f"base={directory}", "adapter=null", f"output={out}"],
        [
            "nemo_mla_lora.recipes.generate",
            f"checkpoint={out}",
            f"prompt_ids_file={tmp_path / 'ids.json'}",
            "max_new_tokens=4",
            f"dump_logits={tmp_path / 'dump.pt'}",
        ],
    ):
        (tmp_path / "ids.json").write_text(json.dumps([[256, 85, 80, 80, 70], [256, 99]]))
        proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    dump = torch.load(tmp_path / "dump.pt")
    model = hf_model(directory)
    for row in dump:
        prompt = row["tokens"][: row["prompt_logits"].shape[0]]
        with torch.no_grad():
            expected = model(prompt[None]).logits[0]
            greedy = model.generate(prompt[None], max_new_tokens=4, do_sample=False, eos_token_id=None)[0]
        torch.testing.assert_close(row["prompt_logits"], expected, atol=1e-4, rtol=0)
        assert torch.equal(row["tokens"], greedy), (row["tokens"], greedy)


@pytest.mark.parametrize("variant", ["v2_lite_greedy_yarn_noq", "v3_noaux_yarn_q"])
def test_nemo_checkpoint_context_is_read_as_data(tmp_path, variant):
    """A NeMo 2 checkpoint's context (written by NeMo's own TrainerContext.io_dump) gives the same architecture;
    it is read as YAML data, so a ``_target_`` planted in it is never called."""
    from nemo import lightning as nl
    from nemo.collections import llm
    from nemo.lightning import io

    from nemo_mla_lora.checkpoints.kind import checkpoint_kind, checkpoint_spec
    from nemo_mla_lora.models.from_spec import config_from_spec

    spec = hf_config.spec_from_hf(MAKER.hf_config(variant))
    ckpt = tmp_path / "nemo_ckpt"
    (ckpt / "weights").mkdir(parents=True)
    trainer = nl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    io.TrainerContext(model=llm.GPTModel(config_from_spec(spec)), trainer=trainer, extra={}).io_dump(
        ckpt / "context", yaml_attrs=["model"]
    )
    assert checkpoint_kind(ckpt) == "nemo" and checkpoint_spec(ckpt) == spec
    yaml_file = ckpt / "context" / "model.yaml"
    marker = tmp_path / "pwned"
    text = yaml_file.read_text()
    assert "\n  init_method: null\n" in text
    yaml_file.write_text(
        text.replace(
            "\n  init_method: null\n", f"\n  init_method:\n    _target_: os.system\n    _args_: ['touch {marker}']\n"
        )
    )
    assert checkpoint_spec(ckpt) == spec and not marker.exists()
