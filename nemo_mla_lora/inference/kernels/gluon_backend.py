"""The engine's ``gluon`` decode backend: the warp-specialised Gluon kernel (``gluon_decode``) for every decode step
it can run, our TMA / portable kernels (``hopper_decode.decode_attention``) for the rest; and the per-shape choice
``decode_attention`` itself makes (``gluon_is_faster``: where the kernel beat our TMA kernel, eager and graphed).

The kernel is built for Hopper at 64 and 128 heads (blocks of 64 heads), DeepSeek's c = 512 and d = 64 and a bf16
cache laid out for TMA; the engine refuses the backend up front where it could never run
(``gluon_launch.device_problem``), and ``gluon_or_ours`` takes ours for a step whose tensors it cannot read (a
float32 cache, a layout TMA refuses).
Index legend: b batch, h heads, t cached positions, c latent, d rope dim.
"""

import torch

from nemo_mla_lora.inference.kernels import gluon_decode, gluon_launch, graph_choice

# Head blocks (b x h / 64) from which the Gluon kernel beat our TMA kernel in eager calls: on an H100 (bench/README.md,
# 4.3) it was 1.10-1.53x faster at 64-128 blocks and 1.7x slower at 2 and 32 blocks, where an eager call is mostly
# host time and the Gluon kernel's host path (four TMA descriptors, the split buffers, the merge launch) is the longer.
# Replayed from a CUDA graph (no host work per call), with ``gluon_launch.default_ws_splits``, it was as fast as the
# TMA kernel at batch 1 with 1K positions (within 1%) and faster at every other 64- and 128-head shape of the H100
# sweep, up to 2.4x.
FASTER_FROM_BLOCKS = 64


def gluon_is_faster(b: int, h: int, graphed: bool | None = None) -> bool:
    """Whether ``decode_attention`` takes the Gluon kernel for b rows of h heads (a function of host values: a
    CUDA graph captures one choice per shape).

    Args:
        b: rows of the batch; h: query heads.
        graphed: whether kernels are chosen for a CUDA graph (then every shape of 64-head blocks); None: ask
            ``graph_choice.for_graph``, only where the batch alone does not decide.
    """
    if h % gluon_decode.BLOCK_H:
        return False
    if b * (h // gluon_decode.BLOCK_H) >= FASTER_FROM_BLOCKS:
        return True
    return graph_choice.for_graph() if graphed is None else graphed


def gluon_reads(q_lat, c_kv, k_rope) -> bool:
    """Whether the Gluon kernel can run on these tensors (shapes, dtypes and strides only: no device sync)."""
    return q_lat.dtype == torch.bfloat16 and gluon_launch.unavailable(c_kv, k_rope, q_lat.shape[1]) is None


def gluon_or_ours(q_lat, q_rope, c_kv, k_rope, lengths, scale: float, max_length: int | None = None):
    """o_lat [b, h, c] by the Gluon kernel where ``gluon_launch.unavailable`` finds nothing against these tensors,
    else by ``hopper_decode.decode_attention``; the choice reads shapes, dtypes and strides only (no device sync:
    a CUDA graph captures one choice per shape).

    Args:
        q_lat, q_rope: the queries, [b, h, c] and [b, h, d].
        c_kv, k_rope: one layer's cache views, [b, t, c] and [b, t, d] (``LatentKVCache``'s).
        lengths: [b] int32, row i attends to positions 0 .. lengths[i] - 1.
        scale: the softmax scale.
        max_length: positions the kernels may read (default: the views' t).
    """
    if gluon_reads(q_lat, c_kv, k_rope):
        ws = gluon_launch.latent_decode_attention_ws
        return ws(q_lat, q_rope, c_kv, k_rope, lengths, scale, max_length=max_length)
    from nemo_mla_lora.inference.kernels.hopper_decode import decode_attention

    return decode_attention(q_lat, q_rope, c_kv, k_rope, lengths, scale, max_length=max_length)
