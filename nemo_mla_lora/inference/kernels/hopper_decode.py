"""Decode attention over the latent cache for Hopper (sm_90): TMA tile loads, one c_kv tile for both dots.

Same equations and split-KV scheme as ``triton_decode`` (index legend: b batch, h heads, t cached positions,
c latent = kv_lora_rank, d = qk_rope_head_dim):

    score[b, h, t] = scale * (q_lat[b, h, :] . c_kv[b, t, :] + q_rope[b, h, :] . k_rope[b, t, :])
    o_lat[b, h, :] = sum_t softmax_t(score[b, h, :]) c_kv[b, t, :]                          [b, h, c]

What differs from the portable kernel, each seen in the sm_90 compile (``bench/decode_ir.py``):
- The cache tiles come through tensor descriptors (TMA on sm_90): one bulk copy per tile into shared
  memory, no per-thread address arithmetic; a descriptor's shape is the row's own length, so positions
  past it read as zeros (never stale or NaN cache memory).
- The latent is handled as two halves of c / 2 (a TMA box is at most 256 elements wide): two [BLOCK_T, c/2]
  tiles feed both the score dot (as B^T) and the output dot (as B) from the same shared-memory buffer, and
  the [BLOCK_H, c] accumulator is two [BLOCK_H, c/2] accumulators.
Needs ``triton.set_allocator`` (descriptors built on the device take 128 bytes of global scratch per
program); ``latent_decode_attention_tma`` sets a torch allocator. ``TRITON_INTERPRET=1`` runs it on CPU.
"""

import torch
import triton
import triton.language as tl

from nemo_mla_lora.inference.kernels.triton_decode import default_splits, merge_splits, split_buffers, split_strides


@triton.jit
def _tma_split_kernel(
    q_lat,
    q_rope,
    c_kv,
    k_rope,
    lengths,
    acc_out,
    m_out,
    l_out,
    scale,
    H,
    chunk,
    s_qb,
    s_qh,
    s_rb,
    s_rh,
    s_cb,
    s_ct,
    s_kb,
    s_kt,
    s_ab,
    s_ah,
    s_as,
    s_mb,
    s_mh,
    C: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_T: tl.constexpr,
    ONE_SPLIT: tl.constexpr,
):
    HALF: tl.constexpr = C // 2
    hb, split = tl.program_id(0), tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # b x a row's stride passes 2^31 elements in a large cache
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    cs, ds = tl.arange(0, HALF), tl.arange(0, D)
    hmask = heads < H
    q_row = q_lat + b * s_qb + heads[:, None] * s_qh
    q0 = tl.load(q_row + cs[None, :], mask=hmask[:, None], other=0.0)  # [BH, c/2]
    q1 = tl.load(q_row + HALF + cs[None, :], mask=hmask[:, None], other=0.0)  # [BH, c/2]
    qr = tl.load(q_rope + b * s_rb + heads[:, None] * s_rh + ds[None, :], mask=hmask[:, None], other=0.0)
    length = tl.load(lengths + b)
    kv = tl.make_tensor_descriptor(
        c_kv + b * s_cb, shape=[length, C], strides=[s_ct, 1], block_shape=[BLOCK_T, HALF]
    )  # zeros past the row's length
    kr = tl.make_tensor_descriptor(k_rope + b * s_kb, shape=[length, D], strides=[s_kt, 1], block_shape=[BLOCK_T, D])
    start = split * chunk
    end = tl.minimum(start + chunk, length)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_H], tl.float32)
    acc0 = tl.zeros([BLOCK_H, HALF], tl.float32)
    acc1 = tl.zeros([BLOCK_H, HALF], tl.float32)
    for t0 in range(start, end, BLOCK_T):
        k0 = kv.load([t0, 0])  # [BT, c/2]
        k1 = kv.load([t0, HALF])  # [BT, c/2]
        kt = kr.load([t0, 0])  # [BT, d]
        scores = tl.dot(q0, tl.trans(k0))
        scores = tl.dot(q1, tl.trans(k1), scores)
        scores = tl.dot(qr, tl.trans(kt), scores) * scale  # [BH, BT]
        ts = t0 + tl.arange(0, BLOCK_T)
        scores = tl.where((ts < end)[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        p = p.to(k0.dtype)
        acc0 = tl.dot(p, k0, acc0 * alpha[:, None])
        acc1 = tl.dot(p, k1, acc1 * alpha[:, None])
        m = m_new
    if ONE_SPLIT:  # acc_out is the output [b, h, c] (s_as unused)
        acc0 = acc0 / l_sum[:, None]
        acc1 = acc1 / l_sum[:, None]
    out_row = acc_out + b * s_ab + heads[:, None] * s_ah + split * s_as
    tl.store(out_row + cs[None, :], acc0, mask=hmask[:, None])
    tl.store(out_row + HALF + cs[None, :], acc1, mask=hmask[:, None])
    if ONE_SPLIT:
        return
    tl.store(m_out + b * s_mb + heads * s_mh + split, m, mask=hmask)
    tl.store(l_out + b * s_mb + heads * s_mh + split, l_sum, mask=hmask)


@triton.jit
def _tma_split_kernel_t(
    q_lat,
    q_rope,
    c_kv,
    k_rope,
    lengths,
    acc_out,
    m_out,
    l_out,
    scale,
    H,
    chunk,
    s_qb,
    s_qh,
    s_rb,
    s_rh,
    s_cb,
    s_ct,
    s_kb,
    s_kt,
    s_ab,
    s_ah,
    s_as,
    s_mb,
    s_mh,
    C: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_T: tl.constexpr,
    ONE_SPLIT: tl.constexpr,
):
    """The same split pass with positions as the MMA's rows: scores^T [BT, BH] = c_kv tile . q^T and
    o^T [c/2, BH] += c_kv tile^T . p^T, so the few heads of a tensor-parallel rank (16) are the N of a
    64-row wgmma instead of padding its M."""
    HALF: tl.constexpr = C // 2
    hb, split = tl.program_id(0), tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # b x a row's stride passes 2^31 elements in a large cache
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    cs, ds = tl.arange(0, HALF), tl.arange(0, D)
    hmask = heads < H
    q_col = q_lat + b * s_qb + heads[None, :] * s_qh
    q0 = tl.load(q_col + cs[:, None], mask=hmask[None, :], other=0.0)  # [c/2, BH]
    q1 = tl.load(q_col + HALF + cs[:, None], mask=hmask[None, :], other=0.0)  # [c/2, BH]
    qr = tl.load(q_rope + b * s_rb + heads[None, :] * s_rh + ds[:, None], mask=hmask[None, :], other=0.0)
    length = tl.load(lengths + b)
    kv = tl.make_tensor_descriptor(
        c_kv + b * s_cb, shape=[length, C], strides=[s_ct, 1], block_shape=[BLOCK_T, HALF]
    )  # zeros past the row's length
    kr = tl.make_tensor_descriptor(k_rope + b * s_kb, shape=[length, D], strides=[s_kt, 1], block_shape=[BLOCK_T, D])
    start = split * chunk
    end = tl.minimum(start + chunk, length)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_H], tl.float32)
    acc0 = tl.zeros([HALF, BLOCK_H], tl.float32)
    acc1 = tl.zeros([HALF, BLOCK_H], tl.float32)
    for t0 in range(start, end, BLOCK_T):
        k0 = kv.load([t0, 0])  # [BT, c/2]
        k1 = kv.load([t0, HALF])  # [BT, c/2]
        kt = kr.load([t0, 0])  # [BT, d]
        scores = tl.dot(k0, q0)
        scores = tl.dot(k1, q1, scores)
        scores = tl.dot(kt, qr, scores) * scale  # [BT, BH]
        ts = t0 + tl.arange(0, BLOCK_T)
        scores = tl.where((ts < end)[:, None], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[None, :])
        l_sum = l_sum * alpha + tl.sum(p, axis=0)
        p = p.to(k0.dtype)
        acc0 = tl.dot(tl.trans(k0), p, acc0 * alpha[None, :])
        acc1 = tl.dot(tl.trans(k1), p, acc1 * alpha[None, :])
        m = m_new
    if ONE_SPLIT:  # acc_out is the output [b, h, c] (s_as unused)
        acc0 = acc0 / l_sum[None, :]
        acc1 = acc1 / l_sum[None, :]
    out_col = acc_out + b * s_ab + heads[None, :] * s_ah + split * s_as
    tl.store(out_col + cs[:, None], acc0, mask=hmask[None, :])
    tl.store(out_col + HALF + cs[:, None], acc1, mask=hmask[None, :])
    if ONE_SPLIT:
        return
    tl.store(m_out + b * s_mb + heads * s_mh + split, m, mask=hmask)
    tl.store(l_out + b * s_mb + heads * s_mh + split, l_sum, mask=hmask)


KERNELS = {"heads": _tma_split_kernel, "positions": _tma_split_kernel_t}  # what fills the MMA's rows


def default_tma_launch(h: int, b: int, t: int) -> dict:
    """The fastest launch of the decode sweep per kind of shape (bench/README.md, ``bench/decode_roofline.py``).
    Little work (b x t < 32K cached positions, or one row) wants many small programs: 16 heads per program,
    positions as the MMA's rows, twice the splits when b x t x h <= 256K; V3's 128 heads at b > 1 keep 64 x 64
    tiles on two warp groups; a tensor-parallel rank's few heads stream the cache in 16 x 32 tiles three stages
    deep, with twice the splits from 1M cached positions on (batch 32 x 32K: 0.455 against 0.476 ms on an H100,
    where FlashMLA takes 0.433); 64 heads take 64 x 64 tiles."""
    heads64 = dict(rows="heads", block_h=64, block_t=64, num_warps=8, num_stages=2)
    if h >= 128 and b > 1:
        return dict(heads64, split_factor=2 if b * t <= 8192 else 1)
    if b * t < 32768 or b == 1:
        return dict(
            rows="positions",
            block_h=16,
            block_t=64,
            num_warps=4,
            num_stages=2,
            split_factor=2 if b * t * h <= 262144 else 1,
        )
    if h <= 32:
        split_factor = 2 if b * t >= 1 << 20 else 1
        return dict(rows="heads", block_h=16, block_t=32, num_warps=4, num_stages=3, split_factor=split_factor)
    return dict(heads64, split_factor=1)


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def supported(c_kv: torch.Tensor, k_rope: torch.Tensor) -> bool:
    """TMA's terms: sm_90 or newer (or the interpreter), c even and c / 2 a power of two <= 256, d a power of
    two <= 256, 16-byte aligned rows and bases."""
    c, d = c_kv.shape[-1], k_rope.shape[-1]
    half = c // 2
    if c % 2 or half & (half - 1) or half > 256 or half < 16 or d & (d - 1) or d > 256 or d < 16:
        return False
    if c_kv.stride(-1) != 1 or k_rope.stride(-1) != 1:
        return False
    size = c_kv.element_size()
    if any((x.stride(0) * size) % 16 or (x.stride(1) * size) % 16 or x.data_ptr() % 16 for x in (c_kv, k_rope)):
        return False
    if c_kv.device.type == "cuda":
        return torch.cuda.get_device_capability(c_kv.device)[0] >= 9
    return True


def latent_decode_attention_tma(
    q_lat,
    q_rope,
    c_kv,
    k_rope,
    lengths,
    scale: float,
    splits: int | None = None,
    block_h: int | None = None,
    block_t: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    max_length: int | None = None,
    rows: str | None = None,
) -> torch.Tensor:
    """As ``triton_decode.latent_decode_attention`` (same arguments, shapes and result), through TMA tiles;
    ``rows``: ``heads`` or ``positions`` fill the MMA's rows (``KERNELS``). Raises ValueError where
    ``supported`` says no."""
    if not supported(c_kv, k_rope):
        raise ValueError(
            f"latent_decode_attention_tma: unsupported cache c_kv {tuple(c_kv.shape)} strides "
            f"{c_kv.stride()}, k_rope {tuple(k_rope.shape)} strides {k_rope.stride()} on {c_kv.device}"
        )
    b, h, c = q_lat.shape
    d = q_rope.shape[-1]
    t_max = max_length if max_length is not None else int(lengths.max())
    launch = default_tma_launch(h, b, t_max)
    block_h, block_t = block_h or launch["block_h"], block_t or launch["block_t"]
    num_warps, num_stages = num_warps or launch["num_warps"], num_stages or launch["num_stages"]
    kernel = KERNELS[rows or launch["rows"]]
    q_lat, q_rope, lengths = q_lat.contiguous(), q_rope.contiguous(), lengths.to(torch.int32)
    splits = splits or launch["split_factor"] * default_splits(b, h, t_max, block_h, q_lat.device)
    chunk, splits, out, acc, m, l_sum = split_buffers(q_lat, t_max, splits, block_t)
    one = splits == 1
    if q_lat.device.type == "cuda":
        triton.set_allocator(_scratch)
    strides = split_strides((q_lat, q_rope, c_kv, k_rope), acc, m)
    args = (q_lat, q_rope, c_kv, k_rope, lengths, acc, m, l_sum, scale, h, chunk, *strides)
    kernel[(triton.cdiv(h, block_h), splits, b)](
        *args,
        C=c,
        D=d,
        BLOCK_H=block_h,
        BLOCK_T=block_t,
        ONE_SPLIT=one,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    merge_splits(acc, m, l_sum, out)
    return out


def decode_attention(q_lat, q_rope, c_kv, k_rope, lengths, scale: float, max_length: int | None = None):
    """The decode kernel for this cache: on Hopper the warp-specialised Gluon kernel for the shapes where it is
    faster (``gluon_backend.gluon_is_faster``: all 64-head blocks for a CUDA graph, as ``graph_choice`` says, 64
    blocks and more in eager calls; where it reads the tensors), the TMA kernels elsewhere where
    ``supported`` (Hopper and newer), else the portable Triton kernel (``triton_decode``). Same arguments and result
    as each."""
    if c_kv.device.type == "cuda" and supported(c_kv, k_rope):
        from nemo_mla_lora.inference.kernels import gluon_backend

        if gluon_backend.gluon_is_faster(*q_lat.shape[:2]) and gluon_backend.gluon_reads(q_lat, c_kv, k_rope):
            ws = gluon_backend.gluon_launch.latent_decode_attention_ws
            return ws(q_lat, q_rope, c_kv, k_rope, lengths, scale, max_length=max_length)
        return latent_decode_attention_tma(q_lat, q_rope, c_kv, k_rope, lengths, scale, max_length=max_length)
    from nemo_mla_lora.inference.kernels.triton_decode import latent_decode_attention

    return latent_decode_attention(q_lat, q_rope, c_kv, k_rope, lengths, scale, max_length=max_length)
