"""Part-selective adapters are exact: the delta outside the chosen part is identically zero,
by construction (B has no rows there), before and after training steps."""

import pytest
import torch
from conftest import batch
from test_lora_parity import adapted, check_against_reference

from nemo_mla_lora.peft import MLALoRA
from nemo_mla_lora.peft.parts import row_mask
from nemo_mla_lora.peft.state import adapter_factors, adapter_modules

PARTS = [
    ("q_lora", "linear_kv_up_proj", "k"),
    ("q_lora", "linear_kv_up_proj", "v"),
    ("q_lora", "linear_kv_down_proj", "latent"),
    ("q_lora", "linear_kv_down_proj", "rope"),
    ("q_lora", "linear_q_up_proj", "nope"),
    ("q_lora", "linear_q_up_proj", "rope"),
    ("no_q_lora", "linear_q_proj", "nope"),
    ("no_q_lora", "linear_q_proj", "rope"),
]


def train_steps(model, steps=2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    tokens, positions, mask = batch(seed=3)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(tokens, positions, mask, labels=tokens).mean().backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("variant,leaf,part", PARTS)
def test_part_delta_is_zero_outside(mcore, variant, leaf, part):
    model, spec = adapted(variant, MLALoRA(target_modules=[leaf], parts={leaf: part}, dim=4, alpha=8))
    train_steps(model)
    module = next(iter(adapter_modules(model).values()))
    mask = row_mask(leaf, part, module.to_wrap.config)
    assert module.adapter.lora_b.shape[0] == int(mask.sum()) < mask.numel()
    for a, b, scale in adapter_factors(model).values():
        delta = scale * b @ a  # [out, in]
        assert torch.count_nonzero(delta[~mask]) == 0
        assert torch.count_nonzero(delta[mask]) > 0
    # the module's output changes only in the chosen rows
    x = torch.randn(5, 1, module.to_wrap.input_size)
    with torch.no_grad():
        base, _ = module.to_wrap(x)
        out, _ = module(x)
    assert torch.equal(out[..., ~mask], base[..., ~mask])
    assert not torch.equal(out[..., mask], base[..., mask])
    check_against_reference(model, spec, atol=3e-6)


def test_parts_shapes_follow_heads(mcore):
    model, _ = adapted("q_lora", MLALoRA(target_modules=["linear_kv_up_proj"], parts={"linear_kv_up_proj": "k"}))
    config = next(iter(adapter_modules(model).values())).to_wrap.config
    mask = row_mask("linear_kv_up_proj", "k", config).view(config.num_attention_heads, -1)  # [h, dn+dv]
    assert mask[:, : config.qk_head_dim].all() and not mask[:, config.qk_head_dim :].any()


def test_full_part_names_mean_no_mask(mcore):
    model, _ = adapted("q_lora", MLALoRA(target_modules=["linear_kv_up_proj"], parts={"linear_kv_up_proj": "kv"}))
    assert not next(iter(adapter_modules(model).values())).adapter.part_selective


@pytest.mark.parametrize(
    "parts,message",
    [
        ({"linear_proj": "k"}, "has no MLA parts"),
        ({"linear_kv_up_proj": "latent"}, "expected one of"),
    ],
)
def test_bad_parts_fail_early(parts, message):
    with pytest.raises(ValueError, match=message):
        MLALoRA(placement="nemo_official", parts=parts)


def test_part_selective_adapter_lives_on_the_base_weight_device():
    """The scatter index of a part-selective adapter follows the base weight (the GPU study once found it
    left on the CPU beside a CUDA base); ``meta`` stands in for the other device here."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear
    from torch import nn

    from nemo_mla_lora.peft.adapter import MLALoRAAdapter

    base = ColumnParallelLinear.__new__(ColumnParallelLinear)  # its attributes only: no process groups here
    nn.Module.__init__(base)
    base.weight = nn.Parameter(torch.empty(6, 4, device="meta"))
    base.output_size, base.input_size = 6, 4
    adapter = MLALoRAAdapter(base, dim=2, alpha=4.0, row_mask=torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool))
    assert adapter.lora_a.device.type == adapter.lora_b.device.type == adapter.scatter_index.device.type == "meta"
    assert adapter.lora_b.shape == (3, 2)
