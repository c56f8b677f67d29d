"""The JSON manifest of an export: what it is, where it came from, what its KV cache costs, and the checksums
of its tensors and of its architecture (``architecture_checksums``: the manifest's own ``format``, ``dtype`` and
``mla`` fields, and ``mla_spec.json`` / ``config.json`` / ``adapter_config.json`` field by field, NeMo's
``context/`` files whole; an edited rope base or routing scale would serve other logits with every tensor intact).
"""

import json
from pathlib import Path

import xxhash

from nemo_mla_lora.checkpoints.checksums import CHECKSUM
from nemo_mla_lora.checkpoints.errors import CheckpointError, ChecksumError
from nemo_mla_lora.checkpoints.output_dir import MANIFEST, PRODUCER

# 3: producer + architecture_checksums; 2: tensor_checksums are xxh3_128 (checkpoint.tensor_checksum); 1: sha256
FORMAT_VERSION = 3
ARCHITECTURE_JSON = ("mla_spec.json", "config.json", "adapter_config.json")  # checked field by field
ARCHITECTURE_FILES = ("context/model.yaml", "context/io.json")  # a nemo export's NeMo config: checked whole
MANIFEST_FIELDS = ("format", "dtype", "mla")  # what the readers build the model from
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def kv_cache_report(spec, dtype: str) -> dict:
    """Values and bytes per token: latent cache (c_kv + shared rope key) vs materialized K and V."""
    per_layer = spec.kv_cache_values_per_token_per_layer()
    nbytes = DTYPE_BYTES[dtype]
    return {
        "dtype": dtype,
        "values_per_token_per_layer": per_layer,
        "bytes_per_token_per_layer": {k: v * nbytes for k, v in per_layer.items()},
        "bytes_per_token": {k: v * nbytes * spec.num_layers for k, v in per_layer.items()},
        "materialized_over_latent": per_layer["materialized"] / per_layer["latent"],
    }


# Who reads each format, and how (checked: tests/export/test_export.py, tests/recipes/test_hf_checkpoints.py,
# bench/README.md).
CONSUMERS = {
    "mcore": "Megatron-Core's GPTModel with MLASelfAttention: dist_checkpointing.load(model.sharded_state_dict(), "
    "dir) with default strictness; names=te: the Transformer Engine layer spec (0.15.3 on an H200), "
    "names=local: the TE-free spec (0.15.3 on CPU, 0.19.2 on an H200), see bench/README.md; Megatron's "
    "dynamic inference engine absorbs it at load with cache_mla_latents=True (needs Transformer Engine "
    "and FlashMLA); nemo_mla_lora.recipes.generate absorbs it at load (latent cache)",
    "nemo": "NeMo 2 (2.7.3 tested): llm.generate (io.load_context + MegatronStrategy restore, "
    "default strictness; H200), llm.export_ckpt(path, target='hf') (HFDeepSeekExporter), llm.finetune "
    "resume=AutoResume(restore_config=RestoreConfig(path=...)) (the same restore); names=te: the TE layer "
    "spec NeMo's DeepSeek configs build where Transformer Engine is installed (NeMo's containers); "
    "names=local: nemo_mla_lora's TE-free layer spec named in the context; nemo_mla_lora.recipes.generate "
    "absorbs it at load (latent cache)",
    "absorbed": "Megatron-Core 0.17-0.18 AbsorbedMLASelfAttention (split linear_k_up_proj / linear_v_up_proj); "
    "not megatron-core >= 0.19, whose module holds one linear_kv_up_proj again; "
    "nemo_mla_lora.recipes.generate (latent cache)",
    "hf": "transformers AutoModelForCausalLM, vLLM, SGLang: the source's config.json with torch_dtype = the "
    "written dtype; nemo_mla_lora.recipes.generate absorbs it at load",
    "hf_peft": "peft PeftModel.from_pretrained over the HF base (vLLM drops a kv_b_proj LoRA in its absorbed path)",
}


def build(fmt: str, spec, dtype: str, scales: dict, checksums: dict, fold: dict | None = None) -> dict:
    """The manifest without its ``source`` (added by the pipeline) and ``verify`` (added after verifying)."""
    return {
        "producer": PRODUCER,
        "format": fmt,
        "format_version": FORMAT_VERSION,
        "mla": spec.to_dict(),
        "latent_cache": fmt != "hf_peft",  # served with a c_kv + k_rope cache by the consumers in loaded_by
        "kv_cache": kv_cache_report(spec, dtype),
        "merge_scales": scales,
        "dtype": dtype,
        "folded": fold,
        "tensor_checksums": checksums,
        "checksum": CHECKSUM,
        "loaded_by": CONSUMERS[fmt],
    }


def read_manifest(directory, hint: str = "") -> dict:
    """``directory/manifest.json`` as a dict; a missing, truncated or non-object file is a one-line
    ``CheckpointError`` naming it.

    Args:
        directory: an export.
        hint: what to do when there is no manifest (appended to that error).
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {MANIFEST}" + (f"; {hint}" if hint else ""))
    try:
        info = json.loads(path.read_text())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(
            f"{path}: not valid JSON ({err}); truncated or edited since export? re-export it"
        ) from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(info).__name__}, not the manifest's object")
    return info


def _checksum(value) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return f"{CHECKSUM}:{xxhash.xxh3_128(text.encode()).hexdigest()}"


def _fields(value, prefix: str = "") -> dict | str:
    """Field -> checksum of its value (a JSON object), or one checksum (anything else)."""
    if isinstance(value, dict):
        return {f"{prefix}{k}": _checksum(v) for k, v in value.items()}
    return _checksum(value)


def _json_file(path: Path):
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); truncated or edited since export?") from None


def architecture_checksums(directory, info: dict) -> dict:
    """File -> {field: checksum} (JSON files, the manifest's ``MANIFEST_FIELDS``) or one checksum (other files),
    for the architecture files ``directory`` holds now and the manifest ``info``.

    Args:
        directory: an export (or its temp dir, before the manifest is written).
        info: the manifest.
    """
    directory = Path(directory)
    own = {}
    for key in MANIFEST_FIELDS:
        if key in info:
            value = _fields(info[key], f"{key}.")
            own.update(value if isinstance(value, dict) else {key: value})
    out = {MANIFEST: own}
    for name in ARCHITECTURE_JSON:
        if (directory / name).is_file():
            out[name] = _fields(_json_file(directory / name))
    for name in ARCHITECTURE_FILES:
        if (directory / name).is_file():
            out[name] = f"{CHECKSUM}:{xxhash.xxh3_128((directory / name).read_bytes()).hexdigest()}"
    return out


def _changed(was: dict, now: dict) -> str:
    changed = sorted(f for f in set(was) & set(now) if was[f] != now[f])
    added, removed = sorted(set(now) - set(was)), sorted(set(was) - set(now))
    parts = (
        ([f"field{'s' * (len(changed) > 1)} {', '.join(changed)} changed"] if changed else [])
        + ([f"added {', '.join(added)}"] if added else [])
        + ([f"removed {', '.join(removed)}"] if removed else [])
    )
    return "; ".join(parts)


def check_architecture(directory, info: dict) -> bool:
    """The architecture files against the manifest's ``architecture_checksums``, both ways (a file recorded and
    gone, or there and not recorded, is an error too); raises ``ChecksumError`` naming the file and field.
    Returns False for a manifest written before they were recorded (format_version < 3), True when checked.

    Args:
        directory: an export.
        info: its manifest.
    """
    recorded = info.get("architecture_checksums")
    if recorded is None:
        return False
    if not isinstance(recorded, dict):
        raise ChecksumError(f"{Path(directory) / MANIFEST}: architecture_checksums is not a mapping")
    current = architecture_checksums(directory, info)
    for name in sorted(set(recorded) | set(current)):
        where = Path(directory) / name
        if name not in current:
            raise ChecksumError(f"{where}: missing; manifest.json's architecture_checksums covers it")
        if name not in recorded:
            raise ChecksumError(f"{where}: not covered by manifest.json's architecture_checksums (added since export)")
        was, now = recorded[name], current[name]
        if was == now:
            continue
        what = _changed(was, now) if isinstance(was, dict) and isinstance(now, dict) else "its content changed"
        raise ChecksumError(
            f"{where}: {what} since export (architecture_checksums in manifest.json); a model built "
            f"from it computes other logits: restore it or re-export"
        )
    return True
