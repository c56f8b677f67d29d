"""LoRA around a base linear the package does not compute (Transformer Engine's), with no pass of its own over the
input gradient or the output:

    x1, hs = lora_fork(x, A, scale)      x1 = x (a view), hs = scale * x A^T          [t, r]
    y      = base(x1)                    the base's own forward and backward (TE's GEMMs, FP8, overlap)
    y      = lora_onto(y, hs, B)         y += hs B^T, in y's buffer                    [t, o]

Autograd runs ``lora_fork``'s backward once both of its outputs have their gradients: the base's input
gradient gx1 [t, i] and the adapter's ghs = gy B [t, r]. It then accumulates gx = gx1 + scale * ghs A into
gx1's buffer (one GEMM with beta = 1), where the three-op adapter (``MLALoRAAdapter.add_to``) makes autograd
write a second [t, i] gradient and add the two (an elementwise pass over the layer's input, twice the
memory). ``lora_onto`` adds the adapter's output into the base's output buffer (``addmm_``; for grouped
experts one grouped GEMM and an in-place add), instead of a new [t, o] tensor.

The base must return a fresh input gradient (a linear's dgrad GEMM does; TE's do) and must not save its
output for backward (a linear does not): the first is written into, the second would fail autograd's
version check loudly. Experts: A [e, r, i], B [e, o, r] per group of rows (``counts``), as in ``lora_fn``.

Index legend: t tokens (rows), i in_features, o out_features, r LoRA rank, e group (expert).
"""

import torch

from nemo_mla_lora.peft.lora_fn import group_offsets, grouped_mm


class _Fork(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, scale: float, counts: list[int], offs):
        x2 = x.reshape(-1, x.shape[-1])  # [t, i]
        hs = grouped_mm(x2, a.transpose(1, 2), offs, counts).mul_(scale)  # [t, r]
        ctx.save_for_backward(x2, a)
        ctx.scale, ctx.counts, ctx.offs, ctx.shape = scale, counts, offs, x.shape
        return x.view_as(x), hs

    @staticmethod
    def backward(ctx, gx1, ghs):
        x2, a = ctx.saved_tensors
        counts, offs = ctx.counts, ctx.offs
        ga = gx = None
        if ghs is not None:
            gh = ghs.contiguous() * ctx.scale  # d/d(x A^T): [t, r]
            if ctx.needs_input_grad[1]:
                ga = grouped_mm(gh.T, x2, offs, counts)  # [e, r, i]
            if ctx.needs_input_grad[0]:
                gx = _accumulate_input_grad(gx1, gh, a, counts, offs, ctx.shape)
        elif ctx.needs_input_grad[0]:
            gx = gx1
        return gx, ga, None, None, None


def _accumulate_input_grad(gx1, gh, a, counts, offs, shape) -> torch.Tensor:
    """gx1 + gh_e A_e per group, in gx1's buffer where it can be written: [*shape]."""
    if gx1 is None:
        return grouped_mm(gh, a, offs, counts).view(shape)  # [t, i]
    g2 = gx1.reshape(-1, gx1.shape[-1])
    if len(counts) == 1 and g2.is_contiguous() and g2.data_ptr() == gx1.data_ptr():
        g2.addmm_(gh, a[0])  # the base's dgrad as the GEMM's C (beta = 1): no separate add
        return gx1
    return (g2 + grouped_mm(gh, a, offs, counts)).view(shape)


class _Onto(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, hs, b, counts: list[int], offs):
        y2 = y.view(-1, y.shape[-1]) if y.is_contiguous() else None  # [t, o]
        if y2 is not None and len(counts) == 1:
            y2.addmm_(hs, b[0].T)  # y + hs B^T, in y's buffer
        else:
            y.add_(grouped_mm(hs, b.transpose(1, 2), offs, counts).view(y.shape))
        ctx.mark_dirty(y)
        ctx.save_for_backward(hs, b)
        ctx.counts, ctx.offs = counts, offs
        return y

    @staticmethod
    def backward(ctx, gy):
        hs, b = ctx.saved_tensors
        counts, offs = ctx.counts, ctx.offs
        g2 = gy.reshape(-1, gy.shape[-1]).contiguous()  # [t, o]
        ghs = grouped_mm(g2, b, offs, counts) if ctx.needs_input_grad[1] else None  # [t, r]
        gb = grouped_mm(g2.T, hs, offs, counts) if ctx.needs_input_grad[2] else None  # [e, o, r]
        return gy, ghs, gb, None, None


def lora_fork(
    x: torch.Tensor, a: torch.Tensor, scale: float, counts: list[int] | None = None, offs=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x1, hs): x [..., i] passed on as x1 (feed it to the base), hs = scale * x A^T [t, r].

    Args:
        x: the base's input, [..., i] (rows grouped by expert when ``counts`` is given).
        a: A [r, i], or [e, r, i] for groups.
        scale: alpha / r.
        counts: rows of x per group (experts); None: one group.
        offs: ``lora_fn.group_offsets(counts)`` if already on x's device.
    """
    counts = [x.numel() // x.shape[-1]] if counts is None else [int(n) for n in counts]
    if a.dim() == 2:
        a = a.unsqueeze(0)  # [1, r, i]
    if offs is None and len(counts) > 1:
        offs = group_offsets(counts, x.device)
    return _Fork.apply(x, a, scale, counts, offs)


def lora_onto(y: torch.Tensor, hs: torch.Tensor, b: torch.Tensor, counts: list[int] | None = None, offs=None):
    """y + hs B^T written into y (the base's output, [..., o]); returns y.

    Args:
        y: the base's output for ``lora_fork``'s x1, [..., o].
        hs: ``lora_fork``'s second output, [t, r].
        b: B [o, r], or [e, o, r] for groups.
        counts, offs: as for ``lora_fork``.
    """
    counts = [hs.shape[0]] if counts is None else [int(n) for n in counts]
    if b.dim() == 2:
        b = b.unsqueeze(0)  # [1, o, r]
    if offs is None and len(counts) > 1:
        offs = group_offsets(counts, hs.device)
    return _Onto.apply(y, hs, b, counts, offs)
