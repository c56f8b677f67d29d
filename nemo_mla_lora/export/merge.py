"""Merging LoRA into base weights: W' = W + scale * B @ A, accumulated in fp32 (fp64 for fp64 weights),
cast back to the weight's dtype.

Pure functions on tensors. Names are Megatron module names (``peft.state`` conventions): an adapter for
``decoder.layers.0.self_attention.linear_kv_up_proj`` merges into ``...linear_kv_up_proj.weight``.
"""

import torch


class MergeError(ValueError):
    pass


BLOCK_ELEMENTS = 1 << 20  # fp32 accumulation in row blocks of at most this many elements (4 MB: in cache)


def merge_linear(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                 name: str = "weight", out: torch.Tensor | None = None) -> torch.Tensor:
    """weight [out, in], A [r, in], B [out, r] (full height; zeros outside a part) -> merged [out, in] of
    weight's dtype, written into ``out`` (a new tensor when None; ``out=weight`` merges in place). Computed
    in row blocks through one reused fp32 buffer: memory is the result plus 4 MB, and each block is
    converted, updated, checked and rounded while it is in cache (a fresh 64 MB block per step cost 3x)."""
    out_features, in_features = weight.shape
    if lora_a.shape[1] != in_features or lora_b.shape[0] != out_features or lora_a.shape[0] != lora_b.shape[1]:
        raise MergeError(f"{name}: LoRA shapes A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)} do not fit "
                         f"weight {tuple(weight.shape)} (expected A [r, {in_features}], B [{out_features}, r])")
    merged = torch.empty_like(weight) if out is None else out
    if merged.shape != weight.shape or merged.dtype != weight.dtype:
        raise MergeError(f"{name}: out is {tuple(merged.shape)} {merged.dtype}, weight {tuple(weight.shape)} {weight.dtype}")
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32  # at least fp32
    a, b = lora_a.to(acc), lora_b.to(acc)
    rows = max(1, BLOCK_ELEMENTS // max(1, in_features))
    buffer = torch.empty(min(rows, out_features) * in_features, dtype=acc)
    for i in range(0, out_features, rows):
        n = min(rows, out_features - i)
        block = buffer[: n * in_features].view(n, in_features)  # [rows, in]
        block.copy_(weight[i:i + n])
        block.addmm_(b[i:i + n], a, alpha=scale)  # W + scale * B A: [rows, r] @ [r, in]
        if not torch.isfinite(block.sum()):  # one reduction (isfinite() per value costs 4x the merge)
            bad = int((~torch.isfinite(block)).sum())
            if bad:  # (else only the sum overflowed)
                raise MergeError(f"{name}: merged weight has NaN/Inf ({bad} values in rows {i}..{i + n - 1})")
        merged[i:i + n].copy_(block)
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
