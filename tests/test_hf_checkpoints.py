"""Real HF checkpoints in: tiny checkpoints made by transformers' own DeepseekV2/V3 classes
(``scripts/make_tiny_hf.py``), every routing and RoPE variant, read from their own config.json only.

The oracle is transformers' model on the same files. One divergence is stated, not hidden: transformers'
``DeepseekV2Attention`` leaves out DeepSeek's YaRN softmax factor mscale(factor, mscale_all_dim)^2, which
DeepSeek's own modeling_deepseek.py (V2 and V3), transformers' own DeepseekV3Attention, vLLM and
Megatron-Core apply; for V2 + YaRN the HF model gets that factor set on its ``scaling`` attribute.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from nemo_mla_lora import hf_config
from nemo_mla_lora.export.sources import HFBase
from nemo_mla_lora.mla_spec import yarn_mscale
from nemo_mla_lora.reference.model import forward

ROOT = Path(__file__).resolve().parents[1]


def _maker():
    spec = importlib.util.spec_from_file_location("make_tiny_hf", ROOT / "scripts" / "make_tiny_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAKER = _maker()
VARIANTS = sorted(MAKER.VARIANTS)


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_hf")
    return {name: MAKER.make(name, root / name) for name in VARIANTS}


def hf_model(directory, adapter=None):
    """transformers' own model on the checkpoint (eager attention, fp32), with DeepSeek's V2 YaRN softmax
    factor (module docstring); with ``adapter``, peft's ``PeftModel`` over it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32, attn_implementation="eager")
    c = model.config
    if c.model_type == "deepseek_v2" and c.rope_scaling:
        m = yarn_mscale(c.rope_scaling["factor"], c.rope_scaling.get("mscale_all_dim", 0))
        for layer in model.model.layers:
            layer.self_attn.scaling = layer.self_attn.scaling * m * m
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def prompt_tokens(vocab: int, batch: int = 2, length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


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
    from nemo_mla_lora import checkpoint
    from nemo_mla_lora.models.from_spec import config_from_spec
    from nemo_mla_lora.models.tiny import build_model

    base = HFBase(hf_checkpoints[variant], dtype=torch.float32)
    state = base.load(base.names)
    tokens = prompt_tokens(base.spec.vocab_size)
    with torch.no_grad():
        expected = hf_model(hf_checkpoints[variant])(tokens).logits
        reference = forward(tokens, state, base.spec)
        model = checkpoint.load_weights(build_model(config_from_spec(base.spec)), state, variant).eval()
        s = tokens.shape[1]
        megatron = model(tokens, torch.arange(s).expand_as(tokens), torch.ones(1, 1, s, s, dtype=torch.bool).triu(1))
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(reference, expected, atol=2e-5, rtol=0)
    torch.testing.assert_close(megatron, expected, atol=2e-5, rtol=0)


def test_shape_preserving_mismatch_refused(hf_checkpoints):
    from omegaconf import OmegaConf

    from nemo_mla_lora.models.architecture import resolve

    directory = str(hf_checkpoints["v3_noaux_yarn_q"])
    ok = OmegaConf.create({"name": "x", "checkpoint": directory, "config": None, "arch": {"routed_scaling_factor": 2.5}})
    assert resolve(ok).moe_scaling_factor == 2.5
    for field, value in (("routed_scaling_factor", 1.0), ("rope_theta", 20000.0),
                         ("rope_scaling", dict(MAKER.YARN, factor=8.0))):
        bad = OmegaConf.create({"name": "x", "checkpoint": directory, "config": None, "arch": {field: value}})
        with pytest.raises(ValueError, match="contradicts the checkpoint"):
            resolve(bad)


@pytest.mark.parametrize("field, value, message", [
    ("topk_method", "sinkhorn", "topk_method"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling.type"),
    ("hidden_act", "gelu", "hidden_act"),
    ("norm_topk_prob", False, "norm_topk_prob"),
    ("rope_interleave", False, "rope_interleave"),
])
def test_unrepresentable_config_refused(hf_checkpoints, field, value, message):
    config = json.loads((hf_checkpoints["v3_noaux_yarn_q"] / "config.json").read_text())
    with pytest.raises(hf_config.UnsupportedConfig, match=message):
        hf_config.spec_from_hf(dict(config, **{field: value}))
