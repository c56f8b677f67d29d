"""A grouped low-rank product added in place, one Triton launch:

    out[t, n] += scale * sum_k left[t, k] right[g(t), k, n]        g(t): the group whose rows hold t

for LoRA on grouped experts, where k is the rank r: the adapter's output onto the base's expert output
(left = hs, right = B^T) and the adapter's input gradient onto the base's (left = ghs, right = A). Through
``torch._grouped_mm`` the same sum is a [t, n] product written out, then read back with ``out`` and ``out`` written
again (``_grouped_mm`` has no accumulating form): four passes over a [t, n] tensor as wide as the layer. Here
each tile of ``out`` is read once and written once, and the rank-r product is computed between the two.

Each program takes a [BLOCK_T, BLOCK_N] tile of ``out``; its rows may span several groups (small groups, or a
group boundary inside the tile), so the program finds the tile's first group by a binary search of ``ends`` and
adds one rank-r product per group that the tile's rows meet, with the rows of other groups masked to zero.
``ends`` is ``lora_fn.group_offsets``: each group's end row, int32 on the device, so nothing is read on the host.
Products accumulate in fp32 (fp32 operands in full precision, not TF32); ``out`` is rounded once, after the add.

Index legend: t rows (grouped), n columns of out, k the low-rank dimension (LoRA rank r), g group (expert).
Runs on CUDA; ``TRITON_INTERPRET=1`` runs the same kernel on CPU tensors (the CPU tests do).
"""

import os

import torch
import triton
import triton.language as tl

from nemo_mla_lora.inference.kernels.tiles import dot, pow2

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_RANK = 256  # one k tile per group; larger ranks take torch's path


@triton.jit
def _first_group(ends, t0, E):
    """The first group g with ends[g] > t0: the group that holds row t0 (empty groups skipped)."""
    lo = t0 * 0
    hi = E - 1
    while lo < hi:
        mid = (lo + hi) // 2
        right_of = tl.load(ends + mid) > t0
        hi = tl.where(right_of, mid, hi)
        lo = tl.where(right_of, lo, mid + 1)
    return lo


@triton.jit
def _grouped_add_kernel(
    out,
    left,
    right,
    ends,
    T,
    N,
    K,
    E,
    scale,
    s_ot,
    s_lt,
    s_rg,
    s_rk,
    s_rn,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    """out[t, n] += scale * sum_k left[t, k] right[g(t), k, n] for one [BLOCK_T, BLOCK_N] tile."""
    t0 = tl.program_id(0) * BLOCK_T
    rows = t0 + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    rmask, cmask, kmask = rows < T, cols < N, ks < K
    rows64 = rows.to(tl.int64)  # out may exceed 2^31 elements
    lt = tl.load(left + rows64[:, None] * s_lt + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
    g = _first_group(ends, t0, E)
    start = tl.load(ends + tl.maximum(g - 1, 0))
    start = tl.where(g > 0, start, 0)
    t_end = tl.minimum(t0 + BLOCK_T, T)
    acc = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
    while (g < E) & (start < t_end):
        end = tl.load(ends + g)
        mine = (rows >= start) & (rows < end)
        rt = tl.load(
            right + g.to(tl.int64) * s_rg + ks[:, None] * s_rk + cols[None, :] * s_rn,
            mask=kmask[:, None] & cmask[None, :],
            other=0.0,
        )  # [BK, BN]
        acc += dot(tl.where(mine[:, None], lt, tl.zeros_like(lt)), rt, IEEE)  # [BT, BK] @ [BK, BN]
        start = end
        g += 1
    ptr = out + rows64[:, None] * s_ot + cols[None, :]
    keep = rmask[:, None] & cmask[None, :]
    total = tl.load(ptr, mask=keep, other=0.0).to(tl.float32) + scale * acc
    tl.store(ptr, total.to(out.dtype.element_ty), mask=keep)


def runs(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> bool:
    """Whether ``grouped_lowrank_add_`` takes these operands: one float dtype of ``DTYPES`` for all three, rows of
    ``out`` and ``left`` contiguous in their last dim, rank at most ``MAX_RANK``, on CUDA (or anywhere under
    Triton's interpreter)."""
    if not (out.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    if out.dtype not in DTYPES or left.dtype != out.dtype or right.dtype != out.dtype:
        return False
    return out.stride(-1) == 1 and left.stride(-1) == 1 and left.shape[-1] <= MAX_RANK


def grouped_lowrank_add_(
    out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, ends: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """out [t, n] += scale * left_g [t_g, k] @ right[g] [k, n] for each group g of rows, in place; returns out.

    Args:
        out: [t, n], rows grouped (contiguous in n).
        left: [t, k] (contiguous in k).
        right: [e, k, n], any strides (B [e, n, k] passes as ``B.transpose(1, 2)``).
        ends: [e] int32 on out's device: each group's end row (``lora_fn.group_offsets``); ends[-1] == t.
        scale: multiplies the product.
    """
    t, n = out.shape
    e, k, n_right = right.shape
    if left.shape != (t, k) or n_right != n or ends.shape != (e,):
        raise ValueError(
            f"grouped_lowrank_add_: out {tuple(out.shape)}, left {tuple(left.shape)}, right {tuple(right.shape)}, "
            f"ends {tuple(ends.shape)}: expected [t, n], [t, k], [e, k, n], [e]"
        )
    if t == 0 or n == 0:
        return out
    block_t = 64 if t >= 64 else pow2(t)
    block_n = 128 if n >= 128 else pow2(n)
    grid = (triton.cdiv(t, block_t), triton.cdiv(n, block_n))
    _grouped_add_kernel[grid](
        out,
        left,
        right,
        ends,
        t,
        n,
        k,
        e,
        float(scale),
        out.stride(0),
        left.stride(0),
        right.stride(0),
        right.stride(1),
        right.stride(2),
        BLOCK_T=block_t,
        BLOCK_N=block_n,
        BLOCK_K=pow2(k),
        IEEE=out.dtype == torch.float32,
    )
    return out
