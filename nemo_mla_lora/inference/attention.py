"""Absorbed MLA attention over the latent cache, on a Megatron-Core ``MLASelfAttention``'s own modules.

The attention's down projections, q/kv norms, q up projection, rotary embedding and output projection are
Megatron's; the split kv-up weights of the absorbed checkpoint stand in for ``linear_kv_up_proj``:

    q_lat[h]  = W_UK[h]^T q_nope[h]                      [b, s, h, c]
    score     = q_lat . c_kv(t) + q_rope[h] . k_rope(t)  [b, h, s, t], times the softmax scale
    o[h]      = W_UV[h] sum_t p(t) c_kv(t)               [s, b, h, dv]

Index legend: b batch, s new positions, t cached positions, h heads, d head dim, c latent.
"""

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

from nemo_mla_lora.inference.adapters import NoCorrections

NONE = NoCorrections()


def project(hidden, attn, positions, table_length: int, corr=NONE):
    """hidden [s, b, hidden] at ``positions`` [b, s] (all below ``table_length``) -> q_nope [s, b, h, dn],
    q_rope [s, b, h, dr] (roped), c_kv [b, s, c] (normed), k_rope [b, s, dr] (roped). ``corr``: per-request
    adapter deltas."""
    cfg = attn.config
    s, b, _ = hidden.shape
    dn, dr, c = cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.kv_lora_rank
    if cfg.q_lora_rank is not None:
        q_compressed = corr.linear("linear_q_down_proj", hidden, attn.linear_q_down_proj(hidden)[0])
        q_normed = attn.q_layernorm(q_compressed)
        q = corr.linear("linear_q_up_proj", q_normed, attn.linear_q_up_proj(q_normed)[0])
    else:
        q = corr.linear("linear_q_proj", hidden, attn.linear_q_proj(hidden)[0])
    q = q.view(s, b, -1, dn + dr)  # [s, b, h, dn + dr]
    kv = corr.linear("linear_kv_down_proj", hidden, attn.linear_kv_down_proj(hidden)[0])  # [s, b, c + dr]
    c_kv, k_rope = torch.split(kv, [c, dr], dim=-1)
    rope = attn.rotary_pos_emb(table_length)  # [T, 1, 1, dr]; one length: Megatron's lru_cache hits
    emb, mscale = rope if isinstance(rope, tuple) else (rope, 1.0)  # YaRN returns its mscale, plain RoPE does not
    emb = emb[positions.T, 0]  # [s, b, 1, dr]: each row at its own positions
    q_rope = apply_rotary_pos_emb(q[..., dn:], emb, config=cfg, mscale=mscale)
    k_rope = apply_rotary_pos_emb(k_rope.unsqueeze(2), emb, config=cfg, mscale=mscale).squeeze(2)  # [s, b, dr]
    c_kv = attn.kv_layernorm(c_kv)
    return q[..., :dn], q_rope, c_kv.transpose(0, 1), k_rope.transpose(0, 1)


def absorbed_attention(hidden, attn, w_uk, w_uv, cache, layer: int, corr=NONE, backend: str = "torch"):
    """hidden [s, b, hidden] -> attention output [s, b, hidden]; writes this layer's new latents to
    ``cache`` (each row after its cached tokens). w_uk [h, dn, c], w_uv [h, dv, c]; ``corr``: per-request
    adapter deltas (inference/adapters.py); ``backend="triton"``: decode steps through
    ``hopper_decode.decode_attention`` (on Hopper the Gluon or the TMA kernels by shape, else the portable one),
    ``backend="flashmla"``: through FlashMLA's Hopper kernel where it is faster for the shape, ours elsewhere
    (``kernels/flashmla.flashmla_or_ours``), ``backend="gluon"``: through the warp-specialised Gluon kernel where
    it runs (``kernels/gluon_backend.gluon_or_ours``); prefill stays in einsums."""
    s, b, _ = hidden.shape
    positions = cache.positions(s)  # [b, s]
    q_nope, q_rope, c_kv, k_rope = project(hidden, attn, positions, cache.max_length, corr)
    c_all, k_all = cache.write(layer, c_kv, k_rope, positions)  # [b, t, c], [b, t, dr]
    q_lat = corr.q_lat(q_nope, torch.einsum("sbhd,hdc->bshc", q_nope, w_uk))
    if backend != "torch" and s == 1:  # decode: one kernel over the cache, every head per tile load
        decode_attention = _decode_kernel(backend)
        lengths = (positions[:, 0] + 1).to(torch.int32)  # row i attends to its positions 0..p_i
        o_lat = decode_attention(
            q_lat[:, 0], q_rope[0], c_all, k_all, lengths, attn.softmax_scale, max_length=c_all.shape[1]
        )
        o_lat = o_lat.to(c_all.dtype)[:, None]  # [b, 1, h, c]
    else:
        o_lat = _attend(q_lat, q_rope, c_all, k_all, positions, attn.softmax_scale)
    o = corr.o(o_lat, torch.einsum("bshc,hdc->sbhd", o_lat, w_uv)).reshape(s, b, -1)  # [s, b, h * dv]
    out, bias = attn.linear_proj(o)
    out = corr.linear("linear_proj", o, out)
    return out if bias is None else out + bias


def _decode_kernel(backend: str):
    if backend == "flashmla":
        from nemo_mla_lora.inference.kernels.flashmla import flashmla_or_ours

        return flashmla_or_ours
    if backend == "gluon":
        from nemo_mla_lora.inference.kernels.gluon_backend import gluon_or_ours

        return gluon_or_ours
    from nemo_mla_lora.inference.kernels.hopper_decode import decode_attention

    return decode_attention


def _attend(q_lat, q_rope, c_all, k_all, positions, softmax_scale: float):
    """The latent attention in einsums: q_lat [b, s, h, c], q_rope [s, b, h, dr], query positions [b, s]
    -> o_lat [b, s, h, c]. Row i's query at position p sees cached positions 0..p."""
    scores = torch.einsum("bshc,btc->bhst", q_lat, c_all) + torch.einsum("sbhd,btd->bhst", q_rope, k_all)
    t = c_all.shape[1]
    future = torch.arange(t, device=q_lat.device)[None, None, :] > positions[:, :, None]  # [b, s, t]
    scores = scores if scores.dtype == torch.float64 else scores.float()  # softmax in fp32 (fp64 kept)
    scores = (scores * softmax_scale).masked_fill(future[:, None], float("-inf"))  # [b, h, s, t]
    probs = torch.softmax(scores, dim=-1).to(c_all.dtype)
    return torch.einsum("bhst,btc->bshc", probs, c_all)
