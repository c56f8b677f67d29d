"""MLALoRA on the tiny Megatron model (B != 0) against the plain-torch equations and HF peft's LoRA."""

import pytest
import torch
from conftest import batch, perturb_norms_and_bias

from nemo_mla_lora.arch import keymap
from nemo_mla_lora.arch.mla_spec import MLASpec
from nemo_mla_lora.models.tiny import build_model, tiny_mla_config, tiny_mla_noq_config
from nemo_mla_lora.peft import MLALoRA
from nemo_mla_lora.peft.state import adapter_factors, base_state_dict, randomize_b
from nemo_mla_lora.reference.model import forward

# Each target alone, by leaf or by wildcard (dense MLP, shared experts, routed experts separately).
SINGLE_TARGETS = [
    ("q_lora", "linear_q_down_proj"),
    ("q_lora", "linear_q_up_proj"),
    ("no_q_lora", "linear_q_proj"),
    ("q_lora", "linear_kv_down_proj"),
    ("q_lora", "linear_kv_up_proj"),
    ("q_lora", "linear_proj"),
    ("q_lora", "decoder.layers.0.mlp.linear_fc1"),
    ("q_lora", "decoder.layers.0.mlp.linear_fc2"),
    ("q_lora", "*.shared_experts.linear_fc1"),
    ("q_lora", "*.shared_experts.linear_fc2"),
    ("q_lora", "*.local_experts.*.linear_fc1"),
    ("q_lora", "*.local_experts.*.linear_fc2"),
]
CONFIGS = {"q_lora": tiny_mla_config, "no_q_lora": tiny_mla_noq_config}


def adapted(variant, peft, dtype=torch.float32, seed=0):
    config = CONFIGS[variant](dtype=dtype)
    torch.manual_seed(seed)
    model = build_model(config).eval()
    perturb_norms_and_bias(model)
    model = peft(model)
    randomize_b(model, seed=seed)
    return model, MLASpec.from_megatron(config)


def check_against_reference(model, spec, atol):
    tokens, positions, mask = batch()
    state, adapters = base_state_dict(model), adapter_factors(model)
    with torch.no_grad():
        logits = model(tokens, positions, mask)
        reference = forward(tokens, state, spec, adapters)
        base = forward(tokens, state, spec)
    assert (logits - base).abs().max() > 1e-3, "adapters changed nothing"
    torch.testing.assert_close(logits, reference, atol=atol, rtol=0)


@pytest.mark.parametrize("variant,target", SINGLE_TARGETS)
def test_each_target_alone(mcore, variant, target):
    model, spec = adapted(variant, MLALoRA(target_modules=[target], dim=4, alpha=8))
    names = list(adapter_factors(model))
    assert names and all(target.rsplit(".", 1)[-1] == n.rsplit(".", 1)[-1] for n in names)
    check_against_reference(model, spec, atol=3e-6)


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_all_targets_together_float64(mcore, variant):
    model, spec = adapted(variant, MLALoRA(placement="all_linear", dim=3, alpha=5), dtype=torch.float64)
    check_against_reference(model, spec, atol=2e-7)  # router/softmax/rope stay fp32 in Megatron


def test_all_targets_match_hf_peft(mcore):
    """Same base weights and the same A/B in HF transformers + HF peft give the same logits."""
    from peft import LoraConfig, get_peft_model
    from support.hf import hf_model_from_state as hf_model

    model, spec = adapted("q_lora", MLALoRA(placement="all_linear", dim=4, alpha=8))
    state, adapters = base_state_dict(model), adapter_factors(model)
    hf_targets = {h.rsplit(".", 1)[-1] for n in adapters for h in keymap.to_hf_modules(n)}
    hf = get_peft_model(hf_model(spec, state), LoraConfig(r=4, lora_alpha=8, target_modules=sorted(hf_targets)))
    with torch.no_grad():
        for name, (a, b, _) in adapters.items():
            hf_names = keymap.to_hf_modules(name)
            for hf_name, b_part in zip(hf_names, b.chunk(len(hf_names), dim=0)):
                layer = hf.get_submodule("base_model.model." + hf_name)
                layer.lora_A["default"].weight.copy_(a)
                layer.lora_B["default"].weight.copy_(b_part)
    tokens, positions, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=tokens).logits, model(tokens, positions, mask), atol=3e-6, rtol=0)


def test_only_adapters_train(mcore):
    model, _ = adapted("q_lora", MLALoRA(placement="nemo_official", dim=4, alpha=8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter.lora_" in n for n in trainable)
    tokens, positions, mask = batch()
    model.train()
    model(tokens, positions, mask, labels=tokens).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.requires_grad)
