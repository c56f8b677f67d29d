"""Target selection: named placements, leaf names, wildcards, excludes, and loud failures."""

import pytest
from test_lora_parity import adapted

from nemo_mla_lora.peft import MLALoRA, placements
from nemo_mla_lora.peft.mla_lora import pattern_matches
from nemo_mla_lora.peft.state import adapter_modules

ATTN = {"linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj", "linear_proj"}


def leaves(model):
    return {n.rsplit(".", 1)[-1] for n in adapter_modules(model)}


def test_wildcard_is_anchored_on_layer_index():
    name = "decoder.layers.11.self_attention.linear_proj"
    assert not pattern_matches("*.layers.1.*", "linear_proj", name)
    assert pattern_matches("*.layers.11.*", "linear_proj", name)
    assert pattern_matches("linear_proj", "linear_proj", name)
    assert not pattern_matches("linear_pro", "linear_proj", name)


@pytest.mark.parametrize(
    "variant,placement,expected",
    [
        ("q_lora", "nemo_official", ATTN),
        ("no_q_lora", "nemo_official", {"linear_q_proj", "linear_kv_down_proj", "linear_kv_up_proj", "linear_proj"}),
        ("q_lora", "all_linear", ATTN | {"linear_fc1", "linear_fc2"}),
        ("q_lora", "safe", {"linear_proj", "linear_fc1", "linear_fc2"}),
        ("q_lora", "kv_up", {"linear_kv_up_proj"}),
        ("q_lora", "down_only", {"linear_q_down_proj", "linear_kv_down_proj"}),
        ("no_q_lora", "down_only", {"linear_kv_down_proj"}),
    ],
)
def test_named_placements(mcore, variant, placement, expected):
    model, _ = adapted(variant, MLALoRA(placement=placement, dim=2, alpha=2))
    assert leaves(model) == expected


def test_all_linear_covers_dense_shared_and_routed(mcore):
    model, _ = adapted("q_lora", MLALoRA(placement="all_linear", dim=2, alpha=2))
    names = set(adapter_modules(model))
    assert "decoder.layers.0.mlp.linear_fc1" in names
    assert "decoder.layers.1.mlp.shared_experts.linear_fc2" in names
    assert "decoder.layers.2.mlp.experts.local_experts.5.linear_fc1" in names
    assert not any("output_layer" in n or "router" in n for n in names)


def test_wildcards_and_excludes(mcore):
    peft = MLALoRA(target_modules=["*.layers.1.*"], exclude_modules=["*.local_experts.*", "linear_proj"])
    model, _ = adapted("q_lora", peft)
    names = set(adapter_modules(model))
    assert names and all(".layers.1." in n for n in names)
    assert not any("local_experts" in n or n.endswith("linear_proj") for n in names)
    assert "decoder.layers.1.mlp.shared_experts.linear_fc1" in names


def test_lr_scales():
    assert all(0.5 <= placements.get(n).lr_scale <= 0.8 for n in ("nemo_official", "kv_up", "down_only", "all_linear"))
    assert placements.get("safe").lr_scale == 1.0
    assert MLALoRA(target_modules=["linear_kv_up_proj"]).lr_scale == 0.8
    assert MLALoRA(target_modules=["linear_fc1"]).lr_scale == 1.0


@pytest.mark.parametrize(
    "peft,message",
    [
        (lambda: MLALoRA(target_modules=["linear_qkv"]), r"\['linear_qkv'\] matched no module"),
        (lambda: MLALoRA(target_modules=["linear_q_proj"]), "Adaptable leaves in this model"),
        (lambda: MLALoRA(target_modules=["*.layers.7.*"]), "matched no module"),
        (lambda: MLALoRA(placement="safe", parts={"linear_kv_up_proj": "k"}), r"\['linear_kv_up_proj'\]"),
    ],
)
def test_unmatched_targets_fail_with_what_exists(mcore, peft, message):
    with pytest.raises(ValueError, match=message) as err:
        adapted("q_lora", peft())
    assert "linear_kv_up_proj" in str(err.value)  # the list of what exists


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(placement="everything"), "unknown placement"),
        (dict(placement=None), "needs a placement"),
        (dict(dim=0), "dim must be positive"),
    ],
)
def test_bad_arguments_fail_early(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MLALoRA(**kwargs)
