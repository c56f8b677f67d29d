"""The fused LoRA linear and the grouped expert adapters (lora_fn, grouped_experts) against the per-expert
path they replace and against the equations: outputs and every gradient, B != 0, fp32 and fp64."""

import pytest
import torch
from conftest import batch, megatron_ddp_hooks, perturb_norms_and_bias
from megatron.core.transformer.moe.experts import SequentialMLP

from nemo_mla_lora.models.tiny import build_model, tiny_mla_config
from nemo_mla_lora.peft import MLALoRA, grouped_experts, lora_fn
from nemo_mla_lora.peft.adapter import MLALoRAAdapter
from nemo_mla_lora.peft.state import randomize_b

COUNTS = [5, 0, 9, 2]  # rows per expert, one expert without tokens


def equations(x, a, b, scale, weights, counts):
    """Per expert e: x_e W_e^T + scale (x_e A_e^T) B_e^T, as plain autograd ops. x [t, i] -> [t, o]."""
    out, lo = [], 0
    for e, n in enumerate(counts):
        x_e = x[lo : lo + n]
        out.append(x_e @ weights[e].T + scale * (x_e @ a[e].T) @ b[e].T)
        lo += n
    return torch.cat(out)


def leaves(dtype, i=16, o=12, r=4, counts=COUNTS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    e, t = len(counts), sum(counts)
    x = torch.randn(t, i, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    a = torch.randn(e, r, i, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.randn(e, o, r, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    weights = tuple(torch.randn(o, i, generator=gen, dtype=torch.float64).to(dtype) for _ in range(e))
    gy = torch.randn(t, o, generator=gen, dtype=torch.float64).to(dtype)
    return x, a, b, weights, gy


def grads(fn, x, a, b, gy):
    for t in (x, a, b):
        t.grad = None
    y = fn()
    y.backward(gy)
    return [y.detach()] + [t.grad.clone() for t in (x, a, b)]


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.float64, 1e-12)])
@pytest.mark.parametrize("counts", [COUNTS, [7]], ids=["experts", "one_linear"])
def test_fused_function_equals_the_equations(dtype, atol, counts):
    x, a, b, weights, gy = leaves(dtype, counts=counts)
    got = grads(lambda: lora_fn.frozen_lora_linear(x, a, b, 0.7, weights, counts), x, a, b, gy)
    ref = grads(lambda: equations(x, a, b, 0.7, weights, counts), x, a, b, gy)
    for name, g, r in zip(("y", "x", "A", "B"), got, ref):
        assert g.shape == r.shape, name
        assert (g - r).abs().max().item() < atol * max(1.0, r.abs().max().item()), name
    if len(counts) > 1:
        assert got[2][1].abs().max() == 0 and got[3][1].abs().max() == 0  # the expert without tokens


@pytest.mark.parametrize("under_ddp", [False, True], ids=["autograd", "megatron_ddp"])
def test_one_linear_with_2d_factors_equals_the_equations(under_ddp):
    """One linear (A [r, i], B [o, r], as the adapter passes its parameters) in float64; under Megatron's DDP hook
    the factors' gradients land in ``main_grad`` (added to what it held), inside the GEMM: the flag is set."""
    x, a, b, weights, gy = leaves(torch.float64, counts=[7])
    a, b = torch.nn.Parameter(a.detach()[0]), torch.nn.Parameter(b.detach()[0])
    before, _kept = megatron_ddp_hooks((a, b), torch.float64) if under_ddp else (None, None)
    x.grad = None
    y = lora_fn.frozen_lora_linear(x.view(7, 1, -1), a, b, 0.7, weights[:1])
    y.backward(gy.view(7, 1, -1))
    xr, ar, br = (t.detach().clone().requires_grad_() for t in (x, a, b))
    ref = equations(xr, ar[None], br[None], 0.7, weights, [7])
    ref.backward(gy)
    torch.testing.assert_close(y.view(7, -1), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=1e-12)
    if not under_ddp:
        got = (a.grad, b.grad)
    else:
        assert a.grad is None and b.grad is None and a.grad_added_to_main_grad and b.grad_added_to_main_grad
        got = (a.main_grad - before[0], b.main_grad - before[1])
    for g, r in zip(got, (ar.grad, br.grad)):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)


def test_frozen_base_alone_and_trainable_base_refused():
    x, a, b, weights, gy = leaves(torch.float64)
    y = lora_fn.frozen_lora_linear(x, None, None, 0.0, weights, COUNTS)
    y.backward(gy)
    zero = torch.zeros_like(b)
    x_ref = x.detach().clone().requires_grad_()
    equations(x_ref, a.detach(), zero, 0.0, weights, COUNTS).backward(gy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="must be frozen"):
        lora_fn.frozen_lora_linear(x, a, b, 1.0, (weights[0].clone().requires_grad_(),) + weights[1:], COUNTS)


def test_native_grouped_mm_is_used_where_it_runs(monkeypatch):
    """fp32 with 16-byte rows goes through torch._grouped_mm (CPU); fp64 or odd rows through the loop."""
    calls = []
    native = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *args: calls.append(1) or native(*args))
    x, a, b, weights, gy = leaves(torch.float32)
    lora_fn.frozen_lora_linear(x, a, b, 1.0, weights, COUNTS).backward(gy)
    assert len(calls) == 6  # forward: x A^T, h B^T; backward: g B, g^T h, gh^T x, gh A
    calls.clear()
    x, a, b, weights, gy = leaves(torch.float64)
    lora_fn.frozen_lora_linear(x, a, b, 1.0, weights, COUNTS).backward(gy)
    assert not calls


def adapted_tiny(dtype, seed=0, **peft):
    config = tiny_mla_config(dtype=dtype)
    torch.manual_seed(seed)
    model = build_model(config)
    perturb_norms_and_bias(model)
    model = MLALoRA(**peft)(model)
    randomize_b(model, seed=seed)
    return model


def step(model):
    """Logits, the input embedding's gradient and every adapter gradient of one forward/backward."""
    tokens, positions, mask = batch()
    model.zero_grad(set_to_none=True)
    logits = model(tokens, positions, mask)
    gen = torch.Generator().manual_seed(3)
    logits.backward(torch.randn(logits.shape, generator=gen, dtype=torch.float64).to(logits.dtype))
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def per_expert_path(model, monkeypatch):
    """Back to Megatron's SequentialMLP and the three-op adapter (MLALoRAAdapter.add_to)."""
    for m in model.modules():
        if isinstance(m, grouped_experts.LoRASequentialMLP):
            m.__class__ = SequentialMLP
    monkeypatch.setattr(MLALoRAAdapter, "fused", lambda self, base: False)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("placement", ["all_linear", "nemo_official", "safe"])
def test_grouped_and_fused_equal_the_per_expert_path(mcore, monkeypatch, dtype, atol, placement):
    model = adapted_tiny(dtype, placement=placement, dim=4, alpha=6)
    experts = [m for m in model.modules() if isinstance(m, grouped_experts.LoRASequentialMLP)]
    assert experts and all(m.grouped_plan() is not None for m in experts)  # frozen experts too (nemo_official)
    logits, grad = step(model)
    per_expert_path(model, monkeypatch)
    ref_logits, ref_grad = step(model)
    assert grad.keys() == ref_grad.keys() and any("local_experts" in n for n in grad) == (placement != "nemo_official")
    scale = ref_logits.abs().max().item()
    assert (logits - ref_logits).abs().max().item() < atol * scale
    for name in ref_grad:
        diff = (grad[name] - ref_grad[name]).abs().max().item()
        assert diff < atol * max(1.0, ref_grad[name].abs().max().item()), f"{name}: {diff}"


def test_experts_fall_back_where_grouping_does_not_apply(mcore, monkeypatch):
    """Adapters on some experts only: Megatron's per-expert forward, the same numbers."""
    model = adapted_tiny(torch.float64, placement=None, target_modules=["*.local_experts.0.linear_fc1"], dim=3)
    experts = [m for m in model.modules() if isinstance(m, grouped_experts.LoRASequentialMLP)]
    assert experts and all(m.grouped_plan() is None for m in experts)
    logits, grad = step(model)
    assert any(g.abs().max() > 0 for g in grad.values())
    per_expert_path(model, monkeypatch)
    ref_logits, ref_grad = step(model)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-12, atol=1e-12)
    for name in ref_grad:  # expert 0's adapter runs fused per expert here, unfused there: rounding only
        torch.testing.assert_close(grad[name], ref_grad[name], rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("counts", [[300, 0, 517, 45, 162], [1024]], ids=["experts", "one_linear"])
def test_bf16_on_the_gpu_equals_the_float64_equations(monkeypatch, counts):
    """The CUDA grouped GEMMs (torch._grouped_mm on sm90+) in bf16: within bf16 rounding of float64."""
    calls = []
    native = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *args: calls.append(1) or native(*args))
    x, a, b, weights, gy = leaves(torch.float64, i=256, o=384, r=16, counts=counts)
    ref = grads(lambda: equations(x, a, b, 0.5, weights, counts), x, a, b, gy)
    cast = [t.detach().to("cuda", torch.bfloat16) for t in (x, a, b, gy)]
    xg, ag, bg = (t.requires_grad_() for t in cast[:3])
    got = grads(
        lambda: lora_fn.frozen_lora_linear(
            xg, ag, bg, 0.5, tuple(w.to("cuda", torch.bfloat16) for w in weights), counts
        ),
        xg,
        ag,
        bg,
        cast[3],
    )
    for name, g, r in zip(("y", "x", "A", "B"), got, ref):
        rel = ((g.double().cpu() - r).norm() / r.norm()).item()
        assert rel < 1e-2, f"{name}: relative error {rel}"
    assert len(calls) == (6 if len(counts) > 1 and torch.cuda.get_device_capability() >= (9, 0) else 0)


def test_frozen_experts_on_the_grouped_path_equal_megatrons(mcore, monkeypatch):
    """group_experts(frozen_too=True): a frozen MoE model's logits and input gradient as SequentialMLP's."""
    config = tiny_mla_config(dtype=torch.float64)
    torch.manual_seed(0)
    model = build_model(config)
    perturb_norms_and_bias(model)
    model.requires_grad_(False)
    model.embedding.word_embeddings.weight.requires_grad_(True)  # a gradient that flows through every expert
    assert grouped_experts.group_experts(model, frozen_too=True) > 0
    assert all(
        m.grouped_plan() is not None for m in model.modules() if isinstance(m, grouped_experts.LoRASequentialMLP)
    )
    logits, grad = step(model)
    per_expert_path(model, monkeypatch)
    ref_logits, ref_grad = step(model)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        grad["embedding.word_embeddings.weight"], ref_grad["embedding.word_embeddings.weight"], rtol=1e-12, atol=1e-12
    )


@pytest.mark.slow
def test_grouped_path_with_megatrons_fused_swiglu(mcore, monkeypatch):
    """bias_activation_fusion (Megatron's weighted_bias_swiglu_impl, as NeMo's GPU configs set it): the
    grouped path's one activation over all tokens equals SequentialMLP's per expert."""
    config = tiny_mla_config(dtype=torch.float32, bias_activation_fusion=True)
    torch.manual_seed(0)
    model = MLALoRA(placement="all_linear", dim=4, alpha=6)(build_model(config))
    randomize_b(model)
    experts = [m for m in model.modules() if isinstance(m, grouped_experts.LoRASequentialMLP)]
    assert experts and all(m.grouped_plan() is not None for m in experts)
    logits, grad = step(model)
    per_expert_path(model, monkeypatch)
    ref_logits, ref_grad = step(model)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=2e-5 * ref_logits.abs().max().item())
    for name in ref_grad:
        scale = max(1.0, ref_grad[name].abs().max().item())
        torch.testing.assert_close(grad[name], ref_grad[name], rtol=0, atol=2e-5 * scale, msg=name)
