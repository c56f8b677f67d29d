"""HF PEFT adapters read completely: each LoRA feature peft saves (DoRA, rank/alpha patterns with rsLoRA,
modules_to_save, embedding LoRA, LoRA on lm_head, regex targets, layers_to_transform, exclude_modules, the
lora_alpha default) made by peft itself on a tiny transformers DeepSeek-V3 (B != 0, DoRA magnitudes away from
the weight norms, modules_to_save copies changed) and exported; transformers on the exported files against peft's
own ``merge_and_unload`` (fp32). What the export cannot do exactly is refused, naming the field, before anything
is written; a misread adapter fails verify."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from nemo_mla_lora.checkpoints.hf_peft_config import pattern_value, targeted
from nemo_mla_lora.checkpoints.sources import HFBase
from nemo_mla_lora.export.pipeline import VerificationError, export, read_export
from nemo_mla_lora.reference import latent

ROOT = Path(__file__).resolve().parents[2]
VARIANT, TIED = "v3_noaux_yarn_q", "v3_tied_yarn_q"


def _maker():
    spec = importlib.util.spec_from_file_location("make_tiny_hf", ROOT / "scripts" / "make_tiny_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    maker, root = _maker(), tmp_path_factory.mktemp("hf_peft_bases")
    return {name: maker.make(name, root / name) for name in (VARIANT, TIED)}


def tokens() -> torch.Tensor:
    return torch.randint(0, 262, (2, 10), generator=torch.Generator().manual_seed(0))


BASE_LOGITS = {}


def base_logits(directory) -> torch.Tensor:
    if str(directory) not in BASE_LOGITS:
        BASE_LOGITS[str(directory)] = hf_logits(directory)
    return BASE_LOGITS[str(directory)]


def hf_logits(directory) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens()).logits


def make_adapter(base, out, seed: int = 0, merge: bool = True, **config) -> torch.Tensor | None:
    """A peft LoRA adapter on ``base`` with random A and B (``init_lora_weights=False``), DoRA magnitudes and
    modules_to_save copies moved away from the base, saved by peft; returns the logits of peft's
    ``merge_and_unload()`` of it (``merge``), else the peft model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    peft_model = get_peft_model(model, LoraConfig(**{"init_lora_weights": False, **config}))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.5 * torch.rand_like(p))
            elif "modules_to_save.default" in name:
                p.add_(0.1 * torch.randn_like(p))
    peft_model.save_pretrained(out)
    if not merge:
        return peft_model
    with torch.no_grad():
        return peft_model.merge_and_unload().eval()(tokens()).logits


def assert_export_matches(base, adapter, out, expected, fmt: str = "hf") -> dict:
    info = export(base, adapter, out, fmt=fmt, progress=False)
    assert info["verify"]["passed"], info["verify"]
    if fmt == "hf":
        got = hf_logits(out)
    else:  # the latent-cache forward on the written tensors: prefill 4, then decode one token at a time
        got, _ = latent.generate_logits(tokens(), read_export(out, fmt), HFBase(base).spec, prefill=4)
    assert (expected - base_logits(base)).abs().max() > 0.05  # the adapter changes the logits
    torch.testing.assert_close(got, expected, atol=2e-5 * max(1.0, expected.abs().max().item()), rtol=0)
    return info


FEATURES = {
    "dora": dict(target_modules=["q_a_proj", "kv_b_proj", "gate_proj", "lm_head"], use_dora=True),
    "patterns_rslora": dict(
        target_modules=["q_a_proj", "o_proj", "gate_proj", "up_proj"],
        r=6,
        lora_alpha=12,
        use_rslora=True,
        rank_pattern={"o_proj": 4, r"layers\.1\.mlp\.experts\.3\.up_proj": 2},
        alpha_pattern={"q_a_proj": 3, "up_proj": 5},
    ),
    "modules_to_save": dict(target_modules=["o_proj"], modules_to_save=["lm_head", "mlp.gate", "input_layernorm"]),
    "embedding": dict(target_modules=["embed_tokens", "o_proj"]),
    "lm_head": dict(target_modules=["lm_head", "kv_a_proj_with_mqa"]),
    "regex_targets": dict(target_modules=r".*\.layers\.[02]\.(self_attn\.q_b_proj|mlp\.down_proj)"),
    "layers_exclude": dict(
        target_modules=["q_b_proj", "down_proj"],
        layers_to_transform=[1, 2],
        exclude_modules=["shared_experts.down_proj"],
    ),
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_each_feature_matches_peft_merge(bases, tmp_path, feature):
    expected = make_adapter(bases[VARIANT], tmp_path / "adapter", **FEATURES[feature])
    assert_export_matches(bases[VARIANT], tmp_path / "adapter", tmp_path / "hf", expected)


@pytest.mark.parametrize("feature", ["dora", "embedding", "lm_head"])
def test_verify_adapts_the_vocabulary_tensors_by_rows_as_whole(bases, tmp_path, feature):
    """Verify's reference reads the adapted embedding / output layer a block of rows at a time: each block equal
    to the same rows of the whole adapted tensor (float64), for LoRA, DoRA (lm_head: norms of rows) and embedding
    LoRA; the embedding under DoRA (norms of columns) stays whole."""
    from nemo_mla_lora.export.peft_reference import ROWS, PeftReference

    make_adapter(bases[VARIANT], tmp_path / "adapter", merge=False, **FEATURES[feature])
    reference, base = PeftReference(tmp_path / "adapter"), HFBase(bases[VARIANT])
    names = ["output_layer.weight", "embedding.word_embeddings.weight"]
    state = {n: base.load([n])[n].double() for n in names}
    view = reference.view(state, torch.float64)
    rows = torch.tensor([[5, 0, 261], [5, 7, 7]])  # as the prompts' tokens index the embedding
    for name in names:
        if name not in reference.touched:
            continue
        whole = reference.tensor(name, state[name], torch.float64)
        got = view[name]
        assert type(got).__name__ == "_AdaptedRows" and got.shape == whole.shape
        torch.testing.assert_close(got[100:228], whole[100:228], atol=1e-12, rtol=0)
        torch.testing.assert_close(got[rows], whole[rows], atol=1e-12, rtol=0)
        assert (whole - state[name]).abs().max() > 1e-3  # the adapter changes it
    reference.config.use_dora = True  # as if the embedding's LoRA were DoRA: its norms are of columns
    assert not reference.by_rows(ROWS["embedding.word_embeddings.weight"]) or feature != "embedding"


def test_all_features_together_hf_and_latent(mcore, bases, tmp_path):
    config = dict(
        target_modules=[
            "embed_tokens",
            "q_a_proj",
            "kv_b_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "lm_head",
        ],
        use_dora=True,
        r=6,
        lora_alpha=10,
        use_rslora=True,
        rank_pattern={"kv_b_proj": 4},
        alpha_pattern={r"experts\.\d+\.up_proj": 7},
        modules_to_save=["post_attention_layernorm", "mlp.gate"],
        exclude_modules=["layers.2.self_attn.o_proj"],
    )
    expected = make_adapter(bases[VARIANT], tmp_path / "adapter", **config)
    info = assert_export_matches(bases[VARIANT], tmp_path / "adapter", tmp_path / "hf", expected)
    assert info["merge_scales"]["decoder.layers.1.mlp.experts.local_experts.0.linear_fc1"] == {
        "gate": pytest.approx(10 / 6**0.5),
        "up": pytest.approx(7 / 6**0.5),
    }
    assert_export_matches(bases[VARIANT], tmp_path / "adapter", tmp_path / "absorbed", expected, fmt="absorbed")


def test_missing_lora_alpha_is_peft_default(bases, tmp_path):
    """peft's default lora_alpha is 8 (scale 8 / r = 2 here), not r or 1."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    make_adapter(bases[VARIANT], tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["o_proj", "q_b_proj"])
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    del config["lora_alpha"]
    config_file.write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(bases[VARIANT], dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        expected = PeftModel.from_pretrained(model, tmp_path / "adapter").merge_and_unload().eval()(tokens()).logits
    assert_export_matches(bases[VARIANT], tmp_path / "adapter", tmp_path / "hf", expected)


@pytest.fixture(scope="module")
def plain_adapter(bases, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "adapter"
    make_adapter(bases[VARIANT], out, r=4, target_modules=["q_a_proj", "o_proj", "gate_proj", "up_proj"])
    return out


def edited(plain_adapter, tmp_path, **fields) -> Path:
    out = tmp_path / "edited"
    shutil.copytree(plain_adapter, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(fields)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def assert_refused(base, adapter, out, match: str, fmt: str = "hf") -> None:
    with pytest.raises(Exception, match=match):
        export(base, adapter, out, fmt=fmt, progress=False)
    assert not out.exists() and not any(out.parent.glob(f".{out.name}*"))


@pytest.mark.parametrize(
    "field, value",
    [
        ("fan_in_fan_out", True),
        ("bias", "all"),
        ("bias", "lora_only"),
        ("use_qalora", True),
        ("target_parameters", ["mlp.experts.0.gate_proj.weight"]),
        ("layer_replication", [[0, 2]]),
        ("peft_type", "LOHA"),
        ("megatron_config", {"num_layers": 3}),
        ("trainable_token_indices", [1, 2]),
        ("init_lora_weights", "pissa"),
        ("init_lora_weights", "olora"),
        ("use_future_feature", True),
        ("task_type", "SEQ_CLS"),
        ("target_modules", None),
    ],
)
def test_unsupported_field_refused_before_writing(bases, plain_adapter, tmp_path, field, value):
    adapter = edited(plain_adapter, tmp_path, **{field: value})
    assert_refused(bases[VARIANT], adapter, tmp_path / "out", field)


def test_lora_bias_refused_naming_the_module(bases, tmp_path):
    peft_model = make_adapter(
        bases[VARIANT], tmp_path / "adapter", merge=False, target_modules=["o_proj"], lora_bias=True
    )
    with pytest.raises(RuntimeError, match="lora_bias=True"):  # peft cannot merge it either
        peft_model.merge_and_unload()
    assert_refused(
        bases[VARIANT],
        tmp_path / "adapter",
        tmp_path / "out",
        r"lora_bias: model\.layers\.\d\.self_attn"
        r"\.o_proj",
    )


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(target_modules=["lm_head", "o_proj"]), "tie_word_embeddings"),
        (dict(target_modules=["o_proj"], modules_to_save=["embed_tokens"]), "tie_word_embeddings"),
    ],
)
def test_tied_embeddings_adapter_refused(bases, tmp_path, config, match):
    make_adapter(bases[TIED], tmp_path / "adapter", **config)
    assert_refused(bases[TIED], tmp_path / "adapter", tmp_path / "out", match)


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(target_modules=["o_proj"], use_dora=True), "use_dora"),
        (dict(target_modules=["o_proj", "q_a_proj"], rank_pattern={"o_proj": 2}), "rank_pattern"),
        (dict(target_modules=["o_proj", "q_a_proj"], alpha_pattern={"o_proj": 2}), "alpha_pattern"),
        (dict(target_modules=["o_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(target_modules=["o_proj", "embed_tokens"]), "embed_tokens"),
        (dict(target_modules=["o_proj", "gate_proj", "up_proj"]), "gate_proj \\+ up_proj"),
    ],
)
def test_hf_peft_format_refuses_what_it_cannot_write(bases, tmp_path, config, match):
    make_adapter(bases[VARIANT], tmp_path / "adapter", **config)
    assert_refused(bases[VARIANT], tmp_path / "adapter", tmp_path / "out", match, fmt="hf_peft")


@pytest.mark.parametrize(
    "key",
    [
        "base_model.model.model.layers.0.self_attn.o_proj.lora_C.weight",
        "model.layers.0.self_attn.o_proj.lora_A.weight",
        "base_model.model.model.layers.0.post_attention_layernorm.weight",
    ],
)
def test_unread_tensor_refused_naming_it(bases, plain_adapter, tmp_path, key):
    from safetensors.torch import load_file, save_file

    adapter = edited(plain_adapter, tmp_path)
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors[key] = torch.ones(64) if key.endswith("layernorm.weight") else torch.ones(4, 96)
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    assert_refused(bases[VARIANT], adapter, tmp_path / "out", key.replace(".", r"\."))


def test_rank_mismatch_and_other_dims_refused_naming_the_module(bases, plain_adapter, tmp_path):
    adapter = edited(plain_adapter, tmp_path, r=8)  # the file's tensors have rank 4
    assert_refused(
        bases[VARIANT],
        adapter,
        tmp_path / "out",
        r"model\.layers\.0\.mlp\.gate_proj \(decoder\.layers\.0\.mlp\.linear_fc1\): "
        r".*lora_A\.weight is \(4, 64\), expected \(8, 64\)",
    )
    make_adapter(bases[VARIANT], tmp_path / "other", target_modules=["q_a_proj", "q_b_proj"])  # q_lora_rank 48
    assert_refused(
        bases[TIED],
        tmp_path / "other",
        tmp_path / "out2",  # q_lora_rank 40
        r"q_a_proj .*lora_B\.weight is \(48, 8\), expected \(40, 8\)",
    )


def test_misread_dora_fails_verify(bases, tmp_path, monkeypatch):
    """The reference side reads the adapter on its own: a merge-side reader that drops DoRA's magnitude cannot
    make verify agree with it."""
    from nemo_mla_lora.checkpoints.hf_peft import HFPeftAdapter

    make_adapter(bases[VARIANT], tmp_path / "adapter", target_modules=["o_proj", "q_b_proj"], use_dora=True)
    original = HFPeftAdapter._lora_tensors
    monkeypatch.setattr(HFPeftAdapter, "_lora_tensors", lambda self, m: (*original(self, m)[:3], None))
    with pytest.raises(VerificationError, match="differs from the unmerged model"):
        export(bases[VARIANT], tmp_path / "adapter", tmp_path / "out", fmt="hf", progress=False)
    assert not (tmp_path / "out").exists()


def test_target_matching_and_patterns_are_peft_own(bases):
    """``targeted`` / ``pattern_value`` against peft's own check_target_module_exists / get_pattern_key on every
    module name of the model."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key
    from transformers import AutoModelForCausalLM

    from nemo_mla_lora.checkpoints.hf_peft_config import read_config

    names = [n for n, _ in AutoModelForCausalLM.from_pretrained(bases[VARIANT]).named_modules() if n]
    configs = [
        dict(target_modules=["q_a_proj", "gate_proj"], layers_to_transform=[1], layers_pattern="layers"),
        dict(
            target_modules=["down_proj", "model.layers.0.self_attn.o_proj"],
            layers_to_transform=2,
            exclude_modules=r".*shared_experts.*",
        ),
        dict(target_modules=r".*(experts\.[13]|self_attn)\.\w+_proj", modules_to_save=["self_attn"]),
        dict(target_modules=["up_proj"], exclude_modules=["experts.0.up_proj"], layers_to_transform=[0, 1]),
    ]
    for config in configs:
        ours = read_config_dict(config, read_config)
        peft_config = LoraConfig(**config)
        expected = [n for n in names if check_target_module_exists(peft_config, n)]
        assert expected and [n for n in names if targeted(ours, n)] == expected
    patterns = {r"layers\.1\..*proj": 3, "o_proj": 5, "experts.2.up_proj": 7}
    for n in names:
        assert pattern_value(patterns, n, 8) == patterns.get(get_pattern_key(list(patterns), n), 8)


def read_config_dict(config: dict, read_config) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "adapter_config.json"
        path.write_text(json.dumps({"peft_type": "LORA", **config}))
        return read_config(path)
