"""LoRA on Transformer Engine's grouped expert linears: ``TEGroupedMLP``'s ``linear_fc1`` / ``linear_fc2``.

A ``TEGroupedLinear`` holds every local expert's weight (``weight0`` .. ``weight{E-1}``) and is called as
``linear(x, m_splits)`` on the tokens grouped by expert. ``TEGroupedLoRALinear`` wraps one:

    y = base(x, m_splits) + scale * (x_e A_e^T) B_e^T          for the rows x_e of each expert e

the base in TE's own grouped GEMM, the adapters as grouped GEMMs around it (``lora_around``: the delta added
into TE's output, the adapter's input gradient into TE's). A [E, r, in],
B [E, out, r] (stacked each step from one parameter per expert). Its sharded checkpoint is interchangeable
with ``SequentialMLP`` experts' adapters, as TE's grouped weights are with ``SequentialMLP``'s: each local
expert's A and B become
``<experts>.linear_fc1.adapter.lora_a`` / ``lora_b`` at their global expert index (fc1's B through
Megatron's SwiGLU factory when the MLP is gated), so adapter files, merge and export read the same keys
whichever expert module trained them. Expert tensor parallelism > 1 is refused (the TE experts' TP
communication is the token dispatcher's; their adapters would need its groups).
Index legend: t permuted tokens (grouped by local expert), i in_features, o out_features, r rank, e expert.
"""

import torch
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from torch import nn

from nemo_mla_lora.peft.adapter import grad_flags, init_a
from nemo_mla_lora.peft.lora_around import lora_fork, lora_onto
from nemo_mla_lora.peft.lora_fn import StackFactors, group_offsets


class GroupedLoRAAdapter(nn.Module):
    """One rank-r adapter per local expert e: parameters ``lora_a{e}`` [r, in] and ``lora_b{e}`` [out, r] (B zero at
    start), each its own Parameter as TE keeps ``weight{e}``: Megatron's distributed optimizer finds a parameter's
    checkpoint entry by the parameter itself (``get_param_id_to_sharded_param_map``), so a per-expert slice of one
    stacked parameter has none (else a ``KeyError`` at NeMo's first checkpoint save). ``stacked()`` gives the
    grouped GEMMs' [E, r, in] / [E, out, r] operands each step (two small copies; gradients flow to each expert)."""

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        dim: int,
        alpha: float,
        kind: str = "column",
        a_init: str = "xavier",
        glu_fc1: bool = False,
        dtype=torch.float32,
        device=None,
    ):
        super().__init__()
        for e in range(num_experts):
            a = torch.empty(dim, in_features, dtype=torch.float32)
            init_a(a, a_init)
            setattr(self, f"lora_a{e}", nn.Parameter(a.to(device=device, dtype=dtype)))
            setattr(self, f"lora_b{e}", nn.Parameter(torch.zeros(out_features, dim, device=device, dtype=dtype)))
        self.num_experts, self.dim, self.alpha, self.scale = num_experts, dim, alpha, alpha / dim
        self.glu_fc1, self.kind = glu_fc1, kind

    def expert(self, e: int) -> tuple[nn.Parameter, nn.Parameter]:
        """Expert e's (A [r, in], B [out, r])."""
        return getattr(self, f"lora_a{e}"), getattr(self, f"lora_b{e}")

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [E, r, in], B [E, out, r]) of every local expert (their gradients into Megatron's ``main_grad`` as
        one multi-tensor add per factor: ``lora_fn.StackFactors``)."""
        a, b = zip(*(self.expert(e) for e in range(self.num_experts)))
        return StackFactors.apply(*a), StackFactors.apply(*b)

    def sharded_state_dict(
        self, prefix="", sharded_offsets=(), metadata=None, ep_rank: int = 0, ep_size: int = 1, edp_rank: int = 0
    ):
        """Per local expert e: A_e, B_e as ShardedTensors ``prefix + lora_a`` / ``lora_b`` at global expert
        ``ep_rank * E + e`` of ``ep_size * E`` (the axis after ``sharded_offsets``), replicated along the
        expert-data-parallel group as TE's grouped weights are; state-dict keys ``prefix + lora_a{e}``."""
        out, singleton = {}, (metadata or {}).get("singleton_local_shards", False)
        axis = "lora_a" if self.kind == "row" else "lora_b"  # split like the base weight (MLALoRAAdapter's map)
        for e in range(self.num_experts):
            global_e = ep_rank * self.num_experts + e
            offsets = (
                sharded_offsets
                if singleton
                else (*sharded_offsets, (len(sharded_offsets), global_e, ep_size * self.num_experts))
            )
            key_prefix = f"{global_e}.{prefix}" if singleton else prefix
            a, b = self.expert(e)
            sub = make_sharded_tensors_for_checkpoint(
                {f"{key_prefix}lora_a": a, f"{key_prefix}lora_b": b},
                "",
                {f"{key_prefix}{axis}": 1 if self.kind == "row" else 0},
                offsets,
            )
            for value in sub.values():
                value.replica_id = (*value.replica_id[:2], edp_rank)
            if self.glu_fc1:
                sub[f"{key_prefix}lora_b"] = apply_swiglu_sharded_factory(
                    sub[f"{key_prefix}lora_b"], offsets, singleton
                )
            for name, value in sub.items():
                out[f"{prefix}{name.rsplit('.', 1)[-1]}{e}"] = value
        return out


class TEGroupedLoRALinear(nn.Module):
    """A TE grouped expert linear with a ``GroupedLoRAAdapter``: ``(base(x, m_splits) + delta, bias)``."""

    def __init__(self, to_wrap: nn.Module, adapter: GroupedLoRAAdapter):
        super().__init__()
        self.to_wrap, self.adapter = to_wrap, adapter

    def forward(self, x: torch.Tensor, m_splits):
        a, b = self.adapter.stacked()  # [E, r, in], [E, out, r]
        counts = [int(n) for n in m_splits]
        offs = group_offsets(counts, x.device)  # end rows, shared by both halves
        x1, hs = lora_fork(x, a, self.adapter.scale, counts, offs)  # hs [t, r]
        out, bias = self.to_wrap(x1, m_splits)
        return lora_onto(out, hs, b, counts, offs), bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The base's grouped weights as TE writes them, plus the adapters under ``prefix + 'adapter.'``."""
        from megatron.core import parallel_state as ps

        out = self.to_wrap.sharded_state_dict(prefix, sharded_offsets, metadata)
        out.update(
            self.adapter.sharded_state_dict(
                f"{prefix}adapter.",
                sharded_offsets,
                metadata,
                ep_rank=ps.get_expert_model_parallel_rank(),
                ep_size=ps.get_expert_model_parallel_world_size(),
                edp_rank=ps.get_expert_data_parallel_rank(),
            )
        )
        return out


def wrap(
    base: nn.Module,
    name: str,
    dim: int,
    alpha: float,
    a_init: str = "xavier",
    dropout: float = 0.0,
    dtype: torch.dtype | None = None,
) -> TEGroupedLoRALinear:
    """``base``: a Megatron ``TEGroupedLinear`` (``linear_fc1`` or ``linear_fc2`` of a ``TEGroupedMLP``)."""
    from megatron.core import parallel_state as ps

    if ps.get_expert_tensor_parallel_world_size() > 1:
        raise NotImplementedError(
            f"{name}: adapters on TE grouped experts at expert tensor parallel size "
            f"{ps.get_expert_tensor_parallel_world_size()}; supported at 1 (EP any)"
        )
    if dropout > 0:
        raise NotImplementedError(f"{name}: adapter dropout on TE grouped experts; use dropout=0")
    w = base.weight0
    adapter = GroupedLoRAAdapter(
        base.num_gemms,
        base.in_features,
        base.out_features,
        dim,
        alpha,
        kind="row" if name == "linear_fc2" else "column",
        a_init=a_init,
        glu_fc1=name == "linear_fc1" and base.config.gated_linear_unit,
        dtype=dtype or w.dtype,
        device=w.device,
    )
    grad_flags(adapter, w)
    return TEGroupedLoRALinear(base, adapter)
