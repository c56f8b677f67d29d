"""Decode attention over the latent cache in Triton (split-KV "flash decoding" for MLA).

For one new token per request, with the absorbed query already formed (q_lat = W_UK^T q_nope, plus any
adapter corrections):

    score[b, h, t] = scale * (q_lat[b, h, :] . c_kv[b, t, :] + q_rope[b, h, :] . k_rope[b, t, :])
    o_lat[b, h, :] = sum_t softmax_t(score[b, h, :]) c_kv[b, t, :]                          [b, h, c]

Every head attends to the same c_kv and k_rope (MLA is multi-query in the latent space), so a program
loads a cache tile once for ``BLOCK_H`` heads. Stage 1: grid (head blocks, splits of the cached positions,
b), head blocks varying fastest so that the programs reading one cache tile run side by side and all but
the first find it in L2; each program keeps a running max, sum and [BLOCK_H, c] accumulator over its
split. Stage 2: grid (b, h) merges the splits; with one split, stage 1 normalizes and writes the output
itself. Rows may hold different numbers of cached tokens (``lengths``).
Index legend: b batch, h heads, t cached positions, c latent (kv_lora_rank), d rope dim.

Runs on CUDA; ``TRITON_INTERPRET=1`` runs the same kernels on CPU tensors (the CPU tests do).
"""

import torch
import triton
import triton.language as tl

from nemo_mla_lora.inference.kernels.tiles import pow2


@triton.jit
def _split_kernel(
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
    C,
    D,
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
    BLOCK_H: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_SPLIT: tl.constexpr,
):
    hb, split = tl.program_id(0), tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # b x a row's stride passes 2^31 elements in a large cache
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    cs, ds = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_D)
    hmask = heads < H
    q = tl.load(
        q_lat + b * s_qb + heads[:, None] * s_qh + cs[None, :], mask=hmask[:, None] & (cs[None, :] < C), other=0.0
    )  # [BH, BC]
    qr = tl.load(
        q_rope + b * s_rb + heads[:, None] * s_rh + ds[None, :], mask=hmask[:, None] & (ds[None, :] < D), other=0.0
    )  # [BH, BD]
    length = tl.load(lengths + b)
    start = split * chunk
    end = tl.minimum(start + chunk, length)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    for t0 in range(start, end, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)  # [BT]
        tmask = ts < end
        kc = tl.load(
            c_kv + b * s_cb + ts[:, None] * s_ct + cs[None, :], mask=tmask[:, None] & (cs[None, :] < C), other=0.0
        )  # [BT, BC]
        kr = tl.load(
            k_rope + b * s_kb + ts[:, None] * s_kt + ds[None, :], mask=tmask[:, None] & (ds[None, :] < D), other=0.0
        )  # [BT, BD]
        scores = (tl.dot(q, tl.trans(kc)) + tl.dot(qr, tl.trans(kr))) * scale  # [BH, BT]
        scores = tl.where(tmask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kc.dtype), kc)
        m = m_new
    if ONE_SPLIT:  # acc_out is the output [b, h, c] (s_as unused)
        acc = acc / l_sum[:, None]
    tl.store(
        acc_out + b * s_ab + heads[:, None] * s_ah + split * s_as + cs[None, :],
        acc,
        mask=hmask[:, None] & (cs[None, :] < C),
    )
    if ONE_SPLIT:
        return
    tl.store(m_out + b * s_mb + heads * s_mh + split, m, mask=hmask)
    tl.store(l_out + b * s_mb + heads * s_mh + split, l_sum, mask=hmask)


@triton.jit
def _merge_kernel(
    acc_in,
    m_in,
    l_in,
    out,
    C,
    S,
    s_ab,
    s_ah,
    s_as,
    s_mb,
    s_mh,
    s_ob,
    s_oh,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    GROUP_S: tl.constexpr,
):
    b, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    ss, cs = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_C)
    smask = ss < S
    m = tl.load(m_in + b * s_mb + h * s_mh + ss, mask=smask, other=float("-inf"))  # [BS]
    l_sum = tl.load(l_in + b * s_mb + h * s_mh + ss, mask=smask, other=0.0)
    m_all = tl.max(m, axis=0)
    w = tl.where(smask & (m > float("-inf")), tl.exp(m - m_all), 0.0)  # [BS]; empty splits weigh 0
    o = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(0, S, GROUP_S):  # GROUP_S splits at a time: a [BS, BC] tile would spill at 64+ splits
        sg = s0 + tl.arange(0, GROUP_S)
        gmask = sg < S
        mg = tl.load(m_in + b * s_mb + h * s_mh + sg, mask=gmask, other=float("-inf"))  # [GS]
        wg = tl.where(gmask & (mg > float("-inf")), tl.exp(mg - m_all), 0.0)  # [GS]
        acc = tl.load(
            acc_in + b * s_ab + h * s_ah + sg[:, None] * s_as + cs[None, :],
            mask=gmask[:, None] & (cs[None, :] < C),
            other=0.0,
        )  # [GS, BC]
        o += tl.sum(acc * wg[:, None], axis=0)
    o = o / tl.sum(l_sum * w, axis=0)
    tl.store(out + b * s_ob + h * s_oh + cs, o, mask=cs < C)


def split_buffers(q_lat: torch.Tensor, t_max: int, splits: int, block_t: int):
    """(chunk, splits, out [b, h, c], acc, m, l_sum) for ``splits`` about-equal chunks of ``t_max`` positions, each
    a multiple of ``block_t``: acc [b, h, splits, c] and m, l_sum [b, h, splits] in float32; with one split,
    acc is the output itself (the split pass normalizes and writes it)."""
    b, h, c = q_lat.shape
    chunk = triton.cdiv(triton.cdiv(t_max, splits), block_t) * block_t
    splits = triton.cdiv(t_max, chunk)
    out = torch.empty(b, h, c, dtype=q_lat.dtype, device=q_lat.device)
    acc = out if splits == 1 else torch.empty(b, h, splits, c, dtype=torch.float32, device=q_lat.device)
    m = torch.empty(b, h, splits, dtype=torch.float32, device=q_lat.device)
    return chunk, splits, out, acc, m, torch.empty_like(m)


def split_strides(row_major: tuple, acc: torch.Tensor, m: torch.Tensor) -> tuple[int, ...]:
    """The stride arguments of the split kernels, in their order.

    Args:
        row_major: the tensors whose (batch, row) strides come first (q_lat, q_rope, c_kv, k_rope; none for the
            Gluon kernel, whose TMA descriptors hold them).
        acc, m: ``split_buffers``' partial sums and row maxima; acc's split stride is 0 where acc is ``out`` itself
            (one split).
    """
    rows = tuple(s for t in row_major for s in t.stride()[:2])
    return (*rows, acc.stride(0), acc.stride(1), acc.stride(2) if acc.dim() == 4 else 0, m.stride(0), m.stride(1))


# Splits the merge pass sums at a time: [8, 512] fp32 is 32 values a thread at 4 warps. Holding every split at once
# spilled 10-26 KB a thread at 66-256 splits (ptxas for sm_90a), the splits a single long row takes.
MERGE_GROUP = 8


def merge_splits(acc, m, l_sum, out) -> None:
    """Stage 2: the splits' partial sums into ``out`` [b, h, c] (nothing to do with one split)."""
    b, h, splits, c = acc.shape if acc.dim() == 4 else (*acc.shape[:2], 1, acc.shape[2])
    if splits == 1:
        return
    _merge_kernel[(b, h)](
        acc,
        m,
        l_sum,
        out,
        c,
        splits,
        acc.stride(0),
        acc.stride(1),
        acc.stride(2),
        m.stride(0),
        m.stride(1),
        out.stride(0),
        out.stride(1),
        BLOCK_C=pow2(c),
        BLOCK_S=pow2(splits, 2),
        GROUP_S=min(pow2(splits, 2), MERGE_GROUP),
    )


def default_splits(b: int, h: int, t_max: int, block_h: int, device) -> int:
    """About four programs per SM (splitting the cached positions when batch x head blocks is fewer), at
    least 256 positions per split; one split (no merge pass) when the batch alone fills the card."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return max(1, min(triton.cdiv(t_max, 256), triton.cdiv(4 * sms, b * triton.cdiv(h, block_h))))


def default_launch(h: int) -> dict:
    """Fastest launch in the decode sweeps (bench/README.md): V3's 128 heads are compute-bound, wide head
    blocks feed the tensor cores; a tensor-parallel rank's 16 heads are bandwidth-bound, one 16-head block."""
    if h >= 64:
        return dict(block_h=64, block_t=64, num_warps=8, num_stages=2)
    return dict(block_h=16, block_t=32, num_warps=4, num_stages=2)


def latent_decode_attention(
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
) -> torch.Tensor:
    """q_lat [b, h, c], q_rope [b, h, d], c_kv [b, T, c], k_rope [b, T, d] (T >= max length, any strides
    with a unit last dim), lengths [b] (int) -> o_lat [b, h, c] in q_lat's dtype (accumulated in float32).
    ``max_length``: an upper bound of ``lengths`` known on the host (no device sync: CUDA-graph safe)."""
    b, h, c = q_lat.shape
    d = q_rope.shape[-1]
    launch = default_launch(h)
    block_h, block_t = block_h or launch["block_h"], block_t or launch["block_t"]
    num_warps, num_stages = num_warps or launch["num_warps"], num_stages or launch["num_stages"]
    q_lat, q_rope = q_lat.contiguous(), q_rope.contiguous()
    if c_kv.stride(-1) != 1 or k_rope.stride(-1) != 1:
        raise ValueError("latent_decode_attention: the cache's last dim must be contiguous")
    t_max = max_length if max_length is not None else int(lengths.max())
    splits = splits or default_splits(b, h, t_max, block_h, q_lat.device)
    chunk, splits, out, acc, m, l_sum = split_buffers(q_lat, t_max, splits, block_t)
    one = splits == 1
    block_c, block_d = pow2(c), pow2(d)
    strides = split_strides((q_lat, q_rope, c_kv, k_rope), acc, m)
    args = (q_lat, q_rope, c_kv, k_rope, lengths, acc, m, l_sum, scale, h, c, d, chunk, *strides)
    _split_kernel[(triton.cdiv(h, block_h), splits, b)](
        *args,
        BLOCK_H=block_h,
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        BLOCK_D=block_d,
        ONE_SPLIT=one,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    merge_splits(acc, m, l_sum, out)
    return out
