"""The LoRA adapter for one Megatron linear: delta(x) = scale * scatter_rows(B (A x)).

Tensor parallelism follows the base linear (``to_wrap``), through Megatron-Core's own mappings:

| base | A [r, in] | B [rows, r] | communication |
|---|---|---|---|
| ColumnParallelLinear (output sharded) | full, replicated | local rows | r-sized: h's grad all-reduced (or h gathered)|
| RowParallelLinear (input sharded) | local input columns | full, replicated | r-sized all-reduce (or reduce-scatter)|
| TP size 1 / duplicated | full | full | none |

Transformer Engine's linears map onto these rows (``linear_layout.py``).

Routed-expert linears with explicit expert communication (EP or expert-TP > 1) leave input gather and
output reduction to the token dispatcher, as their base linears do; the adapter does the same and only
all-reduces the gradient of its replicated factor. A part-selective B whose chosen rows do not split
evenly over the TP ranks (e.g. latent-only ``linear_kv_down_proj``) is kept whole on every rank and
each rank takes its slice of the output.
"""

import math

import torch
from megatron.core.tensor_parallel import mappings
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from torch import nn

from nemo_mla_lora.peft.linear_layout import layout
from nemo_mla_lora.peft.lora_fn import frozen_lora_linear


def init_a(weight: torch.Tensor, method: str) -> None:
    """LoRA A initialisation, named as in NeMo's LoRA (xavier, kaiming, normal)."""
    if method == "xavier":
        nn.init.xavier_normal_(weight)
    elif method == "kaiming":
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    elif method == "normal":
        nn.init.normal_(weight, std=0.02)
    else:
        raise ValueError(f"lora_A_init_method={method!r}; expected xavier, kaiming or normal")


def grad_flags(adapter: nn.Module, base_weight: torch.Tensor) -> None:
    """The adapter's parameters take the base weight's gradient-reduction flags, so Megatron reduces them where
    it reduces the weight: ``allreduce=False`` (a routed expert under expert parallelism: DDP reduces it over
    the expert-data-parallel group only; by default every rank's local experts would be averaged with other
    ranks' different experts) and ``sequence_parallel`` (a TE linear duplicated over TP ranks that each see a
    sequence shard: ``finalize_model_grads`` all-reduces it over TP)."""
    for name in ("allreduce", "sequence_parallel"):
        if hasattr(base_weight, name):
            for p in adapter.parameters(recurse=False):
                setattr(p, name, getattr(base_weight, name))


def frozen_plain(base: nn.Module) -> bool:
    """A frozen weight without bias or FP8: what ``lora_fn.frozen_lora_linear`` computes the base as."""
    return not (base.weight.requires_grad or base.bias is not None or getattr(base.config, "fp8", None))


class MLALoRAAdapter(nn.Module):
    """A [r, in], B [rows, r]; ``row_mask`` (global, optional) selects the rows B may change."""

    def __init__(
        self,
        base: nn.Module,
        dim: int,
        alpha: float,
        dropout: float = 0.0,
        dropout_position: str = "pre",
        a_init: str = "xavier",
        b_init: str = "zero",
        row_mask: torch.Tensor | None = None,
        glu_fc1: bool = False,
        dtype=None,
    ):
        super().__init__()
        if b_init != "zero":
            raise ValueError(f"lora_B_init_method={b_init!r}; only 'zero' keeps the model unchanged at start")
        if dropout_position not in ("pre", "post"):
            raise ValueError(f"dropout_position={dropout_position!r}; expected 'pre' or 'post'")
        self.layout = lay = layout(base)
        self.mode, self.tp_group, self.tp_rank, self.tp_size = lay.mode, lay.tp_group, lay.tp_rank, lay.tp_size
        self.base_kind, self.explicit = lay.kind, lay.explicit_expert_comm
        self.sequence_parallel = lay.sequence_parallel
        self.dim, self.alpha, self.scale = dim, alpha, alpha / dim
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout_position = dropout_position
        self.glu_fc1 = glu_fc1
        out_features, in_features = lay.out_features, lay.in_features
        if row_mask is not None and row_mask.numel() != out_features:
            raise ValueError(f"part mask has {row_mask.numel()} rows, linear has {out_features} output rows")
        dtype = dtype or base.weight.dtype
        device = base.weight.device
        self._init_rows(out_features, row_mask, device)
        a_full = torch.empty(dim, in_features, dtype=torch.float32)
        init_a(a_full, a_init)
        if self.base_kind == "row":
            a_full = a_full.chunk(self.tp_size, dim=1)[self.tp_rank]
        self.lora_a = nn.Parameter(a_full.to(device=device, dtype=dtype).contiguous())
        self.lora_b = nn.Parameter(torch.zeros(self.b_rows, dim, device=device, dtype=dtype))
        grad_flags(self, base.weight)

    def _init_rows(self, out_features: int, row_mask: torch.Tensor | None, device) -> None:
        """Decide how B's rows map to this rank's output rows; register the scatter index (on ``device``)."""
        rows = torch.arange(out_features) if row_mask is None else row_mask.nonzero().flatten()
        self.part_selective = row_mask is not None
        self.out_local = out_features // self.tp_size if self.base_kind == "column" else out_features
        self.b_replicated = self.base_kind != "column"
        if self.base_kind == "column":
            lo = self.tp_rank * self.out_local
            per_rank = [
                ((rows >= r * self.out_local) & (rows < (r + 1) * self.out_local)).sum().item()
                for r in range(self.tp_size)
            ]
            if len(set(per_rank)) == 1:  # even split: B sharded like the base weight
                local = rows[(rows >= lo) & (rows < lo + self.out_local)] - lo
                self.register_buffer("scatter_index", local.to(device), persistent=False)
                self.b_rows = per_rank[0]
            else:  # uneven: B whole on every rank, output sliced
                self.b_replicated = True
                self.register_buffer("scatter_index", rows.to(device), persistent=False)
                self.b_rows = rows.numel()
        else:
            self.register_buffer("scatter_index", rows.to(device), persistent=False)
            self.b_rows = rows.numel()

    def _scatter(self, y_sel: torch.Tensor, out_features: int) -> torch.Tensor:
        """[..., rows_sel] -> [..., out_features] with zeros outside the chosen rows."""
        if not self.part_selective and y_sel.shape[-1] == out_features:
            return y_sel
        full = y_sel.new_zeros(*y_sel.shape[:-1], out_features)
        return full.index_copy(-1, self.scatter_index, y_sel)

    def _factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [s, b, in] (in sharded for row-parallel) -> (h [s', b, r] = x A^T after the mode's
        communication, the B to apply [rows, r]); delta = scatter_rows(h B^T) * scale."""
        g = self.tp_group
        if self.mode == "column":
            h = self._column_h(x)  # [s, b, r]
            b = (
                mappings.copy_to_tensor_model_parallel_region(self.lora_b, group=g)
                if self.b_replicated
                else self.lora_b
            )
            return h, b
        if self.mode == "row":
            h = x @ self.lora_a.T  # partial sums over the input shards: [s, b, r]
            if self.explicit:
                return h, mappings.copy_to_tensor_model_parallel_region(self.lora_b, group=g)
            if self.sequence_parallel:
                h = mappings.reduce_scatter_to_sequence_parallel_region(h, group=g)
                return h, mappings.copy_to_tensor_model_parallel_region(self.lora_b, group=g)
            return mappings.reduce_from_tensor_model_parallel_region(h, group=g), self.lora_b
        return x @ self.lora_a.T, self.lora_b

    def _column_h(self, x: torch.Tensor) -> torch.Tensor:
        """h = x A^T [s, b, r] on every TP rank of a column-parallel base, communicating h (r wide) rather than x:
        with sequence parallelism each rank projects its sequence shard [s/tp, b, in] and h is gathered (backward:
        dh reduce-scattered, so each rank's dA is its shard's part and A's gradient is all-reduced); without it x
        is whole on every rank and h's gradient is all-reduced (each rank's B covers its own output rows), which
        makes dA and the adapter's input gradient whole on every rank. The base gathers or all-reduces x's own
        hidden-wide tensors as before; the adapter no longer does it a second time. Explicit expert communication:
        the dispatcher gave every rank the same tokens; A's gradient is all-reduced."""
        g = self.tp_group
        if self.sequence_parallel:
            a = mappings.copy_to_tensor_model_parallel_region(self.lora_a, group=g)
            return mappings.gather_from_sequence_parallel_region(x @ a.T, group=g)  # [s/tp, b, r] -> [s, b, r]
        if self.explicit:
            return x @ mappings.copy_to_tensor_model_parallel_region(self.lora_a, group=g).T
        return mappings.copy_to_tensor_model_parallel_region(x @ self.lora_a.T, group=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [s, b, in] (in sharded for row-parallel) -> delta [s, b, out_local]."""
        if self.dropout_position == "pre":
            x = self.dropout(x)
        h, b = self._factors(x)
        if self.mode == "column" and self.b_replicated:
            full = self._scatter(h @ b.T, self.out_local * self.tp_size)
            y = full[..., self.tp_rank * self.out_local : (self.tp_rank + 1) * self.out_local]
        else:
            y = self._scatter(h @ b.T, self.out_local)
        y = y * self.scale
        return self.dropout(y) if self.dropout_position == "post" else y

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out + delta(x). Where B covers every output row, one ``addmm`` computes out + scale * h B^T
        (no scaled [s, b, out] temporary, no separate add: fewer kernels and fewer passes over the
        output, which is what LoRA's per-step overhead is made of; see bench/README.md)."""
        fusable = not self.part_selective and (self.dropout_position == "pre" or isinstance(self.dropout, nn.Identity))
        if not fusable:
            return out + self(x)
        h, b = self._factors(self.dropout(x))  # h: [s, b, r] -> [t, r] below (t = s*b)
        return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), b.T, alpha=self.scale).view(
            out.shape
        )

    def around(self, x: torch.Tensor, normed: bool = False) -> bool:
        """Whether ``lora_around`` runs this adapter beside its base: a TE linear without TP communication of its
        own (TP size 1 or duplicated), full rows, no dropout, x in the adapter's dtype. ``normed``: asked for the
        LayerNorm linear, whose adapter takes TE's normalised output as x, so only ``lora_onto`` applies (the
        delta into TE's output buffer); without it, for the other TE linears (``lora_fork`` and ``lora_onto``)."""
        lay = self.layout
        return (
            lay.te
            and self.mode == "plain"
            and lay.fused_norm == normed
            and not self.part_selective
            and isinstance(self.dropout, nn.Identity)
            and x.dtype == self.lora_a.dtype
        )

    def fused(self, base: nn.Module) -> bool:
        """Whether ``fused_forward`` computes base(x) + delta(x) as the adapter's own path does: Megatron's
        own Column/Row linear, frozen, without bias or FP8, a full-row adapter without dropout; at TP > 1
        only a column-parallel base in its usual layout (no expert TP, output not gathered). A row-parallel
        base at TP > 1 keeps the adapter's path (x_shard A_shard^T all-reduced, then B): fused, the
        base's reduction would sum the adapter's partial outputs instead, rounding differently."""
        if type(base) not in (ColumnParallelLinear, RowParallelLinear) or self.part_selective:
            return False
        if not isinstance(self.dropout, nn.Identity) or not frozen_plain(base):
            return False
        if self.tp_size == 1:
            return True
        return (
            self.base_kind == "column"
            and not self.explicit
            and not self.b_replicated
            and not base.gather_output
            and not base.disable_grad_reduce
        )

    def fused_forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """base(x) + delta(x) as one autograd function (``lora_fn``) after Megatron's own TP mapping of the
        input: at TP > 1 (column-parallel) x gathered from the sequence shards (or copied), then
        x W_local^T + s (x A^T) B_local^T, with A's gradient all-reduced.
        x: [s, b, in] -> [s', b, out_local]."""
        g, a, b = self.tp_group, self.lora_a, self.lora_b
        if self.tp_size > 1:
            if self.sequence_parallel:
                x = mappings.gather_from_sequence_parallel_region(x, group=g)
            else:
                x = mappings.copy_to_tensor_model_parallel_region(x, group=g)
            a = mappings.copy_to_tensor_model_parallel_region(a, group=g)
        return frozen_lora_linear(x, a, b, self.scale, (base.weight,))

    def full_b(self) -> torch.Tensor:
        """This rank's B expanded to its full output rows (zeros outside the part): [out_local or out, r]."""
        out = self.out_local * self.tp_size if self.b_replicated and self.base_kind == "column" else self.out_local
        return self._scatter(self.lora_b.detach().T, out).T

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """A and B as ShardedTensors, sharded like the base weight (so TP can change on load)."""
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

        state = self.state_dict(prefix="", keep_vars=True)
        axis_map = {"lora_a": 1} if self.base_kind == "row" else ({} if self.b_replicated else {"lora_b": 0})
        sharded = make_sharded_tensors_for_checkpoint(state, prefix, axis_map, sharded_offsets)
        if self.glu_fc1 and "lora_b" in axis_map and not self.part_selective:
            key = f"{prefix}lora_b"
            singleton = (metadata or {}).get("singleton_local_shards", False)
            sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets, singleton)
        return sharded
