"""Routed experts with LoRA computed together: Megatron's ``SequentialMLP`` whose adapters are grouped GEMMs.

``group_experts(model)`` turns every ``SequentialMLP`` into ``LoRASequentialMLP`` (same parameters, same
state dict, same sharded checkpoint: only ``forward`` differs). Its forward runs the local experts'
``linear_fc1`` over all permuted tokens at once through ``lora_fn.frozen_lora_linear`` (the frozen base
one GEMM per expert, as Megatron runs it; A and B of every expert stacked into grouped GEMMs), the
activation once over all tokens (elementwise, so the same numbers as per expert), then ``linear_fc2`` the
same way. Where that does not apply it is ``SequentialMLP.forward`` unchanged: expert tensor parallelism
(the adapters' TP mappings then run per expert), FP8, probabilities applied on the input, TE activation,
adapter dropout or part-selective rows, trainable or biased expert linears, adapters on only some experts.

Index legend: t permuted tokens (grouped by local expert), i in_features, o out_features, r rank, e expert.
"""

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
from megatron.core.transformer.moe.experts import SequentialMLP
from torch import nn

from nemo_mla_lora.peft.adapter import frozen_plain
from nemo_mla_lora.peft.lora_fn import StackFactors, frozen_lora_linear, group_offsets


def _base_and_adapter(linear: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    adapter = getattr(linear, "adapter", None)
    return (linear.to_wrap, adapter) if adapter is not None else (linear, None)


def fusable(base: nn.Module, adapter: nn.Module | None) -> bool:
    """Whether ``frozen_lora_linear`` computes exactly what this expert's base(x) (+ adapter(x)) does:
    TP size 1, and frozen without bias or FP8 (with an adapter: ``MLALoRAAdapter.fused``)."""
    group = getattr(base, "tp_group", None)
    if group is not None and group.size() > 1:
        return False
    return adapter.fused(base) if adapter is not None else frozen_plain(base)


def _linear_plan(linears: list[nn.Module]):
    """(base linears, adapters or None) for one linear of every expert, or None if they cannot be grouped."""
    pairs = [_base_and_adapter(m) for m in linears]
    adapters = [a for _, a in pairs if a is not None]
    if adapters and len(adapters) != len(pairs):
        return None  # adapters on some experts only
    if not all(fusable(b, a) for b, a in pairs):
        return None
    if adapters and len({(a.dim, a.scale, a.lora_a.dtype) for a in adapters}) != 1:
        return None
    return tuple(b for b, _ in pairs), (adapters or None)


def _activation_ok(config) -> bool:
    if config.use_te_activation_func or getattr(config, "fp8", None) or config.moe_apply_probs_on_input:
        return False
    if config.bias_activation_fusion:
        return config.gated_linear_unit and config.activation_func == F.silu
    return True


def expert_activation(mlp: nn.Module, y: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Megatron ``MLP.forward``'s activation with ``per_token_scale`` (as it runs for an expert): y [t, o] ->
    [t, o / 2 if gated else o], scaled by probs [t]."""
    config = mlp.config
    if config.bias_activation_fusion:  # gated SiLU only (see _activation_ok)
        return weighted_bias_swiglu_impl(y, None, probs.unsqueeze(-1), config.activation_func_fp8_input_store)
    if config.gated_linear_unit:
        y_glu, y_linear = torch.chunk(y, 2, dim=-1)
        if (val := config.activation_func_clamp_value) is not None:
            y_glu, y_linear = y_glu.clamp(min=None, max=val), y_linear.clamp(min=-val, max=val)
        out = config.activation_func(y_glu) * (y_linear + config.glu_linear_offset)
    else:
        out = mlp.activation_func(y)
    return (out * probs.unsqueeze(-1)).to(out.dtype)


class LoRASequentialMLP(SequentialMLP):
    """``SequentialMLP`` with each linear's expert adapters computed together (module docstring)."""

    def grouped_plan(self):
        """(fc1 plan, fc2 plan) if this forward can group, else None. Made once (``group_experts`` makes it
        anew); with hundreds of experts a check per call would cost more CPU time than the launches it saves."""
        if not hasattr(self, "_lora_plan"):
            self._lora_plan = self._make_plan()
        return self._lora_plan

    def _make_plan(self):
        if not _activation_ok(self.config):
            return None
        fc1 = _linear_plan([e.linear_fc1 for e in self.local_experts])
        fc2 = _linear_plan([e.linear_fc2 for e in self.local_experts])
        if fc1 is None or fc2 is None:
            return None
        if fc1[1] is None and fc2[1] is None and not getattr(self, "_group_frozen", False):
            return None  # no adapters: Megatron's own forward
        return fc1, fc2

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        plan = self.grouped_plan()
        if plan is None:
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        x = permuted_local_hidden_states  # [t, hidden]
        counts = tokens_per_expert.tolist()
        offs = group_offsets(counts, x.device)  # end rows, shared by both linears
        y = _grouped(x, plan[0], counts, offs)  # [t, o1]
        y = expert_activation(self.local_experts[0], y, permuted_probs)  # [t, o1 / 2]
        return _grouped(y, plan[1], counts, offs), None  # [t, hidden]


def _grouped(x: torch.Tensor, plan, counts: list[int], offs: torch.Tensor) -> torch.Tensor:
    """One linear of every local expert over x [t, i] (rows grouped by expert) -> [t, o]."""
    bases, adapters = plan
    weights = tuple(m.weight for m in bases)
    if adapters is None:
        return frozen_lora_linear(x, None, None, 0.0, weights, counts, offs)
    a = StackFactors.apply(*(ad.lora_a for ad in adapters))  # [e, r, i]; gradients into main_grad in one add
    b = StackFactors.apply(*(ad.lora_b for ad in adapters))  # [e, o, r]
    return frozen_lora_linear(x, a, b, adapters[0].scale, weights, counts, offs)


def group_experts(model: nn.Module, frozen_too: bool = False) -> int:
    """Make every Megatron ``SequentialMLP`` in ``model`` a ``LoRASequentialMLP`` (in place); returns how many.
    ``frozen_too``: experts without adapters take the same path too (their base GEMMs into one output, one
    activation over all tokens, the same numbers); ``MLALoRA`` asks for it, since at 64 experts it halves a
    frozen MoE layer's step on a GPU (CPU launch time; bench/README.md)."""
    n = 0
    for module in model.modules():
        if type(module) in (SequentialMLP, LoRASequentialMLP):
            module.__class__ = LoRASequentialMLP
            module.__dict__.pop("_lora_plan", None)
            module._group_frozen = frozen_too
            n += 1
    return n
