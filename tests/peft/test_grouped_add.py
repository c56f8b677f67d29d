"""``peft/grouped_add.py`` (the grouped low-rank product added in place, one Triton launch) against the equations in
float64, in Triton's interpreter on CPU (a child process with ``TRITON_INTERPRET=1``) and in bf16 on a GPU; and
``lora_around``'s grouped experts with the kernel equal to the same adapters through ``torch._grouped_mm`` and an
add (output, input gradient, factor gradients), the kernel counted so the comparison cannot pass without it.

Group layouts: empty groups (first, inside, last), groups smaller than a row tile (several per tile), one group over
several tiles, a tile boundary inside a group; widths and ranks off the tile sizes; B passed transposed (strided)."""

import importlib.util
import json

import pytest
import torch
from support.child import child, interpreted

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

LAYOUTS = [[5, 0, 70, 3, 0, 1, 130], [0, 0, 33], [1] * 40, [64, 64, 0], [200]]

KERNEL_CHECK = """
import json, sys, torch
from nemo_mla_lora.peft.grouped_add import grouped_lowrank_add_
device, dtype = sys.argv[1], getattr(torch, sys.argv[2])
torch.manual_seed(0)
out = []
for counts in json.loads(sys.argv[3]):
    for n, k, scale, strided in ((37, 12, 0.7, True), (130, 16, 1.0, False), (8, 3, 2.0, True)):
        t, e = sum(counts), len(counts)
        y, left, b = torch.randn(t, n), torch.randn(t, k), torch.randn(e, n, k)  # B [e, n, k]
        right = b.transpose(1, 2) if strided else b.transpose(1, 2).contiguous()  # [e, k, n]
        y, left, right = (v.to(device, dtype) for v in (y, left, right))
        want, lo = y.double().cpu(), 0
        for g, c in enumerate(counts):  # the equations, per group, in float64
            want[lo : lo + c] += scale * left[lo : lo + c].double().cpu() @ right[g].double().cpu()
            lo += c
        ends = torch.tensor(counts).cumsum(0).to(device, torch.int32)
        got = grouped_lowrank_add_(y, left, right, ends, scale)
        assert got.data_ptr() == y.data_ptr()
        out.append(((got.double().cpu() - want).abs().max() / want.abs().max()).item())
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("dtype, bound", [("float32", 1e-6), ("float16", 2e-3)])
def test_kernel_equations_interpreted(dtype, bound):
    errors = json.loads(interpreted(KERNEL_CHECK, "cpu", dtype, json.dumps(LAYOUTS)))
    assert len(errors) == 3 * len(LAYOUTS)
    assert max(errors) < bound, errors


@pytest.mark.gpu
def test_kernel_equations_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    errors = json.loads(child(KERNEL_CHECK, "cuda", "bfloat16", json.dumps(LAYOUTS), interpret=False))
    assert max(errors) < 1e-2, errors  # one bf16 rounding of the sum, against the float64 sum


def test_refusals():
    from nemo_mla_lora.peft.grouped_add import grouped_lowrank_add_, runs

    y, left, right = torch.zeros(6, 8), torch.zeros(6, 4), torch.zeros(2, 4, 8)
    assert not runs(y, left, right)  # CPU tensors outside the interpreter: torch's path
    assert not runs(y.double(), left.double(), right.double())
    with pytest.raises(ValueError, match=r"right \(2, 4, 9\).*expected \[t, n\], \[t, k\], \[e, k, n\]"):
        grouped_lowrank_add_(y, left, torch.zeros(2, 4, 9), torch.tensor([3, 6], dtype=torch.int32))


AROUND_CHECK = """
import json, sys, torch
from nemo_mla_lora.peft import grouped_add, lora_around
from nemo_mla_lora.peft.lora_fn import group_offsets
device, dtype = sys.argv[1], getattr(torch, sys.argv[2])
calls = []
kernel = grouped_add.grouped_lowrank_add_
grouped_add.grouped_lowrank_add_ = lambda *a, **k: calls.append(1) or kernel(*a, **k)
counts, i, o, r, scale = [7, 0, 50, 1, 30], 40, 72, 12, 0.5
e = len(counts)
g = torch.Generator().manual_seed(0)
x0, w, a0, b0 = (torch.randn(*s, generator=g) for s in ((sum(counts), i), (e, o, i), (e, r, i), (e, o, r)))
gy = torch.randn(sum(counts), o, generator=g)


def base(x):  # a grouped linear as TE's: a fresh output and a fresh input gradient
    return torch.cat([x[lo:hi] @ w[k].to(x).T for k, (lo, hi) in enumerate(zip(ends[:-1], ends[1:]))])


ends = [0, *torch.tensor(counts).cumsum(0).tolist()]
result = {}
for use in (True, False):
    lora_around.GROUPED_ADD = use
    x, a, b = (v.to(device, dtype, copy=True).requires_grad_() for v in (x0, a0, b0))
    offs = group_offsets(counts, x.device)
    x1, hs = lora_around.lora_fork(x, a, scale, counts, offs)
    y = lora_around.lora_onto(base(x1), hs, b, counts, offs)
    y.backward(gy.to(device, dtype))
    result[use] = [t.detach().double().cpu() for t in (y, x.grad, a.grad, b.grad)]
x, a, b = (v.to(torch.float64, copy=True).requires_grad_() for v in (x0, a0, b0))
y = base(x) + torch.cat([  # the equations in float64
    scale * (x[lo:hi] @ a[k].T) @ b[k].T for k, (lo, hi) in enumerate(zip(ends[:-1], ends[1:]))
])
y.backward(gy.double())
want = [y.detach(), x.grad, a.grad, b.grad]
rel = lambda got, ref: ((got - ref).abs().max() / ref.abs().max()).item()
print(json.dumps({
    "calls": len(calls),
    "kernel": [rel(got, ref) for got, ref in zip(result[True], want)],
    "torch": [rel(got, ref) for got, ref in zip(result[False], want)],
}))
"""


@pytest.mark.slow
def test_lora_around_grouped_interpreted():
    report = json.loads(interpreted(AROUND_CHECK, "cpu", "float32"))
    assert report["calls"] == 2, report  # the delta onto the output, the input gradient onto the base's
    assert max(report["kernel"]) < 1e-5, report
    assert max(report["torch"]) < 1e-5, report


@pytest.mark.gpu
def test_lora_around_grouped_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    report = json.loads(child(AROUND_CHECK, "cuda", "bfloat16", interpret=False))
    assert report["calls"] == 2, report
    kernel, torch_path = report["kernel"], report["torch"]
    assert all(k <= max(1.5 * t, 1e-2) for k, t in zip(kernel, torch_path)), report  # no worse than torch's path
