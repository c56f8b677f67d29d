"""Compile the latent decode kernels for sm_90 on a machine without a GPU and report what the compiler made.

    python bench/decode_ir.py [--triton-site DIR] [--kernel portable|tma] BLOCK_H BLOCK_T NUM_WARPS NUM_STAGES

Triton lowers a kernel for a target it is told (here Hopper, sm_90a) without a device; ptxas from Triton's
package then reports registers and spills. Integer arguments are marked divisible by 16, as Triton's JIT
marks them at V3's dims (every stride and c = 512 are), so vectorisation and pipelining are as on the card.
Reported: wgmma (``warp_group_dot``) vs mma.sync (``tt.dot``), asynchronous copies (cp.async) and TMA loads,
shared-memory allocations and layout conversions in the TTGIR, shared bytes, registers and spills.
``--triton-site`` puts another Triton first on the path (the GPU machine's 3.6.0, unpacked from its wheel).
"""

import argparse
import importlib
import json
import sys

_TMA_INTS = "H chunk s_qb s_qh s_rb s_rh s_cb s_ct s_kb s_kt s_ab s_ah s_as s_mb s_mh"
INTS = {"portable": "H C D chunk s_qb s_qh s_rb s_rh s_cb s_ct s_kb s_kt s_ab s_ah s_as s_mb s_mh",
        "tma": _TMA_INTS, "tma_t": _TMA_INTS}
COUNTS = {"wgmma": "ttng.warp_group_dot ", "mma_sync": "tt.dot ", "cp_async": "async_copy_global_to_local",
          "tma_load": "async_tma_copy_global_to_local", "shared_allocs": "local_alloc",
          "layout_conversions": "convert_layout"}


def compile_kernel(kind: str, block_h: int, block_t: int, num_warps: int, num_stages: int, c=512, d=64):
    import triton
    from triton.backends.compiler import GPUTarget

    if kind == "portable":
        module = importlib.import_module("nemo_mla_lora.inference.kernels.triton_decode")
        fn = module._split_kernel
        constexprs = dict(BLOCK_H=block_h, BLOCK_T=block_t, BLOCK_C=c, BLOCK_D=d, ONE_SPLIT=False)
    else:
        module = importlib.import_module("nemo_mla_lora.inference.kernels.hopper_decode")
        fn = module._tma_split_kernel if kind == "tma" else module._tma_split_kernel_t
        constexprs = dict(C=c, D=d, BLOCK_H=block_h, BLOCK_T=block_t, ONE_SPLIT=False)
    signature = {n: "*bf16" for n in ("q_lat", "q_rope", "c_kv", "k_rope")}
    signature.update(lengths="*i32", acc_out="*fp32", m_out="*fp32", l_out="*fp32", scale="fp32")
    signature.update({n: "i32" for n in INTS[kind].split()})
    signature.update({n: "constexpr" for n in constexprs})
    attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(signature.items())
             if t not in ("constexpr", "fp32") and n != "lengths"}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps,
                                                                             num_stages=num_stages))


def report(compiled) -> dict:
    import triton
    from sm90_compile import ptxas_usage  # bench/; imported after --triton-site put its Triton first

    ttgir = compiled.asm["ttgir"]
    out = {k: ttgir.count(v) for k, v in COUNTS.items()}
    out["shared_bytes"] = compiled.metadata.shared
    usage = ptxas_usage(compiled.asm["ptx"])  # the ptxas Triton compiles with for sm_90 (raises if it refuses)
    out.update(registers=usage["n_regs"], spill_bytes=usage["n_spills"], stack_bytes=usage["stack"])
    out["triton"] = triton.__version__
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--triton-site")
    ap.add_argument("--kernel", choices=sorted(INTS), default="tma")
    ap.add_argument("--ttgir", action="store_true", help="print the TTGIR too")
    ap.add_argument("launch", type=int, nargs=4, metavar="N", help="BLOCK_H BLOCK_T NUM_WARPS NUM_STAGES")
    args = ap.parse_args()
    if args.triton_site:
        sys.path.insert(0, args.triton_site)
    compiled = compile_kernel(args.kernel, *args.launch)
    if args.ttgir:
        print(compiled.asm["ttgir"])
    print(json.dumps({"kernel": args.kernel, "launch": args.launch, **report(compiled)}))


if __name__ == "__main__":
    main()
