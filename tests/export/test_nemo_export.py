"""format=nemo: NeMo 2 checkpoints that NeMo's own code reads, checked against transformers + peft.

On CPU NeMo 2.7.3 can (a) restore a checkpoint through its own ``MegatronStrategy`` and convert it with its own
``HFDeepSeekExporter`` (``llm.export_ckpt(target="hf")``), for ``names=local`` (the context names our TE-free layer
spec; NeMo's stock DeepSeek spec needs Transformer Engine to build), and (b) convert a ``names=te`` checkpoint with
the same exporter (it reads ``weights/`` + ``model.yaml`` without building a model). The TE model's own load and
``llm.generate`` run on the GPU machine (bench/nemo_engines_check.py, bench/README.md).

NeMo's exporter writes bf16 (``cast_dtype=torch.bfloat16``), so its output is compared with the unmerged
transformers + peft model's merged weights rounded to bf16; and it registers transformers' native DeepSeek class
for auto-class export, which fails in ``save_pretrained`` (``..generation.py`` not found: the hook is meant for remote
code) - the tests turn that registration off, nothing else.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from nemo_mla_lora.export.pipeline import export

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import make_tiny_hf as MAKER

TARGETS = [
    "q_a_proj",
    "q_b_proj",
    "q_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]


@pytest.fixture(scope="module")
def tuned(mcore, tmp_path_factory):
    """Every tiny HF variant (V2 softmax greedy / group-limited, V3 noaux_tc; plain RoPE and YaRN; with and without
    q compression; tied embeddings) made by transformers, each with an HF peft LoRA on every linear, B != 0, and
    transformers + peft's merged weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root, out = tmp_path_factory.mktemp("nemo_export"), {}
    for variant in MAKER.VARIANTS:
        directory = MAKER.make(variant, root / variant)
        model = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32)
        peft_model = get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
        )
        peft_model.save_pretrained(root / f"{variant}_peft")
        merged = {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
        out[variant] = dict(hf=directory, peft=root / f"{variant}_peft", merged=merged, root=root)
    return out


def nemo_hf_export(nemo_dir, hf_dir, out, monkeypatch, build_model: bool):
    """NeMo's ``llm.export_ckpt(target='hf')`` (``build_model``: restores the model first, as it always does), or
    its HF exporter alone (what export_ckpt falls back to; reads weights/ + model.yaml)."""
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "register_for_auto_class", classmethod(lambda cls, auto_class=None: None))
    if build_model:
        from nemo.collections import llm

        llm.export_ckpt(path=Path(nemo_dir), target="hf", output_path=Path(out), target_model_name=str(hf_dir))
    else:
        from nemo.lightning.io.api import load_connector_from_trainer_ckpt

        load_connector_from_trainer_ckpt(Path(nemo_dir), "hf")(output_path=Path(out), target_model_name=str(hf_dir))
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32, attn_implementation="eager").eval()


def assert_matches_merged_in_bf16(converted, case):
    """NeMo's HF output equals transformers + peft's merge, both in bf16 (one bf16 step where our fp32 merge and
    peft's round differently), and its logits equal the bf16-rounded merged model's."""
    from transformers import AutoModelForCausalLM

    state = converted.state_dict()
    assert set(state) == set(case["merged"])
    for name, ours in state.items():
        expected = case["merged"][name].to(torch.bfloat16).float()
        ulp = expected.abs().clamp_min(1e-30) * 2.0**-7
        assert ((ours - expected).abs() <= ulp).all(), name
    reference = AutoModelForCausalLM.from_pretrained(
        case["hf"], torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()
    reference.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in case["merged"].items()})
    base = AutoModelForCausalLM.from_pretrained(case["hf"], torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, 262, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, unadapted = converted(tokens).logits, reference(tokens).logits, base(tokens).logits
    assert (want - unadapted).abs().max() > 1e-2  # the adapter shows: a dropped merge could not pass
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)


def convert_and_compare(nemo_dir, case, out, monkeypatch, build_model: bool):
    """NeMo's HF conversion of ``nemo_dir`` equals transformers + peft's merge. NeMo 2.7.3's HFDeepSeekExporter
    always maps ``output_layer.weight``, which a tied-embedding model (Megatron's included) does not have: for the
    tied variant it fails there, after NeMo's restore (``build_model``) has loaded the checkpoint."""
    if MAKER.VARIANTS[case["hf"].name][1].get("tie_word_embeddings"):
        with pytest.raises(ValueError, match="No matches found for source key: output_layer.weight"):
            nemo_hf_export(nemo_dir, case["hf"], out, monkeypatch, build_model)
        return
    assert_matches_merged_in_bf16(nemo_hf_export(nemo_dir, case["hf"], out, monkeypatch, build_model), case)


@pytest.mark.parametrize("variant", MAKER.VARIANTS)
def test_local_names_restore_in_nemo_and_export_to_hf(tuned, tmp_path, monkeypatch, variant):
    """names=local: NeMo builds the model its context names (our layer spec), restores the weights through its
    MegatronStrategy, and its HF exporter writes transformers + peft's merged model."""
    case = tuned[variant]
    report = export(case["hf"], case["peft"], tmp_path / "nemo", fmt="nemo", names="local", progress=False)
    assert report["verify"]["passed"] and report["names"] == "local"
    convert_and_compare(tmp_path / "nemo", case, tmp_path / "back", monkeypatch, build_model=True)


@pytest.mark.parametrize("variant", MAKER.VARIANTS)
def test_te_names_convert_with_nemos_hf_exporter(tuned, tmp_path, monkeypatch, variant):
    case = tuned[variant]
    report = export(case["hf"], case["peft"], tmp_path / "nemo", fmt="nemo", progress=False)
    assert report["names"] == "te" and report["verify"]["passed"]
    if variant.startswith("v2_group"):  # Megatron's group score (sum of the top 2) is not V2's (best expert)
        assert any("routing" in d for d in report["nemo"]["differs_from_deepseek"])
    convert_and_compare(tmp_path / "nemo", case, tmp_path / "back", monkeypatch, build_model=False)


def test_te_checkpoint_layout_and_context(tuned, tmp_path):
    """Keys as NeMo's MegatronParallel saves them (``module.``), the TE spec's fused norm names and the
    ``_extra_state`` entries its TE norms / core attention / linears ask for; the context, loaded by NeMo's
    io.load_context, configures the same architecture with the TE layer spec and the source's tokenizer."""
    from megatron.core import dist_checkpointing
    from nemo.lightning import io

    from nemo_mla_lora.arch.mla_spec import MLASpec

    case = tuned["v3_noaux_yarn_q"]
    out = tmp_path / "nemo"
    export(case["hf"], case["peft"], out, fmt="nemo", progress=False)
    stored = set(dist_checkpointing.load_tensors_metadata(str(out / "weights")))
    assert all(k.startswith("module.") for k in stored)
    for name in (
        "module.decoder.layers.0.mlp.linear_fc1.layer_norm_weight",  # dense: pre-MLP norm fused
        "module.decoder.layers.1.pre_mlp_layernorm.weight",  # MoE layer keeps its norm
        "module.decoder.layers.1.self_attention.linear_q_up_proj.layer_norm_weight",
        "module.decoder.layers.1.self_attention.linear_kv_up_proj.layer_norm_weight",
        "module.decoder.layers.1.mlp.experts.experts.linear_fc1.weight",
    ):
        assert name in stored, name
    assert not any("q_layernorm" in k or "kv_layernorm" in k for k in stored)
    objects = _sharded_objects(out / "weights")
    for module in (
        "decoder.layers.1.input_layernorm",
        "decoder.layers.1.pre_mlp_layernorm",
        "decoder.final_layernorm",
        "decoder.layers.1.self_attention.linear_kv_up_proj",
        "decoder.layers.1.mlp.experts.experts.linear_fc1",
    ):
        assert f"module.{module}._extra_state" in objects, module
    model = io.load_context(out / "context", subpath="model")
    assert type(model).__name__ == "DeepSeekModel" and type(model.config).__name__ == "DeepSeekV3Config"
    assert model.config.transformer_layer_spec.keywords == {"use_transformer_engine": True}
    spec = MLASpec.from_dict(json.loads((out / "mla_spec.json").read_text()))
    read_back = MLASpec.from_megatron(model.config)
    for field in (
        "hidden_size",
        "num_layers",
        "q_lora_rank",
        "kv_lora_rank",
        "qk_rope_head_dim",
        "rope_factor",
        "num_experts",
        "moe_topk",
        "moe_scaling_factor",
        "moe_score_function",
        "moe_layer_pattern",
    ):
        assert getattr(read_back, field) == getattr(spec, field), field
    from transformers import AutoTokenizer

    source = AutoTokenizer.from_pretrained(case["hf"])
    assert model.tokenizer.text_to_ids("abc =") == source("abc =", add_special_tokens=False)["input_ids"]
    # the context holds the tokenizer's files only, where NeMo's import puts them (NeMo copies a tokenizer's
    # directory whole: the source HF directory would have brought its weights along)
    assert (out / "context" / "nemo_tokenizer" / "tokenizer.json").is_file()
    assert not [f for f in (out / "context").rglob("*") if f.suffix in (".safetensors", ".bin", ".pt")]
    assert not (out / ".tokenizer_stage").exists()


def _sharded_objects(weights_dir) -> set:
    """The ShardedObject keys of a dist-checkpoint (stored as ``key/shard_...`` entries of the DCP metadata)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(weights_dir)).read_metadata()
    return {k.split("/shard_")[0] for k in metadata.state_dict_metadata if "/shard_" in k}


def test_nemo_export_reads_back_as_a_base_and_serves(tuned, tmp_path):
    """A NeMo checkpoint (ours, TE names) is a base like any other: exporting it again gives the tensors the
    source gives, and the engine serves it with the logits of the mcore export."""
    from nemo_mla_lora.inference.engine import AbsorbedMLAEngine
    from nemo_mla_lora.runtime import parallel

    parallel.init_megatron()
    case = tuned["v3_noaux_yarn_q"]
    export(case["hf"], case["peft"], tmp_path / "nemo", fmt="nemo", progress=False)
    again = export(tmp_path / "nemo", None, tmp_path / "again", fmt="mcore", progress=False)
    direct = export(case["hf"], case["peft"], tmp_path / "mcore", fmt="mcore", progress=False)
    assert again["tensor_checksums"] == direct["tensor_checksums"]
    tokens = torch.randint(0, 262, (2, 8), generator=torch.Generator().manual_seed(1))
    logits = []
    for name in ("nemo", "mcore"):
        engine = AbsorbedMLAEngine.load(tmp_path / name)
        cache = engine.new_cache(2, 8)
        logits.append(engine.forward(tokens, cache))
    torch.testing.assert_close(logits[0], logits[1], atol=0, rtol=0)


def test_byte_tokenizer_maps_onto_nemos():
    from nemo_mla_lora.data.tokenizer import BOS, EOS, PAD, ByteTokenizer
    from nemo_mla_lora.export.nemo_format import nemo_tokenizer

    theirs, ours = nemo_tokenizer("byte"), ByteTokenizer()
    assert theirs.text_to_ids("Hé!") == ours.encode("Hé!")
    assert (theirs.bos_id, theirs.eos_id, theirs.pad_id, theirs.vocab_size) == (BOS, EOS, PAD, ours.vocab_size)
    assert theirs.ids_to_text([BOS, *ours.encode("abc"), EOS, PAD]) == "abc"


def test_names_option_checked(tuned, tmp_path):
    case = tuned["v3_noaux_yarn_q"]
    with pytest.raises(ValueError, match="names="):
        export(case["hf"], None, tmp_path / "x", fmt="nemo", names="tev")
    with pytest.raises(ValueError, match="applies to formats"):
        export(case["hf"], None, tmp_path / "x", fmt="hf", names="te")
    assert not (tmp_path / "x").exists()


def test_mcore_te_and_local_names_hold_the_same_tensors(tuned, tmp_path):
    """The default mcore export has the TE spec's names (as Megatron's and NeMo's TE models ask for them; the
    TE-spec load itself runs on the GPU machine); ``names=local`` the TE-free spec's. Same tensors either way."""
    from megatron.core import dist_checkpointing

    case = tuned["v3_noaux_yarn_q"]
    te = export(case["hf"], case["peft"], tmp_path / "te", fmt="mcore", progress=False)
    local = export(case["hf"], case["peft"], tmp_path / "local", fmt="mcore", names="local", progress=False)
    assert (te["names"], local["names"]) == ("te", "local")
    assert te["tensor_checksums"] == local["tensor_checksums"]
    te_keys = set(dist_checkpointing.load_tensors_metadata(str(tmp_path / "te")))
    local_keys = set(dist_checkpointing.load_tensors_metadata(str(tmp_path / "local")))
    assert "decoder.layers.1.self_attention.linear_kv_up_proj.layer_norm_weight" in te_keys - local_keys
    assert "decoder.layers.1.self_attention.kv_layernorm.weight" in local_keys - te_keys
    assert "decoder.layers.1.input_layernorm._extra_state" in _sharded_objects(tmp_path / "te")
    assert "decoder.layers.1.input_layernorm._extra_state" not in _sharded_objects(tmp_path / "local")


def test_context_tokenizer_is_the_one_the_run_trained_with(tuned, tmp_path):
    from omegaconf import OmegaConf

    from nemo_mla_lora.recipes.finetune import nemo_context_tokenizer

    case = tuned["v3_noaux_yarn_q"]
    export(case["hf"], None, tmp_path / "nemo", fmt="nemo", progress=False)
    spec = json.loads((tmp_path / "nemo" / "mla_spec.json").read_text())
    from nemo_mla_lora.arch.mla_spec import MLASpec

    spec = MLASpec.from_dict(spec)

    def cfg(kind, tokenizer, checkpoint):
        return OmegaConf.create(
            {"trainer": {"kind": kind}, "data": {"tokenizer": tokenizer}, "model": {"checkpoint": checkpoint}}
        )

    assert nemo_context_tokenizer(cfg("cpu", None, None), spec) == "byte"
    assert nemo_context_tokenizer(cfg("cpu", None, str(case["hf"])), spec) == str(case["hf"])
    assert nemo_context_tokenizer(cfg("megatron", "byte", None), spec) == "nemo_byte"  # NeMo's own, 512 ids
    restored = nemo_context_tokenizer(cfg("megatron", None, str(tmp_path / "nemo")), spec)
    assert (Path(restored) / "tokenizer.json").read_bytes() == (case["hf"] / "tokenizer.json").read_bytes()
    for f in (tmp_path / "nemo").glob("tokenizer*"):  # as NeMo writes them: the context's files only
        f.unlink()
    restored = nemo_context_tokenizer(cfg("megatron", None, str(tmp_path / "nemo")), spec)
    assert restored == str(tmp_path / "nemo" / "context" / "nemo_tokenizer")
    with pytest.raises(ValueError, match="set data.tokenizer"):
        nemo_context_tokenizer(cfg("megatron", None, None), spec)
