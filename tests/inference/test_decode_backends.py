"""The engine's Hopper decode backends beside our Triton kernels: ``gluon`` (``kernels/gluon_backend.py``, the
warp-specialised kernel) and ``flashmla`` (``kernels/flashmla.py``).

On every machine: the ``gluon`` backend is refused with the reason where it could never run (from an export's manifest,
before any weight is read), both Hopper backends refuse an engine that is not bf16, and the ``gluon`` choice per step
takes our kernels for what the Gluon kernel cannot read. On a Hopper GPU: the engine's logits with each backend, step
for step over a prefill and decode steps, equal those with our Triton kernels within bf16's rounding (a model of 64
heads and DeepSeek's c = 512, d = 64; random weights)."""

import dataclasses
import re

import pytest
import torch

from nemo_mla_lora.inference.kernels import gluon_backend, gluon_decode, gluon_launch, graph_choice
from nemo_mla_lora.models.architecture import builtin_spec

BOUND = 3e-2  # of the step's largest |logit|: two bf16 kernels, different summation orders, through 2 layers


def _spec(heads: int = 64, c: int = 512, dr: int = 64):
    return dataclasses.replace(builtin_spec("tiny_mla"), num_heads=heads, kv_lora_rank=c, qk_rope_head_dim=dr)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_engine_refuses_the_gluon_backend_where_it_cannot_run():
    from nemo_mla_lora.inference.engine import AbsorbedMLAEngine

    model = torch.nn.Linear(2, 2)
    gpu = gluon_decode._GLUON_ERROR or "the Gluon decode kernel is compiled for sm_90a (Hopper); expected a sm_90 GPU"
    with pytest.raises(ValueError, match=re.escape(f"attention backend 'gluon': {gpu}")):
        AbsorbedMLAEngine(model, _spec(), [], [], backend="gluon")
    if gluon_decode._GLUON_ERROR is None:
        with pytest.raises(ValueError, match="built for c = 512, d = 64; got c = 40, d = 64"):
            AbsorbedMLAEngine(model, _spec(c=40), [], [], backend="gluon")
        with pytest.raises(ValueError, match="heads in blocks of 64; got 4 heads"):
            AbsorbedMLAEngine(model, _spec(heads=4), [], [], backend="gluon")


def test_an_export_is_refused_before_any_weight_is_read(monkeypatch, tmp_path):
    """A backend the engine cannot use is refused from the export's manifest alone: at real size, reading the weights
    first would cost the whole load before the refusal."""
    from nemo_mla_lora.export import pipeline
    from nemo_mla_lora.inference import engine

    monkeypatch.setattr(engine, "served", lambda directory, verify=True: ("mcore", _spec(), "bfloat16"))
    monkeypatch.setattr(pipeline, "read_export", lambda *a, **k: pytest.fail("weights read before the backend check"))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: attention backend 'nope'; expected one of")):
        engine.AbsorbedMLAEngine.load(tmp_path, backend="nope")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: attention backend 'gluon': ")):
        engine.AbsorbedMLAEngine.load(tmp_path, backend="gluon")


@pytest.mark.parametrize("backend", ["gluon", "flashmla"])
def test_the_hopper_backends_refuse_an_engine_that_is_not_bf16(monkeypatch, backend):
    from nemo_mla_lora.inference import engine
    from nemo_mla_lora.inference.kernels import flashmla

    monkeypatch.setattr(gluon_launch, "device_problem", lambda *args: None)  # as on a Hopper GPU
    monkeypatch.setattr(flashmla, "unavailable", lambda *args: None)
    assert engine.backend_problem(backend, "cuda", _spec(), torch.bfloat16) is None
    assert engine.backend_problem(backend, "cuda", _spec(), torch.float32) == (
        f"attention backend '{backend}': its decode kernel reads a bf16 cache and the engine runs in float32; "
        "use 'triton' (our kernels) or 'torch'"
    )


@pytest.mark.parametrize(
    "dtype, kernel_runs, expected",
    [(torch.bfloat16, True, "gluon"), (torch.float32, True, "ours"), (torch.bfloat16, False, "ours")],
)
def test_each_step_takes_the_gluon_kernel_only_where_it_reads_the_tensors(monkeypatch, dtype, kernel_runs, expected):
    from nemo_mla_lora.inference.kernels import hopper_decode

    called = []
    monkeypatch.setattr(gluon_launch, "unavailable", lambda c_kv, k_rope, heads: None if kernel_runs else "no")
    monkeypatch.setattr(gluon_launch, "latent_decode_attention_ws", lambda *args, **kw: called.append("gluon"))
    monkeypatch.setattr(hopper_decode, "decode_attention", lambda *args, **kw: called.append("ours"))
    b, h, t = 2, 64, 128
    q_lat, q_rope = torch.zeros(b, h, 512, dtype=dtype), torch.zeros(b, h, 64, dtype=dtype)
    c_kv, k_rope = torch.zeros(b, t, 512, dtype=dtype), torch.zeros(b, t, 64, dtype=dtype)
    gluon_backend.gluon_or_ours(q_lat, q_rope, c_kv, k_rope, torch.full((b,), t), 0.1, max_length=t)
    assert called == [expected]


def _hopper_problem(backend: str) -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if backend == "gluon":
        return gluon_launch.device_problem("cuda", 512, 64, 64)
    from nemo_mla_lora.inference.kernels.flashmla import unavailable

    return unavailable("cuda", (512, 64))


def _model(spec):
    """A model of ``spec`` with random weights and its absorbed up projections, bf16 on the GPU: built once and
    shared by the engines compared (Megatron's initialisers draw from its own CUDA RNG tracker, which
    ``torch.manual_seed`` does not reset, so two builds would not hold the same weights)."""
    from nemo_mla_lora.models.from_spec import config_from_spec
    from nemo_mla_lora.models.tiny import build_model

    torch.manual_seed(0)
    model = build_model(config_from_spec(spec, torch.bfloat16)).cuda()
    h, c = spec.num_heads, spec.kv_lora_rank
    k_up, v_up = (
        [torch.randn(h * n, c, dtype=torch.bfloat16, device="cuda") * c**-0.5 for _ in range(spec.num_layers)]
        for n in (spec.qk_nope_head_dim, spec.v_head_dim)
    )
    return model, k_up, v_up


def _logits(engine, tokens, prefill: int) -> torch.Tensor:
    """[b, steps, vocab]: the prefill's last position, then one decode step per remaining token."""
    cache = engine.new_cache(tokens.shape[0], tokens.shape[1])
    steps = [engine.forward(tokens[:, :prefill], cache)[:, -1]]
    steps += [engine.forward(tokens[:, i : i + 1], cache)[:, -1] for i in range(prefill, tokens.shape[1])]
    return torch.stack(steps, dim=1).float()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["gluon", "flashmla"])
def test_the_engine_decodes_as_with_our_triton_kernels(mcore, monkeypatch, backend):
    if problem := _hopper_problem(backend):
        pytest.skip(problem)
    if backend == "flashmla":  # FlashMLA at every step (its backend takes it only for large shapes)
        from nemo_mla_lora.inference.kernels import flashmla

        monkeypatch.setattr(flashmla, "flashmla_is_faster", lambda *args: True)
    spec = _spec()
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, spec.vocab_size, (3, 140), generator=gen).cuda()  # decode past two 64-position tiles
    from nemo_mla_lora.inference.engine import AbsorbedMLAEngine

    model, k_up, v_up = _model(spec)
    want = _logits(AbsorbedMLAEngine(model, spec, k_up, v_up, "triton"), tokens, prefill=70)
    got = _logits(AbsorbedMLAEngine(model, spec, k_up, v_up, backend), tokens, prefill=70)
    err = (got - want).abs().amax(dim=(0, 2))  # per step: the prefill's last position, then each decode step
    peak = want.abs().amax(dim=(0, 2))
    assert err[0] <= 1e-2 * peak[0], f"the prefill (einsums, no decode kernel) differs by {err[0]}: not the backend"
    assert bool((err <= BOUND * peak).all()), f"per-step max |error| {err.tolist()} against {BOUND} x {peak.tolist()}"


def test_decode_attention_takes_the_gluon_kernel_from_64_head_blocks():
    """The shapes where the Gluon kernel beat our TMA kernel on an H100 in eager calls (64 to 128 blocks of 64 heads)
    and where it lost (2 and 32 blocks); replayed from a CUDA graph every shape of 64-head blocks; 16 heads never
    (the kernel takes heads in blocks of 64)."""
    faster = gluon_backend.gluon_is_faster
    assert faster(64, 64) and faster(32, 128) and faster(64, 128) and faster(128, 64)
    assert not faster(16, 128) and not faster(1, 128) and not faster(128, 16) and not faster(256, 16)
    assert not faster(16, 128, graphed=False) and not faster(1, 128, graphed=False)
    with graph_choice.graphed_choice():  # graphed=None asks graph_choice
        assert faster(16, 128) and faster(1, 64) and not faster(256, 16)
    assert faster(1, 64, graphed=True) and faster(16, 128, graphed=True) and faster(64, 128, graphed=True)
    assert not faster(256, 16, graphed=True) and not faster(8, 96, graphed=True)


def test_kernels_are_chosen_for_a_graph_only_inside_graphed_choice_or_a_capture():
    """``graph_choice.for_graph``: off by default (no capture here), on inside ``graphed_choice`` (GraphedDecode's
    warm-up), off again after it, nested or not; ``decode_attention`` and the ``flashmla`` backend read it."""
    from nemo_mla_lora.inference.kernels import graph_choice

    assert not graph_choice.for_graph()
    with graph_choice.graphed_choice():
        assert graph_choice.for_graph()
        with graph_choice.graphed_choice():
            assert graph_choice.for_graph()
        assert graph_choice.for_graph()
    assert not graph_choice.for_graph()
