"""Where a run's architecture comes from: the checkpoint it starts from, else a built-in HF config.

    model.checkpoint=<HF dir>           config.json (+ the tokenizer files beside it)
    model.checkpoint=<our base dir>     mla_spec.json
    model.checkpoint=<NeMo 2 checkpoint> context/model.yaml, read as data (``checkpoints.kind``)
    model.config=tiny_mla | <path to config.json>   no checkpoint: the package's configs/<name>.json or a file

``model.arch`` holds HF ``config.json`` fields to change. Without a checkpoint they edit the built-in config
(a smaller test model, say); with one they may only repeat it: a value that contradicts the checkpoint is an
error naming both, so nothing is typed twice and nothing typed can silently differ from the weights.
"""

import json
from pathlib import Path

from nemo_mla_lora.arch.hf_config import spec_from_hf
from nemo_mla_lora.arch.mla_spec import MLASpec
from nemo_mla_lora.checkpoints.kind import checkpoint_spec

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def builtin_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def builtin_config(name: str) -> dict:
    """The HF ``config.json`` dict of a built-in model, or of a ``config.json`` path."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        path = Path(name)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"model.config={name!r}: neither a built-in model {builtin_names()} nor a config.json")
    return json.loads(path.read_text())


def builtin_spec(name: str) -> MLASpec:
    return spec_from_hf(builtin_config(name), f"model.config={name}")


def _apply(config: dict, arch: dict, source: str) -> dict:
    unknown = sorted(k for k in arch if k not in config and k not in _OPTIONAL_HF_FIELDS)
    if unknown:
        raise ValueError(f"model.arch: {unknown} are not fields of {source}")
    return {**config, **arch}


# HF fields a config.json may leave out (defaults apply) and model.arch may still set.
_OPTIONAL_HF_FIELDS = {
    "scoring_func",
    "topk_method",
    "norm_topk_prob",
    "moe_layer_freq",
    "n_group",
    "topk_group",
    "rope_scaling",
    "tie_word_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "q_lora_rank",
}


def resolve(model_cfg) -> MLASpec:
    """The run's ``MLASpec`` from ``model.checkpoint`` (or ``model.config``), with ``model.arch`` checked/applied."""
    arch = dict(model_cfg.get("arch") or {})
    if model_cfg.checkpoint:
        spec = checkpoint_spec(model_cfg.checkpoint)
        if arch:
            stated = spec_from_hf(_apply(_hf_view(spec), arch, model_cfg.checkpoint), "model.arch")
            diff = {k: (v, getattr(spec, k)) for k, v in stated.to_dict().items() if spec.to_dict()[k] != v}
            if diff:
                raise ValueError(
                    f"model.arch contradicts the checkpoint {model_cfg.checkpoint}: (model.arch, "
                    f"checkpoint) differ in {diff}; drop the override, the checkpoint's config is used"
                )
        return spec
    if not model_cfg.config:
        raise ValueError(
            f"model {model_cfg.name}: no model.checkpoint and no model.config to take the architecture "
            f"from (built-in: {builtin_names()})"
        )
    source = f"model.config={model_cfg.config}"
    return spec_from_hf(_apply(builtin_config(model_cfg.config), arch, source), source)


def _hf_view(spec: MLASpec) -> dict:
    from nemo_mla_lora.arch.hf_config import hf_config_dict

    return hf_config_dict(spec, "float32")
