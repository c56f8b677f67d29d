"""The memory-traffic floor of LoRA adapters run as passes of their own beside the base's GEMMs, per training step
of ``lora_overhead.py``'s V3-shaped layer: what no adapter kernel outside the base GEMM can go below.

    python bench/lora_traffic.py --base-ms 29.35 --copy-gbps 2938     # the floor as a ratio to a measured step

Per adapted linear y = x W^T (x [t, i], W [o, i]) with y += s (x A^T) B^T (A [r, i], B [o, r]), bf16, each tensor of
t rows read or written once per pass it enters:
  forward   hs = x A^T reads x; y += hs B^T reads and writes y                             2 t (i + 2 o) bytes
  backward  g B and g^T hs read g (two GEMMs); dx += (g B) A reads and writes dx;
            A's gradient (g B)^T x reads x                                                 2 t (2 o + 3 i) bytes
together 8 t (i + o) bytes (the rank-r tensors and the factors are small beside these and are left out). Rows t:
the tokens for attention, the shared expert and dense MLPs; tokens x top-k for the routed experts (each token's
rows in top-k experts). Index legend: t rows, i input width, o output width, r rank.
"""

import argparse
import json
import sys

from lora_overhead import V3_LAYER  # bench/ is this script's directory


def adapted_linears(layer: dict, tokens: int) -> dict[str, tuple[int, int, int]]:
    """Leaf name -> (rows t, input width i, output width o) of every linear ``all_linear`` adapts in the layer.

    Args:
        layer: ``lora_overhead.V3_LAYER``-style dims (Megatron config names).
        tokens: tokens per step (sequence x batch).
    """
    h, heads = layer["hidden_size"], layer["num_attention_heads"]
    q_head = layer["qk_head_dim"] + layer["qk_pos_emb_head_dim"]  # qk_nope_head_dim + qk_rope_head_dim
    expert, shared = layer["moe_ffn_hidden_size"], layer["moe_shared_expert_intermediate_size"]
    routed = tokens * layer["moe_router_topk"]
    return {
        "linear_q_down_proj": (tokens, h, layer["q_lora_rank"]),
        "linear_q_up_proj": (tokens, layer["q_lora_rank"], heads * q_head),
        "linear_kv_down_proj": (tokens, h, layer["kv_lora_rank"] + layer["qk_pos_emb_head_dim"]),
        "linear_kv_up_proj": (tokens, layer["kv_lora_rank"], heads * (layer["qk_head_dim"] + layer["v_head_dim"])),
        "linear_proj": (tokens, heads * layer["v_head_dim"], h),
        "shared_experts.linear_fc1": (tokens, h, 2 * shared),  # gated: gate and up in one weight
        "shared_experts.linear_fc2": (tokens, shared, h),
        "experts.linear_fc1": (routed, h, 2 * expert),
        "experts.linear_fc2": (routed, expert, h),
    }


PLACEMENTS = ("nemo_official", "all_linear")  # lora_overhead.py's summary placements


def placement_leaves(linears: dict[str, tuple[int, int, int]], placement: str) -> tuple[str, ...]:
    """The linears of ``linears`` that ``placement`` adapts: their Megatron leaf name among its targets
    (``peft.placements``, what MLALoRA wraps)."""
    from nemo_mla_lora.peft import placements

    targets = placements.get(placement).targets
    return tuple(name for name in linears if name.rsplit(".", 1)[-1] in targets)


def floor_bytes(linears: dict[str, tuple[int, int, int]], leaves=None, element: int = 2) -> int:
    """8 t (i + o) bytes (``element`` bytes per value: 2 for bf16) summed over ``leaves`` (None: every linear)."""
    return sum(4 * element * t * (i + o) for name, (t, i, o) in linears.items() if leaves is None or name in leaves)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096, help="tokens per step (lora_overhead.py's seq x batch)")
    p.add_argument("--copy-gbps", type=float, help="the card's copy bandwidth, read + write (decode_roofline.roofs)")
    p.add_argument("--base-ms", type=float, help="the frozen layer's GPU time per step, to state the floor as a ratio")
    args = p.parse_args(argv)
    linears = adapted_linears(V3_LAYER, args.tokens)
    rows = {}
    for name in PLACEMENTS:
        gb = floor_bytes(linears, placement_leaves(linears, name)) / 1e9
        row = {"GB": round(gb, 3)}
        if args.copy_gbps:
            row["ms"] = round(1e3 * gb / args.copy_gbps, 3)
            if args.base_ms:
                row["x_base"] = round((args.base_ms + row["ms"]) / args.base_ms, 4)
        rows[name] = row
    json.dump(dict(tokens=args.tokens, copy_GBps=args.copy_gbps, base_ms=args.base_ms, floor=rows), sys.stdout,
              indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
