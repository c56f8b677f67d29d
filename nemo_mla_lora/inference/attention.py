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


def project(hidden, attn, start: int, corr=NONE):
    """hidden [s, b, hidden] at positions start..start+s-1 -> q_nope [s, b, h, dn], q_rope [s, b, h, dr]
    (roped), c_kv [b, s, c] (normed), k_rope [b, s, dr] (roped). ``corr``: per-request adapter deltas."""
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
    emb, mscale = attn.rotary_pos_emb(start + s)  # [start + s, 1, 1, dr]
    emb = emb[start:start + s]
    q_rope = apply_rotary_pos_emb(q[..., dn:], emb, config=cfg, mscale=mscale)
    k_rope = apply_rotary_pos_emb(k_rope.unsqueeze(2), emb, config=cfg, mscale=mscale).squeeze(2)  # [s, b, dr]
    c_kv = attn.kv_layernorm(c_kv)
    return q[..., :dn], q_rope, c_kv.transpose(0, 1), k_rope.transpose(0, 1)


def absorbed_attention(hidden, attn, w_uk, w_uv, cache, layer: int, corr=NONE, backend: str = "torch"):
    """hidden [s, b, hidden] -> attention output [s, b, hidden]; writes this layer's new latents to
    ``cache`` (positions cache.length onwards). w_uk [h, dn, c], w_uv [h, dv, c]; ``corr``: per-request
    adapter deltas (inference/adapters.py); ``backend="triton"``: decode steps through
    ``triton_decode.latent_decode_attention`` (prefill stays in einsums)."""
    s, b, _ = hidden.shape
    start = cache.length
    q_nope, q_rope, c_kv, k_rope = project(hidden, attn, start, corr)
    c_all, k_all = cache.write(layer, c_kv, k_rope)  # [b, t, c], [b, t, dr]
    q_lat = corr.q_lat(q_nope, torch.einsum("sbhd,hdc->bshc", q_nope, w_uk))
    if backend == "triton" and s == 1:  # decode: one kernel over the cache, every head per tile load
        from nemo_mla_lora.inference.triton_decode import latent_decode_attention

        lengths = torch.full((b,), c_all.shape[1], dtype=torch.int32, device=hidden.device)
        o_lat = latent_decode_attention(q_lat[:, 0], q_rope[0], c_all, k_all, lengths, attn.softmax_scale)
        o_lat = o_lat.to(c_all.dtype)[:, None]  # [b, 1, h, c]
    else:
        o_lat = _attend(q_lat, q_rope, c_all, k_all, start, attn.softmax_scale)
    o = corr.o(o_lat, torch.einsum("bshc,hdc->sbhd", o_lat, w_uv)).reshape(s, b, -1)  # [s, b, h * dv]
    out, bias = attn.linear_proj(o)
    out = corr.linear("linear_proj", o, out)
    return out if bias is None else out + bias


def _attend(q_lat, q_rope, c_all, k_all, start: int, softmax_scale: float):
    """The latent attention in einsums: q_lat [b, s, h, c], q_rope [s, b, h, dr] -> o_lat [b, s, h, c]."""
    s = q_lat.shape[1]
    scores = torch.einsum("bshc,btc->bhst", q_lat, c_all) + torch.einsum("sbhd,btd->bhst", q_rope, k_all)
    t = c_all.shape[1]
    device = q_lat.device
    future = torch.arange(t, device=device)[None, :] > (start + torch.arange(s, device=device))[:, None]
    scores = scores if scores.dtype == torch.float64 else scores.float()  # softmax in fp32 (fp64 kept)
    scores = (scores * softmax_scale).masked_fill(future, float("-inf"))  # [b, h, s, t]
    probs = torch.softmax(scores, dim=-1).to(c_all.dtype)
    return torch.einsum("bhst,btc->bshc", probs, c_all)
