"""Absorption: the merged ``linear_kv_up_proj`` split per head into K and V up projections.

Megatron-Core's ``AbsorbedMLASelfAttention`` (megatron-core >= 0.17, experimental_attention_variant/
absorbed_mla.py) views the combined weight as [h, qk_nope_head_dim + v_head_dim, c] and stores
``linear_k_up_proj.weight`` = [:, :dn, :] as [h*dn, c] and ``linear_v_up_proj.weight`` = [:, dn:, :] as
[h*dv, c]; its load hook converts between that split layout and the combined one. We write exactly that.

Folding (optional, not the default): W_UQ(nope)^T W_UK per head and W_O W_UV per head as static
matrices. Exact, but larger and slower to decode unless qk_nope_head_dim > rq*c/(rq+c);
``fold_cost`` prints the numbers for the model at hand.
"""

import torch

from nemo_mla_lora.arch.mla_spec import MLASpec

K_UP, V_UP, KV_UP = "linear_k_up_proj.weight", "linear_v_up_proj.weight", "linear_kv_up_proj.weight"
Q_FOLDED, O_FOLDED = "linear_q_absorbed_proj.weight", "linear_o_absorbed_proj.weight"


def split_kv_up(kv_up: torch.Tensor, spec: MLASpec) -> tuple[torch.Tensor, torch.Tensor]:
    """[h*(dn+dv), c] -> K up [h*dn, c], V up [h*dv, c]."""
    h, dn, dv, c = spec.num_heads, spec.qk_nope_head_dim, spec.v_head_dim, spec.kv_lora_rank
    if tuple(kv_up.shape) != (h * (dn + dv), c):
        raise ValueError(
            f"linear_kv_up_proj.weight is {tuple(kv_up.shape)}, expected [{h * (dn + dv)}, {c}] "
            f"(heads {h} x (qk_nope_head_dim {dn} + v_head_dim {dv}), kv_lora_rank {c})"
        )
    per_head = kv_up.view(h, dn + dv, c)  # [h, dn+dv, c]
    return per_head[:, :dn, :].reshape(h * dn, c).contiguous(), per_head[:, dn:, :].reshape(h * dv, c).contiguous()


def join_kv_up(k_up: torch.Tensor, v_up: torch.Tensor, spec: MLASpec) -> torch.Tensor:
    """The inverse of ``split_kv_up``."""
    h, c = spec.num_heads, spec.kv_lora_rank
    return torch.cat([k_up.view(h, -1, c), v_up.view(h, -1, c)], dim=1).reshape(-1, c)


def absorb_layer(state: dict, prefix: str, spec: MLASpec, fold: bool = False) -> dict:
    """Replace ``{prefix}.linear_kv_up_proj.weight`` by the split K/V up projections (and, with
    ``fold``, add the folded products). Other entries pass through. ``prefix`` ends at self_attention."""
    out = {k: v for k, v in state.items() if k != f"{prefix}.{KV_UP}"}
    k_up, v_up = split_kv_up(state[f"{prefix}.{KV_UP}"], spec)
    out[f"{prefix}.{K_UP}"], out[f"{prefix}.{V_UP}"] = k_up, v_up
    if fold:
        out.update(fold_products(state, prefix, spec, k_up, v_up))
    return out


def fold_products(state: dict, prefix: str, spec: MLASpec, k_up, v_up) -> dict:
    """Folded per-head products, fp32 accumulated:
    q side: F_q[h] = W_UK[h]^T W_UQ_nope[h]: [h, c, rq or hidden];
    out side: F_o[h] = W_O[:, h] W_UV[h]: [hidden, h, c]."""
    h, dn, dr, dv, c = (
        spec.num_heads,
        spec.qk_nope_head_dim,
        spec.qk_rope_head_dim,
        spec.v_head_dim,
        spec.kv_lora_rank,
    )
    q_name = "linear_q_up_proj" if spec.q_lora_rank is not None else "linear_q_proj"
    w_uq = state[f"{prefix}.{q_name}.weight"].float().view(h, dn + dr, -1)[:, :dn, :]  # [h, dn, rq]
    w_uk = k_up.float().view(h, dn, c)
    w_uv = v_up.float().view(h, dv, c)
    w_o = state[f"{prefix}.linear_proj.weight"].float().view(-1, h, dv)  # [hidden, h, dv]
    dtype = k_up.dtype
    return {
        f"{prefix}.{Q_FOLDED}": torch.einsum("hdc,hdq->hcq", w_uk, w_uq).to(dtype),  # [h, c, rq]
        f"{prefix}.{O_FOLDED}": torch.einsum("ohd,hdc->ohc", w_o, w_uv).to(dtype),  # [hidden, h, c]
    }


def fold_cost(spec: MLASpec) -> dict:
    """Parameters per layer and decode FLOPs per token per layer (q-side + out-side), split vs folded."""
    h, dn, dv, c, hid = spec.num_heads, spec.qk_nope_head_dim, spec.v_head_dim, spec.kv_lora_rank, spec.hidden_size
    rq = spec.q_lora_rank if spec.q_lora_rank is not None else hid
    split_params = h * dn * rq + h * dn * c + h * dv * c + hid * h * dv  # W_UQ(nope), W_UK, W_UV, W_O
    folded_params = h * c * rq + hid * h * c
    return {
        "split": {"params_per_layer": split_params, "decode_flops_per_token_per_layer": 2 * split_params},
        "folded": {"params_per_layer": folded_params, "decode_flops_per_token_per_layer": 2 * folded_params},
        "folded_over_split": folded_params / split_params,
        "folding_pays_when": f"qk_nope_head_dim > rq*c/(rq+c) = {rq * c / (rq + c):.1f} (here {dn})",
    }
