"""The Gluon decode kernels' own source (every schedule of ``gluon_launch.KERNELS``), run on the CPU through
``support.gluon_emulator`` (numpy shared memory, mbarriers with phases and transaction bytes, TMA copies, wgmma as
fp32 matmuls evaluated at their wait, one thread per partition): against the float64 decode step, with NaN in the
cache past each row's length, rows of 1 to 2,000 positions, one split and several (0 to 32 tiles per split, both
consumers' last-tile cases), 64 and 128 heads. A wrong tile index, barrier phase, release order or softmax scale in a
kernel fails here, before a GPU is lent; compiler and hardware matters (layouts, proxies, registers) do not show."""

import math

import pytest
import torch

pytest.importorskip("triton")

from support import gluon_emulator

from nemo_mla_lora.reference.latent import decode_step as reference

SCALE = 0.05
BOUND = 4e-3  # of max |o_lat|, as on the GPU


def _inputs(heads: int, lens: list[int], seed: int = 0):
    """q_lat [b, h, 512], q_rope [b, h, 64] and the cache views of one [b, P, 576] bf16 buffer, NaN past each
    row's length (P: the longest row rounded up to 64, plus a page)."""
    g = torch.Generator().manual_seed(seed)
    b, c, d = len(lens), 512, 64
    q = torch.randn(b, heads, c + d, generator=g).to(torch.bfloat16)  # [b, h, c + d]
    buf = torch.randn(b, (-(-max(lens) // 64) + 1) * 64, c + d, generator=g).to(torch.bfloat16)  # [b, P, c + d]
    for i, n in enumerate(lens):
        buf[i, n:] = float("nan")
    return q[..., :c], q[..., c:], buf[..., :c], buf[..., c:], torch.tensor(lens, dtype=torch.int32)


def _decode(modules, schedule: str, q_lat, q_rope, c_kv, k_rope, lengths, splits: int) -> torch.Tensor:
    """``gluon_launch.latent_decode_attention_ws``'s host steps with the launch emulated; the splits merged in
    float64 (merge_splits' equations)."""
    launch = modules["gluon_launch"]
    q_lat, q_rope = q_lat.contiguous(), q_rope.contiguous()
    kernel = launch.KERNELS[schedule]
    plan = launch.launch_plan(kernel, q_lat, q_rope, c_kv, k_rope, lengths, SCALE, c_kv.shape[1], splits)
    grid, args, kwargs, (out, acc, m, l_sum) = plan
    gluon_emulator.launch(kernel.kernel, grid, args, kwargs)
    if acc is out:  # one split: the kernel wrote the output
        return out
    weight = torch.exp(m.double() - m.double().amax(-1, keepdim=True))  # [b, h, S]; m in natural-log units
    num = (weight.unsqueeze(-1) * acc.double()).sum(2)  # [b, h, c]
    return (num / (weight * l_sum.double()).sum(-1, keepdim=True)).to(out.dtype)


@pytest.fixture(scope="module")
def modules():
    return gluon_emulator.emulated_kernels()


@pytest.mark.parametrize("schedule", ["pingpong", "seesaw", "seesaw_t32"])
@pytest.mark.parametrize(
    "heads, lens, splits",
    [
        (64, [300], 1),
        (128, [1, 65, 200], 1),
        (64, [1, 63, 64, 65, 300], 3),
        (128, [129, 320, 1], 7),
        (64, [2000], 1),  # 32 tiles through the two stages: every barrier's phase wraps many times
        (128, [1500, 7], 2),
    ],
)
def test_the_kernel_source_matches_the_equations(modules, schedule, heads, lens, splits):
    assert set(modules["gluon_launch"].KERNELS) == {"pingpong", "seesaw", "seesaw_t32"}
    q_lat, q_rope, c_kv, k_rope, lengths = _inputs(heads, lens)
    got = _decode(modules, schedule, q_lat, q_rope, c_kv, k_rope, lengths, splits)
    want = reference(q_lat, q_rope, c_kv.nan_to_num(0.0), k_rope.nan_to_num(0.0), lengths, SCALE)  # [b, h, c]
    assert torch.isfinite(got).all()
    err, peak = (got.double() - want).abs().max().item(), want.abs().max().item()
    assert err <= BOUND * peak, f"{schedule}: max |error| {err:.3e} > {BOUND} x max |o| {peak:.3e}"
    assert not math.isnan(err)


def test_the_real_kernel_modules_are_back_after_the_emulation():
    """The emulation imports the kernel modules afresh under fake Gluon modules; afterwards the package, its
    attributes and ``sys.modules`` hold the real ones again (other tests compile them for sm_90a)."""
    import sys

    from nemo_mla_lora.inference.kernels import gluon_decode

    mods = gluon_emulator.emulated_kernels()
    assert mods["gluon_decode"] is not gluon_decode
    assert not hasattr(mods["gluon_decode"]._ws_decode_kernel, "run")  # a plain function under emulation
    from nemo_mla_lora.inference import kernels

    assert sys.modules["nemo_mla_lora.inference.kernels.gluon_decode"] is gluon_decode is kernels.gluon_decode
    assert sys.modules["triton.experimental.gluon"].jit is not None
    if gluon_decode.gluon is not None:
        assert hasattr(gluon_decode._ws_decode_kernel, "run")  # Gluon's JIT function, as compiled elsewhere
