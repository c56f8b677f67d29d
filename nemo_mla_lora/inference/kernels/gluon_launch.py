"""The host side of the warp-specialised Gluon decode kernel (``gluon_decode``): where it can run (Triton's Gluon,
DeepSeek's c = 512 and d = 64, heads in blocks of 64, a sm_90 GPU, a bf16 cache laid out for TMA), how many splits
of the positions a call takes, and the call itself (checks, split buffers, launch, merge).
Index legend: b batch, h heads, t cached positions, c latent, d rope dim.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from nemo_mla_lora.inference.kernels.gluon_decode import (
    _GLUON_ERROR,
    BLOCK_H,
    BLOCK_T,
    LATENT,
    ROPE,
    STAGES,
    _ws_decode_kernel,
    launch_args,
)
from nemo_mla_lora.inference.kernels.gluon_seesaw import _seesaw_decode_kernel
from nemo_mla_lora.inference.kernels.triton_decode import merge_splits, split_buffers


class Schedule(NamedTuple):
    """How the two consumer warpgroups share the work: the kernel (all take ``launch_args``' arguments), positions
    per cache tile and tiles in shared memory at once (Q's 72 KiB + stages x tile within sm_90's 227 KiB)."""

    kernel: object
    block_t: int
    stages: int


# ``gluon_decode``'s ping-pong (each softmax waits for the other's P) and ``gluon_seesaw``'s (a softmax waits for the
# other's row max alone; stages loaded and released in halves), the latter also with tiles of 32 positions in four
# stages (the same bytes in flight, three tiles of slack between a stage's release and its next use instead of one).
# The default is the one that has run on a GPU; the seesaw kernels have not yet (their source is checked on the CPU
# through tests/support/gluon_emulator.py, their speed is not known).
KERNELS = {
    "pingpong": Schedule(_ws_decode_kernel, BLOCK_T, STAGES),
    "seesaw": Schedule(_seesaw_decode_kernel, BLOCK_T, STAGES),
    "seesaw_t32": Schedule(_seesaw_decode_kernel, 32, 4),
}
SCHEDULE = "pingpong"


def device_problem(device: torch.device | str, latent: int, rope: int, heads: int) -> str | None:
    """Why the kernel cannot run for a model of these dims on ``device`` (None: it can, given a cache laid out as
    ``unavailable`` asks): Triton's Gluon, c = 512 and d = 64, heads in blocks of 64, a sm_90 GPU.

    Args:
        device: where the cache lives.
        latent, rope: the model's kv_lora_rank (c) and qk_rope_head_dim (d).
        heads: query heads per batch row.
    """
    if _GLUON_ERROR:
        return _GLUON_ERROR
    if (latent, rope) != (LATENT, ROPE):
        return f"the Gluon decode kernel is built for c = {LATENT}, d = {ROPE}; got c = {latent}, d = {rope}"
    if heads % BLOCK_H:
        return f"the Gluon decode kernel takes heads in blocks of {BLOCK_H}; got {heads} heads"
    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        where = device if device.type != "cuda" else f"sm_{''.join(map(str, torch.cuda.get_device_capability(device)))}"
        return f"the Gluon decode kernel is compiled for sm_90a (Hopper); expected a sm_90 GPU, got {where}"
    return None


def unavailable(c_kv: torch.Tensor, k_rope: torch.Tensor, heads: int) -> str | None:
    """Why ``latent_decode_attention_ws`` cannot run on this cache (None: it can).

    Args:
        c_kv: [b, t, 512] bf16 cache view (rows of one [b, P, 576] buffer, or its own tensor), unit last stride.
        k_rope: [b, t, 64] bf16 cache view with the same positions per row as c_kv.
        heads: query heads per batch row (a multiple of 64).
    """
    if problem := device_problem(c_kv.device, c_kv.shape[-1], k_rope.shape[-1], heads):
        return problem
    if c_kv.dtype != torch.bfloat16 or k_rope.dtype != torch.bfloat16:
        return f"the Gluon decode kernel reads a bf16 cache; got c_kv {c_kv.dtype}, k_rope {k_rope.dtype}"
    return _layout_problem(c_kv, k_rope)


def _layout_problem(c_kv: torch.Tensor, k_rope: torch.Tensor) -> str | None:
    """TMA's terms on the cache views: unit last stride, 16-byte aligned bases and row strides, rows b * R + t."""
    for name, x in (("c_kv", c_kv), ("k_rope", k_rope)):
        if x.stride(-1) != 1 or x.stride(0) % x.stride(1) or (x.stride(1) * 2) % 16 or x.data_ptr() % 16:
            return (
                f"the Gluon decode kernel loads {name} by TMA: expected a unit last stride, 16-byte aligned base and "
                f"row stride, and a batch stride that is a whole number of rows; got strides {x.stride()}, "
                f"base {x.data_ptr()} (mod 16 = {x.data_ptr() % 16})"
            )
    if c_kv.shape[:2] != k_rope.shape[:2] or c_kv.stride(0) // c_kv.stride(1) != k_rope.stride(0) // k_rope.stride(1):
        return (
            f"c_kv and k_rope must hold the same positions per row: got shapes {tuple(c_kv.shape)}, "
            f"{tuple(k_rope.shape)} and strides {c_kv.stride()}, {k_rope.stride()}"
        )
    return None


# Positions per split at least: two 64-position tiles. On an H100 (graphed) batch 1 and 8 with 1K-4K positions ran
# 1.1-1.3x faster with twice the splits of a 256 floor (batch 1, 1K at 128 heads: 14.9 -> 11.1 us), and no shape
# where this floor adds splits was more than 1% slower.
POSITIONS_PER_SPLIT = 128


def default_ws_splits(b: int, h: int, t_max: int, device) -> int:
    """Splits of the positions for one wave of CTAs (one CTA per SM: its shared memory is the SM's), at least
    ``POSITIONS_PER_SPLIT`` positions per split; one split (no merge pass) when batch x head blocks fill the card."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    return max(1, min(triton.cdiv(t_max, POSITIONS_PER_SPLIT), sms // (b * (h // BLOCK_H))))


def latent_decode_attention_ws(
    q_lat,
    q_rope,
    c_kv,
    k_rope,
    lengths,
    scale: float,
    splits: int | None = None,
    max_length: int | None = None,
    schedule: str | None = None,
) -> torch.Tensor:
    """The warp-specialised Gluon decode (module docstring): same arguments and result as
    ``hopper_decode.latent_decode_attention_tma``.

    Args:
        q_lat: [b, h, 512] bf16 absorbed queries (any strides; made contiguous).
        q_rope: [b, h, 64] bf16 rope queries.
        c_kv: [b, t, 512] bf16 cache view, k_rope: [b, t, 64] (``unavailable`` lists the terms).
        lengths: [b] int, row i attends to its positions 0 .. lengths[i] - 1 (each >= 1, <= t).
        scale: the softmax scale.
        splits: splits of the positions (default ``default_ws_splits``); one split writes the output directly.
        max_length: an upper bound of ``lengths`` known on the host (no device sync: CUDA-graph safe).
        schedule: the consumers' schedule, a key of ``KERNELS`` (default ``SCHEDULE``).

    Returns:
        o_lat [b, h, 512] bf16. Raises ValueError with the reason where ``unavailable`` says no.
    """
    b, h, c = q_lat.shape
    kernel = KERNELS.get(schedule or SCHEDULE)
    if kernel is None:
        raise ValueError(f"latent_decode_attention_ws: schedule must be one of {sorted(KERNELS)}; got {schedule!r}")
    if problem := unavailable(c_kv, k_rope, h):
        raise ValueError(f"latent_decode_attention_ws: {problem}")
    if q_rope.shape != (b, h, ROPE) or c_kv.shape[0] != b or q_lat.dtype != torch.bfloat16:
        raise ValueError(
            f"latent_decode_attention_ws: expected q_lat [b, h, {LATENT}] and q_rope [b, h, {ROPE}] bf16 and a cache "
            f"of b = {b} rows; got q_lat {tuple(q_lat.shape)} {q_lat.dtype}, q_rope {tuple(q_rope.shape)}, "
            f"c_kv {tuple(c_kv.shape)}"
        )
    t_max = max_length if max_length is not None else int(lengths.max())
    if t_max > c_kv.shape[1]:
        raise ValueError(f"latent_decode_attention_ws: lengths up to {t_max} but the cache holds {c_kv.shape[1]}")
    q_lat, q_rope, lengths = _aligned(q_lat), _aligned(q_rope), lengths.to(torch.int32)
    splits = splits or default_ws_splits(b, h, t_max, q_lat.device)
    grid, args, kwargs, (out, acc, m, l_sum) = launch_plan(
        kernel, q_lat, q_rope, c_kv, k_rope, lengths, scale, t_max, splits
    )
    kernel.kernel[grid](*args, **kwargs)
    merge_splits(acc, m, l_sum, out)
    return out


def launch_plan(kernel: Schedule, q_lat, q_rope, c_kv, k_rope, lengths, scale: float, t_max: int, splits: int):
    """The split buffers and the launch of ``kernel`` for tensors ``latent_decode_attention_ws`` has checked and
    aligned: (grid, args, kwargs, (out, acc, m, l_sum)), acc being out itself with one split. Also what the CPU
    compile check and the Gluon emulator launch.

    Args:
        kernel: a value of ``KERNELS``.
        q_lat, q_rope, c_kv, k_rope, lengths, scale: as ``latent_decode_attention_ws`` takes them.
        t_max: positions the kernel may read per row; splits: splits of them (fewer where chunks would be empty).
    """
    chunk, _, out, acc, m, l_sum = split_buffers(q_lat, t_max, splits, kernel.block_t)
    tensors = (q_lat, q_rope, c_kv, k_rope, lengths)
    grid, args, kwargs = launch_args(*tensors, scale, chunk, acc, m, l_sum, kernel.block_t, kernel.stages)
    return grid, args, kwargs, (out, acc, m, l_sum)


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """Contiguous with a 16-byte aligned base (a TMA descriptor's terms)."""
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()
