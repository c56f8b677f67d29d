"""The engine's MoE layers without Megatron's token dispatcher (``inference/moe.py``).

On every machine, for every routing of the family (V2 softmax greedy and group-limited, V3 sigmoid + bias noaux_tc):
``GroupedMoE`` gives Megatron's own MoE layer's output on the same weights (router, routed experts through
``torch._grouped_mm`` with the offsets on the device, shared experts), holds the expert weights once, and the engine
decodes with it as with Megatron's layer. On a GPU: the engine's decode of a MoE model replays from a CUDA graph with
the eager logits (bf16, sm_90+)."""

import pytest
import torch
from conftest import batch, perturb_norms_and_bias
from support.hf import MAKER, VARIANTS

from nemo_mla_lora.arch import hf_config
from nemo_mla_lora.inference.moe import GroupedMoE, unsupported


def _model(variant: str, dtype=torch.float32, device="cpu"):
    from nemo_mla_lora.models.from_spec import config_from_spec
    from nemo_mla_lora.models.tiny import build_model

    spec = hf_config.spec_from_hf(MAKER.hf_config(variant).to_dict())
    torch.manual_seed(0)
    model = build_model(config_from_spec(spec, dtype)).to(device).eval()
    perturb_norms_and_bias(model)  # the V3 router's expert bias non-zero: it changes the choice, not the weights
    return spec, model


def _moe_layers(model) -> list:
    return [layer.mlp for layer in model.decoder.layers if hasattr(layer.mlp, "router")]


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_grouped_moe_gives_megatrons_moe_layer(mcore, variant, monkeypatch):
    spec, model = _model(variant)
    layers = _moe_layers(model)
    assert layers and all(unsupported(mlp) is None for mlp in layers)
    x = torch.randn(5, 3, spec.hidden_size, generator=torch.Generator().manual_seed(1))  # [s, b, hidden]
    want = [mlp(x)[0] for mlp in layers]  # Megatron's router, allgather dispatcher, SequentialMLP, shared experts
    grouped = [GroupedMoE(mlp) for mlp in layers]
    from nemo_mla_lora.peft import lora_fn

    monkeypatch.setattr(lora_fn, "spans", lambda counts: pytest.fail("the per-expert host loop ran"))
    for moe, mlp, expected in zip(grouped, layers, want):
        got, bias = moe(x)
        assert bias is None and got.shape == x.shape
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        fc1 = mlp.experts.local_experts[1].linear_fc1.weight
        assert fc1.data_ptr() == moe.w1[1].data_ptr()  # the expert's weight is a view of the stack: held once
    torch.testing.assert_close(layers[0](x)[0], want[0], atol=0, rtol=0)  # the layer itself, on the views


@torch.no_grad()
def test_the_per_expert_fallback_gives_the_same(mcore):
    """float64 (which torch._grouped_mm does not run): one GEMM per expert, the counts read back."""
    spec, model = _model("v3_noaux_yarn_q", torch.float64)
    mlp = _moe_layers(model)[0]
    x = torch.randn(4, 2, spec.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(GroupedMoE(mlp)(x)[0], mlp(x)[0], atol=1e-12, rtol=1e-12)
    assert "runs on cpu" in GroupedMoE(mlp).graph_problem(x)


def test_layers_it_cannot_stand_in_for_are_named(mcore):
    spec, model = _model("v2_lite_greedy_yarn_noq")
    dense = next(layer.mlp for layer in model.decoder.layers if not hasattr(layer.mlp, "router"))
    assert "not a MoE layer" in unsupported(dense)
    mlp = _moe_layers(model)[0]
    mlp.config.moe_expert_capacity_factor = 1.0
    try:
        assert "token dropping" in unsupported(mlp)
        with pytest.raises(ValueError, match="GroupedMoE: token dropping"):
            GroupedMoE(mlp)
    finally:
        mlp.config.moe_expert_capacity_factor = None


def _engine(model, spec, device="cpu"):
    from nemo_mla_lora.inference.engine import AbsorbedMLAEngine

    dtype = next(model.parameters()).dtype
    h, c = spec.num_heads, spec.kv_lora_rank
    gen = torch.Generator().manual_seed(3)
    k_up, v_up = ([torch.randn(h * n, c, generator=gen).to(device, dtype) * c**-0.5 for _ in range(spec.num_layers)]
                  for n in (spec.qk_nope_head_dim, spec.v_head_dim))  # fmt: skip
    return AbsorbedMLAEngine(model, spec, k_up, v_up)


@pytest.mark.parametrize("variant", ["v2_lite_greedy_yarn_noq", "v3_noaux_yarn_q"])
def test_the_engine_decodes_with_it_as_with_megatrons_layer(mcore, variant):
    spec, model = _model(variant)
    engine = _engine(model, spec)
    assert [m is not None for m in engine.moe] == [hasattr(layer.mlp, "router") for layer in model.decoder.layers]
    tokens, _, _ = batch(seq=9, vocab=spec.vocab_size)
    runs = []
    for moe in (engine.moe, [None] * len(engine.moe)):  # grouped, then Megatron's own layers
        engine.moe = moe
        cache = engine.new_cache(2, 12)
        steps = [engine.forward(tokens[:, :6], cache)[:, -1]]
        steps += [engine.forward(tokens[:, i : i + 1], cache)[:, -1] for i in range(6, 9)]
        runs.append(torch.stack(steps, dim=1))  # [b, 4, vocab]
    torch.testing.assert_close(runs[0], runs[1], atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0), reason="needs sm_90+ (grouped GEMM)"
)
@pytest.mark.parametrize("variant", ["v2_lite_greedy_yarn_noq", "v3_noaux_yarn_q"])
def test_a_moe_model_decodes_from_a_cuda_graph(mcore, variant):
    from nemo_mla_lora.inference.graphs import GraphedDecode, graph_unsafe

    spec, model = _model(variant, torch.bfloat16, "cuda")
    engine = _engine(model, spec, "cuda")
    assert graph_unsafe(engine) is None
    tokens = batch(seq=12, vocab=spec.vocab_size)[0].cuda()
    eager_cache = engine.new_cache(2, 16, static=True)
    eager = [engine.forward(tokens[:, :5], eager_cache)[:, -1]]
    eager += [engine.forward(tokens[:, i : i + 1], eager_cache)[:, -1] for i in range(5, 12)]
    cache = engine.new_cache(2, 16, static=True)
    first = engine.forward(tokens[:, :5], cache)[:, -1]
    graphed = GraphedDecode(engine, cache)
    steps = [first] + [graphed.step(tokens[:, i]).clone() for i in range(5, 12)]
    torch.testing.assert_close(torch.stack(steps, 1).float(), torch.stack(eager, 1).float(), atol=2e-2, rtol=0)
