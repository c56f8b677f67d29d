"""Every Triton and Gluon kernel of the package compiles for sm_90a (Hopper) with the installed Triton, no GPU needed
(``bench/sm90_compile.py``): each entry point is called with CPU tensors at DeepSeek-V3's shapes while every
``kernel[grid](...)`` compiles for GPUTarget("cuda", 90, 32) instead of launching, so the kernels, constexprs and launch
options are those an H100 would get; ptxas (the one Triton itself uses for sm_90) reports registers and spills.

Checked: each entry launches the kernels it is meant to, within sm_90's 227 KiB of shared memory and 255 registers,
with the instructions its design rests on (wgmma where the MMA has 64 rows; TMA loads in the TMA kernels; the Gluon
kernels' register split by setmaxnreg in three warpgroups of 168 registers, no spill). Gluon's
and Triton's names move between releases (3.6's ``tma.async_copy_global_to_shared`` raises in 3.9) and the GPU
machine runs another Triton than this one: this is where such a break shows before a GPU is lent. Spills of the two
128-head Triton decode kernels depend on the Triton release (none with 3.6; some with 3.9: bench/README.md) and are
not asserted."""

import pytest
from support.bench import bench_module

from nemo_mla_lora.inference.kernels import gluon_decode

sm90 = bench_module("sm90_compile")

# entry -> (kernels launched in order, wgmma in the entry's own kernel, TMA loads there, spill-free with every Triton
# release here). wgmma needs 64 rows of the MMA: the 16-head launch of 16 x 32 tiles runs mma.sync by design.
EXPECTED = {
    "decode_tma_heads_h128": (["_tma_split_kernel", "_merge_kernel"], True, True, False),
    "decode_tma_heads_h16_b8_t8k": (["_tma_split_kernel", "_merge_kernel"], False, True, True),
    "decode_tma_positions_h16": (["_tma_split_kernel_t", "_merge_kernel"], True, True, True),
    "decode_portable_h128": (["_split_kernel", "_merge_kernel"], True, False, False),
    "decode_gluon_ws_h128": (["_ws_decode_kernel"], True, True, True),
    "decode_gluon_seesaw_h128": (["_seesaw_decode_kernel"], True, True, True),
    "decode_gluon_seesaw_t32_h128": (["_seesaw_decode_kernel"], True, True, True),
    "decode_merge_128_splits": (["_merge_kernel"], False, False, True),
    "decode_adapters": (["_expand_kernel", "_q_lat_kernel", "_o_kernel"], True, False, True),
    "grouped_add_r16": (["_grouped_add_kernel"], True, False, True),
    "grouped_add_r64": (["_grouped_add_kernel"], True, False, True),
}


def test_every_entry_is_checked():
    assert set(EXPECTED) == set(sm90.ENTRIES)


@pytest.mark.parametrize("entry", list(EXPECTED))
def test_compiles_for_sm90a(entry):
    if entry.startswith("decode_gluon") and gluon_decode._GLUON_ERROR:
        pytest.skip(gluon_decode._GLUON_ERROR)
    kernels, wgmma, tma, spill_free = EXPECTED[entry]
    rows = sm90.compile_entry(entry)
    assert [r["kernel"] for r in rows] == kernels
    main = rows[0]  # the entry's own kernel (a merge pass may follow)
    assert (main["wgmma"], main["tma"]) == (wgmma, tma), main
    for r in rows:
        assert r["shared"] <= sm90.SM90_SMEM and r["n_regs"] <= 255, r
        if spill_free:
            assert (r["n_spills"], r["stack"]) == (0, 0), r
    if entry.startswith("decode_gluon"):  # one CTA per SM: three warpgroups, 168 registers at launch, then setmaxnreg
        assert (main["warps"], main["n_regs"], main["setmaxnreg"]) == (12, gluon_decode.LAUNCH["maxnreg"], True), main
