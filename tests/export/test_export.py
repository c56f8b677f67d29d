"""Merge -> absorb -> write -> verify, every format, both tiny models; bad inputs fail with no output."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import batch

from nemo_mla_lora.arch import absorb, hf_config
from nemo_mla_lora.arch.mla_spec import MLASpec
from nemo_mla_lora.checkpoints import dist_ckpt
from nemo_mla_lora.checkpoints.dist_reader import CheckpointReader
from nemo_mla_lora.checkpoints.dist_stream import StreamingDistCkpt
from nemo_mla_lora.export.pipeline import VerificationError, export, read_export
from nemo_mla_lora.models.tiny import build_model, tiny_mla_config
from nemo_mla_lora.peft import MLALoRA
from nemo_mla_lora.peft.merge import MergeError, merge_linear
from nemo_mla_lora.peft.state import base_state_dict
from nemo_mla_lora.reference import latent


@pytest.mark.parametrize("fmt", ["absorbed", "mcore", "hf"])
def test_merged_formats_round_trip_and_match_unmerged(trained, fmt):
    out = trained["root"] / f"export_{fmt}"
    info = export(trained["root"] / "base", trained["root"] / "adapter", out, fmt=fmt, progress=False)
    assert info["verify"]["passed"] and info["verify"]["max_abs_logit_diff"] < 2e-5
    if fmt in ("absorbed", "mcore"):  # verify decoded with a cache of c_kv + k_rope only
        timing = info["timing"]  # the dist-ckpt writer's time, by what it did (each rounded to 10 ms)
        parts = [timing[f"write_{k}"] for k in ("save", "metadata", "files")]
        assert timing["write_save"] > 0 and min(parts) >= 0 and sum(parts) <= timing["write"] + 0.03, timing
        spec_ = trained["spec"]
        assert info["verify"]["cached_values_per_token"] == spec_.num_layers * (
            spec_.kv_lora_rank + spec_.qk_rope_head_dim
        )
    assert json.loads((out / "manifest.json").read_text())["format"] == fmt
    state = read_export(out, fmt)
    tokens, positions, mask = batch()
    with torch.no_grad():
        unmerged = trained["model"](tokens, positions, mask)  # the Megatron model with live adapters
    spec = trained["spec"]
    if fmt == "absorbed":
        assert not any(k.endswith(absorb.KV_UP) for k in state)
        logits, cache = latent.generate_logits(tokens, state, spec, prefill=5)
        assert cache.values_per_token() == spec.num_layers * (spec.kv_lora_rank + spec.qk_rope_head_dim)
    else:
        from nemo_mla_lora.reference.model import forward

        logits = forward(tokens, state, spec)
    torch.testing.assert_close(logits, unmerged, atol=2e-5, rtol=0)


def test_absorbed_layout_is_megatron_split_layout(trained):
    """linear_k_up_proj = view [h, dn+dv, c][:, :dn] as [h*dn, c]; linear_v_up_proj the rest."""
    spec = trained["spec"]
    out = trained["root"] / "export_absorbed"
    state = read_export(out, "absorbed")
    merged = read_export(trained["root"] / "export_mcore", "mcore")
    p = "decoder.layers.1.self_attention"
    kv = merged[f"{p}.linear_kv_up_proj.weight"].view(spec.num_heads, -1, spec.kv_lora_rank)
    h, dn, c = spec.num_heads, spec.qk_nope_head_dim, spec.kv_lora_rank
    assert torch.equal(state[f"{p}.linear_k_up_proj.weight"], kv[:, :dn].reshape(h * dn, c))
    assert torch.equal(state[f"{p}.linear_v_up_proj.weight"], kv[:, dn:].reshape(-1, c))
    assert torch.equal(
        absorb.join_kv_up(*absorb.split_kv_up(merged[f"{p}.linear_kv_up_proj.weight"], spec), spec),
        merged[f"{p}.linear_kv_up_proj.weight"],
    )
    assert f"{p}.kv_layernorm.weight" in state


def test_manifest_kv_bytes_by_hand(trained):
    spec = trained["spec"]
    info = json.loads((trained["root"] / "export_absorbed" / "manifest.json").read_text())
    kv = info["kv_cache"]
    latent_values = spec.kv_lora_rank + spec.qk_rope_head_dim  # 40 + 8
    materialized = spec.num_heads * (spec.qk_nope_head_dim + spec.qk_rope_head_dim + spec.v_head_dim)  # 4*(24+8+28)
    assert (latent_values, materialized) == (48, 240)
    assert kv["bytes_per_token_per_layer"] == {"latent": 48 * 4, "materialized": 240 * 4}  # float32
    assert kv["bytes_per_token"] == {"latent": 48 * 4 * 3, "materialized": 240 * 4 * 3}
    assert info["latent_cache"] and info["source"]["base"]["hash"] and info["source"]["adapter"]["hash"]
    assert len(info["tensor_checksums"]) > 50 and info["merge_scales"]


def test_v3_kv_cache_is_71x():
    from nemo_mla_lora.export.manifest import kv_cache_report

    v3 = MLASpec(
        hidden_size=7168,
        num_layers=61,
        num_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        vocab_size=129280,
        ffn_hidden_size=18432,
    )
    report = kv_cache_report(v3, "bfloat16")
    assert report["bytes_per_token_per_layer"] == {"latent": 1152, "materialized": 81920}
    assert round(report["materialized_over_latent"], 1) == 71.1


def write_hf_base(state, spec, directory):
    from safetensors.torch import save_file

    from nemo_mla_lora.arch import keymap

    directory.mkdir(parents=True, exist_ok=True)
    hf_config.hf_model_config(spec).to_json_file(str(directory / "config.json"))
    save_file(
        {k: v.contiguous() for k, v in keymap.megatron_to_hf(state).items()}, str(directory / "model.safetensors")
    )


def test_hf_peft_export_loads_in_hf_transformers_peft(trained):
    """Our hf_peft files on the unmerged HF base, through HF transformers + HF peft, give the logits of
    the unmerged Megatron model."""
    from peft import PeftModel
    from transformers import DeepseekV3ForCausalLM

    out = trained["root"] / "export_hf_peft"
    info = export(trained["root"] / "base", trained["root"] / "adapter", out, fmt="hf_peft", progress=False)
    assert any("kv_b_proj" in w for w in info["warnings"])
    hf_base = trained["root"] / "hf_base"
    write_hf_base(base_state_dict(trained["model"]), trained["spec"], hf_base)
    base = DeepseekV3ForCausalLM.from_pretrained(hf_base, torch_dtype=torch.float32, attn_implementation="eager")
    hf = PeftModel.from_pretrained(base, out).eval()
    tokens, positions, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            hf(input_ids=tokens).logits, trained["model"](tokens, positions, mask), atol=3e-6, rtol=0
        )


def test_hf_transformers_and_peft_chain(mcore, tmp_path):
    """HF DeepseekV3 + HF peft LoRA on the five MLA linears (B != 0), saved by HF, then our import ->
    merge -> absorb -> latent-cache decode gives HF's logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import DeepseekV3ForCausalLM

    spec = MLASpec.from_megatron(tiny_mla_config())
    torch.manual_seed(0)
    config = hf_config.hf_model_config(spec)
    config._attn_implementation = "eager"
    hf = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layernorm" in name or name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.1)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    targets = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "peft")
    tokens = batch()[0]
    with torch.no_grad():
        expected = peft_model(input_ids=tokens).logits
    info = export(tmp_path / "hf", tmp_path / "peft", tmp_path / "absorbed", fmt="absorbed", progress=False)
    assert info["verify"]["passed"]
    state = read_export(tmp_path / "absorbed", "absorbed")
    logits, _ = latent.generate_logits(tokens, state, spec, prefill=3)
    torch.testing.assert_close(logits, expected, atol=3e-6, rtol=0)


def test_fp8_block_dequantization(tmp_path):
    from nemo_mla_lora.checkpoints.sources import dequantize_fp8

    w = torch.randn(200, 300)
    scale = torch.zeros(2, 3)
    for i in range(2):
        for j in range(3):
            scale[i, j] = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].abs().max() / 448.0
    q = (w / scale.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]).to(torch.float8_e4m3fn)
    back = dequantize_fp8(q, scale, torch.float32)
    assert (back - w).abs().max() < 0.07 * w.abs().max()  # e4m3: 3 mantissa bits
    assert (back - w).abs().max() > 0  # it really went through fp8


def test_fold_is_exact_and_costs_are_reported(trained):
    spec, model = trained["spec"], trained["model"]
    state = {k: v.double() for k, v in base_state_dict(model).items()}
    p = "decoder.layers.0.self_attention"
    k_up, v_up = absorb.split_kv_up(state[f"{p}.linear_kv_up_proj.weight"], spec)
    folded = absorb.fold_products(state, p, spec, k_up, v_up)
    h, dn, dr, dv, c = spec.num_heads, spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim, spec.kv_lora_rank
    q_name = "linear_q_up_proj" if spec.q_lora_rank else "linear_q_proj"
    c_q = torch.randn(3, state[f"{p}.{q_name}.weight"].shape[1], dtype=torch.float64)  # [s, rq]
    q_nope = (c_q @ state[f"{p}.{q_name}.weight"].T).view(3, h, dn + dr)[..., :dn]
    q_lat_split = torch.einsum("shd,hdc->shc", q_nope, k_up.view(h, dn, c))
    q_lat_folded = torch.einsum("hcq,sq->shc", folded[f"{p}.{absorb.Q_FOLDED}"], c_q)
    torch.testing.assert_close(q_lat_folded, q_lat_split)
    o_lat = torch.randn(3, h, c, dtype=torch.float64)
    out_split = (
        torch.einsum("shc,hdc->shd", o_lat, v_up.view(h, dv, c)).reshape(3, -1) @ state[f"{p}.linear_proj.weight"].T
    )
    out_folded = torch.einsum("ohc,shc->so", folded[f"{p}.{absorb.O_FOLDED}"], o_lat)
    torch.testing.assert_close(out_folded, out_split)
    cost = absorb.fold_cost(spec)
    assert cost["folded"]["params_per_layer"] > 0 and "qk_nope_head_dim" in cost["folding_pays_when"]


def test_existing_output_is_not_overwritten(trained):
    out = trained["root"] / "export_mcore"
    with pytest.raises(FileExistsError, match="exists"):
        export(trained["root"] / "base", trained["root"] / "adapter", out, fmt="mcore", progress=False)


def test_failed_verification_leaves_nothing(trained):
    out = trained["root"] / "never"
    with pytest.raises(VerificationError, match="tolerance"):
        export(
            trained["root"] / "base", trained["root"] / "adapter", out, fmt="absorbed", tolerance=0.0, progress=False
        )
    assert not out.exists() and not list(trained["root"].glob(".never.tmp-*"))


def test_truncated_checkpoint_is_a_clear_error(trained, tmp_path):
    from nemo_mla_lora.checkpoints.errors import CheckpointError

    broken = tmp_path / "base"
    shutil.copytree(trained["root"] / "base", broken)
    for f in broken.glob("*.distcp"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    with pytest.raises(CheckpointError, match="truncated or incomplete"):
        export(broken, trained["root"] / "adapter", tmp_path / "out", fmt="mcore", progress=False)
    (broken / ".metadata").unlink()
    with pytest.raises(CheckpointError, match="not a Megatron dist-checkpoint \\(no .metadata\\)"):
        export(broken, trained["root"] / "adapter", tmp_path / "out", fmt="mcore", progress=False)
    assert not (tmp_path / "out").exists()


def test_adapter_for_another_model_is_refused(trained, tmp_path, mcore):
    other_config = tiny_mla_config(num_layers=2)
    other_spec = MLASpec.from_megatron(other_config)
    peft = MLALoRA(placement="kv_up", dim=4, alpha=8)
    other = peft(build_model(other_config))
    dist_ckpt.save_adapter(other, peft, other_spec, tmp_path / "adapter")
    from nemo_mla_lora.checkpoints.errors import CheckpointError

    with pytest.raises(CheckpointError, match="trained on another model"):
        export(trained["root"] / "base", tmp_path / "adapter", tmp_path / "out", fmt="mcore", progress=False)


def test_merge_refuses_bad_shapes_and_nan():
    w = torch.zeros(6, 5)
    with pytest.raises(MergeError, match=r"expected A \[r, 5\], B \[6, r\]"):
        merge_linear(w, torch.zeros(2, 4), torch.zeros(6, 2), 1.0)
    with pytest.raises(MergeError, match="NaN/Inf"):
        merge_linear(w, torch.full((2, 5), float("nan")), torch.ones(6, 2), 1.0)
    a, b = torch.randn(2, 5), torch.randn(6, 2)
    torch.testing.assert_close(merge_linear(w, a, b, 0.5), 0.5 * b @ a)


def test_merge_in_row_blocks_and_in_place_equals_the_equation(monkeypatch):
    """bf16 weight merged through the reused fp32 block (several blocks, a short last one) == round(W + s B A)
    computed whole in float64 then rounded; in place (out=weight) gives the same bits; NaN names its rows."""
    import nemo_mla_lora.peft.merge as merge

    monkeypatch.setattr(merge, "BLOCK_ELEMENTS", 3 * 8)  # 3 rows of 8 per block: 11 rows -> 3, 3, 3, 2
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(11, 8, generator=gen).to(torch.bfloat16)
    a, b = torch.randn(4, 8, generator=gen), torch.randn(11, 4, generator=gen)
    expected = (w.double() + 0.25 * b.double() @ a.double()).to(torch.bfloat16)
    merged = merge_linear(w, a, b, 0.25)
    assert torch.equal(merged, expected) and not torch.equal(merged, w)
    in_place = w.clone()
    assert merge_linear(in_place, a, b, 0.25, out=in_place) is in_place and torch.equal(in_place, expected)
    b[9, 0] = float("inf")
    with pytest.raises(MergeError, match=r"rows 9\.\.10"):
        merge_linear(w, a, b, 0.25)
    with pytest.raises(MergeError, match="out is"):
        merge_linear(w, a, b, 0.25, out=torch.empty(11, 8))


def _verify_absorbed_export(trained, corrupt: bool, mode: str = "full", layers=None) -> dict:
    """StreamingVerify over the written absorbed export, unit by unit, as the pipeline runs it."""
    import math

    from nemo_mla_lora.checkpoints.sources import open_adapter, open_base
    from nemo_mla_lora.export.units import plan
    from nemo_mla_lora.export.verify import StreamingVerify

    spec = trained["spec"]
    base, reader = open_base(trained["root"] / "base"), CheckpointReader(trained["root"] / "export_absorbed")
    lora = open_adapter(trained["root"] / "adapter", spec)

    def units(source_names, shape_of):
        return plan(source_names, {n: 4 * math.prod(shape_of(n)) for n in source_names}, budget=1 << 30)

    verifier = StreamingVerify(spec, latent=True, mode=mode, layers=layers)
    pairs = zip(units(base.names, lambda n: base.shapes()[n]), units(reader.names(), lambda n: reader.flat[n][2]))
    for u_base, u_exp in pairs:
        assert (u_base.group, u_base.kind) == (u_exp.group, u_exp.kind)
        verifier.reference(
            u_base, base.load(u_base.names), lora.factors([n[:-7] for n in u_base.names if n.endswith(".weight")])
        )
        tensors = reader.load(u_exp.names)
        key = "decoder.layers.1.self_attention.linear_k_up_proj.weight"
        if corrupt and key in tensors:
            tensors[key] = (
                tensors[key].view(spec.num_heads, -1, spec.kv_lora_rank).flip(0).reshape(-1, spec.kv_lora_rank)
            )
        verifier.export(u_exp, tensors)
    return verifier.report()


def test_streaming_verify_catches_a_wrong_split(trained):
    """The streaming verify is not vacuous: K/V halves swapped inside one head fail it, in full mode and in
    sample mode when the layer is sampled; sample mode skips what it was not asked to check."""
    good = _verify_absorbed_export(trained, corrupt=False)
    bad = _verify_absorbed_export(trained, corrupt=True)
    assert good["passed"] and not bad["passed"] and bad["max_abs_logit_diff"] > 100 * good["max_abs_logit_diff"]
    sampled = _verify_absorbed_export(trained, corrupt=True, mode="sample", layers=[1])
    assert not sampled["passed"] and not sampled["layers"]["1"]["passed"]
    good_sampled = _verify_absorbed_export(trained, corrupt=False, mode="sample", layers=[1])
    assert good_sampled["passed"] and set(good_sampled["layers"]) == {"1"}
    skipped = _verify_absorbed_export(trained, corrupt=True, mode="sample", layers=[0])
    assert set(skipped["layers"]) == {"0"} and skipped["layers"]["0"]["passed"]


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("factor_sharded", [False, True])
def test_merge_tp_shards_equals_merging_the_whole(kind, factor_sharded):
    """Shards merged rank by rank (with A or B gathered where sharded on r) == the whole matrix merged."""
    from nemo_mla_lora.peft.merge import merge_tp_shards

    tp, r = 2, 4
    w, a, b = (
        torch.randn(12, 10, dtype=torch.float64),
        torch.randn(r, 10, dtype=torch.float64),
        torch.randn(12, r, dtype=torch.float64),
    )
    whole = merge_linear(w, a, b, 0.5)
    if kind == "column":
        shards_w, shards_b = list(w.chunk(tp, 0)), list(b.chunk(tp, 0))
        shards_a = list(a.chunk(tp, 0)) if factor_sharded else [a] * tp  # NeMo shards r of A; MLALoRA does not
        merged = torch.cat(merge_tp_shards("column", shards_w, shards_a, shards_b, 0.5), 0)
    else:
        shards_w, shards_a = list(w.chunk(tp, 1)), list(a.chunk(tp, 1))
        shards_b = list(b.chunk(tp, 1)) if factor_sharded else [b] * tp
        merged = torch.cat(merge_tp_shards("row", shards_w, shards_a, shards_b, 0.5), 1)
    torch.testing.assert_close(merged, whole)
    with pytest.raises(MergeError, match="weight shards"):
        merge_tp_shards(kind, shards_w, shards_a[:1], shards_b, 0.5)


@pytest.mark.parametrize("kind", ["mcore_export", "base_checkpoint"])
def test_megatron_default_strictness_load(trained, tmp_path, kind):
    """Megatron's own ``dist_checkpointing.load(model.sharded_state_dict(), dir)`` with its default strictness
    (every key the model asks for, ``_extra_state`` included) reads the mcore export and our base checkpoint
    into a model built from their ``mla_spec.json``; the export then equals the unmerged fine-tuned model."""
    from megatron.core import dist_checkpointing

    from nemo_mla_lora.models.from_spec import config_from_spec

    directory = trained["root"] / "base"
    if kind == "mcore_export":
        directory = tmp_path / "mcore"
        export(
            trained["root"] / "base", trained["root"] / "adapter", directory, fmt="mcore", names="local", progress=False
        )  # the model here is built on the TE-free spec (TE-spec load: bench/README.md)
    model = build_model(config_from_spec(dist_ckpt.read_spec(directory))).eval()
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(directory)))
    if kind == "mcore_export":
        tokens, positions, mask = batch()
        with torch.no_grad():
            torch.testing.assert_close(
                model(tokens, positions, mask), trained["model"](tokens, positions, mask), atol=2e-5, rtol=0
            )


def test_te_named_base_reads_as_local(trained, tmp_path):
    """A base saved by a Transformer-Engine-spec model (NeMo's DeepSeek recipes) names the q/kv and dense
    pre-MLP norms after the linear they are fused into; it reads, and exports, as the local-spec base does."""
    from nemo_mla_lora.arch import keymap
    from nemo_mla_lora.checkpoints.sources import open_base

    spec = trained["spec"]
    local = open_base(trained["root"] / "base")
    state = local.load(local.names)
    dense = {i for i in range(spec.num_layers) if not spec.is_moe_layer(i)}
    te_state = {keymap.to_te_name(n, dense): t for n, t in state.items()}
    renamed = {n for n in te_state if n not in state}
    assert {
        "decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
        "decoder.layers.1.self_attention.linear_kv_up_proj.layer_norm_weight",
    } <= renamed
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in te_state  # an MoE layer keeps its norm
    assert {keymap.from_te_name(n) for n in te_state} == set(state)
    te_dir = tmp_path / "te_base"
    stream = StreamingDistCkpt(te_dir)  # the writer our base checkpoints go through (experts one chunk each)
    stream.add(dist_ckpt.sharded_tensors(te_state))
    stream.finish()
    (te_dir / dist_ckpt.SPEC_FILE).write_text((trained["root"] / "base" / dist_ckpt.SPEC_FILE).read_text())
    te = open_base(te_dir)
    assert sorted(te.names) == sorted(local.names)
    assert all(torch.equal(t, state[n]) for n, t in te.load(te.names).items())
    a = export(te_dir, trained["root"] / "adapter", tmp_path / "from_te", fmt="mcore", progress=False)
    b = export(
        trained["root"] / "base", trained["root"] / "adapter", tmp_path / "from_local", fmt="mcore", progress=False
    )
    assert a["tensor_checksums"] == b["tensor_checksums"]


def test_export_verify_modes(trained, tmp_path):
    """verify=sample checks the named layers on their own (and the head); verify=none checks nothing; a layer
    the model lacks is refused before anything is written."""
    root = trained["root"]
    sample = export(
        root / "base",
        root / "adapter",
        tmp_path / "sample",
        fmt="hf",
        verify="sample",
        verify_layers=[1],
        progress=False,
    )["verify"]
    assert sample["mode"] == "sample" and sample["passed"] and set(sample["layers"]) == {"1"}
    assert sample["layers"]["1"]["max_abs_diff"] <= sample["layers"]["1"]["bound"]
    none = export(root / "base", root / "adapter", tmp_path / "none", fmt="hf", verify=False, progress=False)
    assert none["verify"] == {"mode": "none", "passed": True} and "timing" in none
    timing = none["timing"]  # where a run's time went: the process before export(), export() around its stages
    assert timing["before_export"] > 0 and timing["outside_stages"] >= 0 and timing["wall"] > 0
    with pytest.raises(ValueError, match=r"verify layers \[7\]"):
        export(
            root / "base",
            root / "adapter",
            tmp_path / "bad",
            fmt="hf",
            verify="sample",
            verify_layers=[7],
            progress=False,
        )
    assert not (tmp_path / "bad").exists()


def test_expert_units_smaller_than_a_layer_read_from_a_dist_checkpoint(trained, tmp_path):
    """A Megatron base whose experts are read one at a time (a V3-sized expert is over the unit budget):
    Megatron's loader cannot read some fragments of a stacked tensor in a one-process world (it failed on
    the GPU with deepseek_v3_small); the rows come through torch DCP and the export equals the one-unit one."""
    base = trained["root"] / "base"
    reader = CheckpointReader(base)
    name = "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"
    live = trained["model"].state_dict()[name]
    assert torch.equal(reader.load([name])[name], live)
    one = export(
        base, trained["root"] / "adapter", tmp_path / "one", fmt="mcore", progress=False, verify=False, budget=1
    )  # every expert its own unit
    whole = export(base, trained["root"] / "adapter", tmp_path / "whole", fmt="mcore", progress=False, verify=False)
    assert one["timing"]["units"] > whole["timing"]["units"]
    a, b = read_export(tmp_path / "one", "mcore"), read_export(tmp_path / "whole", "mcore")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_process_age_counts_from_the_process_start():
    """``process_age`` (the export manifest's ``before_export``) from ``/proc``: a fresh process that sleeps 1 s
    first reports at least that and far less than a minute."""
    code = "import time; time.sleep(1); from nemo_mla_lora.runtime.processes import process_age; print(process_age())"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 1.0 <= float(proc.stdout) < 60
