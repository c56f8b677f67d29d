"""How an adapter sees its base linear: Megatron's own Column/RowParallelLinear or Transformer Engine's.

NeMo builds DeepSeek-V3 with Megatron's TE layer spec, where the MLA and MLP linears are TE modules:

| base | kind | mode at TP > 1 | global (out, in) from | the adapter's input |
|---|---|---|---|---|
| ColumnParallelLinear | column | column | output_size, input_size | x |
| RowParallelLinear | row | row | output_size, input_size | x (input shard) |
| TELinear, parallel_mode None (duplicated: q/kv down) | column | plain | out_features, in_features | x |
| TEColumnParallelLinear | column | column | out_features x tp, in_features | x |
| TELayerNormColumnParallelLinear (q/kv up, dense fc1) | column | column | out_features x tp, in_features | normed x |
| TERowParallelLinear | row | row | out_features, in_features x tp | x (input shard) |

TE keeps per-partition sizes (``out_features`` of a column linear, ``in_features`` of a row linear are this
rank's); Megatron's linears keep global ones. A TE linear with a fused norm normalises inside its GEMM; its
adapter must see the normalised input, as the base does, so the wrapper asks TE to return it
(``return_layernorm_output``: this rank's sequence shard under sequence parallelism; the adapter gathers it
as for any column-parallel base). TE cannot be imported on a machine
without CUDA: ``te_layout`` is the shape and mode logic on plain values (tested on CPU); ``layout`` reads a
module (TE modules are recognised only where TE imports).
"""

import functools
from dataclasses import dataclass

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from torch import nn

TE_KINDS = {
    "TELayerNormColumnParallelLinear": "column",
    "TEColumnParallelLinear": "column",
    "TERowParallelLinear": "row",
    "TELinear": None,
}  # None: from its parallel_mode


@dataclass(frozen=True)
class LinearLayout:
    kind: str  # "column" | "row": how the weight is split when TP > 1
    mode: str  # "plain" (TP size 1, duplicated, or expert with explicit communication) | "column" | "row"
    out_features: int  # global
    in_features: int  # global
    tp_size: int = 1
    tp_rank: int = 0
    tp_group: object = None
    sequence_parallel: bool = False
    explicit_expert_comm: bool = False
    fused_norm: bool = False  # TE LayerNormLinear: the adapter takes the normalised input
    te: bool = False


def te_layout(
    class_name: str,
    parallel_mode,
    out_features: int,
    in_features: int,
    tp_size: int,
    tp_rank: int = 0,
    tp_group=None,
    sequence_parallel: bool = False,
) -> LinearLayout:
    """The layout of a TE linear from its class name and attributes (per-partition features)."""
    if class_name not in TE_KINDS:
        raise TypeError(f"{class_name} is not a TE linear MLALoRA wraps; expected one of {sorted(TE_KINDS)}")
    if parallel_mode not in ("column", "row", None):
        raise ValueError(f"{class_name}: parallel_mode={parallel_mode!r}; expected 'column', 'row' or None")
    expected = TE_KINDS[class_name]
    if expected is not None and parallel_mode not in (expected, None):
        raise ValueError(f"{class_name} with parallel_mode={parallel_mode!r}; expected {expected!r}")
    size = tp_size if parallel_mode is not None else 1  # None: TE does no TP communication (duplicated)
    out_global = out_features * size if parallel_mode == "column" else out_features
    in_global = in_features * size if parallel_mode == "row" else in_features
    kind = parallel_mode or expected or "column"
    return LinearLayout(
        kind=kind,
        mode=kind if size > 1 else "plain",
        out_features=out_global,
        in_features=in_global,
        tp_size=size,
        tp_rank=tp_rank if size > 1 else 0,
        tp_group=tp_group,
        sequence_parallel=bool(sequence_parallel) and size > 1,
        fused_norm=class_name == "TELayerNormColumnParallelLinear",
        te=True,
    )


@functools.cache
def _megatron_te():
    """Megatron's TE wrappers (``megatron.core.extensions.transformer_engine``), or None where Transformer Engine
    does not import; asked once per process (a failed import is not cached by Python, and every module of a
    model is asked about)."""
    from nemo_mla_lora.runtime.te_compat import transformer_engine_absent

    if transformer_engine_absent():
        return None
    from megatron.core.extensions import transformer_engine as mte

    return mte


def _te_class_name(module: nn.Module) -> str | None:
    """The Megatron TE wrapper ``module`` is an instance of, or None (always None without TE)."""
    mte = _megatron_te()
    if mte is None:
        return None
    for name in TE_KINDS:  # subclasses first: TELayerNorm..., TEColumn/TERow (TELinear subclasses), TELinear
        if isinstance(module, getattr(mte, name)):
            return name
    return None


def is_te_grouped(module: nn.Module) -> bool:
    """Whether ``module`` is TE's grouped expert linear (``TEGroupedMLP``'s fc1/fc2; False without TE)."""
    grouped = getattr(_megatron_te(), "TEGroupedLinear", None)
    return grouped is not None and isinstance(module, grouped)


def is_linear(module: nn.Module) -> bool:
    """Whether MLALoRA can wrap ``module``: a Megatron or TE linear of the table above."""
    return isinstance(module, (ColumnParallelLinear, RowParallelLinear)) or _te_class_name(module) is not None


def layout(base: nn.Module) -> LinearLayout:
    """The layout of a Megatron or TE linear; TypeError for anything else."""
    group = getattr(base, "tp_group", None)
    if isinstance(base, (ColumnParallelLinear, RowParallelLinear)):
        size = group.size() if group is not None else 1
        explicit = bool(getattr(base, "explicit_expert_comm", False))
        kind = "row" if isinstance(base, RowParallelLinear) else "column"
        mode = "plain" if size == 1 and not explicit else kind
        return LinearLayout(
            kind=kind,
            mode=mode,
            out_features=base.output_size,
            in_features=base.input_size,
            tp_size=size,
            tp_rank=group.rank() if group is not None else 0,
            tp_group=group,
            sequence_parallel=bool(getattr(base, "sequence_parallel", False)) and not explicit,
            explicit_expert_comm=explicit,
        )
    name = _te_class_name(base)
    if name is None:
        raise TypeError(
            f"{type(base).__name__} is not a Megatron Column/RowParallelLinear or a TE linear ({', '.join(TE_KINDS)})"
        )
    return te_layout(
        name,
        base.parallel_mode,
        base.out_features,
        base.in_features,
        base.tp_size,
        group.rank() if group is not None and base.tp_size > 1 else 0,
        group,
        getattr(base, "sequence_parallel", False),
    )
