"""The Gluon decode kernel with a seesaw schedule: the same equations, arguments, shared buffers and result as
``gluon_decode._ws_decode_kernel`` (index legend: b batch, h heads, t cached positions, c latent = 512, d =
qk_rope_head_dim = 64), with two changes to how the two consumer warpgroups share the work.

1. The softmaxes hand over the running row max alone. Warpgroup W = j % 2 owns tile j: scores S_j, then
   m_j = max(m_{j-1}, rowmax S_j), published at once (the other warpgroup's next softmax waits on nothing else), then
   P_j = exp2(S_j - m_j) and O_W += P_j V_j[:, W half]. Its P_j reaches the other warpgroup scaled by
   exp2(m_j - m_{j+1}) (its owner waits for m_{j+1}), so the other adds P_j V_j[:, other half] in its tile j + 1
   right after publishing m_{j+1}, with O already in units of m_{j+1}: the rescale rides on its own tile's. In the
   ping-pong schedule of ``gluon_decode`` a warpgroup's softmax waits for the other's whole softmax, its P and its
   P V; here only for a row max. (FlashMLA's SM90 kernel calls this schedule "seesaw".)
2. A stage is loaded and released in two parts, in the order the consumers let go of them: part A is the owner's
   c_kv half (its scores start on it, its own P V reads it), part B the other c_kv half and the rope box (the rope box
   then carries P_j to the other warpgroup: P [64 h, 64 t] bf16 is the size of k_rope [64 t, 64 d], so it needs no
   buffer of its own). A consumer adds the other's tile j - 1 right after publishing m_j, before its own
   exponentials and P V, so tile j - 1's part B is refilled as soon as the exchange allows; the producer loads tile
   k's part A once the owner of tile k - NSTAGE (same stage) is done with it, and tile k - 1's part B once tile
   k - 1 - NSTAGE's is released.
Tiles as the launch asks (``gluon_launch.KERNELS``): 64 positions in two stages (``seesaw``; shared memory Q 72 KiB +
2 x 72 KiB + row max and sum per stage + barriers, 217.4 KiB) or 32 in four (``seesaw_t32``: the same bytes in
flight, but three tiles between a stage's release and its next use instead of one; 218.5 KiB); the rope box of a
32-position tile holds P [64 h, 32 t] just as well (the same 4 KiB). Written above for 64: [64 h, t] wherever a tile
shape appears. Host side, split count and merge pass: ``gluon_launch`` (``schedule=``).
"""

from __future__ import annotations

import triton

from nemo_mla_lora.inference.kernels import gluon_decode as gd
from nemo_mla_lora.inference.kernels.gluon_decode import (
    _allocate_tiles,
    _jit,
    _load_q,
    _program_span,
    _rescale,
    _store,
    _zero_tail,
)

if gd.gl is not None:  # Gluon's Hopper API (``gluon_decode`` says which Triton has it)
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    _tma_load, _cta_barrier = gd._tma_load, gd._cta_barrier

# a host function evaluated at compile time (layouts from a tile size); plain where Triton predates it
_constexpr_function = getattr(triton, "constexpr_function", lambda fn: fn)


@_jit
def _producer(descs, bufs, bars, q_row, kv_row, n):
    """TMA loads: Q once; then, for k = 0 .. n, tile k's part A (its owner's c_kv half, k % 2) once the stage's
    previous part A is free, and tile k - 1's part B (the other c_kv half and k_rope) once the stage's previous part B
    is: the order in which the consumers release them."""
    kv_desc, kr_desc = descs[2], descs[3]
    kv_bufs, kr_bufs = bufs[2], bufs[3]
    q_bar, ready_a, ready_b, free_a, free_b = bars[0], bars[1], bars[2], bars[3], bars[4]
    NSTAGE: gl.constexpr = ready_a.shape[0]
    TILE_T: gl.constexpr = kv_desc.block_type.shape[0]
    WIDTH: gl.constexpr = kv_desc.block_type.shape[1]
    _load_q(descs, bufs, q_bar, q_row)
    for k in range(n + 1):
        if k < n:  # part A of tile k
            s = k % NSTAGE
            mbarrier.wait(free_a.index(s), ((k // NSTAGE) & 1) ^ 1)  # a fresh barrier passes parity 1 at once
            mbarrier.expect(ready_a.index(s), kv_desc.block_type.nbytes)
            half = k % 2
            _tma_load(kv_desc, [kv_row + k * TILE_T, half * WIDTH], ready_a.index(s), kv_bufs.index(2 * s + half))
        if k > 0:  # part B of tile i = k - 1
            i = k - 1
            s = i % NSTAGE
            mbarrier.wait(free_b.index(s), ((i // NSTAGE) & 1) ^ 1)
            bar = ready_b.index(s)
            mbarrier.expect(bar, kv_desc.block_type.nbytes + kr_desc.block_type.nbytes)
            half = 1 - i % 2
            _tma_load(kv_desc, [kv_row + i * TILE_T, half * WIDTH], bar, kv_bufs.index(2 * s + half))  # [64 t, 256]
            _tma_load(kr_desc, [kv_row + i * TILE_T, 0], bar, kr_bufs.index(s))  # [64 t, 64 d]


@_constexpr_function
def _scores_layout(tile_t):
    """The wgmma accumulator layout of S [64 h, tile_t t] on one warpgroup."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, tile_t, 16])


@_constexpr_function
def _p_layout(tile_t):
    """P [64 h, tile_t t] bf16 in shared memory, as wgmma's A operand: rows of 2 x tile_t bytes, swizzled as wide."""
    return gl.NVMMASharedLayout(swizzle_byte_width=2 * tile_t, element_bitwidth=16, rank=2)


@_jit
def _p_box_reinterpret(kr_bufs, s):
    """Stage s's rope box [tile_t t, 64 d] seen as P [64 h, tile_t t] (the same bytes): Triton 3.9's name."""
    TILE_T: gl.constexpr = kr_bufs.shape[1]
    return kr_bufs.index(s).reinterpret(gl.bfloat16, [kr_bufs.shape[2], TILE_T], _p_layout(TILE_T))


@_jit
def _p_box_underscore(kr_bufs, s):
    """The same with Triton 3.6's name (``_reinterpret``)."""
    TILE_T: gl.constexpr = kr_bufs.shape[1]
    return kr_bufs.index(s)._reinterpret(gl.bfloat16, [kr_bufs.shape[2], TILE_T], _p_layout(TILE_T))


_p_box = (
    _p_box_reinterpret
    if gd.gl is not None and hasattr(getattr(gl, "shared_memory_descriptor", None), "reinterpret")
    else _p_box_underscore
)


@_jit
def _scores(bufs, bars, j, W: gl.constexpr, zero):
    """S_j [64 h, 64 t] = Q [64 h, 576] . K_j^T: the wgmma over the owner's c_kv half starts when part A lands, the
    other half and the rope box follow part B. ``zero``: 0, opaque to the compiler (``gluon_decode._scores``)."""
    q_bufs, qr_buf, kv_bufs, kr_bufs = bufs[0], bufs[1], bufs[2], bufs[3]
    ready_a, ready_b = bars[1], bars[2]
    s = j % ready_a.shape[0]
    phase = (j // ready_a.shape[0]) & 1
    s_layout: gl.constexpr = _scores_layout(kv_bufs.shape[1])
    acc = gl.full([q_bufs.shape[1], kv_bufs.shape[1]], 0.0, gl.float32, s_layout)
    mbarrier.wait(ready_a.index(s), phase)
    own, other = kv_bufs.index(2 * s + W).permute((1, 0)), kv_bufs.index(2 * s + 1 - W).permute((1, 0))
    acc = warpgroup_mma(q_bufs.index(zero + W), own, acc, use_acc=False, is_async=True)
    mbarrier.wait(ready_b.index(s), phase)
    acc = warpgroup_mma(q_bufs.index(zero + 1 - W), other, acc, is_async=True)
    acc = warpgroup_mma(qr_buf, kr_bufs.index(s).permute((1, 0)), acc, is_async=True)
    return warpgroup_mma_wait(0, deps=(acc,))


@_jit
def _publish_max(m_bufs, m_ready, s, m_j):
    """The running row max after this tile [64 h], for the other warpgroup's next softmax."""
    m_bufs.index(s).store(m_j)
    _cta_barrier()
    mbarrier.arrive(m_ready.index(s), count=1)


@_jit
def _read_max(m_bufs, m_ready, k, like):
    """The running row max after tile k [64 h] (in ``like``'s layout), once its owner has published it."""
    s = k % m_ready.shape[0]
    mbarrier.wait(m_ready.index(s), (k // m_ready.shape[0]) & 1)
    return m_bufs.index(s).load(like.type.layout)


@_jit
def _hand_over(kr_bufs, r_bufs, p_ready, s, p, row_sum, scale):
    """P_j and its row sums scaled to the next running max (``scale`` [64 h] = exp2(m_j - m_{j+1})); P [64 h, 64 t]
    bf16 goes over the spent rope box of stage s."""
    _p_box(kr_bufs, s).store((p.to(gl.float32) * gl.expand_dims(scale, 1)).to(gl.bfloat16))
    r_bufs.index(s).store(row_sum * scale)
    fence_async_shared()  # generic stores before the other warpgroup's wgmma (async proxy) reads P
    _cta_barrier()
    mbarrier.arrive(p_ready.index(s), count=1)


@_jit
def _add_other(bufs, bars, i, o, l_sum, W: gl.constexpr):
    """The other warpgroup's tile i, handed over in units of this warpgroup's running max: l += its row sums,
    O += P_i V_i[:, W half]; then tile i's part B is released."""
    kv_bufs, kr_bufs, r_bufs = bufs[2], bufs[3], bufs[5]
    ready_b, p_ready = bars[2], bars[6]
    s = i % ready_b.shape[0]
    mbarrier.wait(ready_b.index(s), (i // ready_b.shape[0]) & 1)  # its owner waited too; here for the async proxy
    mbarrier.wait(p_ready.index(s), (i // ready_b.shape[0]) & 1)
    l_sum = l_sum + r_bufs.index(s).load(l_sum.type.layout)
    o = warpgroup_mma(_p_box(kr_bufs, s), kv_bufs.index(2 * s + W), o)  # [64 h, t] . [t, 256 c]
    mbarrier.arrive(bars[4].index(s), count=1)  # free_b: the producer may refill this half and the P box
    return o, l_sum


@_jit
def _own_tile(bufs, bars, j, span, state, W: gl.constexpr):
    """Tile j = W, W + 2, ...: scores, running max (published), the other's tile j - 1 (its part B is refilled from
    then on), softmax, O += P V_j[:, W half]; then P_j handed over scaled to the max after tile j + 1. ``state``: (O,
    row sum, O's max, m_{j-1})."""
    n, t_start, t_end, qk_scale = span
    o, l_sum, m_ref, m_prev = state
    kv_bufs, kr_bufs, m_bufs, r_bufs = bufs[2], bufs[3], bufs[4], bufs[5]
    free_a, m_ready, p_ready = bars[3], bars[5], bars[6]
    s = j % free_a.shape[0]
    t0 = t_start + j * kv_bufs.shape[1]
    scores = _scores(bufs, bars, j, W, (t_end - t0) >> 31)  # [64 h, 64 t]; t0 < t_end, so the shift is 0
    if t0 + kv_bufs.shape[1] > t_end:  # after the scores have read the tile; before any P V does
        _zero_tail(kv_bufs, s, t_end - t0)
    ts = t0 + gl.arange(0, kv_bufs.shape[1], gl.SliceLayout(0, scores.type.layout))
    scores = gl.where(gl.expand_dims(ts < t_end, 0), scores * qk_scale, float("-inf"))  # log2 units
    m_j = gl.maximum(m_prev, gl.max(scores, axis=1))  # [64 h]
    _publish_max(m_bufs, m_ready, s, m_j)
    alpha = gl.exp2(m_ref - m_j)
    o = _rescale(o, alpha)  # O and l in units of m_j, those of the other's P_{j-1}
    l_sum = l_sum * alpha
    if j > 0:  # the other's tile j - 1 first (its owner scales it as soon as m_j is out): its part B goes sooner
        o, l_sum = _add_other(bufs, bars, j - 1, o, l_sum, W)
    p = gl.exp2(scores - gl.expand_dims(m_j, 1))  # [64 h, 64 t]
    row_sum = gl.sum(p, axis=1)
    l_sum = l_sum + row_sum
    p = p.to(gl.bfloat16)  # held in bf16 until the hand-over (in fp32 it spills)
    p_a = gl.convert_layout(p, gl.DotOperandLayout(operand_index=0, parent=o.type.layout, k_width=2))
    o = warpgroup_mma(p_a, kv_bufs.index(2 * s + W), o)  # [64 h, 64 t] . [64 t, 256 c]
    mbarrier.arrive(free_a.index(s), count=1)
    m_next = m_j
    if j + 1 < n:  # the last tile hands over unscaled
        m_next = _read_max(m_bufs, m_ready, j + 1, m_j)
    _hand_over(kr_bufs, r_bufs, p_ready, s, p, row_sum, gl.exp2(m_j - m_next))
    return o, l_sum, m_j, m_next


@_jit
def _last_other(bufs, bars, i, o, l_sum, m_ref, m_i, W: gl.constexpr):
    """The other warpgroup's tile i = n - 1 after this warpgroup's last own tile: O and l to units of m_i, then
    O += P_i V_i[:, W half]."""
    alpha = gl.exp2(m_ref - m_i)
    o = _rescale(o, alpha)
    return _add_other(bufs, bars, i, o, l_sum * alpha, W)


@_jit
def _consumer(bufs, bars, span, outs, W: gl.constexpr, ONE_SPLIT: gl.constexpr):
    """Consumer warpgroup W: its tiles j = W, W + 2, ... (each with the other's tile j - 1), the other's last tile if
    it comes after, then its half of O."""
    n = span[0]
    s_layout: gl.constexpr = _scores_layout(bufs[2].shape[1])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 256, 16])
    rows: gl.constexpr = bufs[0].shape[1]
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    m_ref = gl.full([rows], float("-inf"), gl.float32, row_layout)  # the max O and l are in units of
    l_sum = gl.full([rows], 0.0, gl.float32, row_layout)
    o = gl.full([rows, bufs[2].shape[2]], 0.0, gl.float32, o_layout)  # [64 h, 256 c]
    m_next = m_ref  # the running max after the other's latest tile
    mbarrier.wait(bars[0], 0)  # Q landed
    if (n > 0) & (W == 1):  # warpgroup 1's first tile follows tile 0
        m_next = _read_max(bufs[4], bars[5], 0, m_next)
    own = gl.cdiv(n - W, 2)
    for k in range(own):
        o, l_sum, m_ref, m_next = _own_tile(bufs, bars, 2 * k + W, span, (o, l_sum, m_ref, m_next), W)
    last = 2 * own + W - 1  # a tile after this warpgroup's last one is the other's (at most one)
    if (last < n) & (last >= 0):  # last is -1 only for W = 0 and no tiles
        o, l_sum = _last_other(bufs, bars, last, o, l_sum, m_ref, m_next, W)
        m_ref = m_next
    _store(o, m_ref, l_sum, outs, W, ONE_SPLIT)


@_jit
def _allocate(descs, NSTAGE: gl.constexpr):
    """``gluon_decode._allocate_tiles``' buffers (the k_rope boxes later carry P), row max and row sum per stage."""
    q_desc = descs[0]
    q_bufs, qr_buf, kv_bufs, kr_bufs = _allocate_tiles(descs, NSTAGE)
    row_layout: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])  # of one [64 h] row
    m_bufs = gl.allocate_shared_memory(gl.float32, [NSTAGE, q_desc.block_type.shape[0]], row_layout)  # [S, 64 h]
    r_bufs = gl.allocate_shared_memory(gl.float32, [NSTAGE, q_desc.block_type.shape[0]], row_layout)  # [S, 64 h]
    return q_bufs, qr_buf, kv_bufs, kr_bufs, m_bufs, r_bufs


@_jit
def _barriers(NSTAGE: gl.constexpr):
    """Q landed; per stage: parts A and B landed (TMA bytes), parts A and B free (one consumer each), the row max
    published, P handed over."""
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    ready_a, ready_b, free_a, free_b = (
        _stage_bars(NSTAGE),
        _stage_bars(NSTAGE),
        _stage_bars(NSTAGE),
        _stage_bars(NSTAGE),
    )
    m_ready, p_ready = _stage_bars(NSTAGE), _stage_bars(NSTAGE)
    return q_bar, ready_a, ready_b, free_a, free_b, m_ready, p_ready


@_jit
def _stage_bars(NSTAGE: gl.constexpr):
    """NSTAGE mbarriers of one arrival each."""
    bars = gl.allocate_shared_memory(gl.int64, [NSTAGE, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(NSTAGE):
        mbarrier.init(bars.index(s), count=1)
    return bars


@_jit
def _seesaw_decode_kernel(
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
    """Grid (h / 64, splits, b), the arguments of ``gluon_decode.launch_args``. Allocates the shared buffers and
    barriers, then forks the producer and the two consumers."""
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
