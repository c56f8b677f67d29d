"""The warp-specialised Gluon decode kernels (``inference/kernels/gluon_decode.py``, the ping-pong schedule, and
``gluon_seesaw.py``) on a Hopper GPU: against the float64 equations (``reference.latent.decode_step``) and against the
TMA Triton kernel (``hopper_decode``).

The cache is what the engine keeps: views c_kv = buf[..., :512], k_rope = buf[..., 512:] of one [b, P, 576] bf16
buffer, with NaN written past each row's length (the kernel must never let it in). Heads 64 and 128, batches 1, 3
and 64, lengths 1, 63, 64, 65, 1000 and 4096 mixed per row, default / one / three splits. Bound: the largest
absolute error at most 4e-3 of the output's largest magnitude (bf16 output and bf16 P). Skipped without an sm_90
GPU or Gluon; the refusal test runs everywhere."""

import os

import pytest
import torch

pytest.importorskip("triton")

from nemo_mla_lora.inference.kernels import gluon_decode, gluon_launch
from nemo_mla_lora.reference.latent import decode_step as reference

SCALE = 0.05  # about 1 / sqrt(192 + 64), V3's
# the schedules tested (``gluon_launch.KERNELS``); bench/run_gpu.sh names those whose smoke launch ran
SCHEDULES = os.environ.get("GLUON_SCHEDULES", ",".join(gluon_launch.KERNELS)).split(",")
BOUND = 4e-3  # of max |o_lat|


def _sm90_problem() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if torch.cuda.get_device_capability() != (9, 0):
        return f"needs a Hopper (sm_90) GPU, this one is sm_{''.join(map(str, torch.cuda.get_device_capability()))}"
    return gluon_decode._GLUON_ERROR


needs_sm90 = pytest.mark.skipif(_sm90_problem() is not None, reason=str(_sm90_problem()))

LENGTHS = {  # batch -> lengths per row
    1: [4096],
    3: [1, 65, 1000],
    64: [[1, 63, 64, 65, 1000, 4096][i % 6] if i < 12 else 1 + (i * 379) % 4096 for i in range(64)],
}


def _inputs(heads: int, lens: list[int], seed: int = 0):
    """q_lat [b, h, 512], q_rope [b, h, 64] as non-contiguous views of one [b, h, 576] tensor; the cache views of
    one [b, P, 576] buffer (P: the longest row rounded up to 64, plus a page) with NaN past each row's length."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    b, c, d = len(lens), gluon_decode.LATENT, gluon_decode.ROPE
    q = torch.randn(b, heads, c + d, device="cuda", dtype=torch.bfloat16, generator=g)  # [b, h, c + d]
    pages = -(-max(lens) // 64) + 1
    buf = torch.randn(b, pages * 64, c + d, device="cuda", dtype=torch.bfloat16, generator=g)  # [b, P, c + d]
    for i, n in enumerate(lens):
        buf[i, n:] = float("nan")
    lengths = torch.tensor(lens, device="cuda", dtype=torch.int32)
    return q[..., :c], q[..., c:], buf[..., :c], buf[..., c:], lengths


def _want(q_lat, q_rope, c_kv, k_rope, lengths):
    """The float64 equations on the cache with its NaN zeroed (masked positions weigh 0 either way)."""
    return reference(q_lat, q_rope, c_kv.nan_to_num(0.0), k_rope.nan_to_num(0.0), lengths, SCALE)  # [b, h, c]


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("batch", [1, 3, 64])
@pytest.mark.parametrize("heads", [64, 128])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_matches_the_equations_and_the_tma_kernel(schedule, heads, batch, splits):
    from nemo_mla_lora.inference.kernels.hopper_decode import latent_decode_attention_tma

    q_lat, q_rope, c_kv, k_rope, lengths = _inputs(heads, LENGTHS[batch])
    ws = gluon_launch.latent_decode_attention_ws
    got = ws(q_lat, q_rope, c_kv, k_rope, lengths, SCALE, splits=splits, schedule=schedule)
    assert got.shape == q_lat.shape and got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    want = _want(q_lat, q_rope, c_kv, k_rope, lengths)
    peak = want.abs().max().item()
    err = (got.double() - want).abs().max().item()
    assert err <= BOUND * peak, f"max |error| {err:.3e} > {BOUND} x max |o| {peak:.3e}"
    tma = latent_decode_attention_tma(q_lat, q_rope, c_kv, k_rope, lengths, SCALE, splits=splits)
    assert (got.double() - tma.double()).abs().max().item() <= 2 * BOUND * peak


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_host_max_length_and_rows_of_one_position(schedule):
    """``max_length`` from the host (no device sync) above every row's length; rows of 1 position in every split;
    splits of 0 to 5 tiles (both consumers' last-tile cases)."""
    q_lat, q_rope, c_kv, k_rope, lengths = _inputs(128, [1, 64, 1, 4096, 1, 129, 320], seed=1)
    want = _want(q_lat, q_rope, c_kv, k_rope, lengths)
    for splits in (None, 7, 13):
        got = gluon_launch.latent_decode_attention_ws(
            q_lat, q_rope, c_kv, k_rope, lengths, SCALE, splits=splits, max_length=c_kv.shape[1], schedule=schedule
        )
        assert (got.double() - want).abs().max().item() <= BOUND * want.abs().max().item()


def test_refuses_with_the_reason():
    """What the kernel is not built for is refused with expected-vs-actual, before anything is launched."""
    c_kv, k_rope = torch.zeros(2, 64, 256, dtype=torch.bfloat16), torch.zeros(2, 64, 64, dtype=torch.bfloat16)
    q, lengths = torch.zeros(2, 64, 512, dtype=torch.bfloat16), torch.tensor([64, 64])
    with pytest.raises(ValueError, match=r"schedule must be one of \['pingpong', 'seesaw', 'seesaw_t32'\]; got 'zi"):
        gluon_launch.latent_decode_attention_ws(q, q[..., :64], c_kv, k_rope, lengths, SCALE, schedule="zigzag")
    if gluon_decode._GLUON_ERROR:
        assert gluon_launch.unavailable(c_kv, k_rope, 64) == gluon_decode._GLUON_ERROR
        return
    assert "built for c = 512, d = 64; got c = 256, d = 64" in gluon_launch.unavailable(c_kv, k_rope, 64)
    c_kv = torch.zeros(2, 64, 512, dtype=torch.bfloat16)
    assert "heads in blocks of 64; got 96 heads" in gluon_launch.unavailable(c_kv, k_rope, 96)
    assert "expected a sm_90 GPU, got cpu" in gluon_launch.unavailable(c_kv, k_rope, 128)
    with pytest.raises(ValueError, match="latent_decode_attention_ws: the Gluon decode kernel takes heads"):
        q = torch.zeros(2, 96, 512, dtype=torch.bfloat16)
        gluon_launch.latent_decode_attention_ws(q, q[..., :64], c_kv, k_rope, torch.tensor([64, 64]), SCALE)


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("heads, batch, takes_gluon", [(64, 64, True), (128, 3, False)])
def test_decode_attention_takes_the_kernel_where_it_is_faster(monkeypatch, heads, batch, takes_gluon):
    """``hopper_decode.decode_attention`` (the engine's ``triton`` backend) runs the Gluon kernel at 64 head blocks
    and the TMA kernel below, with the same result as the equations either way."""
    from nemo_mla_lora.inference.kernels.hopper_decode import decode_attention

    calls, kernel = [], gluon_launch.latent_decode_attention_ws
    monkeypatch.setattr(gluon_launch, "latent_decode_attention_ws", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    q_lat, q_rope, c_kv, k_rope, lengths = _inputs(heads, LENGTHS[64][:batch])
    got = decode_attention(q_lat, q_rope, c_kv, k_rope, lengths, SCALE, max_length=c_kv.shape[1])
    want = _want(q_lat, q_rope, c_kv, k_rope, lengths)
    assert bool(calls) == takes_gluon
    assert (got.double() - want).abs().max().item() <= BOUND * want.abs().max().item()


@pytest.mark.gpu
@needs_sm90
def test_decode_attention_takes_the_kernel_at_small_batches_in_a_cuda_graph(monkeypatch):
    """For a CUDA graph, ``decode_attention`` runs the Gluon kernel at 2 head blocks too (128 heads, batch 1), where
    an eager call takes the TMA kernel: in the warm-up under ``graphed_choice`` (which compiles it) and in the
    capture; the replay equals the equations."""
    from nemo_mla_lora.inference.kernels import graph_choice
    from nemo_mla_lora.inference.kernels.hopper_decode import decode_attention

    q_lat, q_rope, c_kv, k_rope, lengths = _inputs(128, LENGTHS[1])
    kernel, t, calls = gluon_launch.latent_decode_attention_ws, c_kv.shape[1], []
    monkeypatch.setattr(gluon_launch, "latent_decode_attention_ws", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    decode_attention(q_lat, q_rope, c_kv, k_rope, lengths, SCALE, max_length=t)
    assert calls == []  # eager: below 64 head blocks, the TMA kernel
    with graph_choice.graphed_choice():  # GraphedDecode's warm-up
        decode_attention(q_lat, q_rope, c_kv, k_rope, lengths, SCALE, max_length=t)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = decode_attention(q_lat, q_rope, c_kv, k_rope, lengths, SCALE, max_length=t)
    graph.replay()
    torch.cuda.synchronize()
    want = _want(q_lat, q_rope, c_kv, k_rope, lengths)
    assert calls == [1, 1]
    assert (got.double() - want).abs().max().item() <= BOUND * want.abs().max().item()
