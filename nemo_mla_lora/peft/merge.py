"""Merging LoRA into base weights: W' = W + scale * B @ A, accumulated in fp32 (fp64 for fp64 weights),
cast back to the weight's dtype.

Pure functions on tensors. Names are Megatron module names (``peft.state`` conventions): an adapter for
``decoder.layers.0.self_attention.linear_kv_up_proj`` merges into ``...linear_kv_up_proj.weight``.

An adapter source hands out, per module, either plain factors ``(A, B, scale)`` or an ``AdapterEntry`` (HF PEFT
features beyond them: DoRA's magnitude, tensors that replace the base's); ``merge_unit`` merges either kind.
"""

from dataclasses import dataclass, field

import torch


class MergeError(ValueError):
    pass


BLOCK_ELEMENTS = 1 << 20  # fp32 accumulation in row blocks of at most this many elements (4 MB: in cache)


def merge_linear(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    name: str = "weight",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """weight [out, in], A [r, in], B [out, r] (full height; zeros outside a part) -> merged [out, in] of
    weight's dtype, written into ``out`` (a new tensor when None; ``out=weight`` merges in place). Computed
    in row blocks through one reused fp32 buffer: memory is the result plus 4 MB, and each block is
    converted, updated, checked and rounded while it is in cache (a fresh 64 MB block per step cost 3x)."""
    out_features, in_features = weight.shape
    if lora_a.shape[1] != in_features or lora_b.shape[0] != out_features or lora_a.shape[0] != lora_b.shape[1]:
        raise MergeError(
            f"{name}: LoRA shapes A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)} do not fit "
            f"weight {tuple(weight.shape)} (expected A [r, {in_features}], B [{out_features}, r])"
        )
    merged = torch.empty_like(weight) if out is None else out
    if merged.shape != weight.shape or merged.dtype != weight.dtype:
        raise MergeError(
            f"{name}: out is {tuple(merged.shape)} {merged.dtype}, weight {tuple(weight.shape)} {weight.dtype}"
        )
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32  # at least fp32
    a, b = lora_a.to(acc), lora_b.to(acc)
    rows = max(1, BLOCK_ELEMENTS // max(1, in_features))
    buffer = torch.empty(min(rows, out_features) * in_features, dtype=acc)
    for i in range(0, out_features, rows):
        n = min(rows, out_features - i)
        block = buffer[: n * in_features].view(n, in_features)  # [rows, in]
        block.copy_(weight[i : i + n])
        block.addmm_(b[i : i + n], a, alpha=scale)  # W + scale * B A: [rows, r] @ [r, in]
        if not torch.isfinite(block.sum()):  # one reduction (isfinite() per value costs 4x the merge)
            bad = int((~torch.isfinite(block)).sum())
            if bad:  # (else only the sum overflowed)
                raise MergeError(f"{name}: merged weight has NaN/Inf ({bad} values in rows {i}..{i + n - 1})")
        merged[i : i + n].copy_(block)
    return merged


def expand_rows(b_rows: torch.Tensor, row_index: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """A part-selective B [rows_sel, r] to full height [out, r] (zeros outside the part)."""
    if row_index is None:
        return b_rows
    full = b_rows.new_zeros(out_features, b_rows.shape[1])
    full[row_index] = b_rows
    return full


def merge_tp_shards(kind: str, weights: list, lora_a: list, lora_b: list, scale: float, name: str = "weight") -> list:
    """Merge one linear's tensor-parallel shards (rank order), gathering a LoRA factor only where the
    shapes say it is sharded on the rank dim (NeMo's LoRA shards A's rank for column-parallel bases;
    MLALoRA keeps the replicated factor whole):

    - ``column`` (weight [out/tp, in] per rank): B_i [out/tp, r] is the rank's own rows; A is whole
      ([r, in] on every rank) or sharded on r ([r/tp, in]) and then gathered.
    - ``row`` (weight [out, in/tp] per rank): A_i [r, in/tp] is the rank's own columns; B is whole
      ([out, r]) or sharded on r ([out, r/tp]) and then gathered.
    Returns the merged shards, each W_i + scale * B_i A_i in fp32.
    """
    tp = len(weights)
    if not (len(lora_a) == len(lora_b) == tp):
        raise MergeError(f"{name}: {tp} weight shards but {len(lora_a)} A and {len(lora_b)} B shards")
    if kind == "column":
        rank_dim_a = lora_b[0].shape[1]  # B_i [out/tp, r] carries the full rank
        a = torch.cat(lora_a, 0) if lora_a[0].shape[0] * tp == rank_dim_a and tp > 1 else lora_a[0]
        return [merge_linear(w, a, b, scale, f"{name}[tp{i}]") for i, (w, b) in enumerate(zip(weights, lora_b))]
    if kind == "row":
        rank_dim = lora_a[0].shape[0]  # A_i [r, in/tp] carries the full rank
        b = torch.cat(lora_b, 1) if lora_b[0].shape[1] * tp == rank_dim and tp > 1 else lora_b[0]
        return [merge_linear(w, a, b, scale, f"{name}[tp{i}]") for i, (w, a) in enumerate(zip(weights, lora_a))]
    raise ValueError(f"kind={kind!r}; expected 'column' or 'row'")


@dataclass(frozen=True, eq=False)
class AdapterEntry:
    """One module's adapter where plain factors do not say it all (HF PEFT). Merged as: ``replace`` first
    (tensors that take the base's place: peft's ``modules_to_save`` and saved base layers), then
    W + scale * B A, then DoRA: each row (``norm_dim`` 1, linears) or column (``norm_dim`` 0, embeddings) of
    W + scale * B A rescaled to ``magnitude`` over its L2 norm, in the rows ``dora_rows`` (all when None).

    Iterating it as ``(A, B, scale)`` is refused unless it is plain factors: a DoRA magnitude or a replacement
    cannot be applied as x A^T B^T."""

    module: str
    lora_a: torch.Tensor | None = None  # [r, in]
    lora_b: torch.Tensor | None = None  # [out, r], full height
    scale: float = 1.0
    magnitude: torch.Tensor | None = None  # [out] (norm_dim 1) or [in] (norm_dim 0)
    norm_dim: int = 1
    dora_rows: torch.Tensor | None = None  # bool [out]: rows that DoRA rescales (norm_dim 1)
    replace: dict = field(default_factory=dict)  # param -> [((row_start, row_stop) | None, tensor)]
    features: tuple = ()  # the adapter's fields that made this entry, for messages

    def plain(self) -> bool:
        return self.magnitude is None and not self.replace and self.lora_a is not None

    def __iter__(self):
        if not self.plain():
            raise MergeError(
                f"{self.module}: {', '.join(self.features) or 'this adapter'} cannot be applied as "
                f"factors (A, B, scale); merge it (export to a merged format)"
            )
        return iter((self.lora_a, self.lora_b, self.scale))


def merge_unit(tensors: dict, factors: dict) -> None:
    """Merges every module's adapter into ``tensors``, in place.

    Args:
        tensors: flat Megatron names -> a unit's tensors as read.
        factors: module -> ``(A, B, scale)`` or ``AdapterEntry`` (an adapter source's ``factors``).
    """
    for module, factor in factors.items():
        weight = tensors[f"{module}.weight"]
        if not isinstance(factor, AdapterEntry):
            a, b, scale = factor
            merge_linear(weight, a, b, scale, name=module, out=weight)
            continue
        for param, pieces in factor.replace.items():
            if param != "weight":
                _replace(tensors[f"{module}.{param}"], pieces, f"{module}.{param}")
        merge_entry(weight, factor, name=module, out=weight)


def _replace(target: torch.Tensor, pieces: list, name: str) -> None:
    for rows, value in pieces:
        view = target if rows is None else target[rows[0] : rows[1]]
        if view.shape != value.shape:
            raise MergeError(
                f"{name}: replacement is {tuple(value.shape)}, the base's rows {rows} are {tuple(view.shape)}"
            )
        view.copy_(value)


def merge_entry(
    weight: torch.Tensor, entry: AdapterEntry, name: str = "weight", out: torch.Tensor | None = None
) -> torch.Tensor:
    """The merged weight of one ``AdapterEntry`` (module docstring of ``AdapterEntry``), written into ``out``
    (a new tensor when None; ``out=weight`` merges in place). Accumulated in fp32 (fp64 for fp64 weights) in row
    blocks, rounded to the weight's dtype once.

    Args:
        weight: the base weight [out, in] as read.
        entry: what the adapter does to it.
        name: named in errors.
        out: where the result goes.
    """
    merged = torch.empty_like(weight) if out is None else out
    if merged is not weight:
        merged.copy_(weight)
    _replace(merged, entry.replace.get("weight", []), f"{name}.weight")
    if entry.lora_a is None:
        return merged
    if entry.magnitude is None:
        return merge_linear(merged, entry.lora_a, entry.lora_b, entry.scale, name=name, out=merged)
    return _merge_dora(merged, entry, name)


def _dora_blocks(weight: torch.Tensor, entry: AdapterEntry, name: str):
    """(row index, W + s B A in the accumulation dtype) per row block (merge_linear's shapes checked first)."""
    out_features, in_features = weight.shape
    a, b = entry.lora_a, entry.lora_b
    if a.shape[1] != in_features or b.shape[0] != out_features or a.shape[0] != b.shape[1]:
        raise MergeError(
            f"{name}: LoRA shapes A {tuple(a.shape)} and B {tuple(b.shape)} do not fit weight {tuple(weight.shape)}"
        )
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    a, b = a.to(acc), b.to(acc)
    rows = max(1, BLOCK_ELEMENTS // max(1, in_features))
    for i in range(0, out_features, rows):
        block = weight[i : i + rows].to(acc, copy=True).addmm_(b[i : i + rows], a, alpha=entry.scale)
        yield i, block


def _merge_dora(weight: torch.Tensor, entry: AdapterEntry, name: str) -> torch.Tensor:
    """DoRA as peft merges it: m / ||W + s B A|| * (W + s B A), the norm of each row (linear: over the inputs)
    or of each column (embedding: over the vocabulary), the weight as it is before the merge."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    magnitude = entry.magnitude.to(acc)
    expected = weight.shape[0] if entry.norm_dim == 1 else weight.shape[1]
    if magnitude.shape != (expected,):
        raise MergeError(
            f"{name}: DoRA magnitude is {tuple(magnitude.shape)}, expected ({expected},) for weight "
            f"{tuple(weight.shape)}"
        )
    column_sq = None
    if entry.norm_dim == 0:  # a column's norm needs every row first
        column_sq = sum(block.pow(2).sum(0) for _, block in _dora_blocks(weight, entry, name))
    for i, block in _dora_blocks(weight, entry, name):  # block i is read before it is written
        if entry.norm_dim == 0:
            block *= (magnitude / column_sq.sqrt())[None, :]
        else:
            factor = magnitude[i : i + block.shape[0]] / torch.linalg.vector_norm(block, dim=1)
            if entry.dora_rows is not None:
                factor = torch.where(entry.dora_rows[i : i + block.shape[0]], factor, torch.ones_like(factor))
            block *= factor[:, None]
        if not torch.isfinite(block).all():
            raise MergeError(f"{name}: DoRA-merged weight has NaN/Inf in rows {i}..{i + block.shape[0] - 1}")
        weight[i : i + block.shape[0]].copy_(block)
    return weight
