"""LoRA on frozen linears as one autograd function, for one linear or for all local experts of one linear.

    y = x W^T + scale * (x A^T) B^T        (per group e of rows: x_e W_e^T + scale * (x_e A_e^T) B_e^T)

Index legend: t tokens (rows of x; for experts, grouped by expert as the token dispatcher permutes them),
i in_features, o out_features, r LoRA rank, e group (expert).

Why one function: as three autograd ops (frozen base, x A^T, addmm) the backward writes a second
input gradient [t, i] for the adapter and autograd then adds it to the base's. Here the adapter's part
of the input gradient is written first and the base's GEMM accumulates onto it (``addmm_``, beta = 1),
A's gradient reuses the saved input, and the saved state is x (which the adapter needed anyway) plus
scale * x A^T [t, r]. For experts the adapter GEMMs of all groups are grouped GEMMs
(``torch._grouped_mm``: one launch per factor instead of one chain per expert), while the frozen
base's GEMMs stay one per expert, as Megatron's ``SequentialMLP`` runs them.
"""

import functools

import torch


def spans(counts: list[int]) -> list[tuple[int, int]]:
    """Row ranges [lo, hi) of the groups, in order."""
    out, lo = [], 0
    for n in counts:
        out.append((lo, lo + n))
        lo += n
    return out


def group_offsets(counts: list[int], device: torch.device | str) -> torch.Tensor:
    """torch._grouped_mm's ``offs``: the end row of each group, int32. To a GPU through pinned memory, without
    blocking: a copy from pageable memory would synchronize the stream, once per grouped linear and step."""
    ends = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)
    if torch.device(device).type == "cuda":
        return ends.pin_memory().to(device, non_blocking=True)
    return ends.to(device)


def grouped_mm_native(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether torch._grouped_mm runs these operands: CPU fp32/bf16/fp16, CUDA bf16 on sm90+; each operand
    row- or column-major in its last two dims with 16-byte aligned strides and start (otherwise one mm per
    group computes the same product)."""
    if a.dtype != b.dtype:
        return False
    if a.is_cuda:
        if a.dtype != torch.bfloat16 or _capability(a.device) < (9, 0):
            return False
    elif a.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    size = a.element_size()
    for t in (a, b):
        if 1 not in t.stride()[-2:] or t.data_ptr() % 16:
            return False
        if any((s * size) % 16 for s in t.stride() if s != 1):
            return False
    return True


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Per group e, a_e @ b_e, in the two forms of torch._grouped_mm:

    a [t, k] (rows grouped), b [e, k, n]               -> [t, n]
    a [m, t] (columns grouped), b [t, n] (rows grouped) -> [e, m, n]   (an empty group gives zeros)
    """
    if len(counts) == 1:
        return a @ b[0] if b.dim() == 3 else (a @ b).unsqueeze(0)
    if grouped_mm_native(a, b):
        return torch._grouped_mm(a, b, offs)
    if b.dim() == 3:
        out = a.new_empty(a.shape[0], b.shape[2])
        for g, (lo, hi) in enumerate(spans(counts)):
            torch.mm(a[lo:hi], b[g], out=out[lo:hi])
        return out
    out = a.new_empty(len(counts), a.shape[0], b.shape[1])
    for g, (lo, hi) in enumerate(spans(counts)):
        torch.mm(a[:, lo:hi], b[lo:hi], out=out[g])
    return out


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * a @ b in one GEMM (beta = 0: the uninitialised C is ignored, as BLAS and torch.addmm define it)."""
    return torch.addmm(a.new_empty(a.shape[0], b.shape[1]), a, b, beta=0, alpha=scale)


@functools.cache
def accumulates_across_dtypes(device: torch.device, dtype: torch.dtype, main_dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(c, m1, m2, out_dtype=c.dtype, out=c)`` adds dtype operands into a main_dtype ``c`` on
    this device, checked once on a small product against the same sum in float64 (the CUDA kernel exists for
    bf16/fp16 into fp32; CPU builds lack it)."""
    gen = torch.Generator().manual_seed(0)
    m1, m2, c = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((5, 24), (24, 3), (5, 3)))
    want = c + 0.5 * (m1.to(dtype).double() @ m2.to(dtype).double())
    got = c.to(device, main_dtype)
    try:
        torch.addmm(got, m1.to(device, dtype), m2.to(device, dtype), alpha=0.5, out_dtype=main_dtype, out=got)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return bool(torch.allclose(got.double().cpu(), want, rtol=1e-3, atol=1e-3))


def _not_capturing(m: torch.Tensor) -> bool:
    """False only while a CUDA graph is being captured on m's device: the check reads its result on the host."""
    return not (m.is_cuda and torch.cuda.is_current_stream_capturing())


def _main_grad(param: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
    """``param``'s ``main_grad`` where Megatron's DDP gave it one (``grad_added_to_main_grad`` is its flag; not
    Megatron-FSDP's) that a kernel on ``like``'s device can add into: contiguous, ``param``'s shape."""
    main = getattr(param, "main_grad", None)
    if main is None or not hasattr(param, "grad_added_to_main_grad") or hasattr(param, "__fsdp_param__"):
        return None
    if main.shape != param.shape or not main.is_contiguous() or main.device != like.device:
        return None
    return main


def _handed_to_ddp(params, like: torch.Tensor) -> torch.Tensor:
    """After the gradients went into ``main_grad``: the flag set, and what DDP's hook gets (it adds nothing
    while the flag is set; zeros where ``zero_out_wgrad`` asks for them)."""
    for p in params:
        p.grad_added_to_main_grad = True
    if any(getattr(p, "zero_out_wgrad", False) for p in params):  # DDP's hook adds the returned gradient regardless
        return torch.zeros_like(like)
    return torch.empty_like(like)


def weight_grad(param: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, scale: float) -> torch.Tensor:
    """The gradient scale * m1 @ m2 of the factor ``param`` [p, q] (m1 [p, t], m2 [t, q]).

    Where Megatron's DDP gave ``param`` a ``main_grad`` buffer (``grad_added_to_main_grad`` is its flag), the
    GEMM accumulates into that buffer (beta = 1; bf16 operands into an fp32 buffer through ``out_dtype`` where
    ``accumulates_across_dtypes``) and an uninitialised tensor is returned with the flag set, so DDP's hook adds
    nothing: what Megatron's own linears do with gradient accumulation fusion, one launch and one [p, q]
    temporary less per factor and step. Elsewhere the gradient is returned and DDP's hook adds it."""
    main = _main_grad(param, m1)
    if main is None:
        return scaled_mm(m1, m2, scale)
    if main.dtype == m1.dtype:
        main.addmm_(m1, m2, alpha=scale)
    elif _not_capturing(m1) and accumulates_across_dtypes(m1.device, m1.dtype, main.dtype):
        torch.addmm(main, m1, m2, alpha=scale, out_dtype=main.dtype, out=main)
    else:
        return scaled_mm(m1, m2, scale)
    return _handed_to_ddp((param,), param)


class StackFactors(torch.autograd.Function):
    """(p_0, .., p_{e-1}), each [p, q] -> [e, p, q] (``torch.stack``), for per-expert factors held as separate
    parameters. Backward: the gradient g [e, p, q] of the stack goes to every p_e; where Megatron's DDP gave all
    of them ``main_grad`` buffers, it is added into them by one multi-tensor add (``torch._foreach_add_``; one cast
    first where the buffers are fp32 and g is not) and DDP's hooks get nothing to add, instead of e separate
    gradients that DDP's hooks add one by one (e launches per factor and step)."""

    @staticmethod
    def forward(ctx, *params):
        ctx.params = params
        return torch.stack(params)

    @staticmethod
    def backward(ctx, g):
        mains = [_main_grad(p, g) for p in ctx.params]
        if any(m is None for m in mains) or len({m.dtype for m in mains}) != 1:
            return g.unbind(0)
        torch._foreach_add_(mains, g.to(mains[0].dtype).unbind(0))  # main_grad_e += g_e
        return _handed_to_ddp(ctx.params, g).unbind(0)


class FrozenLoRALinear(torch.autograd.Function):
    """x [t, i], a [e, r, i], b [e, o, r] (or [r, i], [o, r]: one linear; or both None: the frozen base alone)
    -> y [t, o]. ``weights``: e frozen [o, i] tensors; ``counts``: rows of x per group (sums to t)."""

    @staticmethod
    def forward(ctx, x, a, b, scale: float, weights: tuple, counts: list[int], offs: torch.Tensor | None):
        if offs is None and len(counts) > 1:
            offs = group_offsets(counts, x.device)
        hs = None
        if a is None:
            y = x.new_empty(x.shape[0], weights[0].shape[0])  # [t, o]
            for (lo, hi), w in zip(spans(counts), weights):
                torch.mm(x[lo:hi], w.T, out=y[lo:hi])
        elif a.dim() == 2:
            hs = scaled_mm(x, a.t(), scale)  # [t, r]
            y = (hs @ b.t()).addmm_(x, weights[0].T)  # [t, o]: + x W^T onto the adapter's output
        else:
            hs = grouped_mm(x, a.transpose(1, 2), offs, counts).mul_(scale)  # [t, r]
            y = grouped_mm(hs, b.transpose(1, 2), offs, counts)  # [t, o]
            for (lo, hi), w in zip(spans(counts), weights):
                y[lo:hi].addmm_(x[lo:hi], w.T)  # + x_e W_e^T
        ctx.save_for_backward(x if a is not None else None, a, b, hs)  # the frozen base alone needs no input
        ctx.scale, ctx.weights, ctx.counts, ctx.offs = scale, weights, counts, offs
        return y

    @staticmethod
    def backward(ctx, gy):
        x, a, b, hs = ctx.saved_tensors
        counts, offs = ctx.counts, ctx.offs
        gy = gy.contiguous()  # [t, o]
        gx = ga = gb = None
        if a is not None and a.dim() == 2:  # one linear: the factors' gradients into main_grad where DDP gave one
            gh = scaled_mm(gy, b, ctx.scale)  # d/d(x A^T) = scale * d/d(hs): [t, r]
            gb = weight_grad(b, gy.T, hs, 1.0) if ctx.needs_input_grad[2] else None  # [o, r]
            ga = weight_grad(a, gh.T, x, 1.0) if ctx.needs_input_grad[1] else None  # [r, i]
            gx = gh @ a if ctx.needs_input_grad[0] else None  # [t, i]
        elif a is not None:
            gh = grouped_mm(gy, b, offs, counts)  # d/d(hs): [t, r]
            if ctx.needs_input_grad[2]:
                gb = grouped_mm(gy.T, hs, offs, counts)  # [e, o, r]
            gh.mul_(ctx.scale)  # d/d(x A^T): [t, r]
            if ctx.needs_input_grad[1]:
                ga = grouped_mm(gh.T, x, offs, counts)  # [e, r, i]
            if ctx.needs_input_grad[0]:
                gx = grouped_mm(gh, a, offs, counts)  # adapter's part of the input gradient: [t, i]
        if ctx.needs_input_grad[0]:
            if gx is None:
                gx = gy.new_empty(gy.shape[0], ctx.weights[0].shape[1])  # [t, i]
                for (lo, hi), w in zip(spans(counts), ctx.weights):
                    torch.mm(gy[lo:hi], w, out=gx[lo:hi])
            else:
                for (lo, hi), w in zip(spans(counts), ctx.weights):
                    gx[lo:hi].addmm_(gy[lo:hi], w)  # + gy_e W_e, onto the same buffer
        return gx, ga, gb, None, None, None, None


def frozen_lora_linear(
    x: torch.Tensor,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    scale: float,
    weights: tuple,
    counts: list[int] | None = None,
    offs: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x W^T + scale (x A^T) B^T for x [..., i]; one linear: a [r, i], b [o, r], ``weights`` (W,);
    experts: a [e, r, i], b [e, o, r], e weights, ``counts`` rows of x [t, i] per expert (``offs``: their
    int32 end rows on x's device, if already there)."""
    if any(w.requires_grad for w in weights):
        raise ValueError("frozen_lora_linear: the base weight must be frozen (requires_grad=False)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # [t, i]
    if counts is None:
        counts = [x2.shape[0]]
    y = FrozenLoRALinear.apply(x2, a, b, scale, tuple(weights), list(counts), offs)
    return y.view(*lead, y.shape[-1])
