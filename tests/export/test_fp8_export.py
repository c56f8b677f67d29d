"""``weight_dtype=fp8_block`` of the hf export: DeepSeek-V3's FP8 block format written (``checkpoints/fp8.py``),
checked against float64 block by block, read back through safetensors, our ``HFBase`` reader and transformers'
forward on the dequantized weights, and read again as the base of another export."""

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file
from support.hf import MAKER, hf_model_from_state

from nemo_mla_lora.checkpoints import fp8
from nemo_mla_lora.checkpoints.sources import HFBase, dequantize_fp8
from nemo_mla_lora.export.pipeline import export
from nemo_mla_lora.export.verify import fixed_prompts

# Written out here, not taken from the module under test: the tensors DeepSeek-V3's release holds in FP8.
FP8_NAMES = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)|"
    r"mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))\.weight$"
)
QUANT = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def tensors(directory) -> dict:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_quantize_block_fp8_round_trip_against_float64():
    """Each element of the dequantized weight is within half an e4m3 step of the float64 weight: 2^-4 relative
    (3 mantissa bits), or 2^-10 of the block scale among e4m3's subnormals; an all-zero block stays zero."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(300, 260, generator=gen, dtype=torch.float64)
    w *= torch.logspace(-3, 2, 3, dtype=torch.float64).repeat_interleave(128)[:300, None]  # blocks of other sizes
    w[128:256, 128:256] = 0.0
    w[5, 7] = 1e-9  # far below its block's smallest e4m3 step
    q, scale_inv = fp8.quantize_block_fp8(w.float())
    assert q.dtype == torch.float8_e4m3fn and scale_inv.dtype == torch.float32 and scale_inv.shape == (3, 3)
    for i, j in [(0, 0), (2, 2), (0, 1)]:
        block = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
        assert math.isclose(scale_inv[i, j].item(), block.abs().max().item() / 448.0, rel_tol=1e-6)
    assert scale_inv[1, 1] == 1.0 and (q[128:256, 128:256].float() == 0).all()
    back = dequantize_fp8(q, scale_inv, torch.float64)
    per_element = scale_inv.double().repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :260]
    bound = 2.0**-4 * w.abs() + 2.0**-10 * per_element + 1e-6 * w.abs()  # + float32's rounding of w / scale
    assert ((back - w).abs() <= bound).all(), ((back - w).abs() - bound).max()
    assert (back - w).abs().max() > 0  # it really went through fp8
    assert q.float().abs().amax() == 448.0  # each block's max maps onto e4m3's largest value


def test_quantize_refuses_what_it_cannot_write():
    with pytest.raises(ValueError, match="2-D float"):
        fp8.quantize_block_fp8(torch.ones(4))
    bad = torch.ones(3, 3)
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fp8.quantize_block_fp8(bad)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A tiny HF DeepSeek-V3 base, an HF PEFT LoRA (B != 0) on its attention, MLP and expert linears, and its hf
    export as merged and in FP8."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("fp8_export")
    base = MAKER.make("v3_noaux_yarn_q", root / "base")
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    targets = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(root / "adapter")
    merged = export(base, root / "adapter", root / "merged", fmt="hf", progress=False)
    quantized = export(base, root / "adapter", root / "fp8", fmt="hf", weight_dtype="fp8_block", progress=False)
    return {"root": root, "merged": merged, "fp8": quantized}


def test_fp8_export_layout_config_and_manifest(exports):
    root = exports["root"]
    merged, written = tensors(root / "merged"), tensors(root / "fp8")
    quantized = {n for n in merged if FP8_NAMES.match(n)}
    assert quantized and any(".experts." in n for n in quantized) and any("kv_b_proj" in n for n in quantized)
    assert set(written) == set(merged) | {f"{n}_scale_inv" for n in quantized}
    for name, w in merged.items():
        if name in quantized:
            blocks = (-(-w.shape[0] // 128), -(-w.shape[1] // 128))
            assert written[name].dtype == torch.float8_e4m3fn and written[name].shape == w.shape, name
            assert written[f"{name}_scale_inv"].dtype == torch.float32, name
            assert tuple(written[f"{name}_scale_inv"].shape) == blocks, name
        else:  # embeddings, lm_head, norms, router weights and bias: as merged, bit for bit
            assert torch.equal(written[name], w), name
    config, config_merged = (json.loads((root / d / "config.json").read_text()) for d in ("fp8", "merged"))
    assert config.pop("quantization_config") == QUANT and config == config_merged
    info = json.loads((root / "fp8" / "manifest.json").read_text())
    assert set(info["tensor_checksums"]) == set(written)
    report, measured = info["verify"], info["fp8"]
    assert measured["quantized_tensors"] == len(quantized)
    assert info["timing"]["fp8_quantize"] >= 0
    assert 0 < measured["max_relative_error"] <= 2.0**-4
    gap = measured["logits_vs_merge"]["max_abs_logit_diff"]
    assert gap > 0 and report["passed"]
    assert report["bound"] == pytest.approx(report["bound_unquantized"] + gap)
    assert report["bound_unquantized"] == exports["merged"]["verify"]["bound"]


def test_fp8_export_reads_back_and_matches_merge_within_measured_error(exports):
    """Our reader dequantizes exactly fp8 * scale_inv (float64 here); transformers' forward on those weights
    differs from its forward on the unquantized merge by what the manifest measured."""
    root = exports["root"]
    merged, written = tensors(root / "merged"), tensors(root / "fp8")
    reader = HFBase(root / "fp8", dtype=torch.float32)
    state = reader.load(reader.names)
    reference = HFBase(root / "merged", dtype=torch.float32)
    merged_state = reference.load(reference.names)
    from nemo_mla_lora.arch import keymap

    for name, w in keymap.megatron_to_hf(state).items():
        if name in written and written[name].dtype == torch.float8_e4m3fn:
            s = written[f"{name}_scale_inv"].double()
            by_hand = (
                written[name].double()
                * s.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
            )
            torch.testing.assert_close(w.double(), by_hand, rtol=2**-23, atol=0)
            assert (w - merged[name]).abs().max() <= 2.0**-4 * merged[name].abs().max(), name
    spec = reader.spec
    tokens = fixed_prompts(spec.vocab_size)
    with torch.no_grad():
        logits = hf_model_from_state(spec, state)(input_ids=tokens).logits
        logits_merged = hf_model_from_state(spec, merged_state)(input_ids=tokens).logits
    measured = exports["fp8"]["fp8"]["logits_vs_merge"]
    diff = (logits - logits_merged).abs().max().item()
    assert diff > 0
    assert diff == pytest.approx(measured["max_abs_logit_diff"], rel=0.05, abs=1e-4 * measured["max_abs_logit"])


def test_fp8_export_is_a_base_for_another_export(exports, tmp_path):
    """The FP8 export read as a base: exported as merged it holds the weights as our reader dequantizes them
    (to bf16, as DeepSeek-V3's bases are read); quantized again it holds the same FP8 values, its scales within
    bf16's rounding of the dequantized block maxima (2^-9 relative, doubled for margin)."""
    root = exports["root"]
    plain = export(root / "fp8", None, tmp_path / "plain", fmt="hf", progress=False)
    assert plain["verify"]["passed"]
    reader = HFBase(root / "fp8")
    expected = keymap_hf(reader.load(reader.names))
    back = tensors(tmp_path / "plain")
    assert set(back) == set(expected)
    for name, w in expected.items():
        assert torch.equal(back[name], w), name
    again = export(root / "fp8", None, tmp_path / "again", fmt="hf", weight_dtype="fp8_block", progress=False)
    assert again["verify"]["passed"]
    first, second = tensors(root / "fp8"), tensors(tmp_path / "again")
    assert set(first) == set(second)
    for name, t in first.items():
        if t.dtype == torch.float8_e4m3fn:
            assert torch.equal(second[name].float(), t.float()), name
        elif name.endswith("_scale_inv"):
            torch.testing.assert_close(second[name], t, rtol=2.0**-8, atol=0)


def keymap_hf(state: dict) -> dict:
    from nemo_mla_lora.arch import keymap

    return keymap.megatron_to_hf(state)


@pytest.mark.parametrize("fmt, dtype, message", [("mcore", "fp8_block", "format=hf only"), ("hf", "fp8", "expected")])
def test_fp8_option_refused_for_other_formats(exports, tmp_path, fmt, dtype, message):
    root = exports["root"]
    with pytest.raises(ValueError, match=message):
        export(root / "base", root / "adapter", tmp_path / "out", fmt=fmt, weight_dtype=dtype, progress=False)
    assert not (tmp_path / "out").exists()


def test_fp8_sample_verify_widens_each_layer_bound(exports, tmp_path):
    root = exports["root"]
    info = export(
        root / "base",
        root / "adapter",
        tmp_path / "sample",
        fmt="hf",
        weight_dtype="fp8_block",
        verify="sample",
        verify_layers=[0, 2],
        progress=False,
    )
    report, gap = info["verify"], info["fp8"]["logits_vs_merge"]
    assert report["passed"] and set(report["layers"]) == set(gap["layers"]) == {"0", "2"}
    for layer, entry in report["layers"].items():
        assert gap["layers"][layer] > 0
        assert entry["bound"] == pytest.approx(entry["bound_unquantized"] + gap["layers"][layer])


def test_transformers_reads_the_quantization_config_and_the_cli_takes_the_option(exports):
    """transformers parses config.json's FP8 entry as its own FineGrainedFP8 config (loading the weights needs a
    GPU there); the export CLI's config has the field."""
    from transformers import AutoConfig

    from nemo_mla_lora.config.compose import compose

    quant = AutoConfig.from_pretrained(exports["root"] / "fp8").quantization_config
    assert quant["quant_method"] == "fp8" and list(quant["weight_block_size"]) == [128, 128]
    cfg = compose("export", ["base=a", "adapter=b", "output=c", "format=hf", "weight_dtype=fp8_block"])
    assert (
        cfg.weight_dtype == "fp8_block" and compose("export", ["base=a", "adapter=b", "output=c"]).weight_dtype is None
    )


def test_the_training_callback_writes_the_fp8_export_in_process_and_in_a_child(trained, tmp_path):
    """``export.weight_dtype=fp8_block`` of the finetune recipe: the callback's one-process export and the child
    process it uses under several ranks write the same FP8 files, verified, the quantization reported."""
    from nemo_mla_lora.callbacks.export import MLAExportCallback, export_in_child

    base, adapter = trained["root"] / "base", trained["root"] / "adapter"
    callback = MLAExportCallback(None, trained["spec"], base, tmp_path / "run", fmt="hf", weight_dtype="fp8_block")
    info = callback._export(adapter, tmp_path / "run" / "export")
    child = export_in_child(
        base, adapter, tmp_path / "child", fmt="hf", fold=False, verify="full", tolerance=None, weight_dtype="fp8_block"
    )
    for manifest in (info, child):
        assert manifest["verify"]["passed"] and manifest["fp8"]["logits_vs_merge"]["max_abs_logit_diff"] > 0
        assert 0 < manifest["fp8"]["max_relative_error"] <= 2.0**-4
    written = tensors(tmp_path / "run" / "export")
    assert any(t.dtype == torch.float8_e4m3fn for t in written.values())
    assert info["tensor_checksums"] == child["tensor_checksums"]  # the same bytes either way
