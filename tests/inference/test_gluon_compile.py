"""The warp-specialised Gluon decode kernel (``inference/kernels/gluon_decode.py``) compiles for sm_90a with the
installed Triton, no GPU needed (``bench/gluon_compile.py``: the launcher's own arguments bound, ``triton.compile``
for GPUTarget("cuda", 90, 32), the registers and spills as ptxas reports them): one CTA per SM as designed (three
warpgroups at 168 registers a thread, no spill, no stack, at most sm_90's 227 KiB of shared memory). Gluon's names
move between Triton releases (3.6's ``async_copy_global_to_shared`` and ``thread_barrier`` raise or are gone in 3.9),
and the GPU machine runs another Triton than this one: this is where a rename shows before a GPU is lent."""

import pytest

from nemo_mla_lora.inference.kernels import gluon_decode

pytestmark = pytest.mark.skipif(gluon_decode._GLUON_ERROR is not None, reason=str(gluon_decode._GLUON_ERROR))


@pytest.mark.parametrize("heads, splits", [(64, 1), (128, 3)])
def test_compiles_for_sm90a_in_one_cta_per_sm_without_spills(heads, splits):
    from support.bench import bench_module

    compile_check = bench_module("gluon_compile")
    kernel = compile_check.compile_config(heads, 4, 1000, splits)
    usage = compile_check.ptxas_usage(kernel.asm["ptx"])
    assert (usage["n_spills"], usage["stack"]) == (0, 0), usage["log"]
    assert usage["n_regs"] <= gluon_decode.LAUNCH["maxnreg"], usage["log"]
    assert kernel.metadata.num_warps == 12 and kernel.metadata.maxnreg == gluon_decode.LAUNCH["maxnreg"]
    assert kernel.metadata.shared <= compile_check.SM90_SMEM, f"{kernel.metadata.shared} B of shared memory"
    assert "setmaxnreg" in kernel.asm["ptx"] and "wgmma.mma_async" in kernel.asm["ptx"]
