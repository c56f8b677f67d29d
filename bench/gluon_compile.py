"""Compile-only check of the Gluon warp-specialised decode kernels (``inference/kernels/gluon_decode.py`` and
``gluon_seesaw.py``, one per schedule of ``gluon_launch.KERNELS``) for sm_90a, no GPU needed: binds the launcher's own arguments (CPU tensors of the real shapes, so the signature and the
specialisation are what a launch on an H100 would compile), compiles through ``triton.compile`` for
GPUTarget("cuda", 90, 32) with the wheel's ptxas, and prints registers, spills and shared memory per config.
Exits non-zero when a config fails to compile, spills, or needs more shared memory than sm_90's 227 KiB.

    python bench/gluon_compile.py [--ptx DIR]   # DIR: also write each config's PTX, TTGIR and ptxas log there
    python bench/gluon_compile.py --time [--json F]  # on an sm_90 GPU instead: time it beside hopper_decode's TMA
                                                     # kernel and FlashMLA's (every schedule)
"""

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
import triton
from sm90_compile import SM90_SMEM, TARGET, compiled_launches, gluon_kernel_launch, ptxas_usage  # bench/

from nemo_mla_lora.inference.kernels import gluon_decode as gd
from nemo_mla_lora.inference.kernels import gluon_launch

CONFIGS = [  # (heads, batch, cached positions, splits): both head counts, one split (writes out) and several
    (64, 4, 1000, 1),
    (64, 4, 1000, 3),
    (128, 4, 1000, 1),
    (128, 4, 1000, 3),
]


def compile_config(h: int, b: int, t: int, splits: int, schedule: str = "pingpong"):
    """The compiled kernel for one launch config and schedule (raises on a compile error)."""
    with compiled_launches() as launches:
        gluon_kernel_launch(h, b, t, splits, schedule)
    return launches[0][2]


TIMED = [  # (heads, batch, positions per row): 64 heads where ours were furthest from copy bandwidth, 128 from the roof
    (64, 64, 4096), (64, 128, 32768), (128, 64, 4096), (128, 16, 4096), (128, 1, 16384), (128, 32, 32768)
]


def time_kernels(out: Path | None = None) -> int:
    """us per call replayed from a CUDA graph (``decode_roofline.graphed_ms``: the GPU's time, as serving engines
    run decode) and per eager call (``eager_us``, ``do_bench``: host work included where it is the longer), TFLOP/s
    (2 x 576 + 2 x 512 FLOPs per position and head) and cache GB/s from the graphed time, of the Gluon kernel, of
    ``latent_decode_attention_tma`` and, where it imports, FlashMLA's SM90 decode (``kernels/flashmla.py``), on full
    rows of the engine's cache buffer, against the roofs measured here (``decode_roofline.roofs``: the copy
    bandwidth, read + write, and the bf16 matmul peak). A kernel that raises is reported and the others go on;
    ``out``: also write the rows and roofs there as JSON. Returns 1 when a kernel failed."""
    from decode_roofline import graphed_ms, roofs  # bench/ is this script's directory
    from triton.testing import do_bench

    from nemo_mla_lora.inference.kernels import flashmla
    from nemo_mla_lora.inference.kernels.hopper_decode import latent_decode_attention_tma

    fns = {"triton_tma": latent_decode_attention_tma}
    if (why := flashmla.unavailable()) is None:
        fns["flashmla"] = flashmla.flashmla_decode
    else:
        print(f"flashmla: not timed ({why})")
    # last: a fault in a new kernel would poison the context
    for schedule in gluon_launch.KERNELS:
        fns[f"gluon_{schedule}"] = functools.partial(gluon_launch.latent_decode_attention_ws, schedule=schedule)
    roof = roofs()
    copy_gbs, peak_tflops = roof["copy_GBps"], roof["matmul_bf16_TFLOPs"]
    print(f"{torch.cuda.get_device_name()}: device copy {copy_gbs:.0f} GB/s (read + write), matmul {peak_tflops:.0f}")
    rows, failed = [], 0
    for h, b, t in TIMED:
        pad = triton.cdiv(t, flashmla.PAGE) * flashmla.PAGE  # FlashMLA reads whole pages
        buf = torch.randn(b, pad, gd.LATENT + gd.ROPE, device="cuda", dtype=torch.bfloat16)  # [b, P, c + d]
        q = torch.randn(b, h, gd.LATENT + gd.ROPE, device="cuda", dtype=torch.bfloat16)  # [b, h, c + d]
        args = (q[..., : gd.LATENT], q[..., gd.LATENT :], buf[:, :t, : gd.LATENT], buf[:, :t, gd.LATENT :])
        lengths = torch.full((b,), t, device="cuda", dtype=torch.int32)
        flops, nbytes = b * h * t * (2 * 576 + 2 * 512), b * t * (gd.LATENT + gd.ROPE) * 2 + b * h * (576 + 512) * 2
        ref = latent_decode_attention_tma(*args, lengths, 0.05, max_length=t).double()
        for name, fn in fns.items():
            try:
                err = (fn(*args, lengths, 0.05, max_length=t).double() - ref).abs().max().item()
                call = lambda fn=fn, args=args, lengths=lengths, t=t: fn(*args, lengths, 0.05, max_length=t)  # noqa: E731
                eager_ms, ms = do_bench(call), graphed_ms(call)
            except Exception as error:  # a compile or launch error: report it, time the rest
                print(f"h={h:3d} b={b:2d} t={t:5d} {name:10s} FAILED: {type(error).__name__}: {error}"[:600])
                failed = 1
                continue
            tflops, gbs = flops / ms / 1e9, nbytes / ms / 1e6
            rows.append(dict(heads=h, batch=b, positions=t, kernel=name, us=ms * 1e3, eager_us=eager_ms * 1e3,
                             TFLOPs=tflops, GBps=gbs, max_diff_vs_tma=err))
            print(
                f"h={h:3d} b={b:2d} t={t:5d} {name:10s} {ms * 1e3:8.1f} us (eager {eager_ms * 1e3:7.1f}) {tflops:6.1f} TFLOP/s "
                f"({100 * tflops / peak_tflops:4.1f}% of {peak_tflops:.0f}) {gbs:6.0f} GB/s "
                f"({100 * gbs / copy_gbs:4.1f}% of copy) max|diff vs tma| {err:.2e}"
            )
    if out is not None:
        out.write_text(json.dumps(dict(card=torch.cuda.get_device_name(), roofs=roof, rows=rows), indent=1))
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ptx", type=Path, help="write each config's PTX, TTGIR and ptxas log here")
    parser.add_argument("--time", action="store_true", help="time the kernel on this machine's sm_90 GPU instead")
    parser.add_argument("--json", type=Path, help="with --time: also write the timings there")
    opts = parser.parse_args()
    if opts.time:
        return time_kernels(opts.json)
    print(f"triton {triton.__version__}, target {TARGET}")
    if gd._GLUON_ERROR:
        print(f"FAILED: {gd._GLUON_ERROR}")
        return 1
    failed = []
    for (h, b, t, splits), schedule in ((c, s) for s in gluon_launch.KERNELS for c in CONFIGS):
        name = f"{schedule}_h{h}_b{b}_t{t}_splits{splits}"
        try:
            k = compile_config(h, b, t, splits, schedule)
        except Exception as err:  # report every config, then fail
            print(f"{name}: FAILED to compile: {type(err).__name__}: {err}")
            failed.append(name)
            continue
        md, use = k.metadata, ptxas_usage(k.asm["ptx"])
        ok = use["n_spills"] == 0 and use["stack"] == 0 and md.shared <= SM90_SMEM
        print(
            f"{name}: n_regs={use['n_regs']} n_spills={use['n_spills']} stack={use['stack']} shared={md.shared} B "
            f"({md.shared / 1024:.1f} KiB of {SM90_SMEM // 1024}) warps={md.num_warps} maxnreg={md.maxnreg} "
            f"{'ok' if ok else 'FAILED'}"
        )
        if opts.ptx:
            opts.ptx.mkdir(parents=True, exist_ok=True)
            (opts.ptx / f"{name}.ptx").write_text(k.asm["ptx"])
            (opts.ptx / f"{name}.ttgir").write_text(k.asm["ttgir"])
            (opts.ptx / f"{name}.ptxas.log").write_text(use["log"])
        if not ok:
            failed.append(name)
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
