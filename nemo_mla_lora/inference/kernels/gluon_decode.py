"""Warp-specialised decode attention over the latent cache for Hopper (sm_90a), in Triton's Gluon language.

Same equations, arguments and split-KV scheme as ``hopper_decode.latent_decode_attention_tma`` (index legend: b batch,
h heads, t cached positions, c latent = kv_lora_rank = 512, d = qk_rope_head_dim = 64):

    score[b, h, t] = scale * (q_lat[b, h, :] . c_kv[b, t, :] + q_rope[b, h, :] . k_rope[b, t, :])
    o_lat[b, h, :] = sum_t softmax_t(score[b, h, :]) c_kv[b, t, :]                          [b, h, c]

Design as built (one CTA per (64-head block, split of the positions, batch row); 1 CTA per SM):
- Producer: the default partition (one warpgroup, as Gluon needs num_warps a multiple of 4; 24 registers a thread
  after setmaxnreg). It TMA-loads Q [64 h, 576] once, then each [64 t, 576] cache tile as two [64, 256] c_kv boxes
  and one [64, 64] k_rope box (Triton issues each 256-wide box as four 64-wide TMA copies, one per warp) into a ring
  of ``STAGES`` = 2 shared-memory stages; an mbarrier per stage says "ready" (TMA bytes landed), another "free"
  (both consumers are done with it). The host builds the descriptors over the cache as rows b * R + t (R =
  c_kv.stride(0) / c_kv.stride(1), the buffer's P).
- Two consumer warpgroups (two 4-warp worker partitions, 240 registers a thread), ping-pong by tile:
  warpgroup (tile % 2) computes the tile's scores S = Q K^T [64 h, 64 t] by wgmma (K = 576, A and B from shared
  memory), masks positions past the split's end to -inf, runs the online softmax and publishes P (bf16) and the
  new row max / row sum through shared memory (one mbarrier "P ready" per tile). Each warpgroup owns one half of
  O [64 h, 256 c] (128 fp32 registers a thread) and adds P V for every tile, in tile order: the owner from its P
  in registers, the other from the shared P. So one warpgroup's softmax overlaps the other's MMAs.
- Positions past lengths[b] are never trusted: their scores are -inf, and the owner of a row's last, partial tile
  zeroes that tile's c_kv rows past the end in shared memory (0 * NaN would poison P V).
- Shared memory: Q 72 KiB + 2 stages x 72 KiB + P 8 KiB + row max / sum 0.5 KiB + barriers: 230,160 bytes as
  compiled (224.8 KiB of sm_90's 227), so one CTA per SM; 3 warpgroups x 168 registers fill the register file.
Splits and the merge pass are ``triton_decode``'s (``split_buffers``, ``merge_splits``): with one split the
consumers normalise and write ``out`` directly. The host side (where the kernel runs, the split count, the call) is
``gluon_launch``; ``bench/gluon_compile.py`` compiles the kernel for sm_90a without a GPU. ``gluon_seesaw`` is the
same kernel with another schedule of the two consumers, built from the pieces here.
"""

from __future__ import annotations

import functools
import math

import torch
import triton

from nemo_mla_lora.inference.kernels.triton_decode import split_strides

try:  # Gluon's Hopper API as Triton 3.6 (torch 2.11's) and 3.9 ship it
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # the TMA load into shared memory: ``async_load`` in newer Triton (3.9, where the old name raises),
    # ``async_copy_global_to_shared`` in Triton 3.6 (torch 2.11's); the same arguments (desc, coord, barrier, dest)
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # the threads' barrier: 3.6's name, then 3.9's
    _GLUON_ERROR = None
except ImportError as err:  # an older Triton: ``unavailable`` says so
    gluon = gl = None
    _GLUON_ERROR = f"Triton {triton.__version__} has no Gluon Hopper API ({err})"

_jit = gluon.jit if gluon is not None else (lambda fn: fn)

LATENT, ROPE, HALF = 512, 64, 256  # c, d, and the c_kv TMA box width (a box is at most 256 elements wide)
BLOCK_H, BLOCK_T, STAGES = 64, 64, 2
# 3 warpgroups x 128 threads x 168 = 64.5K registers, the SM's; setmaxnreg then gives the two consumer warpgroups
# 240 each (``warp_specialize``'s worker_num_regs) and leaves 24 to the producer (the default partition)
LAUNCH = dict(num_warps=4, maxnreg=168)


@_jit
def _load_q(descs, bufs, q_bar, q_row):
    """TMA loads of this program's Q [64 h, 576] on ``q_bar``: two [64 h, 256 c] halves and [64 h, 64 d]."""
    q_desc, qr_desc = descs[0], descs[1]
    q_bufs, qr_buf = bufs[0], bufs[1]
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes + qr_desc.block_type.nbytes)
    _tma_load(q_desc, [q_row, 0], q_bar, q_bufs.index(0))
    _tma_load(q_desc, [q_row, q_desc.block_type.shape[1]], q_bar, q_bufs.index(1))
    _tma_load(qr_desc, [q_row, 0], q_bar, qr_buf)


@_jit
def _producer(descs, bufs, bars, q_row, kv_row, n):
    """TMA loads: Q once, then n cache tiles through the stage ring (wait "free", expect bytes, copy)."""
    q_desc, qr_desc, kv_desc, kr_desc = descs
    q_bar, ready, free = bars[0], bars[1], bars[2]
    kv_bufs, kr_bufs = bufs[2], bufs[3]
    NSTAGE: gl.constexpr = ready.shape[0]
    TILE_T: gl.constexpr = kv_desc.block_type.shape[0]
    WIDTH: gl.constexpr = kv_desc.block_type.shape[1]
    _load_q(descs, bufs, q_bar, q_row)
    tile_bytes: gl.constexpr = 2 * kv_desc.block_type.nbytes + kr_desc.block_type.nbytes
    for j in range(n):
        s = j % NSTAGE
        mbarrier.wait(free.index(s), ((j // NSTAGE) & 1) ^ 1)  # a fresh barrier passes parity 1 at once
        bar = ready.index(s)
        mbarrier.expect(bar, tile_bytes)
        row = kv_row + j * TILE_T
        _tma_load(kv_desc, [row, 0], bar, kv_bufs.index(2 * s))  # [64 t, 256 c]
        _tma_load(kv_desc, [row, WIDTH], bar, kv_bufs.index(2 * s + 1))
        _tma_load(kr_desc, [row, 0], bar, kr_bufs.index(s))  # [64 t, 64 d]


@_jit
def _zero_tail(kv_bufs, s, valid):
    """Zero the c_kv rows >= valid of stage s (both halves) so that P V never multiplies 0 by stale NaN."""
    rows_layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])
    TILE_T: gl.constexpr = kv_bufs.shape[1]
    for half in gl.static_range(2):
        for r0 in gl.static_range(0, TILE_T, 16):
            part = kv_bufs.index(2 * s + half).slice(r0, 16)  # [16 t, 256 c]
            x = part.load(rows_layout)
            rows = r0 + gl.arange(0, 16, gl.SliceLayout(1, rows_layout))
            part.store(gl.where(gl.expand_dims(rows < valid, 1), x, gl.zeros_like(x)))
    fence_async_shared()  # generic-proxy stores before the wgmma (async proxy) reads


@_jit
def _scores(bufs, s, zero):
    """S [64 h, 64 t] = Q [64 h, 576] . K_s^T [576, 64 t]: three wgmmas over K = 256 + 256 + 64. ``zero`` is 0 at
    run time but opaque to the compiler: Q's 32 wgmma descriptors are then formed in the loop, not hoisted out of it
    into registers that O needs (hoisted, they spill)."""
    q_bufs, qr_buf, kv_bufs, kr_bufs = bufs[0], bufs[1], bufs[2], bufs[3]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
    acc = gl.full([q_bufs.shape[1], kv_bufs.shape[1]], 0.0, gl.float32, s_layout)
    acc = warpgroup_mma(q_bufs.index(zero), kv_bufs.index(2 * s).permute((1, 0)), acc, use_acc=False, is_async=True)
    acc = warpgroup_mma(q_bufs.index(zero + 1), kv_bufs.index(2 * s + 1).permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma(qr_buf, kr_bufs.index(s).permute((1, 0)), acc, is_async=True)
    return warpgroup_mma_wait(0, deps=(acc,))


@_jit
def _rescale(o, alpha):
    """O [64 h, 256 c] * alpha [64 h] (row scale moved to O's layout)."""
    alpha = gl.convert_layout(alpha, gl.SliceLayout(1, o.type.layout))
    return o * gl.expand_dims(alpha, 1)


@_jit
def _other_tile(bufs, bars, j, o, m, l_sum, W: gl.constexpr):
    """Add the other warpgroup's tile j: its new row max / row sum and P from shared memory; O += P V_j[:, W half]."""
    kv_bufs, p_buf, m_buf, r_buf = bufs[2], bufs[4], bufs[5], bufs[6]
    ready, free, p_ready = bars[1], bars[2], bars[3]
    s = j % ready.shape[0]
    mbarrier.wait(ready.index(s), (j // ready.shape[0]) & 1)
    mbarrier.wait(p_ready, j & 1)
    m_j = m_buf.load(m.type.layout)
    alpha = gl.exp2(m - m_j)  # [64 h]
    l_sum = l_sum * alpha + r_buf.load(m.type.layout)
    o = _rescale(o, alpha)
    o = warpgroup_mma(p_buf, kv_bufs.index(2 * s + W), o)  # [64 h, 64 t] . [64 t, 256 c] -> [64 h, 256 c]
    mbarrier.arrive(free.index(s), count=1)
    return o, m_j, l_sum


@_jit
def _own_tile(bufs, bars, j, t0, t_end, qk_scale, o, m, l_sum, W: gl.constexpr):
    """Tile j is this warpgroup's: scores, online softmax, publish P and stats, then O += P V_j[:, W half]."""
    kv_bufs, p_buf, m_buf, r_buf = bufs[2], bufs[4], bufs[5], bufs[6]
    ready, free, p_ready = bars[1], bars[2], bars[3]
    s = j % ready.shape[0]
    mbarrier.wait(ready.index(s), (j // ready.shape[0]) & 1)
    if t0 + kv_bufs.shape[1] > t_end:
        _zero_tail(kv_bufs, s, t_end - t0)
    scores = _scores(bufs, s, (t_end - t0) >> 31)  # [64 h, 64 t]; t0 < t_end, so the shift is 0
    if j > 0:  # the other warpgroup's tile j - 1 comes first in O's order (and gives this tile's running max)
        o, m, l_sum = _other_tile(bufs, bars, j - 1, o, m, l_sum, W)
    ts = t0 + gl.arange(0, kv_bufs.shape[1], gl.SliceLayout(0, scores.type.layout))
    scores = gl.where(gl.expand_dims(ts < t_end, 0), scores * qk_scale, float("-inf"))  # log2 units
    m_new = gl.maximum(m, gl.max(scores, axis=1))  # [64 h]
    alpha = gl.exp2(m - m_new)
    p = gl.exp2(scores - gl.expand_dims(m_new, 1))  # [64 h, 64 t]
    row_sum = gl.sum(p, axis=1)
    l_sum = l_sum * alpha + row_sum
    o = _rescale(o, alpha)
    p = p.to(gl.bfloat16)
    p_buf.store(p)
    m_buf.store(m_new)
    r_buf.store(row_sum)
    fence_async_shared()  # P's generic stores before the other warpgroup's wgmma reads it
    _cta_barrier()
    mbarrier.arrive(p_ready, count=1)
    p_a = gl.convert_layout(p, gl.DotOperandLayout(operand_index=0, parent=o.type.layout, k_width=2))
    o = warpgroup_mma(p_a, kv_bufs.index(2 * s + W), o)  # [64 h, 64 t] . [64 t, 256 c] -> [64 h, 256 c]
    mbarrier.arrive(free.index(s), count=1)
    return o, m_new, l_sum


@_jit
def _store(o, m, l_sum, outs, W: gl.constexpr, ONE_SPLIT: gl.constexpr):
    """This warpgroup's half of O: normalised into out [b, h, c] (one split) or the split's partial acc, m, l. The
    offsets are formed here from the program ids and kernel arguments, so nothing of them stays live in the loop."""
    acc_out, m_out, l_out, s_ab, s_ah, s_as, s_mb, s_mh = outs
    hb, split, b = gl.program_id(0), gl.program_id(1), gl.program_id(2)
    o_layout: gl.constexpr = o.type.layout
    TILE_H: gl.constexpr = o.shape[0]
    WIDTH: gl.constexpr = o.shape[1]
    heads = hb * TILE_H + gl.arange(0, TILE_H, gl.SliceLayout(1, o_layout))
    cols = W * WIDTH + gl.arange(0, WIDTH, gl.SliceLayout(0, o_layout))
    if ONE_SPLIT:
        o = o / gl.expand_dims(gl.convert_layout(l_sum, gl.SliceLayout(1, o_layout)), 1)
    ptrs = acc_out + b * s_ab + split * s_as + gl.expand_dims(heads * s_ah, 1) + gl.expand_dims(cols, 0)
    gl.store(ptrs, o.to(acc_out.dtype.element_ty))  # [64 h, 256 c]
    if not ONE_SPLIT and W == 0:
        rows = b * s_mb + (hb * TILE_H + gl.arange(0, TILE_H, m.type.layout)) * s_mh + split
        gl.store(m_out + rows, m * 0.6931471805599453)  # log2 units back to natural ones (merge_splits' m)
        gl.store(l_out + rows, l_sum)


@_jit
def _allocate_tiles(descs, NSTAGE: gl.constexpr):
    """The shared buffers the TMA boxes land in: Q halves, Q rope, NSTAGE x (two c_kv halves, one k_rope)."""
    q_desc, qr_desc, kv_desc, kr_desc = descs
    q_bufs = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)  # [2, 64 h, 256]
    qr_buf = gl.allocate_shared_memory(qr_desc.dtype, qr_desc.block_type.shape, qr_desc.layout)  # [64 h, 64 d]
    kv_bufs = gl.allocate_shared_memory(kv_desc.dtype, [2 * NSTAGE] + kv_desc.block_type.shape, kv_desc.layout)
    kr_bufs = gl.allocate_shared_memory(kr_desc.dtype, [NSTAGE] + kr_desc.block_type.shape, kr_desc.layout)
    return q_bufs, qr_buf, kv_bufs, kr_bufs


@_jit
def _allocate(descs, NSTAGE: gl.constexpr):
    """The shared buffers: ``_allocate_tiles``', then P, row max and row sum."""
    q_desc, kv_desc = descs[0], descs[2]
    q_bufs, qr_buf, kv_bufs, kr_bufs = _allocate_tiles(descs, NSTAGE)
    p_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    p_buf = gl.allocate_shared_memory(gl.bfloat16, [q_desc.block_type.shape[0], kv_desc.block_type.shape[0]], p_layout)
    row_layout: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    m_buf = gl.allocate_shared_memory(gl.float32, [q_desc.block_type.shape[0]], row_layout)  # [64 h]
    r_buf = gl.allocate_shared_memory(gl.float32, [q_desc.block_type.shape[0]], row_layout)  # [64 h]
    return q_bufs, qr_buf, kv_bufs, kr_bufs, p_buf, m_buf, r_buf


@_jit
def _barriers(NSTAGE: gl.constexpr):
    """Q landed; per stage ready (TMA bytes) and free (both consumers); P ready (one arrive per tile)."""
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [NSTAGE, 1], mbarrier.MBarrierLayout())
    free = gl.allocate_shared_memory(gl.int64, [NSTAGE, 1], mbarrier.MBarrierLayout())
    p_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    mbarrier.init(p_ready, count=1)
    for s in gl.static_range(NSTAGE):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(free.index(s), count=2)
    return q_bar, ready, free, p_ready


@_jit
def _consumer(bufs, bars, span, outs, W: gl.constexpr, ONE_SPLIT: gl.constexpr):
    """Consumer warpgroup W: its own tiles j = W, W + 2, ... and the other's in between, then its half of O."""
    n, t_start, t_end, qk_scale = span
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 256, 16])
    rows: gl.constexpr = bufs[0].shape[1]
    m = gl.full([rows], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_sum = gl.full([rows], 0.0, gl.float32, gl.SliceLayout(1, s_layout))
    o = gl.full([rows, bufs[2].shape[2]], 0.0, gl.float32, o_layout)  # [64 h, 256 c]
    mbarrier.wait(bars[0], 0)  # Q landed
    own = gl.cdiv(n - W, 2)
    for k in range(own):
        j = 2 * k + W
        o, m, l_sum = _own_tile(bufs, bars, j, t_start + j * bufs[2].shape[1], t_end, qk_scale, o, m, l_sum, W)
    last = 2 * own + W - 1  # a tile after this warpgroup's last one is the other's (at most one)
    if (last < n) & (last >= 0):  # last is -1 only for W = 0 and no tiles
        o, m, l_sum = _other_tile(bufs, bars, last, o, m, l_sum, W)
    _store(o, m, l_sum, outs, W, ONE_SPLIT)


@_jit
def _program_span(descs, lengths, chunk, rows_per_batch):
    """This program's split of its batch row: tiles n (0 for a split past the row's length), positions [start, end),
    the row of its queries in q_lat viewed as [b * h, c] and of its first position in the cache viewed as [b * R, c]."""
    hb, split, b = gl.program_id(0), gl.program_id(1), gl.program_id(2)
    start = split * chunk
    end = gl.minimum(start + chunk, gl.load(lengths + b))
    n = gl.cdiv(gl.maximum(end - start, 0), descs[2].block_type.shape[0])
    q_row = (b * gl.num_programs(0) + hb) * descs[0].block_type.shape[0]
    return n, start, end, q_row, b * rows_per_batch + start


@_jit
def _ws_decode_kernel(
    q_desc,
    qr_desc,
    kv_desc,
    kr_desc,
    lengths,
    acc_out,
    m_out,
    l_out,
    qk_scale,
    rows_per_batch,
    chunk,
    s_ab,
    s_ah,
    s_as,
    s_mb,
    s_mh,
    ONE_SPLIT: gl.constexpr,
    NSTAGE: gl.constexpr,
):
    """Grid (h / 64, splits, b). Allocates the shared buffers and barriers, then forks the three partitions."""
    descs = (q_desc, qr_desc, kv_desc, kr_desc)
    n, start, end, q_row, kv_row = _program_span(descs, lengths, chunk, rows_per_batch)
    bufs = _allocate(descs, NSTAGE)
    bars = _barriers(NSTAGE)
    span = (n, start, end, qk_scale)
    outs = (acc_out, m_out, l_out, s_ab, s_ah, s_as, s_mb, s_mh)
    gl.warp_specialize(
        [
            (_producer, (descs, bufs, bars, q_row, kv_row, n)),
            (_consumer, (bufs, bars, span, outs, gl.constexpr(0), ONE_SPLIT)),
            (_consumer, (bufs, bars, span, outs, gl.constexpr(1), ONE_SPLIT)),
        ],
        [4, 4],  # worker warps: the two consumer warpgroups
        [240, 240],  # worker registers; the producer (default partition) gets what is left
    )


@functools.cache
def _shared_layout(block: tuple[int, int]):
    """The bf16 shared-memory layout of one TMA box (built once per box: it is most of a descriptor's host cost)."""
    return gl.NVMMASharedLayout.get_default_for(list(block), gl.bfloat16)


def _descriptor(t: torch.Tensor, rows: int, block: list[int]):
    """A 2-D TMA descriptor over t's rows (last dim contiguous, uniform row stride t.stride(-2))."""
    return TensorDescriptor(t, [rows, t.shape[-1]], [t.stride(-2), 1], block, _shared_layout(tuple(block)))


def launch_args(
    q_lat, q_rope, c_kv, k_rope, lengths, scale: float, chunk: int, acc, m, l_sum, block_t=BLOCK_T, stages=STAGES
):
    """(grid, args, kwargs) of ``_ws_decode_kernel`` (or ``gluon_seesaw``'s kernel, same arguments) for these
    tensors; CPU tensors give the same signature (the compile check in ``bench/gluon_compile.py`` uses them).
    ``acc`` is ``out`` itself with one split; ``block_t`` positions per cache tile (the TMA boxes' rows), ``stages``
    tiles in shared memory at once."""
    b, h, _ = q_lat.shape
    splits = 1 if acc.dim() == 3 else acc.shape[2]
    per_batch = c_kv.stride(0) // c_kv.stride(1)  # R: the buffer's positions per row
    cache_rows = (b - 1) * per_batch + c_kv.shape[1]  # the last row's view ends at its own length
    descs = (
        _descriptor(q_lat.view(b * h, LATENT), b * h, [BLOCK_H, HALF]),  # [b, h, c] -> [b * h, c]
        _descriptor(q_rope.view(b * h, ROPE), b * h, [BLOCK_H, ROPE]),  # [b, h, d] -> [b * h, d]
        _descriptor(c_kv, cache_rows, [block_t, HALF]),  # [b, t, c] as rows b * R + t of [b * R, c]
        _descriptor(k_rope, cache_rows, [block_t, ROPE]),  # [b, t, d] as rows b * R + t of [b * R, d]
    )
    args = (*descs, lengths, acc, m, l_sum, scale * math.log2(math.e), per_batch, chunk, *split_strides((), acc, m))
    return (h // BLOCK_H, splits, b), args, dict(ONE_SPLIT=splits == 1, NSTAGE=stages, **LAUNCH)
