"""Tiny MLA + MoE models for tests and the default recipe, built from the package's own HF configs.

``models/configs/tiny_mla.json`` is an HF DeepSeek-V3 ``config.json`` like any checkpoint's; every
dimension is distinct where a transposed or mis-split tensor could hide: hidden 80, q_lora_rank 56,
kv_lora_rank 40 (+ rope 8 = 48 rows of linear_kv_down_proj), 4 heads, qk_nope 24, qk_rope 8, v 28
(4*28 = 112 != hidden), dense FFN 120, expert FFN 36, two shared experts (72). Layer 0 is dense, the rest
MoE (6 routed experts, top-2, 2 groups, sigmoid router with expert bias), as DeepSeek-V3 lays them out.
"""

import torch

from nemo_mla_lora.models.architecture import builtin_spec
from nemo_mla_lora.models.from_spec import config_from_spec


def mla_config(dtype: torch.dtype = torch.float32, name: str = "tiny_mla", **overrides):
    """NeMo's DeepSeek config for the built-in model ``name`` (``models/configs``), TE-free; ``overrides`` are
    Megatron fields that win. With ``num_layers`` or ``num_moe_experts`` overridden, the dense/MoE layer
    pattern keeps the first layer dense (all dense without experts)."""
    spec = builtin_spec(name)
    if "num_layers" in overrides or "num_moe_experts" in overrides:
        layers = overrides.get("num_layers", spec.num_layers)
        dense = "num_moe_experts" in overrides and not overrides["num_moe_experts"]
        overrides.setdefault("moe_layer_freq", [0] * layers if dense else [0] + [1] * (layers - 1))
    return config_from_spec(spec, dtype, **overrides)


def tiny_mla_config(dtype: torch.dtype = torch.float32, **overrides):
    """DeepSeek-V3 style: q compression (linear_q_down_proj / linear_q_up_proj)."""
    return mla_config(dtype, **overrides)


def tiny_mla_noq_config(dtype: torch.dtype = torch.float32, **overrides):
    """DeepSeek-V2-Lite / Moonlight style: ``q_lora_rank=None`` (linear_q_proj)."""
    return mla_config(dtype, "tiny_mla_noq", **overrides)


def build_model(config, pre_process=None, post_process=None):
    """The Megatron-Core ``GPTModel`` for ``config`` (call after ``parallel.init_megatron``)."""
    model = config.configure_model(tokenizer=None, pre_process=pre_process, post_process=post_process)
    return model


def tiny_mla(dtype: torch.dtype = torch.float32, q_lora: bool = True, **overrides):
    config = tiny_mla_config(dtype, **overrides) if q_lora else tiny_mla_noq_config(dtype, **overrides)
    return build_model(config)
