"""On a GPU with Transformer Engine: MLALoRA on Megatron's TE layer spec (as NeMo builds DeepSeek-V3:
TELinear q/kv down, TELayerNormColumnParallelLinear q/kv up and dense fc1 with their norms fused, TEColumn/
TERowParallelLinear, TEGroupedMLP experts with grouped GEMM). Skipped where CUDA or TE is missing (every CPU
machine; the GPU image until TE is brought up: bench/run_gpu.sh te_finetune says how).

Against what we did not write: the plain-torch equations (``reference.model.forward``, float64 on the CPU), the
TE-free local spec's gradients (itself tested against the equations on CPU), Megatron's ``dist_checkpointing.load``
at default strictness. Every adapter has B != 0; fp32 throughout, so the bounds are fp32's (TF32 off where the
run sets ``NVIDIA_TF32_OVERRIDE=0``)."""

import json
import os

import pytest
import torch
from conftest import batch, perturb_norms_and_bias


def _te_and_cuda() -> bool:
    if not torch.cuda.is_available():
        return False
    from nemo_mla_lora.runtime.te_compat import transformer_engine_absent

    return not transformer_engine_absent()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _te_and_cuda(), reason="needs CUDA and Transformer Engine")]

VARIANTS = {"q_lora": "tiny_mla", "no_q_lora": "tiny_mla_noq"}
HF_VARIANTS = (
    "v2_lite_greedy_yarn_noq",
    "v2_group_limited_rope_q",
    "v3_noaux_yarn_q",
    "v3_noaux_rope_noq",
    "v3_tied_yarn_q",
)  # scripts/make_tiny_hf.py's VARIANTS (test_hf_checkpoints: equal to transformers)
REL = 2e-5 if os.environ.get("NVIDIA_TF32_OVERRIDE") == "0" else 5e-3  # of the largest |logit| / |grad|


def record(test: str, **values) -> None:
    """Measured differences, one JSON line each, to ``$TE_GPU_RECORD`` (bench/README.md quotes them)."""
    if os.environ.get("TE_GPU_RECORD"):
        with open(os.environ["TE_GPU_RECORD"], "a") as f:
            f.write(json.dumps({"test": test, **values}) + "\n")


def spec_of(name: str):
    """A built-in tiny model, or one of ``scripts/make_tiny_hf.py``'s variants read from transformers' own config
    (V2 greedy and group-limited softmax routing, V3 noaux, plain RoPE and YaRN, with and without q compression)."""
    from nemo_mla_lora.arch.hf_config import spec_from_hf
    from nemo_mla_lora.models.architecture import builtin_spec

    if name in HF_VARIANTS:
        from support.hf import MAKER

        return spec_from_hf(MAKER.hf_config(name), name)
    return builtin_spec(name)


def build(name: str, te: bool, seed: int = 0):
    """(model on the GPU, its Megatron config, its MLASpec)."""
    from nemo_mla_lora.models.from_spec import CPU_SAFE, config_from_spec
    from nemo_mla_lora.models.layer_spec import local_mla_block_spec, te_mla_block_spec
    from nemo_mla_lora.models.tiny import build_model

    spec = spec_of(name)
    if te:  # NeMo's DeepSeek defaults (alltoall dispatcher, TE permute fusion, grouped GEMM), TE spec
        config = config_from_spec(spec, torch.float32, transformer_layer_spec=te_mla_block_spec, moe_grouped_gemm=True)
    else:
        config = config_from_spec(spec, torch.float32, **CPU_SAFE, transformer_layer_spec=local_mla_block_spec)
    torch.manual_seed(seed)
    return build_model(config).cuda().eval(), config, spec


def adapted_te(name: str, targets="all_linear", seed: int = 0, parts=None):
    from nemo_mla_lora.peft import MLALoRA
    from nemo_mla_lora.peft.state import randomize_b

    model, _, spec = build(name, te=True, seed=seed)
    perturb_norms_and_bias(model)
    peft = MLALoRA(placement=targets, dim=4, alpha=8, parts=parts or {})
    model = peft(model)
    randomize_b(model, seed=seed)
    return model, spec, peft


def logits(model, seq: int = 12, vocab: int = 264):
    tokens, positions, mask = (t.cuda() for t in batch(seq, vocab=vocab))
    return model(tokens, positions, mask)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_te_linear_kind_is_wrapped(mcore, variant):
    from nemo_mla_lora.peft.state import adapter_modules

    model, _, _ = adapted_te(VARIANTS[variant])
    kinds = {n.rsplit(".", 1)[-1]: type(m.to_wrap).__name__ for n, m in adapter_modules(model).items()}
    expected = {
        "linear_q_down_proj": "TELinear",
        "linear_q_up_proj": "LatentNormTELinear",
        "linear_kv_down_proj": "TELinear",
        "linear_kv_up_proj": "LatentNormTELinear",
        "linear_proj": "TERowParallelLinear",
    }
    if variant == "no_q_lora":
        expected = {k: v for k, v in expected.items() if "_q_" not in k} | {"linear_q_proj": "TEColumnParallelLinear"}
    assert {k: kinds[k] for k in expected} == expected
    found = {
        (n.split(".mlp.")[-1], type(m.to_wrap).__name__) for n, m in adapter_modules(model).items() if ".mlp." in n
    }
    assert found == {
        ("linear_fc1", "TELayerNormColumnParallelLinear"),
        ("linear_fc2", "TERowParallelLinear"),
        ("shared_experts.linear_fc1", "TEColumnParallelLinear"),
        ("shared_experts.linear_fc2", "TERowParallelLinear"),
        ("experts.linear_fc1", "TEColumnParallelGroupedLinear"),
        ("experts.linear_fc2", "TERowParallelGroupedLinear"),
    }
    fused = {
        n.split(".", 3)[-1]
        for n, m in adapter_modules(model).items()
        if getattr(getattr(m, "adapter", None), "layout", None) is not None and m.adapter.layout.fused_norm
    }
    fusable = ("self_attention.linear_q_up_proj", "self_attention.linear_kv_up_proj", "mlp.linear_fc1")
    assert fused == {k for k in fusable if variant == "q_lora" or "_q_" not in k}


PARTS = {
    "q_lora": {"linear_q_up_proj": "rope", "linear_kv_up_proj": "k", "linear_kv_down_proj": "latent"},
    "no_q_lora": {"linear_q_proj": "nope", "linear_kv_up_proj": "v", "linear_kv_down_proj": "rope"},
}


@pytest.mark.parametrize("parts", [False, True], ids=["whole", "parts"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_te_lora_matches_the_reference_equations(mcore, variant, parts):
    """Every linear adapted; ``parts``: the MLA linears part-selective (B on some rows only), fused norms too."""
    model, spec, _ = adapted_te(VARIANTS[variant], parts=PARTS[variant] if parts else None)
    check_against_equations(model, spec, "reference", variant=variant, parts=parts)


@pytest.mark.parametrize("variant", HF_VARIANTS)
def test_te_lora_on_every_family_variant_matches_the_equations(mcore, variant):
    """The TE spec (DeepSeek-V2's group router swapped in where its routing needs it) with adapters on every linear,
    on each routing and RoPE variant of the family, against the equations (which equal transformers' own
    DeepseekV2/V3 models on the same variants: tests/recipes/test_hf_checkpoints.py)."""
    model, spec, _ = adapted_te(variant)
    check_against_equations(model, spec, "family_variant", variant=variant)


def check_against_equations(model, spec, test: str, **labels) -> None:
    """The adapted TE model's logits against the plain-torch equations in float64 on its own base and adapter
    tensors; the differences recorded under ``test`` with ``labels``."""
    from nemo_mla_lora.peft.state import adapter_factors, base_state_dict
    from nemo_mla_lora.reference.model import forward

    state = {k: v.double().cpu() for k, v in base_state_dict(model).items()}
    adapters = {k: (a.double().cpu(), b.double().cpu(), s) for k, (a, b, s) in adapter_factors(model).items()}
    tokens = batch(vocab=spec.vocab_size)[0]
    with torch.no_grad():
        out = logits(model, vocab=spec.vocab_size).double().cpu()
        reference, base = forward(tokens, state, spec, adapters), forward(tokens, state, spec)
    diff, changed = (out - reference).abs().max().item(), (reference - base).abs().max().item()
    scale = reference.abs().max().item()
    record(test, **labels, max_abs_diff=diff, adapters_changed_logits_by=changed, max_abs_logit=scale)
    assert changed > 100 * REL * scale, "adapters changed nothing"
    assert diff <= REL * scale, f"{labels}: TE + MLALoRA vs the equations: {diff:.3g} > {REL * scale:.3g}"


def _grads(model) -> dict:
    """Adapter name (local flat, per expert) -> (grad A, grad B)."""
    from nemo_mla_lora.peft.mla_lora import MLALoRALinear
    from nemo_mla_lora.peft.state import adapter_modules, expert_adapters

    out = {}
    for n, m in adapter_modules(model).items():
        if isinstance(m, MLALoRALinear):
            out[n] = (m.adapter.lora_a.grad, m.adapter.lora_b.grad)
        else:  # TE grouped: per local expert, named as SequentialMLP's
            out.update({e: (a.grad, b.grad) for e, a, b in expert_adapters(n, m)})
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_te_lora_gradients_match_the_local_spec(mcore, variant):
    """Same weights, same adapters: the TE model's adapter gradients (the fused norm's returned output, TE's
    grouped GEMM experts) equal the local spec's."""
    from nemo_mla_lora.checkpoints import dist_ckpt
    from nemo_mla_lora.peft import MLALoRA
    from nemo_mla_lora.peft.state import adapter_factors, adapter_modules, base_state_dict

    te_model, _, _ = adapted_te(VARIANTS[variant])
    local, _, _ = build(VARIANTS[variant], te=False)
    dist_ckpt.load_weights(local, base_state_dict(te_model), "the TE model's weights")
    local = MLALoRA(placement="all_linear", dim=4, alpha=8)(local)
    factors = adapter_factors(te_model)
    assert set(factors) == set(adapter_factors(local))
    with torch.no_grad():
        for n, m in adapter_modules(local).items():
            m.adapter.lora_a.copy_(factors[n][0])
            m.adapter.lora_b.copy_(factors[n][1])
    outs = {}
    for kind, model in (("te", te_model), ("local", local)):
        out = logits(model, seq=48)  # 96 tokens, top-2 of 6 experts
        out.backward(torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out))
        outs[kind] = (out.detach(), _grads(model))
    (te_out, te_grads), (local_out, local_grads) = outs["te"], outs["local"]
    worst, idle = 0.0, set()
    for n, (ga, gb) in local_grads.items():
        for g_te, g_local in zip(te_grads[n], (ga, gb)):
            if g_local.abs().max() == 0:  # a routed expert that got no token: no gradient on either side
                assert ".local_experts." in n and g_te.abs().max() == 0, f"{n}: no gradient"
                idle.add(n)
                continue
            worst = max(worst, ((g_te - g_local).abs().max() / g_local.abs().max()).item())
    assert len(idle) <= len(local_grads) // 4, f"too few experts saw tokens: {sorted(idle)}"
    logit_diff = (te_out - local_out).abs().max().item()
    record(
        "gradients",
        variant=variant,
        worst_relative_grad_diff=worst,
        max_abs_logit_diff=logit_diff,
        adapters=len(local_grads),
        experts_without_tokens=len(idle),
    )
    assert logit_diff <= REL * local_out.abs().max().item()
    assert worst <= 10 * REL, f"worst adapter gradient differs by {worst:.3g} of its largest value"


def test_te_merged_equals_unmerged(mcore):
    """W + s B A written into the TE modules' own weights (``weight``, grouped ``weight{e}``), B zeroed: the
    same logits as the adapters running beside the frozen TE GEMMs."""
    from nemo_mla_lora.peft.merge import merge_linear
    from nemo_mla_lora.peft.mla_lora import MLALoRALinear
    from nemo_mla_lora.peft.state import adapter_modules, lora_b_parameters

    model, _, _ = adapted_te("tiny_mla")
    with torch.no_grad():
        unmerged = logits(model)
        for m in adapter_modules(model).values():
            ad = m.adapter
            if isinstance(m, MLALoRALinear):  # merge_linear works on the CPU
                pairs = [(m.to_wrap.weight, ad.lora_a, ad.full_b())]
            else:
                pairs = [(getattr(m.to_wrap, f"weight{e}"), *ad.expert(e)) for e in range(ad.num_experts)]
            for w, a, b in pairs:
                w.copy_(merge_linear(w.cpu(), a.cpu(), b.cpu(), ad.scale))
            for b in lora_b_parameters(ad):
                b.zero_()
        merged = logits(model)
    diff = (merged - unmerged).abs().max().item()
    record("merge", max_abs_diff=diff, max_abs_logit=unmerged.abs().max().item())
    assert diff <= REL * unmerged.abs().max().item()


def test_te_checkpoints_export_and_load_in_megatrons_te_model(mcore, tmp_path):
    """The TE model's base (TE names, ``_extra_state``) and adapters, saved as the callback saves them, export
    (``format=mcore names=te``, verified); Megatron's ``dist_checkpointing.load`` at default strictness puts the
    export into a fresh TE model, which gives the adapted model's logits. The adapter directory loads into the
    local spec's experts too (same keys)."""
    from megatron.core import dist_checkpointing

    from nemo_mla_lora.checkpoints import dist_ckpt
    from nemo_mla_lora.export.pipeline import export
    from nemo_mla_lora.peft import MLALoRA
    from nemo_mla_lora.peft.state import adapter_factors

    model, spec, peft = adapted_te("tiny_mla")
    dist_ckpt.save_base(model, spec, tmp_path / "base")
    dist_ckpt.save_adapter(model, peft, spec, tmp_path / "adapter", base_dir=tmp_path / "base")
    manifest = export(
        tmp_path / "base", tmp_path / "adapter", tmp_path / "out", fmt="mcore", names="te", progress=False
    )
    fresh, _, _ = build("tiny_mla", te=True, seed=1)
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), str(tmp_path / "out")))
    with torch.no_grad():
        want, got = logits(model), logits(fresh)
    diff = (got - want).abs().max().item()
    record("export", max_abs_diff=diff, verify=manifest.get("verify"))
    assert diff <= REL * want.abs().max().item()

    local, _, _ = build("tiny_mla", te=False, seed=2)
    local = MLALoRA(placement="all_linear", dim=4, alpha=8)(local)
    sharded = {k: v for k, v in local.sharded_state_dict().items() if ".adapter." in k}
    local.load_state_dict(dist_checkpointing.load(sharded, str(tmp_path / "adapter")), strict=False)
    theirs, ours = adapter_factors(local), adapter_factors(model)
    assert set(theirs) == set(ours)
    for n, (a, b, _) in ours.items():
        assert torch.equal(theirs[n][0], a) and torch.equal(theirs[n][1], b), n


class _Output(torch.nn.Module):
    """A Megatron linear's output alone (CUDA-graph helpers take tensors, not Megatron's (output, bias))."""

    def __init__(self, linear: torch.nn.Module):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x)[0]


def _fwd_bwd(fn, x, grad, params) -> list[torch.Tensor]:
    """fn(x) and its backward with ``grad``: [output, x.grad, *param grads], cloned."""
    for t in [x, *params]:
        t.grad = None
    out = fn(x)
    out.backward(grad)
    return [out.detach().clone()] + [t.grad.clone() for t in [x, *params]]


@pytest.mark.parametrize(
    "target", ["linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj", "linear_proj"]
)
def test_te_lora_replays_from_a_cuda_graph(mcore, target):
    """An adapted TE linear of the MLA layer (the latent norm's fused linears included) captured, forward and
    backward, by ``torch.cuda.make_graphed_callables`` and replayed on a new input: output, input gradient and
    A / B gradients equal eager's. Where TE's own frozen linear does not capture, the test says so and skips."""
    model, _, _ = adapted_te("tiny_mla")
    wrapper = getattr(model.decoder.layers[0].self_attention, target)
    width = wrapper.to_wrap.in_features
    gen = torch.Generator(device="cuda").manual_seed(3)
    sample, x = (torch.randn(16, 2, width, device="cuda", generator=gen).requires_grad_() for _ in range(2))
    try:  # TE's frozen linear alone, through a function (its forward stays as it is)
        torch.cuda.make_graphed_callables(lambda t: wrapper.to_wrap(t)[0], (sample,))
    except Exception as err:  # TE's capture limits are TE's: reported as the skip reason
        pytest.skip(f"TE's {type(wrapper.to_wrap).__name__} does not capture: {type(err).__name__}: {err}")
    module = _Output(wrapper)
    params = [p for p in module.parameters() if p.requires_grad]
    assert len(params) == 2, f"{target}: expected A and B trainable, got {len(params)} parameters"
    grad = torch.randn(module(x).shape, device="cuda", generator=gen)
    want = _fwd_bwd(module, x, grad, params)  # eager, before make_graphed_callables replaces module.forward
    graphed = torch.cuda.make_graphed_callables(module, (sample,))
    got = _fwd_bwd(graphed, x, grad, params)
    names = ["output", "input gradient", "A gradient", "B gradient"]
    worst = {n: ((g - w).abs().max() / w.abs().max()).item() for n, g, w in zip(names, got, want)}
    record("cuda_graph", target=target, **worst)
    assert all(w.abs().max() > 0 for w in want), f"{target}: a zero reference ({names})"
    assert max(worst.values()) <= 1e-6, f"{target}: graphed differs from eager: {worst}"
