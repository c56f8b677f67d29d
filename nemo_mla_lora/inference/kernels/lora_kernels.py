"""Triton kernels for the multi-adapter corrections of ``inference/adapters.py``: fewer launches per decode step.

The corrections (``LayerCorrections``) in plain torch take three to five kernels each (a product over every
loaded adapter's slots, the row mask, a second product, the add, and the permute copies of the per-head
einsums). Here each is one or two, the mask applied while a tile is loaded and the result added in place:

    linear (q/kv down, q up, q_proj, proj):  z = x A^T (cuBLAS), then  y[t, o] += sum_j z[t, j] M[b(t), j] B^T[j, o]
    kv up, K rows:  q_lat[b, s, h, c] += sum_j (sum_d q_nope[s, b, h, d] B_K[h, d, j]) M[b, j] A[j, c]
    kv up, V rows:  o[s, b, h, e]     += sum_j (sum_c o_lat[b, s, h, c] A[j, c]) M[b, j] B_V[h, j, e]

M [b, m] is the row mask (1 on the slots of the row's adapter), the scale is folded into B (``AdapterBank``).
The per-head kernels keep z [rows, m] in registers between their two products. Products accumulate in fp32
(fp32 operands in full precision, not TF32); z is rounded to the inputs' dtype between the two, as the torch
path rounds it.
Index legend: t rows (s*b or b*s), b batch, s positions, h heads, d qk_nope_head_dim, c latent, e v_head_dim,
j slots (m = loaded adapters x rank), o output features. Runs on CUDA; ``TRITON_INTERPRET=1`` runs the same
kernels on CPU tensors (the CPU tests do).
"""

import torch
import triton
import triton.language as tl

from nemo_mla_lora.inference.kernels.tiles import dot, pow2


@triton.jit
def _expand_kernel(
    z,
    mask,
    bt,
    y,
    T,
    O,  # noqa: E741  (the output width, in the kernel's one-letter size names T, O, J)
    J,
    mask_div,
    mask_mod,
    s_zt,
    s_mb,
    s_bj,
    s_yt,
    BLOCK_T: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_J: tl.constexpr,
    IEEE: tl.constexpr,
):
    """y[t, o] += sum_j z[t, j] mask[(t // mask_div) % mask_mod, j] bt[j, o]."""
    tb, ob = tl.program_id(0), tl.program_id(1)
    ts = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    os_ = ob * BLOCK_O + tl.arange(0, BLOCK_O)
    tmask, omask = ts < T, os_ < O
    rows = (ts // mask_div) % mask_mod
    acc = tl.zeros([BLOCK_T, BLOCK_O], tl.float32)
    for j0 in range(0, J, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        jmask = js < J
        zt = tl.load(z + ts[:, None] * s_zt + js[None, :], mask=tmask[:, None] & jmask[None, :], other=0.0)
        mt = tl.load(mask + rows[:, None] * s_mb + js[None, :], mask=tmask[:, None] & jmask[None, :], other=0.0)
        b = tl.load(bt + js[:, None] * s_bj + os_[None, :], mask=jmask[:, None] & omask[None, :], other=0.0)
        acc += dot((zt * mt).to(b.dtype), b, IEEE)  # [BT, BJ] @ [BJ, BO]
    out = y + ts[:, None] * s_yt + os_[None, :]
    keep = tmask[:, None] & omask[None, :]
    tl.store(out, (tl.load(out, mask=keep, other=0.0).to(tl.float32) + acc).to(y.dtype.element_ty), mask=keep)


@triton.jit
def _rows_and_mask(mask, rb, R, S, J, s_mb, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
    """Rows rb * BLOCK_R .. in (b, s) order -> their b, their s, which exist, the slots, which exist, and the
    rows' mask tile [BR, BJ] (1 on each row's own adapter's slots)."""
    rs = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    bs, ss, rmask = rs // S, rs % S, rs < R
    js = tl.arange(0, BLOCK_J)
    jmask = js < J
    mt = tl.load(mask + bs[:, None] * s_mb + js[None, :], mask=rmask[:, None] & jmask[None, :], other=0.0)
    return bs, ss, rmask, js, jmask, mt


@triton.jit
def _q_lat_kernel(
    q,
    b_k,
    a,
    mask,
    q_lat,
    R,
    S,
    D,
    J,
    C,
    s_qs,
    s_qb,
    s_qh,
    s_kh,
    s_kd,
    s_aj,
    s_mb,
    s_lb,
    s_ls,
    s_lh,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_C: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Head h, rows r = (b, s): z = q[s, b, h, :] B_K[h] [r, j], masked; q_lat[b, s, h, c-block] += z A[:, c-block]."""
    h, rb, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bs, ss, rmask, js, jmask, mt = _rows_and_mask(mask, rb, R, S, J, s_mb, BLOCK_R, BLOCK_J)
    ds = tl.arange(0, BLOCK_D)
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    qt = tl.load(
        q + ss[:, None] * s_qs + bs[:, None] * s_qb + h * s_qh + ds[None, :],
        mask=rmask[:, None] & (ds[None, :] < D),
        other=0.0,
    )  # [BR, BD]
    kt = tl.load(
        b_k + h * s_kh + ds[:, None] * s_kd + js[None, :], mask=(ds[:, None] < D) & jmask[None, :], other=0.0
    )  # [BD, BJ]
    z = (dot(qt, kt, IEEE) * mt).to(kt.dtype)  # [BR, BJ]: the row's own slots only
    at = tl.load(a + js[:, None] * s_aj + cs[None, :], mask=jmask[:, None] & cmask[None, :], other=0.0)  # [BJ, BC]
    out = q_lat + bs[:, None] * s_lb + ss[:, None] * s_ls + h * s_lh + cs[None, :]
    keep = rmask[:, None] & cmask[None, :]
    acc = tl.load(out, mask=keep, other=0.0).to(tl.float32) + dot(z, at, IEEE)
    tl.store(out, acc.to(q_lat.dtype.element_ty), mask=keep)


@triton.jit
def _o_kernel(
    o_lat,
    a,
    b_v,
    mask,
    o,
    R,
    S,
    C,
    J,
    E,
    s_lb,
    s_ls,
    s_lh,
    s_aj,
    s_vh,
    s_vj,
    s_mb,
    s_os,
    s_ob,
    s_oh,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_E: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Head h, rows r = (b, s): z = o_lat[b, s, h, :] A^T [r, j], masked;
    o[s, b, h, e-block] += z B_V[h, :, e-block]."""
    h, rb, eb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bs, ss, rmask, js, jmask, mt = _rows_and_mask(mask, rb, R, S, J, s_mb, BLOCK_R, BLOCK_J)
    es = eb * BLOCK_E + tl.arange(0, BLOCK_E)
    emask = es < E
    z = tl.zeros([BLOCK_R, BLOCK_J], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        lt = tl.load(
            o_lat + bs[:, None] * s_lb + ss[:, None] * s_ls + h * s_lh + cs[None, :],
            mask=rmask[:, None] & (cs[None, :] < C),
            other=0.0,
        )  # [BR, BC]
        at = tl.load(
            a + js[None, :] * s_aj + cs[:, None], mask=jmask[None, :] & (cs[:, None] < C), other=0.0
        )  # [BC, BJ]
        z += dot(lt, at, IEEE)
    vt = tl.load(b_v + h * s_vh + js[:, None] * s_vj + es[None, :], mask=jmask[:, None] & emask[None, :], other=0.0)
    out = o + ss[:, None] * s_os + bs[:, None] * s_ob + h * s_oh + es[None, :]
    keep = rmask[:, None] & emask[None, :]
    acc = tl.load(out, mask=keep, other=0.0).to(tl.float32) + dot((z * mt).to(vt.dtype), vt, IEEE)
    tl.store(out, acc.to(o.dtype.element_ty), mask=keep)


def _inner_contiguous(*tensors: torch.Tensor) -> None:
    bad = [tuple(t.stride()) for t in tensors if t.stride(-1) != 1]
    if bad:
        raise ValueError(f"lora_kernels: last dims must be contiguous; strides {bad}")


def expand_add(y: torch.Tensor, z: torch.Tensor, mask: torch.Tensor, b_t: torch.Tensor, batch: int) -> torch.Tensor:
    """y [s, b, o] += (z [s, b, m] * mask [b, m]) @ B^T [m, o], in place; returns y. y and z contiguous."""
    s, b, o = y.shape
    m = z.shape[-1]
    y2, z2 = y.view(s * b, o), z.view(s * b, m)  # rows t = (s, b): mask row t % b
    _inner_contiguous(y2, z2, mask, b_t)
    block_t = pow2(min(s * b, 64))
    block_o = 128 if o >= 128 else pow2(o)
    grid = (triton.cdiv(s * b, block_t), triton.cdiv(o, block_o))
    _expand_kernel[grid](
        z2,
        mask,
        b_t,
        y2,
        s * b,
        o,
        m,
        1,
        batch,
        z2.stride(0),
        mask.stride(0),
        b_t.stride(0),
        y2.stride(0),
        BLOCK_T=block_t,
        BLOCK_O=block_o,
        BLOCK_J=min(pow2(m), 64),
        IEEE=y.dtype == torch.float32,
    )
    return y


def q_lat_add(
    q_lat: torch.Tensor, q_nope: torch.Tensor, b_k: torch.Tensor, a: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """q_lat [b, s, h, c] += kv-up K-row correction of q_nope [s, b, h, d] (B_K [h, d, m], A [m, c]), in place."""
    b, s, h, c = q_lat.shape
    d, m = b_k.shape[1], b_k.shape[2]
    _inner_contiguous(q_lat, q_nope, b_k, a, mask)
    block_r, block_c = pow2(min(b * s, 64)), min(pow2(c), 128)
    grid = (h, triton.cdiv(b * s, block_r), triton.cdiv(c, block_c))
    _q_lat_kernel[grid](
        q_nope,
        b_k,
        a,
        mask,
        q_lat,
        b * s,
        s,
        d,
        m,
        c,
        q_nope.stride(0),
        q_nope.stride(1),
        q_nope.stride(2),
        b_k.stride(0),
        b_k.stride(1),
        a.stride(0),
        mask.stride(0),
        q_lat.stride(0),
        q_lat.stride(1),
        q_lat.stride(2),
        BLOCK_R=block_r,
        BLOCK_D=pow2(d),
        BLOCK_J=pow2(m),
        BLOCK_C=block_c,
        IEEE=q_lat.dtype == torch.float32,
    )
    return q_lat


def o_add(o: torch.Tensor, o_lat: torch.Tensor, a: torch.Tensor, b_v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """o [s, b, h, e] += kv-up V-row correction of o_lat [b, s, h, c] (A [m, c], B_V [h, m, e]), in place."""
    s, b, h, e = o.shape
    c, m = o_lat.shape[-1], a.shape[0]
    _inner_contiguous(o, o_lat, a, b_v, mask)
    block_r, block_e = pow2(min(b * s, 64)), min(pow2(e), 128)
    grid = (h, triton.cdiv(b * s, block_r), triton.cdiv(e, block_e))
    _o_kernel[grid](
        o_lat,
        a,
        b_v,
        mask,
        o,
        b * s,
        s,
        c,
        m,
        e,
        o_lat.stride(0),
        o_lat.stride(1),
        o_lat.stride(2),
        a.stride(0),
        b_v.stride(0),
        b_v.stride(1),
        mask.stride(0),
        o.stride(0),
        o.stride(1),
        o.stride(2),
        BLOCK_R=block_r,
        BLOCK_C=min(pow2(c), 128),
        BLOCK_J=pow2(m),
        BLOCK_E=block_e,
        IEEE=o.dtype == torch.float32,
    )
    return o
