"""The tiny Megatron-Core MLA model against the plain-torch equations and HF transformers' DeepseekV3."""

import pytest
import torch
from conftest import batch, perturb_norms_and_bias
from support.hf import hf_model_from_state as hf_model

from nemo_mla_lora.arch import keymap
from nemo_mla_lora.arch.mla_spec import MLASpec
from nemo_mla_lora.models.tiny import build_model, tiny_mla_config, tiny_mla_noq_config
from nemo_mla_lora.peft.state import base_state_dict
from nemo_mla_lora.reference.model import forward

CONFIGS = {"q_lora": tiny_mla_config, "no_q_lora": tiny_mla_noq_config}


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_megatron_matches_equations_and_hf(mcore, variant):
    config = CONFIGS[variant]()
    model = build_model(config).eval()
    perturb_norms_and_bias(model)
    spec, state = MLASpec.from_megatron(config), base_state_dict(model)
    tokens, positions, mask = batch()
    with torch.no_grad():
        logits = model(tokens, positions, mask)
        reference = forward(tokens, state, spec)
        hf_logits = hf_model(spec, state)(tokens).logits
    assert logits.abs().max() > 0.1  # not a degenerate model
    torch.testing.assert_close(logits, reference, atol=2e-6, rtol=0)
    torch.testing.assert_close(hf_logits, logits, atol=2e-6, rtol=0)


def test_float64_parity(mcore):
    config = tiny_mla_config(dtype=torch.float64)
    model = build_model(config).eval()
    perturb_norms_and_bias(model)
    tokens, positions, mask = batch()
    with torch.no_grad():
        logits = model(tokens, positions, mask)
        reference = forward(tokens, base_state_dict(model), MLASpec.from_megatron(config))
    # Megatron keeps the router, softmax and rope tables in fp32, so not 1e-15.
    torch.testing.assert_close(logits, reference, atol=5e-8, rtol=0)


def test_keymap_round_trip_and_names(mcore):
    model = build_model(tiny_mla_config())
    state = base_state_dict(model)
    hf = keymap.megatron_to_hf(state)
    assert "model.layers.0.self_attn.kv_b_proj.weight" in hf
    assert "model.layers.1.mlp.experts.5.up_proj.weight" in hf
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in hf
    back = keymap.hf_to_megatron(hf)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_keymap_rejects_unknown_and_half_gate_up():
    with pytest.raises(KeyError, match="no HF name"):
        keymap.to_hf_modules("decoder.layers.0.self_attention.linear_qkv")
    with pytest.raises(KeyError, match="gate_proj/up_proj"):
        keymap.hf_to_megatron({"model.layers.0.mlp.gate_proj.weight": torch.zeros(2, 2)})
