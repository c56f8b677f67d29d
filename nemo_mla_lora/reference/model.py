"""A plain-torch DeepSeek-V3 / V2 forward written from the MLA equations (docs/mla.md).

It reads a Megatron-named state dict and shares no code with Megatron-Core, NeMo or HF: it is the
independent oracle for parity tests. LoRA deltas are applied unmerged: ``adapters[module] = (A [r, in],
B [out, r], scale)`` with B full-height (rows outside a part-selective adapter are zero).

Index legend: b batch, s/t positions (query/key), h heads, d head dim, c latent, r LoRA rank.
"""

import math

import torch
import torch.nn.functional as F

from nemo_mla_lora.arch.mla_spec import MLASpec


def linear(x, state, adapters, name):
    """y = x W^T (+ s (x A^T) B^T when ``name`` has an adapter)."""
    y = x @ state[f"{name}.weight"].T
    if adapters and name in adapters:
        a, b, scale = adapters[name]
        y = y + scale * ((x @ a.T) @ b.T)
    return y


def rms_norm(x, weight, eps):
    x32 = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rope_inv_freq(spec: MLASpec) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [d/2] for the rope dims and the cos/sin scale (yarn, or plain rope)."""
    d, base = spec.qk_rope_head_dim, spec.rope_base
    pos_freqs = base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    if spec.rope_type != "yarn":
        return 1.0 / pos_freqs, 1.0
    factor, original = spec.rope_factor, spec.rope_original_max_positions

    def correction_dim(num_rotations):
        return d * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(spec.rope_beta_fast)), 0)
    high = min(math.ceil(correction_dim(spec.rope_beta_slow)), d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1.0 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, spec.rope_attention_factor


def rope_cos_sin(spec: MLASpec, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [s, d] for positions [s]."""
    inv_freq, scale = rope_inv_freq(spec)
    freqs = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # [s, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [s, d]
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x, cos, sin):
    """x: [..., s, (h,) d], rope dims stored interleaved (DeepSeek): de-interleave, then rotate halves."""
    x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def mla_projections(x, state, adapters, p, spec: MLASpec, cos, sin):
    """The MLA projections for x [b, s, hidden] -> q_nope [b,s,h,dn], q_rope [b,s,h,dr], c_kv [b,s,c],
    k_rope [b,s,dr] (rope applied; the shared key of all heads)."""
    b, s, _ = x.shape
    h, dn, dr, c = spec.num_heads, spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.kv_lora_rank
    if spec.q_lora_rank is None:
        q = linear(x, state, adapters, f"{p}.linear_q_proj")
    else:
        c_q = rms_norm(
            linear(x, state, adapters, f"{p}.linear_q_down_proj"),
            state[f"{p}.q_layernorm.weight"],
            spec.latent_norm_eps,
        )  # [b, s, rq]
        q = linear(c_q, state, adapters, f"{p}.linear_q_up_proj")
    q = q.view(b, s, h, dn + dr)
    q_nope, q_rope = q[..., :dn], q[..., dn:]
    kv = linear(x, state, adapters, f"{p}.linear_kv_down_proj")  # [b, s, c + dr]
    c_kv = rms_norm(kv[..., :c], state[f"{p}.kv_layernorm.weight"], spec.latent_norm_eps)
    k_rope = apply_rope(kv[..., c:], cos, sin)  # [b, s, dr]
    q_rope = apply_rope(q_rope, cos[:, None, :], sin[:, None, :])  # [b, s, h, dr]
    return q_nope, q_rope, c_kv, k_rope


def mla_attention(x, state, adapters, p, spec: MLASpec, cos, sin):
    """Materialized MLA: up-project c_kv to per-head K (nope) and V, then causal softmax attention."""
    b, s, _ = x.shape
    h, dn, dv = spec.num_heads, spec.qk_nope_head_dim, spec.v_head_dim
    q_nope, q_rope, c_kv, k_rope = mla_projections(x, state, adapters, p, spec, cos, sin)
    kv = linear(c_kv, state, adapters, f"{p}.linear_kv_up_proj").view(b, s, h, dn + dv)
    k_nope, v = kv[..., :dn], kv[..., dn:]  # [b, t, h, dn], [b, t, h, dv]
    scores = torch.einsum("bshd,bthd->bhst", q_nope, k_nope) + torch.einsum("bshd,btd->bhst", q_rope, k_rope)
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    scores = (scores * spec.softmax_scale).masked_fill(causal, float("-inf"))
    probs = torch.softmax(scores.float() if scores.dtype != torch.float64 else scores, dim=-1).to(x.dtype)
    o = torch.einsum("bhst,bthd->bshd", probs, v).reshape(b, s, h * dv)
    return linear(o, state, adapters, f"{p}.linear_proj")


def gated_mlp(x, state, adapters, p):
    gate, up = linear(x, state, adapters, f"{p}.linear_fc1").chunk(2, dim=-1)
    return linear(F.silu(gate) * up, state, adapters, f"{p}.linear_fc2")


def route(tokens, state, p, spec: MLASpec) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's routing of tokens [n, hidden] -> chosen experts [n, k] and their scores [n, E] (at least fp32).

    V2: softmax scores; greedy top-k, or group_limited_greedy (groups ranked by their best expert).
    V3: sigmoid scores plus ``expert_bias`` for the choice only; groups ranked by their two best biased scores."""
    acc = torch.float64 if tokens.dtype == torch.float64 else torch.float32  # router in at least fp32
    logits = tokens.to(acc) @ state[f"{p}.router.weight"].to(acc).T  # [n, E]
    n, e, g = logits.shape[0], spec.num_experts, spec.moe_num_groups
    if spec.moe_score_function == "softmax":
        scores = torch.softmax(logits, dim=-1)
        choice = scores
    else:
        scores = torch.sigmoid(logits)
        choice = scores + state[f"{p}.router.expert_bias"].to(acc) if spec.moe_expert_bias else scores
    if spec.moe_topk_method == "greedy" or g == 1:
        return choice.topk(spec.moe_topk, dim=-1)[1], scores
    grouped = choice.view(n, g, e // g)  # [n, g, E/g]
    group_scores = (
        grouped.amax(-1) if spec.moe_topk_method == "group_limited_greedy" else grouped.topk(2, -1)[0].sum(-1)
    )
    keep_groups = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(spec.moe_group_topk, dim=-1)[1], 1)
    keep = keep_groups[:, :, None].expand(n, g, e // g).reshape(n, e).bool()  # [n, E]
    return choice.masked_fill(~keep, float("-inf")).topk(spec.moe_topk, dim=-1)[1], scores


def moe_routing(tokens, state, p, spec: MLASpec, top: torch.Tensor | None = None):
    """Chosen experts [n, k] and their weights [n, k] for tokens [n, hidden]: ``route``'s choice (or ``top``,
    replayed), its scores renormalised if ``moe_norm_topk_prob``, times the scaling factor."""
    chosen, scores = route(tokens, state, p, spec)  # [n, k], [n, E]
    top = chosen if top is None else top
    weights = scores.gather(1, top)  # [n, k]
    if spec.moe_norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return top, weights * spec.moe_scaling_factor


def moe_experts(tokens, top, weights, state, adapters, p, experts, out):
    """Adds each of ``experts``' gated MLP on the tokens [n, hidden] that chose it, times its weight, into
    ``out`` [n, hidden] (in place); the experts' tensors are the only ones read."""
    for expert in experts:
        rows, slot = torch.where(top == expert)
        if rows.numel():
            y = gated_mlp(tokens[rows], state, adapters, f"{p}.experts.local_experts.{expert}")
            out.index_add_(0, rows, y * weights[rows, slot, None].to(y.dtype))
    return out


def moe(x, state, adapters, p, spec: MLASpec, routing: dict | None = None):
    """DeepSeek MoE: ``moe_routing``, each chosen expert weighted (``moe_experts``), plus the shared experts.

    ``routing`` (optional) records the chosen experts per module (``routing[p]`` absent: [n, k] is
    stored) or replays them (present): comparisons of two weight sets then cannot differ by a top-k
    tie flipping, only by the weights themselves."""
    shape = x.shape
    tokens = x.reshape(-1, shape[-1])  # [n, hidden]
    replay = routing.get(p) if routing is not None else None
    top, weights = moe_routing(tokens, state, p, spec, None if replay is None else replay.reshape(-1, spec.moe_topk))
    if routing is not None and replay is None:
        routing[p] = top.view(*shape[:-1], spec.moe_topk)
    out = moe_experts(tokens, top, weights, state, adapters, p, range(spec.num_experts), torch.zeros_like(tokens))
    if spec.shared_expert_ffn_hidden_size:
        out = out + gated_mlp(tokens, state, adapters, f"{p}.shared_experts")
    return out.view(shape)


def decoder_layer(x, state, adapters, layer: int, spec: MLASpec, cos, sin, attention=mla_attention, routing=None):
    p = f"decoder.layers.{layer}"
    x = x + attention(
        rms_norm(x, state[f"{p}.input_layernorm.weight"], spec.norm_eps),
        state,
        adapters,
        f"{p}.self_attention",
        spec,
        cos,
        sin,
    )
    hidden = rms_norm(x, state[f"{p}.pre_mlp_layernorm.weight"], spec.norm_eps)
    if spec.is_moe_layer(layer):
        return x + moe(hidden, state, adapters, f"{p}.mlp", spec, routing)
    return x + gated_mlp(hidden, state, adapters, f"{p}.mlp")


def forward(tokens, state, spec: MLASpec, adapters=None, attention=mla_attention, routing=None):
    """Logits [b, s, vocab] for tokens [b, s]; ``routing``: see ``moe``."""
    x = state["embedding.word_embeddings.weight"][tokens]
    cos, sin = rope_cos_sin(spec, torch.arange(tokens.shape[1]), x.dtype)
    for layer in range(spec.num_layers):
        x = decoder_layer(x, state, adapters, layer, spec, cos, sin, attention, routing)
    x = rms_norm(x, state["decoder.final_layernorm.weight"], spec.norm_eps)
    return x @ output_weight(state, spec).T


def output_weight(state, spec: MLASpec) -> torch.Tensor:
    """The output layer's weight [vocab, hidden]: the embedding's when the model ties them."""
    return state["embedding.word_embeddings.weight" if spec.tie_word_embeddings else "output_layer.weight"]
