"""Triton and Gluon kernels compiled for sm_90a (Hopper) on a machine without a GPU.

``compile_for`` binds a kernel's launch arguments as a launch would (CPU tensors of the real shapes give the same
signature and specialisation as CUDA ones) and compiles through ``triton.compile`` for GPUTarget("cuda", 90, 32);
``compiled_launches`` makes every ``kernel[grid](...)`` inside it compile that way instead of launching, so a public
function of the package, called with CPU tensors, compiles exactly the kernels and launch options it would launch on
an H100. ``ptxas_usage`` reads registers, spills and stack from the ptxas Triton compiles with for that arch.
Used by ``gluon_compile.py`` and the tests; it relies on Triton's launcher internals (``create_function_from_signature``,
``JITFunction._pack_args``), which Triton 3.6 and 3.9 share.
"""

import contextlib
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

SM90_SMEM = 227 * 1024  # the opt-in shared memory per block on sm_90
TARGET = GPUTarget("cuda", 90, 32)  # compiled as sm_90a (wgmma, setmaxnreg)


def compile_for(kernel: JITFunction, args: tuple, kwargs: dict, target: GPUTarget = TARGET):
    """The compiled kernel (``.asm["ptx"]``, ``.metadata``) of ``kernel[grid](*args, **kwargs)`` for ``target``.

    Args:
        kernel: a ``triton.jit`` or ``gluon.jit`` function.
        args, kwargs: the launch's arguments, launch options (``num_warps``, ...) among the kwargs.
        target: the GPU to compile for (default sm_90a).
    """
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    if kernel.is_gluon():
        from triton.experimental.gluon._runtime import GluonASTSource

        source = GluonASTSource(kernel, signature, constexprs, attrs)
    else:
        source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__)


@contextlib.contextmanager
def compiled_launches():
    """Inside, every ``kernel[grid](...)`` compiles for sm_90a (``compile_for``) and launches nothing; yields the
    list that collects (kernel name, grid, compiled kernel) per launch."""
    launches = []

    def run(self, *args, grid, warmup, **kwargs):
        launches.append((self.fn.__name__, grid, compile_for(self, args, kwargs)))

    saved = JITFunction.run
    JITFunction.run = run
    try:
        yield launches
    finally:
        JITFunction.run = saved


def ptxas_usage(ptx: str, target: GPUTarget = TARGET) -> dict:
    """Registers, spill bytes and stack frame as ptxas reports them for ``target`` (what the driver would say at
    load time, which needs a GPU), by the ptxas Triton itself compiles with for that arch (Triton 3.9 takes its
    CUDA 13 ptxas from sm_90 on, whose PTX version the CUDA 12 one refuses)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        arch = f"sm_{target.arch}a" if target.arch == 90 else f"sm_{target.arch}"
        cmd = [get_ptxas(target.arch).path, "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "kernel.o")]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    stack = re.search(r"(\d+) bytes stack frame", log)
    return dict(n_regs=int(regs.group(1)), n_spills=sum(spills), stack=int(stack.group(1)) if stack else 0, log=log)


def _decode_inputs(heads: int, batch: int = 4, positions: int = 1000):
    """The decode kernels' inputs at DeepSeek's c = 512, d = 64, bf16: queries as views of one [b, h, 576] tensor and
    the cache as views of one [b, P, 576] buffer (P a multiple of 64), as the engine keeps them."""
    import torch

    c, d = 512, 64
    q = torch.zeros(batch, heads, c + d, dtype=torch.bfloat16)  # [b, h, c + d]
    buf = torch.zeros(batch, triton.cdiv(positions, 64) * 64, c + d, dtype=torch.bfloat16)  # [b, P, c + d]
    lengths = torch.full((batch,), positions, dtype=torch.int32)
    return q[..., :c], q[..., c:], buf[:, :positions, :c], buf[:, :positions, c:], lengths, 0.05


def _decode(kind: str, heads: int, batch: int = 4, positions: int = 1000):
    """A decode entry: ``kind`` ``heads`` / ``positions`` (the TMA kernels, with ``default_tma_launch``'s tiles for
    the shape; ``heads`` at 16 heads and 64K cached positions takes the tensor-parallel rank's 16 x 32 tiles),
    ``portable``, ``gluon`` (the ping-pong schedule) or ``gluon_<schedule>`` (``gluon_launch.KERNELS``)."""

    def launch():
        from nemo_mla_lora.inference.kernels import hopper_decode, triton_decode

        args = _decode_inputs(heads, batch, positions)
        if kind == "portable":
            return triton_decode.latent_decode_attention(*args, max_length=positions)
        if kind.startswith("gluon"):
            return gluon_kernel_launch(heads, batch, positions, 3, "pingpong" if kind == "gluon" else kind[6:])
        return hopper_decode.latent_decode_attention_tma(*args, max_length=positions, rows=kind)

    return launch


def gluon_kernel_launch(heads: int, batch: int, positions: int, splits: int, schedule: str = "pingpong"):
    """The launch ``gluon_launch.latent_decode_attention_ws`` makes for these shapes (queries made contiguous as it
    makes them), made directly: its launcher refuses a CPU cache (Hopper only). Inside ``compiled_launches`` it
    compiles.

    Args:
        heads, batch, positions: the decode step's shape (every row at ``positions``).
        splits: splits of the positions (1: the kernel writes the output itself).
        schedule: the consumers' schedule (a key of ``gluon_launch.KERNELS``).
    """
    from nemo_mla_lora.inference.kernels import gluon_launch

    q_lat, q_rope, c_kv, k_rope, lengths, scale = _decode_inputs(heads, batch, positions)
    q_lat, q_rope = q_lat.contiguous(), q_rope.contiguous()
    kernel = gluon_launch.KERNELS[schedule]
    plan = gluon_launch.launch_plan(kernel, q_lat, q_rope, c_kv, k_rope, lengths, scale, positions, splits)
    grid, args, kwargs, _ = plan
    return kernel.kernel[grid](*args, **kwargs)


def _adapters():
    """The multi-adapter decode corrections at V3's decode step: batch 64, 128 heads, 8 adapters of rank 16."""
    import torch

    from nemo_mla_lora.inference.kernels import lora_kernels

    b, h, m, bf16 = 64, 128, 8 * 16, torch.bfloat16
    mask = torch.zeros(b, m, dtype=bf16)
    lora_kernels.expand_add(torch.zeros(1, b, 24576, dtype=bf16), torch.zeros(1, b, m, dtype=bf16), mask,
                            torch.zeros(m, 24576, dtype=bf16), b)  # q_up: [1, b, h x 192]
    lora_kernels.q_lat_add(torch.zeros(b, 1, h, 512, dtype=bf16), torch.zeros(1, b, h, 128, dtype=bf16),
                           torch.zeros(h, 128, m, dtype=bf16), torch.zeros(m, 512, dtype=bf16), mask)
    lora_kernels.o_add(torch.zeros(1, b, h, 128, dtype=bf16), torch.zeros(b, 1, h, 512, dtype=bf16),
                       torch.zeros(m, 512, dtype=bf16), torch.zeros(h, m, 128, dtype=bf16), mask)


def _grouped_add(r: int):
    """The grouped experts' adapter sum at V3's width: 16 experts of 1,024 rows, width 7,168, rank ``r``."""
    import torch

    from nemo_mla_lora.peft import grouped_add

    e, rows, n, bf16 = 16, 1024, 7168, torch.bfloat16
    ends = torch.arange(1, e + 1, dtype=torch.int32) * rows
    b = torch.zeros(e, n, r, dtype=bf16)  # B [e, n, r], passed as B^T [e, r, n] (a view)
    grouped_add.grouped_lowrank_add_(torch.zeros(e * rows, n, dtype=bf16), torch.zeros(e * rows, r, dtype=bf16),
                                     b.transpose(1, 2), ends)


def _merge(splits: int, heads: int = 64):
    """The merge pass over ``splits`` partial sums of one long row (batch 1): the split counts a 32K-position row
    takes at 64 heads on an H100 (128 with the Gluon kernel)."""

    def launch():
        import torch

        from nemo_mla_lora.inference.kernels import triton_decode

        acc = torch.zeros(1, heads, splits, 512)  # [b, h, S, c] fp32
        m = torch.zeros(1, heads, splits)  # [b, h, S]
        return triton_decode.merge_splits(acc, m, torch.zeros_like(m), torch.zeros(1, heads, 512, dtype=torch.bfloat16))

    return launch


# name -> a call of the package's own entry point with CPU tensors; each launch in it compiles for sm_90a
ENTRIES = {
    "decode_tma_heads_h128": _decode("heads", 128),
    "decode_tma_heads_h16_b8_t8k": _decode("heads", 16, batch=8, positions=8192),
    "decode_tma_positions_h16": _decode("positions", 16),
    "decode_portable_h128": _decode("portable", 128),
    "decode_gluon_ws_h128": _decode("gluon", 128),
    "decode_gluon_seesaw_h128": _decode("gluon_seesaw", 128),
    "decode_gluon_seesaw_t32_h128": _decode("gluon_seesaw_t32", 128),
    "decode_merge_128_splits": _merge(128),
    "decode_adapters": _adapters,
    "grouped_add_r16": lambda: _grouped_add(16),
    "grouped_add_r64": lambda: _grouped_add(64),
}


def compile_entry(name: str) -> list[dict]:
    """Every kernel launch of ``ENTRIES[name]``, compiled for sm_90a: kernel, grid, warps, shared bytes, registers,
    spills, stack, and the instructions that show the design (wgmma, TMA loads, setmaxnreg)."""
    with compiled_launches() as launches:
        ENTRIES[name]()
    rows = []
    for kernel, grid, compiled in launches:
        ptx, usage = compiled.asm["ptx"], ptxas_usage(compiled.asm["ptx"])
        rows.append(dict(entry=name, kernel=kernel, grid=tuple(grid), warps=compiled.metadata.num_warps,
                         shared=compiled.metadata.shared, **{k: v for k, v in usage.items() if k != "log"},
                         wgmma="wgmma.mma_async" in ptx, tma="cp.async.bulk.tensor" in ptx,
                         setmaxnreg="setmaxnreg" in ptx))
    return rows


def main() -> int:
    """Prints every entry's launches as JSON lines; exits 1 if one fails to compile or exceeds sm_90's shared
    memory."""
    import json
    import sys

    print(f"triton {triton.__version__}, ptxas {get_ptxas(TARGET.arch).path}", file=sys.stderr)
    failed = 0
    for name in ENTRIES:
        try:
            for row in compile_entry(name):
                failed |= row["shared"] > SM90_SMEM
                print(json.dumps(row))
        except Exception as err:  # report each entry, then fail
            print(json.dumps(dict(entry=name, error=f"{type(err).__name__}: {err}"[:400])))
            failed = 1
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
