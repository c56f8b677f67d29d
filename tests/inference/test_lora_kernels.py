"""``inference/kernels/lora_kernels.py`` (the multi-adapter corrections in one or two launches each) against the
equations in float64, in Triton's interpreter on CPU (a child process with ``TRITON_INTERPRET=1``) and on a GPU when
there is one; and the engine's logits with ``AdapterBank(kernels=True)`` equal the torch path's. Odd sizes everywhere
(slots 12 of a 16-wide tile, rows 3 or 6 of 16, head dims 24 and 28, latent 40), one row with no adapter."""

import importlib.util
import json

import pytest
import torch
from support.child import child
from support.child import interpreted as _interpreted

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

KERNEL_CHECK = """
import json, sys, torch
from nemo_mla_lora.inference.kernels import lora_kernels as k
device = sys.argv[1]
rel = lambda got, want: ((got.cpu().double() - want).abs().max() / want.abs().max()).item()  # of the largest value
torch.manual_seed(0)
out = {}
for s in (1, 2):
    b, h, d, c, e, m, n_in, n_out = 3, 4, 24, 40, 28, 12, 80, 112
    mask = torch.zeros(b, m)
    mask[0, :4], mask[2, 8:] = 1, 1  # row 1: no adapter
    dev = lambda *t: [x.to(device) for x in t]
    # linear: y [s, b, o] += (z * mask) B^T
    y, z, bt = torch.randn(s, b, n_out), torch.randn(s, b, m), torch.randn(m, n_out)
    want = y.double() + (z.double() * mask.double()) @ bt.double()
    yd, zd, md, btd = dev(y, z, mask, bt)
    out[f"linear_s{s}"] = rel(k.expand_add(yd, zd, md, btd, b), want)
    # kv up, K rows: q_nope a strided view like the engine's (q [s, b, h, d + rope])
    q = torch.randn(s, b, h, d + 8)
    q_nope, q_lat, b_k, a = q[..., :d], torch.randn(b, s, h, c), torch.randn(h, d, m), torch.randn(m, c)
    zq = torch.einsum("sbhd,hdm->bshm", q_nope.double(), b_k.double()) * mask.double()[:, None, None, :]
    want = q_lat.double() + zq @ a.double()
    qd, ld, kd, ad, md = dev(q, q_lat, b_k, a, mask)
    out[f"q_lat_s{s}"] = rel(k.q_lat_add(ld, qd[..., :d], kd, ad, md), want)
    # kv up, V rows
    o, o_lat, b_v = torch.randn(s, b, h, e), torch.randn(b, s, h, c), torch.randn(h, m, e)
    zo = (o_lat.double() @ a.double().T) * mask.double()[:, None, None, :]
    want = o.double() + torch.einsum("bshm,hme->sbhe", zo, b_v.double())
    od, old, vd = dev(o, o_lat, b_v)
    out[f"o_s{s}"] = rel(k.o_add(od, old, ad, vd, md), want)
print(json.dumps(out))
"""


def test_kernels_match_the_equations_in_the_interpreter():
    errors = json.loads(_interpreted(KERNEL_CHECK, "cpu"))
    assert len(errors) == 6 and max(errors.values()) < 1e-5, errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_match_the_equations_on_the_gpu():
    errors = json.loads(_on_gpu(KERNEL_CHECK, "cuda"))
    assert len(errors) == 6 and max(errors.values()) < 1e-5, errors  # fp32 dots in fp32 (not TF32)


def _on_gpu(code: str, *args) -> str:
    return child(code, *args, interpret=False, timeout=300)


ENGINE_CHECK = """
import json, sys, torch
from nemo_mla_lora.runtime import parallel
from nemo_mla_lora.inference.adapters import SUPPORTED, AdapterBank
from nemo_mla_lora.inference.engine import AbsorbedMLAEngine
from nemo_mla_lora.models.architecture import builtin_spec
from nemo_mla_lora.models.from_spec import config_from_spec
from nemo_mla_lora.models.tiny import build_model
parallel.init_megatron()
device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
out = {}
for name in ("tiny_mla", "tiny_mla_noq"):
    spec = builtin_spec(name)
    torch.manual_seed(0)
    model = build_model(config_from_spec(spec)).to(device).eval()
    h, c, dn, dv = spec.num_heads, spec.kv_lora_rank, spec.qk_nope_head_dim, spec.v_head_dim
    k_up = [(torch.randn(h * dn, c) * c ** -0.5).to(device) for _ in range(spec.num_layers)]
    v_up = [(torch.randn(h * dv, c) * c ** -0.5).to(device) for _ in range(spec.num_layers)]
    engine = AbsorbedMLAEngine(model, spec, k_up, v_up)
    shapes = {n: tuple(m.weight.shape[::-1]) for n, m in model.decoder.layers[0].self_attention.named_children()
              if n in SUPPORTED}
    shapes["linear_kv_up_proj"] = (c, h * (dn + dv))
    factors = {f"a{i}": {f"decoder.layers.{k}.self_attention.{n}": (torch.randn(3 + i, fi), torch.randn(fo, 3 + i), 0.5)
                         for k in range(spec.num_layers) for n, (fi, fo) in shapes.items()} for i in range(3)}
    ids, tokens = torch.tensor([1, 0, 3, 2], device=device), torch.randint(0, 200, (4, 7), device=device)
    logits = {}
    for kernels in (False, True):
        bank, cache = AdapterBank(spec, factors, device, kernels=kernels), engine.new_cache(4, 8)
        steps = [engine.forward(tokens[:, :4], cache, bank, ids)]
        steps += [engine.forward(tokens[:, i:i + 1], cache, bank, ids) for i in range(4, 7)]
        logits[kernels] = torch.cat(steps, 1)
    plain = torch.cat([engine.forward(tokens[:, :4], c := engine.new_cache(4, 8))] +
                      [engine.forward(tokens[:, i:i + 1], c) for i in range(4, 7)], 1)
    out[name] = {"kernels_vs_torch": (logits[True] - logits[False]).abs().max().item(),
                 "adapters_changed": (logits[False] - plain).abs().max().item(),
                 "max_abs_logit": logits[False].abs().max().item()}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_engine_logits_with_kernels_equal_the_torch_corrections():
    """Prefill then decode, rows on three adapters of ranks 3-5 (slots padded) and one on none, with and without
    q compression: the engine's logits through ``lora_kernels`` equal the torch corrections'."""
    _check_engine(json.loads(_interpreted(ENGINE_CHECK)), 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_logits_with_kernels_on_the_gpu():
    _check_engine(json.loads(_on_gpu(ENGINE_CHECK, "cuda")), 1e-4)


def _check_engine(result: dict, bound: float) -> None:
    assert len(result) == 2
    for name, r in result.items():
        assert r["adapters_changed"] > 1e-2, (name, r)
        assert r["kernels_vs_torch"] <= bound * max(1.0, r["max_abs_logit"]), (name, r)
