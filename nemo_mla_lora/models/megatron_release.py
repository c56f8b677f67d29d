"""Megatron-Core's own MLA decoder spec, corrected for the installed release, for DeepSeek checkpoints.

Megatron-Core 0.19 resolves the MLA q/kv norms in ``QKNormConfigResolver`` (``mla_qk_norm_config.py``). For a
model without q compression (``q_lora_rank`` None: DeepSeek-V2-Lite, Moonlight's V2-style configs) and
``qk_layernorm=True`` (the kv latent norm every DeepSeek model has) it adds a q norm DeepSeek does not have:
- TE spec: ``linear_q_proj`` becomes ``TELayerNormColumnParallelLinear`` (a fused norm), so loading a DeepSeek
  checkpoint fails on ``linear_q_proj.layer_norm_weight``, and a model built that way normalises x twice;
- local spec: it refuses to build ("q_layernorm ... is non-trivial, but q_lora_rank is None").
Megatron-Core 0.15 builds both as DeepSeek does (plain ``linear_q_proj``, no q norm). ``mla_decoder_block_spec``
returns Megatron's own ``get_gpt_decoder_block_spec`` with, where the installed release needs it, the attention
module swapped for ``DeepSeekMLASelfAttention``: the release's resolver for the kv side, a plain column-parallel
``linear_q_proj`` and no q norm on the q side (nothing changes for models with q compression or on 0.15); and, on the
local spec, a core attention that accepts the ``k_channels`` / ``v_channels`` MLA passes (0.15 to 0.19 hand them
to a ``DotProductAttention`` that refuses them).

Only Megatron-Core is imported (at call time): a consumer loading our ``mcore`` export with Megatron alone uses
this module and nothing else of the package.
"""

from __future__ import annotations

import importlib.util
from functools import cache


def release_fuses_q_norm() -> bool:
    """Whether the installed Megatron-Core resolves MLA norms through ``QKNormConfigResolver`` (0.19 and later)."""
    return importlib.util.find_spec("megatron.core.transformer.mla_qk_norm_config") is not None


def needs_q_proj_fix(config) -> bool:
    """Whether Megatron's stock spec would give this config a q norm DeepSeek lacks.

    Args:
        config: the model's ``MLATransformerConfig``.
    """
    return release_fuses_q_norm() and config.q_lora_rank is None and bool(config.qk_layernorm)


@cache
def deepseek_mla_self_attention(base_cls: type) -> type:
    """A subclass of Megatron's ``base_cls`` (``MLASelfAttention``) whose q side is DeepSeek's without q
    compression: a plain column-parallel ``linear_q_proj`` and no q norm; the kv side as the release resolves it."""
    from megatron.core.models.backends import get_backend
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mla_qk_norm_config import QKNormConfigResolver

    class DeepSeekMLASelfAttention(base_cls):
        def _resolve_qk_norm_config(self, submodules):
            if self.config.q_lora_rank is not None:
                return super()._resolve_qk_norm_config(submodules)
            resolver = QKNormConfigResolver(self.config, submodules)
            # Resolve as for a q-compressed model (the q-up slot is unused) to get the release's kv side; its
            # q-side choice is replaced below.
            resolver.has_q_lora = True
            resolved = resolver.resolve()
            q_proj = submodules.linear_q_proj or get_backend(self.config.transformer_impl).column_parallel_linear()
            fused = resolver.fused_norm_linear_impl
            if fused is not None and getattr(q_proj, "module", q_proj) is fused:
                raise ValueError(f"linear_q_proj={q_proj} fuses a q norm; DeepSeek without q compression has none")
            resolved.update(linear_q_proj=q_proj, linear_q_up_proj=IdentityOp, q_layernorm=IdentityOp)
            return resolved

    DeepSeekMLASelfAttention.__name__ = DeepSeekMLASelfAttention.__qualname__ = f"DeepSeek{base_cls.__name__}"
    return DeepSeekMLASelfAttention


def core_attention_takes_mla_channels(core_cls: type) -> bool:
    """Whether a core attention class accepts the ``k_channels`` / ``v_channels`` MLA passes to it."""
    import inspect

    params = inspect.signature(core_cls.__init__).parameters
    return "k_channels" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@cache
def mla_core_attention(base_cls: type) -> type:
    """A subclass of Megatron's local ``DotProductAttention`` that accepts ``k_channels`` / ``v_channels`` and sizes
    its output by the v head dim (MLA's q/k head dim, nope + rope, differs from its v head dim)."""

    class MLACoreAttention(base_cls):
        def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
            super().__init__(*args, **kwargs)
            if v_channels is not None:
                self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    MLACoreAttention.__name__ = MLACoreAttention.__qualname__ = f"MLA{base_cls.__name__}"
    return MLACoreAttention


def fix_block_spec(block_spec, config):
    """Swap the attention module of every MLA layer spec of ``block_spec`` where ``needs_q_proj_fix(config)``;
    returns ``block_spec`` (changed in place).

    Args:
        block_spec: a ``TransformerBlockSubmodules`` as ``get_gpt_decoder_block_spec`` returns it.
        config: the model's ``MLATransformerConfig``.
    """
    if not needs_q_proj_fix(config):
        return block_spec
    for layer in block_spec.layer_specs:
        attention = layer.submodules.self_attention
        if "MLASelfAttention" in attention.module.__name__:
            attention.module = deepseek_mla_self_attention(attention.module)
    return block_spec


def fix_core_attention(block_spec):
    """Give every MLA layer spec of ``block_spec`` a core attention that takes MLA's ``k_channels`` /
    ``v_channels`` (Megatron's local spec, 0.15 to 0.19, hands them to a ``DotProductAttention`` that refuses them);
    returns ``block_spec`` (changed in place)."""
    for layer in block_spec.layer_specs:
        attention = layer.submodules.self_attention
        core = getattr(attention.submodules, "core_attention", None)
        if isinstance(core, type) and not core_attention_takes_mla_channels(core):
            attention.submodules.core_attention = mla_core_attention(core)
    return block_spec


def mla_decoder_block_spec(config, use_transformer_engine: bool = True, **kwargs):
    """Megatron-Core's own decoder block spec for an MLA (+ MoE) config, corrected for DeepSeek's q side on the
    installed release (see the module docstring).

    Args:
        config: the model's ``MLATransformerConfig`` (``multi_latent_attention=True``).
        use_transformer_engine: Megatron's TE spec (what NeMo and Megatron train with) or its local spec.
        **kwargs: passed on to ``get_gpt_decoder_block_spec`` (e.g. ``normalization``, ``qk_l2_norm``).

    Returns:
        The ``TransformerBlockSubmodules`` to pass as ``GPTModel(transformer_layer_spec=...)``.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    block = get_gpt_decoder_block_spec(config, use_transformer_engine=use_transformer_engine, **kwargs)
    return fix_core_attention(fix_block_spec(block, config))
