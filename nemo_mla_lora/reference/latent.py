"""The reference latent-cache forward on an absorbed checkpoint (plain torch; the oracle for ``verify``).

The cache holds, per layer and token, only c_kv (kv_lora_rank values, after the kv norm) and the
roped shared key k_rope (qk_rope_head_dim values). Attention runs in the latent space:

    q_lat[h]  = W_UK[h]^T q_nope[h]                      (b, s, h, c)
    score     = q_lat . c_kv(t) + q_rope[h] . k_rope(t)  (b, h, s, t), times the softmax scale
    o[h]      = W_UV[h] sum_t p(t) c_kv(t)               (b, s, h, dv)

Index legend: b batch, s new positions, t cached positions, h heads, d head dim, c latent.
"""

from dataclasses import dataclass, field

import torch

from nemo_mla_lora.arch.absorb import K_UP, V_UP
from nemo_mla_lora.arch.mla_spec import MLASpec
from nemo_mla_lora.reference.model import decoder_layer, linear, mla_projections, output_weight, rms_norm, rope_cos_sin


@dataclass
class LatentCache:
    """Per layer: c_kv [b, t, c] and k_rope [b, t, dr]."""

    c_kv: list = field(default_factory=list)
    k_rope: list = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.c_kv[0].shape[1] if self.c_kv else 0

    def values_per_token(self) -> int:
        return sum(c.shape[-1] + k.shape[-1] for c, k in zip(self.c_kv, self.k_rope))

    def append(self, layer: int, c_kv, k_rope):
        if layer == len(self.c_kv):
            self.c_kv.append(c_kv)
            self.k_rope.append(k_rope)
        else:
            self.c_kv[layer] = torch.cat([self.c_kv[layer], c_kv], dim=1)
            self.k_rope[layer] = torch.cat([self.k_rope[layer], k_rope], dim=1)
        return self.c_kv[layer], self.k_rope[layer]


def latent_attention(x, state, p, spec: MLASpec, cos, sin, cache: LatentCache, layer: int, start: int):
    """x [b, s, hidden] at positions start..start+s-1; appends to ``cache`` layer ``layer``."""
    b, s, _ = x.shape
    h, dn, dv, c = spec.num_heads, spec.qk_nope_head_dim, spec.v_head_dim, spec.kv_lora_rank
    q_nope, q_rope, c_kv, k_rope = mla_projections(x, state, None, p, spec, cos, sin)
    c_all, k_rope_all = cache.append(layer, c_kv, k_rope)  # [b, t, c], [b, t, dr]
    w_uk = state[f"{p}.{K_UP}"].view(h, dn, c)
    w_uv = state[f"{p}.{V_UP}"].view(h, dv, c)
    q_lat = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)
    scores = torch.einsum("bshc,btc->bhst", q_lat, c_all) + torch.einsum("bshd,btd->bhst", q_rope, k_rope_all)
    t = c_all.shape[1]
    future = torch.arange(t)[None, :] > (start + torch.arange(s))[:, None]  # [s, t]
    scores = (scores * spec.softmax_scale).masked_fill(future, float("-inf"))
    probs = torch.softmax(scores if scores.dtype == torch.float64 else scores.float(), dim=-1).to(x.dtype)
    o_lat = torch.einsum("bhst,btc->bshc", probs, c_all)
    o = torch.einsum("bshc,hdc->bshd", o_lat, w_uv).reshape(b, s, h * dv)
    return linear(o, state, None, f"{p}.linear_proj")


def forward(tokens, state, spec: MLASpec, cache: LatentCache | None = None, routing: dict | None = None):
    """Logits [b, s, vocab] for tokens [b, s] appended after ``cache`` (prefill when empty).
    ``routing``: experts chosen for the whole sequence ([b, s_total, k] per MoE module) to replay."""
    cache = cache if cache is not None else LatentCache()
    start = cache.length
    chunk = None if routing is None else {p: r[:, start : start + tokens.shape[1]] for p, r in routing.items()}
    x = state["embedding.word_embeddings.weight"][tokens]
    cos, sin = rope_cos_sin(spec, torch.arange(start, start + tokens.shape[1]), x.dtype)
    for layer in range(spec.num_layers):

        def attention(x_, state_, adapters_, p_, spec_, cos_, sin_, layer=layer):
            return latent_attention(x_, state_, p_, spec_, cos_, sin_, cache, layer, start)

        x = decoder_layer(x, state, None, layer, spec, cos, sin, attention, chunk)
    x = rms_norm(x, state["decoder.final_layernorm.weight"], spec.norm_eps)
    return x @ output_weight(state, spec).T, cache


def generate_logits(tokens, state, spec: MLASpec, prefill: int, routing: dict | None = None):
    """Prefill ``tokens[:, :prefill]`` then decode the rest one token at a time: (logits [b, s, vocab], cache)."""
    logits, cache = forward(tokens[:, :prefill], state, spec, routing=routing)
    steps = [logits]
    for i in range(prefill, tokens.shape[1]):
        step, cache = forward(tokens[:, i : i + 1], state, spec, cache, routing)
        steps.append(step)
    return torch.cat(steps, dim=1), cache


def latent_attention_steps(h, state, p: str, spec: MLASpec, prefill: int):
    """One layer's attention on its normalised input h [b, s, hidden] as a server runs it: prefill
    h[:, :prefill], then each later position one at a time, with this layer's latent cache.
    Returns (attention output [b, s, hidden], cache)."""
    cache, outputs = LatentCache(), []
    for start, end in [(0, prefill)] + [(t, t + 1) for t in range(prefill, h.shape[1])]:
        cos, sin = rope_cos_sin(spec, torch.arange(start, end), h.dtype)
        outputs.append(latent_attention(h[:, start:end], state, p, spec, cos, sin, cache, 0, start))
    return torch.cat(outputs, dim=1), cache


def decode_step(q_lat, q_rope, c_kv, k_rope, lengths, scale: float) -> torch.Tensor:
    """One decode step's latent attention in float64, the oracle of the decode kernels: q_lat [b, h, c],
    q_rope [b, h, d], c_kv [b, t, c], k_rope [b, t, d], row i attending to its first ``lengths[i]`` positions
    -> o_lat [b, h, c]."""
    t = c_kv.shape[1]
    s = (
        torch.einsum("bhc,btc->bht", q_lat.double(), c_kv.double())
        + torch.einsum("bhd,btd->bht", q_rope.double(), k_rope.double())
    ) * scale  # [b, h, t]
    s = s.masked_fill(torch.arange(t, device=s.device)[None, None, :] >= lengths[:, None, None], float("-inf"))
    return torch.einsum("bht,btc->bhc", torch.softmax(s, -1), c_kv.double())
