"""LoRA around a base linear the package does not compute (Transformer Engine's), with no pass of its own over the
input gradient or the output:

    x1, hs = lora_fork(x, A, scale)      x1 = x (a view), hs = scale * x A^T          [t, r]
    y      = base(x1)                    the base's own forward and backward (TE's GEMMs, FP8, overlap)
    y      = lora_onto(y, hs, B)         y += hs B^T, in y's buffer                    [t, o]

Autograd runs ``lora_fork``'s backward once both of its outputs have their gradients: the base's input
gradient gx1 [t, i] and the adapter's ghs = gy B [t, r]. It then accumulates gx = gx1 + scale * ghs A into
gx1's buffer (one GEMM with beta = 1), where the three-op adapter (``MLALoRAAdapter.add_to``) makes autograd
write a second [t, i] gradient and add the two (an elementwise pass over the layer's input, twice the
memory). ``lora_onto`` adds the adapter's output into the base's output buffer (``addmm_``), instead of a new
[t, o] tensor. Grouped experts have no accumulating grouped GEMM (``torch._grouped_mm`` writes a new tensor):
there both sums are one Triton launch on CUDA that reads and writes each tile once (``grouped_add``), else a
grouped GEMM and an in-place add.

Under Megatron's DDP the dense factors' gradients go into their ``main_grad`` buffers inside the GEMM, as
Megatron's own linears do with gradient accumulation fusion (``lora_fn.weight_grad``).

The base must return a fresh input gradient (a linear's dgrad GEMM does; TE's do) and must not save its
output for backward (a linear does not): the first is written into, the second would fail autograd's
version check loudly. Experts: A [e, r, i], B [e, o, r] per group of rows (``counts``), as in ``lora_fn``.

Index legend: t tokens (rows), i in_features, o out_features, r LoRA rank, e group (expert).
"""

import functools

import torch

from nemo_mla_lora.peft.lora_fn import group_offsets, grouped_mm, scaled_mm, weight_grad

GROUPED_ADD = True  # grouped experts: the delta and the input gradient added by one Triton launch where it runs


class _Fork(torch.autograd.Function):
    """x [..., i], a [r, i] (one linear) or [e, r, i] (groups of rows) -> (x viewed, hs = scale * x A^T [t, r])."""

    @staticmethod
    def forward(ctx, x, a, scale: float, counts: list[int], offs):
        x2 = x.reshape(-1, x.shape[-1])  # [t, i]
        if a.dim() == 2:
            hs = scaled_mm(x2, a.t(), scale)  # [t, r]
        else:
            hs = grouped_mm(x2, a.transpose(1, 2), offs, counts).mul_(scale)  # [t, r]
        ctx.save_for_backward(x2, a)
        ctx.scale, ctx.counts, ctx.offs, ctx.shape = scale, counts, offs, x.shape
        ctx.set_materialize_grads(False)  # x1 unused (LayerNorm linear: TE's normalised output): None, not zeros
        return x.view_as(x), hs

    @staticmethod
    def backward(ctx, gx1, ghs):
        x2, a = ctx.saved_tensors
        if ghs is None:
            return gx1, None, None, None, None
        ghs = ghs.contiguous()  # d/d(hs) [t, r]; d/d(x A^T) = scale * ghs
        if a.dim() == 2:
            ga = weight_grad(a, ghs.t(), x2, ctx.scale) if ctx.needs_input_grad[1] else None  # [r, i]
            gx = _dense_input_grad(gx1, ghs, a, ctx.scale, ctx.shape) if ctx.needs_input_grad[0] else None
            return gx, ga, None, None, None
        gh = ghs * ctx.scale
        ga = grouped_mm(gh.T, x2, ctx.offs, ctx.counts) if ctx.needs_input_grad[1] else None  # [e, r, i]
        gx = None
        if ctx.needs_input_grad[0]:
            g2 = gx1.view(-1, gx1.shape[-1]) if gx1 is not None and gx1.is_contiguous() else None  # [t, i]
            if g2 is not None and _add_grouped(g2, gh, a, ctx.offs):  # gx1 + gh_e A_e, in gx1's buffer
                return gx1, ga, None, None, None
            gx = grouped_mm(gh, a, ctx.offs, ctx.counts).view(ctx.shape)  # [t, i]
            gx = gx if gx1 is None else gx.add_(gx1)
        return gx, ga, None, None, None


def _add_grouped(out2: torch.Tensor, left: torch.Tensor, right: torch.Tensor, offs, scale: float = 1.0) -> bool:
    """out2 [t, n] += scale * left_e [t_e, r] right[e] [r, n] per group, in place, by ``grouped_add``'s one
    launch (each tile of out2 read and written once) where it runs these operands (several groups, CUDA,
    Triton, ``GROUPED_ADD`` on); False where it does not, and nothing is written."""
    grouped_add = _grouped_add_module() if GROUPED_ADD and offs is not None else None
    if grouped_add is None or not grouped_add.runs(out2, left, right):
        return False
    grouped_add.grouped_lowrank_add_(out2, left, right, offs, scale)
    return True


@functools.cache
def _grouped_add_module():
    """``peft.grouped_add``, imported once; None where Triton does not import."""
    try:
        from nemo_mla_lora.peft import grouped_add
    except ImportError:
        return None
    return grouped_add


def _dense_input_grad(gx1, ghs, a, scale: float, shape) -> torch.Tensor:
    """gx1 + scale * ghs A [*shape], written into gx1's buffer (the GEMM's C, beta = 1) where it can be."""
    if gx1 is None:
        return scaled_mm(ghs, a, scale).view(shape)
    g2 = gx1.view(-1, gx1.shape[-1]) if gx1.is_contiguous() else None
    if g2 is None:
        return (gx1.reshape(-1, gx1.shape[-1]) + scaled_mm(ghs, a, scale)).view(shape)
    g2.addmm_(ghs, a, alpha=scale)
    return gx1


class _Onto(torch.autograd.Function):
    """(y [..., o], hs [t, r], b [o, r] or [e, o, r]) -> y + hs B^T, in y's buffer.

    Transformer Engine returns its output as a view made inside its autograd Function, and autograd refuses an
    in-place write into such a view (it would rebase the view's history past TE's backward). Here autograd needs
    no such rebase: this Function's backward passes gy on to y unchanged. So the sum is written through a
    detached alias of y's buffer and returned as this Function's new output; the alias shares y's version
    counter, so a base that saved its output for backward would fail autograd's version check loudly."""

    @staticmethod
    def forward(ctx, y, hs, b, counts: list[int], offs, scale: float):
        out = y.detach()  # y's buffer, [..., o]
        y2 = out.view(-1, out.shape[-1]) if out.is_contiguous() else None  # [t, o]
        if b.dim() == 2 and y2 is not None:
            y2.addmm_(hs, b.t(), alpha=scale)  # y + scale * hs B^T, one GEMM with beta = 1
        elif b.dim() == 2:
            out.add_((hs @ b.t()).view(out.shape), alpha=scale)
        elif y2 is None or not _add_grouped(y2, hs, b.transpose(1, 2), offs, scale):
            out.add_(grouped_mm(hs, b.transpose(1, 2), offs, counts).view(out.shape), alpha=scale)
        ctx.save_for_backward(hs, b)
        ctx.counts, ctx.offs, ctx.scale = counts, offs, scale
        return out

    @staticmethod
    def backward(ctx, gy):
        hs, b = ctx.saved_tensors
        g2 = gy.reshape(-1, gy.shape[-1]).contiguous()  # [t, o]
        if b.dim() == 2:
            ghs = scaled_mm(g2, b, ctx.scale) if ctx.needs_input_grad[1] else None  # [t, r]
            gb = weight_grad(b, g2.t(), hs, ctx.scale) if ctx.needs_input_grad[2] else None  # [o, r]
        else:
            ghs = grouped_mm(g2, b, ctx.offs, ctx.counts) if ctx.needs_input_grad[1] else None  # [t, r]
            gb = grouped_mm(g2.T, hs, ctx.offs, ctx.counts) if ctx.needs_input_grad[2] else None  # [e, o, r]
            if ctx.scale != 1.0:
                ghs, gb = (g if g is None else g.mul_(ctx.scale) for g in (ghs, gb))
        return gy, ghs, gb, None, None, None


def lora_fork(
    x: torch.Tensor, a: torch.Tensor, scale: float, counts: list[int] | None = None, offs=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x1, hs): x [..., i] passed on as x1 (feed it to the base; x itself where x needs no gradient, e.g. the
    first layer's normalised embeddings, so the base skips its input-gradient GEMM), hs = scale * x A^T [t, r].

    Args:
        x: the base's input, [..., i] (rows grouped by expert when ``counts`` is given).
        a: A [r, i], or [e, r, i] for groups.
        scale: alpha / r.
        counts: rows of x per group (experts); None: one group.
        offs: ``lora_fn.group_offsets(counts)`` if already on x's device.
    """
    counts = [x.numel() // x.shape[-1]] if counts is None else [int(n) for n in counts]
    if offs is None and a.dim() == 3 and len(counts) > 1:
        offs = group_offsets(counts, x.device)
    x1, hs = _Fork.apply(x, a, scale, counts, offs)
    return (x1 if x.requires_grad else x), hs  # no gradient wanted for x: the base computes no dgrad for it


def lora_onto(
    y: torch.Tensor, hs: torch.Tensor, b: torch.Tensor, counts: list[int] | None = None, offs=None, scale: float = 1.0
):
    """y + scale * hs B^T written into y's buffer (the base's output, [..., o]); returns the sum (y must not be
    used after).

    Args:
        y: the base's output for ``lora_fork``'s x1, [..., o].
        hs: ``lora_fork``'s second output, [t, r].
        b: B [o, r], or [e, o, r] for groups.
        counts, offs: as for ``lora_fork``.
        scale: multiplies hs B^T (on the GEMMs; 1 where ``lora_fork`` scaled hs already, as the adapters' hs is).
    """
    counts = [hs.shape[0]] if counts is None else [int(n) for n in counts]
    if offs is None and b.dim() == 3 and len(counts) > 1:
        offs = group_offsets(counts, hs.device)
    return _Onto.apply(y, hs, b, counts, offs, scale)
