"""Decode replayed from a CUDA graph (``inference/graphs.py``).

On every machine: the static cache (attention over the whole allocation, rows masked by their lengths) gives the
eager engine's logits step for step, its decode steps advance in place without reading the device, and
``GraphedDecode`` refuses what it cannot replay with the reason. On a GPU: the graphed decode's logits equal the
eager ones, step for step, with our kernels and with per-row adapters."""

import pytest
import torch
from conftest import batch

from nemo_mla_lora.inference.engine import AbsorbedMLAEngine
from nemo_mla_lora.inference.graphs import GraphedDecode, graph_unsafe


def _engine(spec, device="cpu", dtype=torch.float32, backend="torch", dense: bool = False):
    """An engine of ``spec``'s attention with random weights (``dense``: MoE layers made dense, as graphs need)."""
    from dataclasses import replace

    from nemo_mla_lora.models.from_spec import config_from_spec
    from nemo_mla_lora.models.tiny import build_model

    spec = replace(spec, num_experts=0, moe_layer_pattern=(), moe_topk=0) if dense else spec
    torch.manual_seed(0)
    model = build_model(config_from_spec(spec, dtype)).to(device)
    h, c = spec.num_heads, spec.kv_lora_rank
    k_up, v_up = ([torch.randn(h * n, c, dtype=dtype, device=device) * c**-0.5 for _ in range(spec.num_layers)]
                  for n in (spec.qk_nope_head_dim, spec.v_head_dim))  # fmt: skip
    return AbsorbedMLAEngine(model, spec, k_up, v_up, backend)


def _decode(engine, cache, tokens, prefill: int) -> torch.Tensor:
    steps = [engine.forward(tokens[:, :prefill], cache)[:, -1]]
    steps += [engine.forward(tokens[:, i : i + 1], cache)[:, -1] for i in range(prefill, tokens.shape[1])]
    return torch.stack(steps, dim=1)  # [b, steps, v]


def test_the_static_cache_decodes_as_the_growing_one(trained):
    engine = _engine(trained["spec"])
    tokens, _, _ = batch(seq=12)
    eager = _decode(engine, engine.new_cache(2, 16), tokens, prefill=5)
    static_cache = engine.new_cache(2, 16, static=True)
    static = _decode(engine, static_cache, tokens, prefill=5)
    torch.testing.assert_close(static, eager, atol=1e-5, rtol=0)
    assert static_cache.length == 12 and static_cache.lengths.tolist() == [12, 12]


def test_decode_steps_advance_in_place_without_reading_the_device(trained):
    engine = _engine(trained["spec"])
    tokens, _, _ = batch(seq=6)
    cache = engine.new_cache(2, 8)
    engine.forward(tokens[:, :5], cache)
    lengths = cache.lengths
    engine.forward(tokens[:, 5:6], cache)
    assert cache.lengths is lengths and lengths.tolist() == [6, 6] and cache.length == 6  # the same tensor


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_graphs_are_refused_with_the_reason(trained):
    engine = _engine(trained["spec"])
    assert "CUDA graphs need the model on a GPU" in graph_unsafe(engine)
    assert graph_unsafe(_engine(trained["spec"], dense=True)).startswith("CUDA graphs need")  # builds dense
    with pytest.raises(ValueError, match="GraphedDecode: CUDA graphs need the model on a GPU"):
        GraphedDecode(engine, engine.new_cache(2, 8, static=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_graphed_decode_equals_eager(trained, backend):
    engine = _engine(trained["spec"], "cuda", torch.float32, backend, dense=True)
    tokens = batch(seq=12)[0].cuda()
    eager = _decode(engine, engine.new_cache(2, 16, static=True), tokens, prefill=5)
    cache = engine.new_cache(2, 16, static=True)
    first = engine.forward(tokens[:, :5], cache)[:, -1]
    graphed = GraphedDecode(engine, cache)
    steps = [first] + [graphed.step(tokens[:, i]).clone() for i in range(5, 12)]
    torch.testing.assert_close(torch.stack(steps, dim=1), eager, atol=1e-4, rtol=0)
    assert cache.length == 12 and cache.lengths.tolist() == [12, 12]
    for _ in range(4):
        graphed.step(tokens[:, 0])
    with pytest.raises(ValueError, match="the cache holds 16 tokens per row; 16 are used and 1 more"):
        graphed.step(tokens[:, 0])


def test_the_benchs_chunked_prefill_matches_the_prompt_in_one_piece(trained, monkeypatch):
    """``bench/decode_bench.prefill`` (chunks that keep the scores small at batch 64, context 4K) leaves the same
    cache and next tokens as one forward over the whole prompt."""
    from support.bench import bench_module

    decode_bench = bench_module("decode_bench")
    engine = _engine(trained["spec"])
    tokens, _, _ = batch(seq=11)
    one = engine.new_cache(2, 16)
    want = engine.forward(tokens, one)[:, -1].argmax(-1)
    monkeypatch.setattr(decode_bench, "PREFILL_SCORES", 2 * engine.spec.num_heads * 16 * 3)  # chunks of 3
    chunked = engine.new_cache(2, 16)
    got = decode_bench.prefill(engine, tokens, chunked)
    assert torch.equal(got, want) and chunked.length == one.length == 11
    torch.testing.assert_close(chunked.c_kv, one.c_kv, atol=1e-5, rtol=0)
