"""FlashMLA's Hopper decode as a backend (``inference/kernels/flashmla.py``).

On every machine: the engine's cache is FlashMLA's paged layout as it is (page j of row i holds row i's
positions 64j .. 64j + 63, c_kv and k_rope side by side, no copy), views that are not are refused, and the
``flashmla`` backend is refused with the reason where it cannot run. On a Hopper GPU with the ``flash_mla``
package: its decode against the float64 equations (the engine decoding through it: ``test_decode_backends.py``)."""

import contextlib

import pytest
import torch

from nemo_mla_lora.arch.mla_spec import MLASpec
from nemo_mla_lora.inference.cache import LatentKVCache
from nemo_mla_lora.inference.kernels.flashmla import PAGE, paged, unavailable
from nemo_mla_lora.reference.latent import decode_step as reference


def _spec(layers: int = 2, c: int = 512, dr: int = 64) -> MLASpec:
    import dataclasses

    from nemo_mla_lora.models.architecture import builtin_spec

    return dataclasses.replace(builtin_spec("tiny_mla"), num_layers=layers, kv_lora_rank=c, qk_rope_head_dim=dr)


def test_the_cache_is_flashmla_s_paged_layout_without_a_copy():
    torch.manual_seed(0)
    b, s, c, dr = 3, 100, 32, 8
    cache = LatentKVCache.allocate(_spec(c=c, dr=dr), b, 150, torch.float32)
    positions = cache.positions(s)
    c_new, k_new = torch.randn(b, s, c), torch.randn(b, s, dr)
    c_all, k_all = cache.write(1, c_new, k_new, positions)  # [b, 100, c], [b, 100, dr]
    pages, table = paged(c_all, k_all)
    assert pages.shape == (b * 192 // PAGE, PAGE, 1, c + dr) and table.shape == (b, 192 // PAGE)  # 150 -> 192
    assert pages.data_ptr() == c_all.data_ptr()  # the cache's own memory
    for i in range(b):
        for t in (0, 63, 64, 99):
            page, k = table[i, t // PAGE].item(), t % PAGE
            torch.testing.assert_close(pages[page, k, 0], torch.cat([c_new[i, t], k_new[i, t]]), rtol=0, atol=0)


def test_views_of_separate_tensors_are_refused():
    c_kv, k_rope = torch.zeros(2, 64, 512), torch.zeros(2, 64, 64)
    with pytest.raises(ValueError, match="expected views of one \\[b, P, c \\+ dr\\] buffer"):
        paged(c_kv, k_rope)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_engine_refuses_the_backend_where_it_cannot_run():
    from nemo_mla_lora.inference.engine import AbsorbedMLAEngine

    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="attention backend 'flashmla': FlashMLA decodes on a CUDA GPU"):
        AbsorbedMLAEngine(model, _spec(), [], [], backend="flashmla")


# (h, b, t) -> the faster kernel in the H100 sweep (bench/README.md, "Hopper decode kernels")
MEASURED = [
    (16, 128, 32768, "ours"),  # ours within 5% at 16 heads everywhere
    (63, 128, 32768, "ours"),
    (64, 1, 4096, "ours"),  # 0.013 against 0.049 ms
    (64, 8, 4096, "ours"),  # 0.037 against 0.053
    (64, 32, 4096, "flashmla"),  # 0.094 against 0.134
    (64, 1, 32768, "flashmla"),  # one long row: 0.076 against 0.159
    (128, 8, 1024, "ours"),  # 0.022 against 0.034
    (128, 8, 4096, "flashmla"),  # 0.048 against 0.063
    (128, 128, 4096, "flashmla"),  # 0.293 against 0.612
]


MEASURED_GRAPHED = [  # the same for a CUDA graph (ours: the Gluon kernel), the graphed H100 sweep, ms
    (16, 128, 32768, "ours"),
    (64, 32, 4096, "ours"),  # 0.073 against 0.096
    (64, 128, 4096, "ours"),  # 0.216 against 0.256
    (128, 1, 32768, "ours"),  # 0.042 against 0.056
    (128, 8, 4096, "ours"),  # 0.040 against 0.049
    (128, 32, 4096, "flashmla"),  # 0.098 against 0.110
    (128, 8, 32768, "flashmla"),  # 0.147 against 0.202
]


@pytest.mark.parametrize(
    "graphed, heads, b, t, expected", [(False, *m) for m in MEASURED] + [(True, *m) for m in MEASURED_GRAPHED]
)
def test_the_backend_takes_flashmla_only_for_the_shapes_where_it_is_faster(monkeypatch, graphed, heads, b, t, expected):
    """Eager against our TMA kernel; for a CUDA graph (``graph_choice``, as GraphedDecode's warm-up and capture)
    against the Gluon kernel."""
    from nemo_mla_lora.inference.kernels import flashmla, graph_choice, hopper_decode

    called = []
    monkeypatch.setattr(flashmla, "flashmla_decode", lambda *args, **kw: called.append("flashmla"))
    monkeypatch.setattr(hopper_decode, "decode_attention", lambda *args, **kw: called.append("ours"))
    q_lat, q_rope = torch.zeros(b, heads, 512), torch.zeros(b, heads, 64)
    c_kv, k_rope = torch.zeros(b, 64, 512), torch.zeros(b, 64, 64)  # the choice reads t from max_length
    with graph_choice.graphed_choice() if graphed else contextlib.nullcontext():
        flashmla.flashmla_or_ours(q_lat, q_rope, c_kv, k_rope, torch.full((b,), t), 0.1, max_length=t)
    assert called == [expected]


def test_without_max_length_the_choice_reads_the_views_positions(monkeypatch):
    from nemo_mla_lora.inference.kernels import flashmla, hopper_decode

    called = []
    monkeypatch.setattr(flashmla, "flashmla_decode", lambda *args, **kw: called.append("flashmla"))
    monkeypatch.setattr(hopper_decode, "decode_attention", lambda *args, **kw: called.append("ours"))
    b, heads = 8, 128
    for t in (1024, 4096):  # 8 x 128 x 1K: ours; x 4K: FlashMLA's
        c_kv, k_rope = torch.zeros(b, t, 512), torch.zeros(b, t, 64)
        flashmla.flashmla_or_ours(torch.zeros(b, heads, 512), torch.zeros(b, heads, 64), c_kv, k_rope, None, 0.1)
    assert called == ["ours", "flashmla"]


needs_flashmla = pytest.mark.skipif(unavailable() is not None, reason=f"FlashMLA cannot run here: {unavailable()}")


@pytest.mark.gpu
@needs_flashmla
@pytest.mark.parametrize("heads", [16, 64, 128])
def test_flashmla_decode_matches_the_equations(heads):
    from nemo_mla_lora.inference.kernels.flashmla import flashmla_decode

    g = torch.Generator(device="cuda").manual_seed(0)
    b, t, lens = 4, 1000, [1000, 1, 777, 64]
    cache = LatentKVCache.allocate(_spec(layers=1), b, t, torch.bfloat16, "cuda")
    cache.c_kv.normal_(generator=g)
    cache.k_rope.normal_(generator=g)
    q, qr = (torch.randn(b, heads, n, device="cuda", generator=g, dtype=torch.bfloat16) for n in (512, 64))
    lengths = torch.tensor(lens, device="cuda", dtype=torch.int32)
    ck, kr = cache.c_kv[0], cache.k_rope[0]
    got = flashmla_decode(q, qr, ck, kr, lengths, 0.05).double()
    want = reference(q, qr, ck, kr, lengths, 0.05)
    assert (got - want).abs().max().item() <= 2e-2 * want.abs().max().item()
