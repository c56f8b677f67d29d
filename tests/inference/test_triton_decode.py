"""The Triton latent decode-attention kernel against an fp64 einsum reference: in Triton's interpreter on
CPU (``TRITON_INTERPRET=1``, set in a child process before triton is imported), and on a GPU when there is
one. The engine with ``backend="triton"`` decodes the same logits as with einsums, adapters included."""

import importlib.util
import json

import pytest
import torch
from support.child import interpreted as _interpreted

from nemo_mla_lora.reference.latent import decode_step as reference  # the fp64 equations

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

KERNEL_CHECK = """
import json, torch
from nemo_mla_lora.inference.kernels.triton_decode import latent_decode_attention
from nemo_mla_lora.reference.latent import decode_step as reference
out = []
torch.manual_seed(0)
for b, h, c, d, t, lens in [(2, 4, 40, 8, 12, [12, 5]), (3, 20, 512, 64, 300, [300, 1, 77])]:
    q, qr, ck, kr = torch.randn(b, h, c), torch.randn(b, h, d), torch.randn(b, t, c), torch.randn(b, t, d)
    lengths = torch.tensor(lens, dtype=torch.int32)
    for kw in ({}, dict(splits=1), dict(splits=3), dict(splits=19, block_t=16)):  # 19: the merge's groups of 8
        o = latent_decode_attention(q, qr, ck, kr, lengths, 0.1, **kw)
        out.append((o.double() - reference(q, qr, ck, kr, lengths, 0.1)).abs().max().item())
print(json.dumps(out))
"""


TMA_CHECK = """
import json, torch
from nemo_mla_lora.inference.kernels.hopper_decode import latent_decode_attention_tma
from nemo_mla_lora.reference.latent import decode_step as reference
out = []
torch.manual_seed(0)
for b, h, c, d, t, lens in [(2, 4, 32, 16, 40, [40, 5]), (3, 20, 512, 64, 300, [300, 1, 77])]:
    q, qr, ck, kr = torch.randn(b, h, c), torch.randn(b, h, d), torch.randn(b, t, c), torch.randn(b, t, d)
    ck[1, lens[1]:] = float("nan")  # memory past a row's length is never read
    kr[1, lens[1]:] = float("inf")
    lengths = torch.tensor(lens, dtype=torch.int32)
    ref = reference(q, qr, ck.nan_to_num(0, 0, 0), kr.nan_to_num(0, 0, 0), lengths, 0.1)
    for rows in ("heads", "positions"):
        for splits in (None, 1, 3, 19):  # 19 splits of 16 positions: empty splits, the merge's groups of 8
            o = latent_decode_attention_tma(q, qr, ck, kr, lengths, 0.1, splits=splits, block_t=16, rows=rows)
            out.append((o.double() - ref).abs().max().item())
print(json.dumps(out))
"""


def test_tma_kernels_match_the_equations_in_the_interpreter():
    """Both Hopper kernels (heads or positions as the MMA's rows): variable lengths, NaN/Inf past a row's
    length (the descriptor's zero fill keeps them out), several split counts."""
    diffs = json.loads(_interpreted(TMA_CHECK))
    assert len(diffs) == 16 and max(diffs) < 1e-5, diffs


def test_tma_kernel_refuses_what_tma_cannot_load():
    from nemo_mla_lora.inference.kernels.hopper_decode import latent_decode_attention_tma, supported

    ck, kr = torch.randn(2, 8, 40), torch.randn(2, 8, 8)  # c / 2 = 20: not a power of two
    assert not supported(ck, kr) and supported(torch.randn(2, 8, 64), torch.randn(2, 8, 16))
    with pytest.raises(ValueError, match="unsupported cache c_kv \\(2, 8, 40\\)"):
        latent_decode_attention_tma(torch.randn(2, 4, 40), torch.randn(2, 4, 8), ck, kr, torch.tensor([8, 8]), 0.1)


def test_kernel_matches_the_equations_in_the_interpreter():
    """Variable lengths per row (a row with one cached token), several split counts (19: more than the merge
    pass sums at a time, empty splits for the short rows), tiny and V3 latent dims."""
    diffs = json.loads(_interpreted(KERNEL_CHECK))
    assert len(diffs) == 8 and max(diffs) < 1e-5, diffs


ENGINE_CHECK = """
import sys, torch
from nemo_mla_lora.runtime import parallel
from nemo_mla_lora.inference.engine import AbsorbedMLAEngine
from nemo_mla_lora.inference.adapters import AdapterBank
parallel.init_megatron()
export, adapter = sys.argv[1], sys.argv[2]
diffs = []
for backend in ("torch", "triton"):
    engine = AbsorbedMLAEngine.load(export, backend=backend)
    bank = AdapterBank.load(engine.spec, {"a": adapter})
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (2, 9))
    cache = engine.new_cache(2, 9)
    ids = bank.ids(["a", None])
    steps = [engine.forward(tokens[:, :4], cache, bank, ids)]
    steps += [engine.forward(tokens[:, i:i + 1], cache, bank, ids) for i in range(4, 9)]
    diffs.append(torch.cat(steps, 1))
print((diffs[0] - diffs[1]).abs().max().item())
"""


@pytest.mark.slow
def test_engine_decodes_the_same_with_the_kernel(mcore, tmp_path):
    from test_multi_adapter import ADAPTERS, base_model

    from nemo_mla_lora.arch.mla_spec import MLASpec
    from nemo_mla_lora.checkpoints import dist_ckpt
    from nemo_mla_lora.export.pipeline import export
    from nemo_mla_lora.models.tiny import tiny_mla_config
    from nemo_mla_lora.peft import MLALoRA
    from nemo_mla_lora.peft.state import randomize_b

    spec = MLASpec.from_megatron(tiny_mla_config())
    dist_ckpt.save_base(base_model(tiny_mla_config), spec, tmp_path / "base")
    export(tmp_path / "base", None, tmp_path / "absorbed", fmt="absorbed", progress=False, verify=False)
    peft = MLALoRA(**ADAPTERS["official_r4"])
    model = peft(base_model(tiny_mla_config))
    randomize_b(model)
    dist_ckpt.save_adapter(model, peft, spec, tmp_path / "adapter", base_dir=tmp_path / "base")
    assert float(_interpreted(ENGINE_CHECK, str(tmp_path / "absorbed"), str(tmp_path / "adapter"))) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "launch",
    [
        {},
        dict(block_h=32, num_warps=8),
        dict(block_h=64, block_t=16, num_warps=8),
        dict(splits=1),
        dict(splits=3, num_stages=1),
    ],
)
def test_kernel_on_gpu_bf16_v3_dims(launch):
    from nemo_mla_lora.inference.kernels.triton_decode import latent_decode_attention

    b, h, c, d, t = 8, 128, 512, 64, 1000
    g = torch.Generator(device="cuda").manual_seed(0)
    q, qr = (torch.randn(b, h, n, device="cuda", generator=g, dtype=torch.bfloat16) for n in (c, d))
    ck, kr = (torch.randn(b, t, n, device="cuda", generator=g, dtype=torch.bfloat16) for n in (c, d))
    lengths = torch.randint(1, t + 1, (b,), device="cuda", dtype=torch.int32)
    o = latent_decode_attention(q, qr, ck, kr, lengths, 0.05, **launch)
    torch.testing.assert_close(o.double(), reference(q, qr, ck, kr, lengths, 0.05), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="needs a Hopper (sm_90) or newer GPU",
)
@pytest.mark.parametrize("h", [16, 128])
@pytest.mark.parametrize(
    "launch",
    [
        dict(rows="heads"),
        dict(rows="positions"),
        dict(rows="positions", splits=1),
        dict(rows="heads", block_t=32, splits=3),
    ],
)
def test_tma_kernels_on_gpu_bf16_v3_dims(h, launch):
    from nemo_mla_lora.inference.kernels.hopper_decode import latent_decode_attention_tma

    b, c, d, t = 8, 512, 64, 1000
    g = torch.Generator(device="cuda").manual_seed(0)
    q, qr = (torch.randn(b, h, n, device="cuda", generator=g, dtype=torch.bfloat16) for n in (c, d))
    ck, kr = (torch.randn(b, t, n, device="cuda", generator=g, dtype=torch.bfloat16) for n in (c, d))
    lengths = torch.randint(1, t + 1, (b,), device="cuda", dtype=torch.int32)
    ck[0, int(lengths[0]) :] = float("nan")
    ref = reference(q, qr, ck.nan_to_num(0), kr, lengths, 0.05)
    o = latent_decode_attention_tma(q, qr, ck, kr, lengths, 0.05, **launch)
    torch.testing.assert_close(o.double(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="needs a Hopper (sm_90) or newer GPU",
)
@pytest.mark.parametrize("kernel", ["portable", "heads", "positions"])
def test_kernels_address_a_cache_past_2_31_elements(kernel):
    """A layer's cache [b, P, c + d] of 2.4e9 elements (batch 64 x 65,600 positions, 4.8 GB): the last rows start
    past 2^31 elements, where a 32-bit row offset wraps (an illegal address, or another row's cache)."""
    from nemo_mla_lora.inference.kernels.hopper_decode import latent_decode_attention_tma
    from nemo_mla_lora.inference.kernels.triton_decode import latent_decode_attention

    b, h, c, d, p = 64, 16, 512, 64, 65600
    assert b * p * (c + d) > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    cache = torch.empty(b, p, c + d, device="cuda", dtype=torch.bfloat16).normal_(generator=g)
    ck, kr = cache[..., :c], cache[..., c:]  # views of one buffer, as the engine's cache
    q, qr = (torch.randn(b, h, n, device="cuda", generator=g, dtype=torch.bfloat16) for n in (c, d))
    lengths = torch.full((b,), 64, device="cuda", dtype=torch.int32)
    lengths[-1] = p  # the last row reads to the buffer's end
    if kernel == "portable":
        o = latent_decode_attention(q, qr, ck, kr, lengths, 0.05)
    else:
        o = latent_decode_attention_tma(q, qr, ck, kr, lengths, 0.05, rows=kernel)
    torch.cuda.synchronize()
    rows = slice(b - 2, b)  # the float64 reference on the last two rows only (17 GB for all)
    ref = reference(q[rows], qr[rows], ck[rows], kr[rows], lengths[rows], 0.05)
    torch.testing.assert_close(o[rows].double(), ref, atol=2e-2, rtol=2e-2)
