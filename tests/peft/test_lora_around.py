"""``peft/lora_around.py``: the adapter's GEMMs around a base it does not compute (TE's linears), checked without TE.

- Numerics: output and every gradient (x, A, B) against the equations in float64, B != 0, for one linear
  ([s, b, i] input) and for grouped experts with an empty group.
- Buffers: the output is the base's output buffer and the input gradient is the buffer the base's backward
  returned (the point of the design: no second [t, i] gradient, no new [t, o] output), with the base returning,
  as Transformer Engine's linears do, a view made inside its autograd Function.
- Wiring: ``MLALoRALinear`` takes this path for a TE linear in plain mode (here a stand-in base with TE's
  layout) and its results equal the three-op adapter's; the LayerNorm linear and part-selective adapters do not.
"""

import pytest
import torch
from conftest import megatron_ddp_hooks
from support.ops import op_counts
from torch import nn

from nemo_mla_lora.peft.lora_around import lora_fork, lora_onto

F64 = torch.float64


class _RecordingLinear(torch.autograd.Function):
    """y = x W^T with W frozen; records the data pointers of its output and of the input gradient it returns.
    Returns a view made inside the Function, as Transformer Engine's linears do (autograd then refuses an in-place
    write into it)."""

    seen: dict = {}

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(w)
        y = x @ w.T
        _RecordingLinear.seen["y"] = y.data_ptr()
        return y.view(y.shape)

    @staticmethod
    def backward(ctx, gy):
        (w,) = ctx.saved_tensors
        gx = gy @ w
        _RecordingLinear.seen["gx"] = gx.data_ptr()
        return gx, None


def _equations(x, w, a, b, scale, counts=None):
    """y = x W^T + scale (x A^T) B^T per group of rows (float64, autograd for the reference gradients)."""
    if counts is None:
        return x @ w.T + scale * (x @ a.T) @ b.T
    rows = x.split(counts)
    return torch.cat([xe @ w[e].T + scale * (xe @ a[e].T) @ b[e].T for e, xe in enumerate(rows)])


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def test_one_linear_matches_the_equations_and_writes_into_the_bases_buffers():
    torch.manual_seed(0)
    s, bsz, i, o, r, scale = 5, 3, 12, 10, 4, 2.5
    w = torch.randn(o, i, dtype=F64)
    x, a, b = _leaves(torch.randn(s, bsz, i, dtype=F64), torch.randn(r, i, dtype=F64), torch.randn(o, r, dtype=F64))
    x1, hs = lora_fork(x, a, scale)
    y = lora_onto(_RecordingLinear.apply(x1, w), hs, b)
    assert y.data_ptr() == _RecordingLinear.seen["y"]
    gy = torch.randn_like(y)
    y.backward(gy)
    assert x.grad.data_ptr() == _RecordingLinear.seen["gx"]

    xr, ar, br = _leaves(x, a, b)
    ref = _equations(xr, w, ar, br, scale)
    ref.backward(gy)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    for got, want in ((x.grad, xr.grad), (a.grad, ar.grad), (b.grad, br.grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("scaled_by", ["fork", "onto"])
def test_grouped_experts_match_the_equations_with_an_empty_group(scaled_by):
    """alpha / r applied by ``lora_fork`` (as the TE grouped experts do) or by ``lora_onto`` (its GEMMs)."""
    torch.manual_seed(1)
    counts, i, o, r, scale = [4, 0, 6, 3], 8, 6, 2, 0.5
    e = len(counts)
    w = torch.randn(e, o, i, dtype=F64)
    x, a, b = _leaves(
        torch.randn(sum(counts), i, dtype=F64), torch.randn(e, r, i, dtype=F64), torch.randn(e, o, r, dtype=F64)
    )
    x1, hs = lora_fork(x, a, scale if scaled_by == "fork" else 1.0, counts)
    base = torch.cat([xe @ w[g].T for g, xe in enumerate(x1.split(counts))])
    y = lora_onto(base, hs, b, counts, scale=scale if scaled_by == "onto" else 1.0)
    gy = torch.randn_like(y)
    y.backward(gy)

    xr, ar, br = _leaves(x, a, b)
    _equations(xr, w, ar, br, scale, counts).backward(gy)
    torch.testing.assert_close(y, _equations(xr, w, ar, br, scale, counts).detach(), rtol=0, atol=1e-12)
    for got, want in ((x.grad, xr.grad), (a.grad, ar.grad), (b.grad, br.grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert a.grad[1].abs().sum() == 0 and b.grad[1].abs().sum() == 0  # no tokens


def test_an_input_without_gradient_reaches_the_base_as_it_is():
    """The first layer's input needs no gradient: the base gets x itself (no dgrad GEMM there), A and B still
    get theirs."""
    w = torch.randn(10, 12, dtype=F64)
    a, b = _leaves(torch.randn(4, 12, dtype=F64), torch.randn(10, 4, dtype=F64))
    x = torch.randn(6, 12, dtype=F64)
    x1, hs = lora_fork(x, a, 2.0)
    assert x1 is x and not x1.requires_grad
    y = lora_onto(x1 @ w.T, hs, b)
    y.sum().backward()
    ar, br = _leaves(a, b)
    _equations(x, w, ar, br, 2.0).sum().backward()
    torch.testing.assert_close(a.grad, ar.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(b.grad, br.grad, rtol=0, atol=1e-12)


def test_adapter_alone_when_the_base_does_not_use_x():
    """The base's gradient absent (a base that ignores x1): the input gradient is the adapter's alone."""
    x, a, b = _leaves(torch.randn(6, 5, dtype=F64), torch.randn(2, 5, dtype=F64), torch.randn(3, 2, dtype=F64))
    x1, hs = lora_fork(x, a, 1.5)
    y = lora_onto(torch.zeros(6, 3, dtype=F64), hs, b)
    y.sum().backward()
    torch.testing.assert_close(x.grad, 1.5 * torch.ones(6, 3, dtype=F64) @ b.detach() @ a.detach())


class _StandInTE(nn.Module):
    """A frozen linear called as Megatron's TE wrappers are: x -> (x W^T, None)."""

    def __init__(self, out_features, in_features):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features, dtype=F64), requires_grad=False)
        self.bias = None

    def forward(self, x):
        return _RecordingLinear.apply(x, self.weight), None


def _wrap(monkeypatch, base: nn.Module, class_name: str, mask: bool):
    """(adapter, MLALoRALinear) around ``base`` laid out as TE's ``class_name`` (out 10, in 12, TP 1), rank 4,
    B != 0; ``mask``: the adapter covers output rows 0-5 only."""
    from nemo_mla_lora.peft import adapter as adapter_module
    from nemo_mla_lora.peft.linear_layout import te_layout
    from nemo_mla_lora.peft.mla_lora import MLALoRALinear

    monkeypatch.setattr(adapter_module, "layout", lambda m: te_layout(class_name, None, 10, 12, 1))
    rows = torch.arange(10) < 6 if mask else None
    adapter = adapter_module.MLALoRAAdapter(base, dim=4, alpha=8.0, row_mask=rows, dtype=F64)
    with torch.no_grad():
        adapter.lora_b.normal_()
    return adapter, MLALoRALinear(base, adapter)


@pytest.mark.parametrize(
    "class_name, mask, expect_around",
    [("TELinear", False, True), ("TERowParallelLinear", False, True), ("TELinear", True, False)],
)
def test_wrapper_takes_the_path_for_plain_te_linears(monkeypatch, class_name, mask, expect_around):
    torch.manual_seed(2)
    base = _StandInTE(10, 12)
    adapter, wrapped = _wrap(monkeypatch, base, class_name, mask)
    x = torch.randn(5, 2, 12, dtype=F64)
    assert adapter.around(x) == expect_around
    assert not adapter.around(x.float())  # another dtype than the adapter's: the three-op path

    _RecordingLinear.seen.clear()
    x_new = x.clone().requires_grad_(True)
    y, bias = wrapped(x_new)
    assert bias is None and (y.data_ptr() == _RecordingLinear.seen["y"]) == expect_around
    gy = torch.randn_like(y)
    y.backward(gy)
    assert (x_new.grad.data_ptr() == _RecordingLinear.seen["gx"]) == expect_around  # around: one gradient buffer
    grads = [x_new.grad] + [p.grad.clone() for p in (adapter.lora_a, adapter.lora_b)]
    adapter.zero_grad()

    x_ref = x.clone().requires_grad_(True)
    out, _ = base(x_ref)
    ref = adapter.add_to(out, x_ref) if not mask else out + adapter(x_ref)
    ref.backward(gy)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    for got, want in zip(grads, [x_ref.grad, adapter.lora_a.grad, adapter.lora_b.grad]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


class _NormLinear(torch.autograd.Function):
    """TE's LayerNorm linear in miniature: x -> (out = (x * g) W^T, normed = x * g), both views made inside the
    Function as TE returns them; the gradient of ``normed`` joins the GEMM's input gradient before the norm's."""

    @staticmethod
    def forward(ctx, x, g, w):
        normed = x * g
        ctx.save_for_backward(g, w)
        out = normed @ w.T
        _RecordingLinear.seen["y"] = out.data_ptr()
        return out.view(out.shape), normed.view(normed.shape)

    @staticmethod
    def backward(ctx, gout, gnormed):
        g, w = ctx.saved_tensors
        gn = gout @ w if gnormed is None else gout @ w + gnormed
        return gn * g, None, None


class _StandInTENorm(nn.Module):
    """Megatron's ``TELayerNormColumnParallelLinear`` as MLALoRALinear calls it with ``return_layernorm_output``:
    x -> ((out, normed), None)."""

    def __init__(self, out_features, in_features):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features, dtype=F64), requires_grad=False)
        self.norm = nn.Parameter(torch.rand(in_features, dtype=F64) + 0.5, requires_grad=False)
        self.return_layernorm_output = False

    def forward(self, x):
        assert self.return_layernorm_output  # MLALoRALinear asks TE for the normalised input
        return _NormLinear.apply(x, self.norm, self.weight), None


@pytest.mark.parametrize("mask", [False, True])
def test_the_layernorm_linears_delta_goes_into_tes_output(monkeypatch, mask):
    """The LayerNorm linear's adapter (it reads TE's normalised output): with full rows its delta is written into
    TE's output buffer (``lora_fork`` on the normalised output, then ``lora_onto``), and output and gradients equal
    the three-op adapter's; a part-selective adapter keeps the three-op path."""
    torch.manual_seed(5)
    base = _StandInTENorm(10, 12)
    adapter, wrapped = _wrap(monkeypatch, base, "TELayerNormColumnParallelLinear", mask)
    x = torch.randn(5, 2, 12, dtype=F64)
    assert adapter.around(x, normed=True) == (not mask) and not adapter.around(x)

    x_new = x.clone().requires_grad_(True)
    y, bias = wrapped(x_new)
    assert bias is None and (y.data_ptr() == _RecordingLinear.seen["y"]) == (not mask)
    gy = torch.randn_like(y)
    y.backward(gy)
    grads = [x_new.grad] + [p.grad.clone() for p in (adapter.lora_a, adapter.lora_b)]
    adapter.zero_grad()

    x_ref = x.clone().requires_grad_(True)
    out, normed = _NormLinear.apply(x_ref, base.norm, base.weight)
    ref = out + adapter(normed)  # the adapter's own three-op path on TE's normalised output
    ref.backward(gy)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    for got, want in zip(grads, [x_ref.grad, adapter.lora_a.grad, adapter.lora_b.grad]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_around_runs_no_elementwise_pass_over_the_input_or_output():
    """What the design saves, counted on the CPU: the three-op adapter's backward adds a second [t, i] input
    gradient to the base's and its forward makes a new output; around the base, neither happens (the adds are
    the GEMMs' beta = 1)."""
    torch.manual_seed(4)
    w = torch.randn(10, 12)
    x, a, b = _leaves(torch.randn(6, 12), torch.randn(4, 12), torch.randn(10, 4))
    gy = torch.randn(6, 10)

    def around():
        x1, hs = lora_fork(x, a, 2.0)
        lora_onto(_RecordingLinear.apply(x1, w), hs, b).backward(gy)

    def three_op():
        out = _RecordingLinear.apply(x, w)
        torch.addmm(out, x @ a.T, b.T, alpha=2.0).backward(gy)

    ops_around, ops_three = op_counts(around), op_counts(three_op)
    elementwise = ("aten::add", "aten::add_", "aten::mul", "aten::mul_", "aten::copy_")
    assert sum(ops_three.get(k, 0) for k in elementwise) >= 1, ops_three  # autograd's sum of the input gradients
    assert sum(ops_around.get(k, 0) for k in elementwise) == 0, ops_around  # scale and sums ride on the GEMMs
    gemms = ("aten::mm", "aten::addmm", "aten::addmm_")
    assert sum(ops_around.get(k, 0) for k in gemms) == 2 + 6  # the base's two, the adapter's six
    assert sum(ops_around.values()) < sum(ops_three.values())  # fewer dispatches: less host time per step


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize(
    "dtype,main_dtype,device",
    [
        (F64, F64, "cpu"),
        (torch.bfloat16, torch.float32, "cpu"),
        pytest.param(torch.bfloat16, torch.float32, "cuda", marks=[pytest.mark.gpu, _CUDA]),
    ],
)
def test_factor_gradients_go_into_megatrons_main_grad(dtype, main_dtype, device):
    """Under Megatron's DDP hook: after two micro-batches each factor's ``main_grad`` holds what it held plus both
    gradients (the equations in float64), ``.grad`` is None as DDP leaves it, and where the GEMM can write the
    buffer's dtype (same dtype here; bf16 into fp32 needs CUDA's addmm out_dtype, so on the CPU DDP's hook adds)
    the flag says the GEMM did; on CUDA it does)."""
    torch.manual_seed(5)
    w = torch.randn(10, 12, dtype=dtype, device=device)
    x, a, b = _leaves(*(torch.randn(*s, dtype=dtype, device=device) for s in ((6, 12), (4, 12), (10, 4))))
    a, b = nn.Parameter(a.detach()), nn.Parameter(b.detach())
    before, (_accs, bucket) = megatron_ddp_hooks((a, b), main_dtype)
    gys = [torch.randn(6, 10, dtype=dtype, device=device) for _ in range(2)]
    for gy in gys:
        x1, hs = lora_fork(x, a, 2.0)
        lora_onto(_RecordingLinear.apply(x1, w), hs, b).backward(gy)
    assert a.grad is None and b.grad is None and len(bucket.ready) == 4
    fused = dtype == main_dtype or device == "cuda"
    assert a.grad_added_to_main_grad is fused and b.grad_added_to_main_grad is fused

    xr, ar, br = _leaves(*(t.detach().cpu().to(F64) for t in (x, a, b)))
    for gy in gys:
        _equations(xr, w.cpu().to(F64), ar, br, 2.0).backward(gy.cpu().to(F64))
    tol = 1e-12 if dtype == F64 else 0.1
    for p, start, ref in ((a, before[0], ar.grad), (b, before[1], br.grad)):
        assert p.main_grad.dtype == main_dtype
        torch.testing.assert_close(p.main_grad.cpu().to(F64), start.cpu().to(F64) + ref, rtol=0.02, atol=tol)


@pytest.mark.parametrize("kernel", ["missing", "wrong", "right"])
def test_cross_dtype_accumulation_is_used_only_where_it_adds_correctly(monkeypatch, kernel):
    """``addmm``'s ``out_dtype`` form is checked once per (device, dtypes) before gradients go through it: a kernel
    that is missing (this CPU build) or that drops what ``main_grad`` held is not used."""
    from nemo_mla_lora.peft import lora_fn

    real = torch.addmm

    def fake(c, m1, m2, *, alpha=1, out_dtype=None, out=None, **kw):
        if out_dtype is None:
            return (
                real(c, m1, m2, alpha=alpha, out=out, **kw) if out is not None else real(c, m1, m2, alpha=alpha, **kw)
            )
        if kernel == "missing":
            raise RuntimeError("Could not run 'aten::addmm.dtype_out'")
        product = alpha * (m1.to(out_dtype) @ m2.to(out_dtype))
        return out.copy_(product if kernel == "wrong" else c + product)  # "wrong": beta = 0

    lora_fn.accumulates_across_dtypes.cache_clear()
    monkeypatch.setattr(torch, "addmm", fake)
    try:
        assert lora_fn.accumulates_across_dtypes(torch.device("cpu"), torch.bfloat16, torch.float32) is (
            kernel == "right"
        )
    finally:
        lora_fn.accumulates_across_dtypes.cache_clear()


def test_fused_factor_gradients_leave_ddps_hook_nothing_to_add(monkeypatch):
    """What the fusion saves, counted on the CPU under Megatron's hook: with the factors' gradients returned (as
    before), the hook runs one ``add_`` per factor into ``main_grad``; accumulated in the GEMMs, none, and no more
    ops in all."""
    from nemo_mla_lora.peft import lora_around, lora_fn

    w = torch.randn(10, 12, dtype=F64)
    gy = torch.randn(6, 10, dtype=F64)

    def run():
        x = torch.randn(6, 12, dtype=F64, requires_grad=True)
        a, b = nn.Parameter(torch.randn(4, 12, dtype=F64)), nn.Parameter(torch.randn(10, 4, dtype=F64))
        _, _alive = megatron_ddp_hooks((a, b), F64)  # the hooks live with their accumulators

        def step():
            x1, hs = lora_fork(x, a, 2.0)
            lora_onto(_RecordingLinear.apply(x1, w), hs, b).backward(gy)

        return op_counts(step)

    fused = run()
    monkeypatch.setattr(lora_around, "weight_grad", lambda p, m1, m2, s: lora_fn.scaled_mm(m1, m2, s))
    returned = run()
    assert returned.get("aten::add_", 0) == 2 and fused.get("aten::add_", 0) == 0, (returned, fused)
    assert sum(fused.values()) < sum(returned.values())
