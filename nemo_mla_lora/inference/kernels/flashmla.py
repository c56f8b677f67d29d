"""FlashMLA's Hopper dense decode (the ``flash_mla`` package, e.g. the ``sgl-flash-mla`` wheel: its legacy SM90
kernels) over the engine's latent cache, as an optional backend beside ``hopper_decode`` / ``triton_decode``.

FlashMLA reads a paged cache [pages, 64, 1, c + dr] (each token's c_kv and k_rope side by side) through a block
table [b, pages per row] and queries [b, s_q, h, c + dr]. ``LatentKVCache`` keeps exactly that layout: one buffer
[L, b, P, c + dr] (P a multiple of 64) whose c_kv / k_rope views the other kernels read, so one layer's buffer is
FlashMLA's cache as it is (no copy), row i's pages being i * P/64 .. (i + 1) * P/64 - 1.

    o_lat[b, h] = softmax_t(scale * (q_lat . c_kv(t) + q_rope . k_rope(t))) . c_kv(t)     [b, h, c]

Only the decoding step (one new position per row) and DeepSeek's dims (c = 512, dr = 64) are FlashMLA's; the rest
stays ours. Index legend: b batch, h heads, t cached positions, c latent, dr rope dim.
"""

import functools

import torch

from nemo_mla_lora.inference.kernels import graph_choice

PAGE = 64  # FlashMLA's page block size: the engine's cache (``inference/cache.py``) pads its rows to it
LATENT, ROPE = 512, 64  # the dims FlashMLA's MLA kernels are built for
# Where FlashMLA's decode is faster than ours (bench/README.md, "Hopper decode kernels": the full sweep on one H100,
# 16/64/128 heads x batch 1-128 x context 1K-32K): from 64 heads on, once there is work for its persistent grid,
# h x b x t >= 4M (batch 8 x 4K at 128 heads: 0.048 against 0.063 ms) or one row of 32K positions or more (which
# ours spreads over too few programs: 0.076 against 0.159 ms at 64 heads). Below that ours launch faster (64 heads,
# batch 1, 4K: 0.013 against FlashMLA's 0.049 ms); at 16 heads ours are within 5% everywhere.
FASTER_FROM_HEADS = 64
FASTER_FROM_WORK = 1 << 22  # h x b x t
FASTER_FROM_POSITIONS = 1 << 15  # t, at any batch
# For a CUDA graph (``graph_choice``) ours is the Gluon kernel at every shape of 64-head blocks (``hopper_decode``),
# and the graphed H100 sweep with it (bench/README.md, 4.3) has FlashMLA ahead only from 128 heads with h x b x t >=
# 16M (batch 32 x 4K: 0.098 against 0.110 ms; 8 x 32K: 0.147 against 0.202; 128 x 1K even) and at two 64-head shapes
# taken as ours: one row of 32K positions (0.077 against 0.117 ms, where ours were held back by the merge pass since
# rewritten) and 128 x 32K (1.676 against 1.720). Below it ours are faster (128 heads, 8 x 4K: 0.040 against 0.049).
GRAPHED_FROM_HEADS = 128
GRAPHED_FROM_WORK = 1 << 24  # h x b x t


def _dims_problem(latent: int, rope: int) -> str | None:
    if (latent, rope) == (LATENT, ROPE):
        return None
    return f"FlashMLA's MLA decode needs kv_lora_rank={LATENT}, qk_rope_head_dim={ROPE}; got {latent}, {rope}"


def unavailable(device: torch.device | str | None = None, dims: tuple[int, int] | None = None) -> str | None:
    """Why FlashMLA's decode cannot run here (None: it can): the package, its SM90 kernels, a Hopper GPU, and
    (``dims``: the model's kv_lora_rank and qk_rope_head_dim) the dims its kernels are built for."""
    if dims is not None and (problem := _dims_problem(*dims)):
        return problem
    if not torch.cuda.is_available():
        return "FlashMLA decodes on a CUDA GPU and this machine has none"
    try:
        import flash_mla
    except Exception as err:  # ImportError, or an extension that does not load
        return f"the flash_mla package does not import ({type(err).__name__}: {err}); install sgl-flash-mla"
    if not flash_mla.has_legacy():
        return "this flash_mla build has no SM90 (legacy) kernels, where its dense decode lives"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        return f"FlashMLA's dense decode is built for SM90 (Hopper); this GPU is SM{major}{minor}"
    return None


def paged(c_kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cache [b * P/64, 64, 1, c + dr], block table [b, P/64] int32) over the buffer that one layer's views
    c_kv [b, t, c] and k_rope [b, t, dr] (``LatentKVCache.write``'s, t <= P) come from; no copy. Raises if they
    are not such views."""
    b, _, c = c_kv.shape
    width = c + k_rope.shape[-1]  # c + dr
    rows = c_kv.stride(0) // width if width else 0  # P
    same_buffer = (
        c_kv.stride()[1:] == (width, 1)
        and k_rope.stride() == c_kv.stride()
        and k_rope.data_ptr() == c_kv.data_ptr() + c * c_kv.element_size()
        and c_kv.stride(0) == rows * width
        and rows % PAGE == 0
    )
    if not same_buffer:
        raise ValueError(
            f"FlashMLA reads c_kv and k_rope side by side in pages of {PAGE} positions: expected views of one "
            f"[b, P, c + dr] buffer (LatentKVCache's), got c_kv {tuple(c_kv.shape)} strides {c_kv.stride()}, "
            f"k_rope {tuple(k_rope.shape)} strides {k_rope.stride()}"
        )
    buffer = c_kv.as_strided((b, rows, width), (rows * width, width, 1))  # [b, P, c + dr]
    return buffer.view(b * rows // PAGE, PAGE, 1, width), _block_table(b, rows // PAGE, str(c_kv.device))


@functools.lru_cache(maxsize=16)
def _block_table(b: int, pages: int, device: str) -> torch.Tensor:
    return torch.arange(b * pages, dtype=torch.int32, device=device).view(b, pages)  # row i: its own pages


def flashmla_decode(q_lat, q_rope, c_kv, k_rope, lengths, scale: float, max_length: int | None = None):
    """q_lat [b, h, c], q_rope [b, h, dr], the cache views c_kv [b, t, c] / k_rope [b, t, dr] (``paged``), lengths
    [b] (row i attends to its positions 0 .. lengths[i] - 1) -> o_lat [b, h, c]. ``max_length`` is accepted for
    the other kernels' signature; FlashMLA schedules from ``lengths`` on the device."""
    import flash_mla

    if problem := _dims_problem(q_lat.shape[-1], q_rope.shape[-1]):
        raise ValueError(problem)
    cache, table = paged(c_kv, k_rope)
    q = torch.cat([q_lat, q_rope], dim=-1).unsqueeze(1)  # [b, 1, h, c + dr]
    schedule, _ = flash_mla.get_mla_metadata()  # filled by the call from these lengths
    out, _ = flash_mla.flash_mla_with_kvcache(
        q, cache, table, lengths.to(torch.int32), LATENT, schedule, softmax_scale=scale, causal=False, use_legacy=True
    )
    return out[:, 0]  # [b, h, c]


def flashmla_is_faster(h: int, b: int, t: int, graphed: bool = False) -> bool:
    """Whether FlashMLA's decode beats ours for h heads, b rows and t positions read per row (measured: the constants
    above); a function of host values, so a CUDA graph captures one choice per shape.

    Args:
        h: query heads; b: rows of the batch; t: cached positions each row's decode reads.
        graphed: whether kernels are chosen for a CUDA graph (``graph_choice.for_graph``; ours: the Gluon kernel).
    """
    if graphed:
        return h >= GRAPHED_FROM_HEADS and h * b * t >= GRAPHED_FROM_WORK
    return h >= FASTER_FROM_HEADS and (h * b * t >= FASTER_FROM_WORK or t >= FASTER_FROM_POSITIONS)


def flashmla_or_ours(q_lat, q_rope, c_kv, k_rope, lengths, scale: float, max_length: int | None = None):
    """The ``flashmla`` backend's choice per shape (``flashmla_is_faster``, eager or for a CUDA graph as
    ``graph_choice`` says): FlashMLA's decode where it is faster, ours (``hopper_decode.decode_attention``) elsewhere.

    Args:
        q_lat, q_rope: the queries, [b, h, c] and [b, h, dr]; h and b decide the kernel, with t.
        c_kv, k_rope: one layer's cache views, [b, t, c] and [b, t, dr] (``LatentKVCache``'s).
        lengths: [b] int32, row i attends to positions 0 .. lengths[i] - 1.
        scale: the softmax scale.
        max_length: positions the kernels may read (ours use it; FlashMLA schedules from ``lengths``): the t of
            the choice (default: the views' t).

    Returns:
        o_lat [b, h, c], as ``flashmla_decode``.
    """
    b, h, _ = q_lat.shape
    if flashmla_is_faster(h, b, max_length or c_kv.shape[1], graph_choice.for_graph()):
        return flashmla_decode(q_lat, q_rope, c_kv, k_rope, lengths, scale, max_length)
    from nemo_mla_lora.inference.kernels.hopper_decode import decode_attention

    return decode_attention(q_lat, q_rope, c_kv, k_rope, lengths, scale, max_length=max_length)
