"""MLA-aware parts: which output rows of an MLA linear an adapter may change.

A part-selective adapter's B holds only the chosen rows, so the delta outside them is zero by
construction. Row layouts (global, i.e. before tensor-parallel sharding):

| target | layout of the output rows | parts |
|---|---|---|
| linear_kv_up_proj | per head [k_nope (qk_nope_head_dim), v (v_head_dim)], view [h, dn+dv] | k, v, kv |
| linear_kv_down_proj | [c_kv (kv_lora_rank), k_rope (qk_rope_head_dim)] | latent, rope, both |
| linear_q_up_proj / linear_q_proj | per head [q_nope, q_rope], view [h, dn+dr] | nope, rope, both |
"""

import torch

FULL = {"linear_kv_up_proj": "kv", "linear_kv_down_proj": "both", "linear_q_up_proj": "both", "linear_q_proj": "both"}
CHOICES = {
    "linear_kv_up_proj": ("k", "v", "kv"),
    "linear_kv_down_proj": ("latent", "rope", "both"),
    "linear_q_up_proj": ("nope", "rope", "both"),
    "linear_q_proj": ("nope", "rope", "both"),
}


def validate(parts: dict) -> None:
    for leaf, part in parts.items():
        if leaf not in CHOICES:
            raise ValueError(f"parts: {leaf!r} has no MLA parts; expected one of {sorted(CHOICES)}")
        if part not in CHOICES[leaf]:
            raise ValueError(f"parts: {leaf}={part!r}; expected one of {CHOICES[leaf]}")


def _per_head(num_heads: int, first: int, second: int, keep_first: bool) -> torch.Tensor:
    """[h * (first + second)] mask of the first (or second) block of every head's rows."""
    head = torch.zeros(first + second, dtype=torch.bool)
    head[:first] = keep_first
    head[first:] = not keep_first
    return head.repeat(num_heads)


def _dims(config) -> tuple[int, int, int, int, int]:
    """(heads, qk_nope, qk_rope, v, kv_lora_rank) from a Megatron config or an ``MLASpec``."""
    if hasattr(config, "qk_nope_head_dim"):
        return (
            config.num_heads,
            config.qk_nope_head_dim,
            config.qk_rope_head_dim,
            config.v_head_dim,
            config.kv_lora_rank,
        )
    return (
        config.num_attention_heads,
        config.qk_head_dim,
        config.qk_pos_emb_head_dim,
        config.v_head_dim,
        config.kv_lora_rank,
    )


def row_mask(leaf: str, part: str | None, config: object) -> torch.Tensor | None:
    """Global boolean mask over ``leaf``'s output rows for ``part``; None means every row.

    ``config``: a Megatron ``MLATransformerConfig`` (whose ``qk_head_dim`` is the nope part) or an ``MLASpec``."""
    if part is None or part == FULL.get(leaf):
        return None
    validate({leaf: part})
    h, nope, rope, v, c = _dims(config)
    if leaf == "linear_kv_up_proj":
        return _per_head(h, nope, v, keep_first=part == "k")
    if leaf == "linear_kv_down_proj":
        mask = torch.zeros(c + rope, dtype=torch.bool)
        mask[:c] = part == "latent"
        mask[c:] = part == "rope"
        return mask
    return _per_head(h, nope, rope, keep_first=part == "nope")
