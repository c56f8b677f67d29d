"""What a checkpoint directory is (HF, ours, NeMo 2) and the architecture (``MLASpec``) it holds, read from its
own files as data: ``config.json``, ``mla_spec.json``, or a NeMo 2 checkpoint's ``context/model.yaml``.

A NeMo 2 checkpoint is ``weights/`` (a Megatron dist-checkpoint whose keys carry the ``module.`` prefix of NeMo's
``MegatronParallel`` wrapper) + ``context/`` (NeMo's ``io_dump`` of the model and tokenizer).
"""

import dataclasses
import json
from pathlib import Path

from nemo_mla_lora.arch.hf_config import spec_from_hf
from nemo_mla_lora.arch.mla_spec import MLASpec
from nemo_mla_lora.checkpoints.dist_ckpt import SPEC_FILE, read_spec
from nemo_mla_lora.checkpoints.errors import CheckpointError

WEIGHTS, CONTEXT, PREFIX = "weights", "context", "module."  # a NeMo 2 checkpoint's layout and key prefix


def is_nemo_checkpoint(path) -> bool:
    """Whether ``path`` holds a NeMo 2 checkpoint (``context/`` + a dist-checkpoint in ``weights/``)."""
    path = Path(path)
    return (path / CONTEXT).is_dir() and (path / WEIGHTS / ".metadata").is_file()


def checkpoint_kind(path) -> str:
    """'hf' | 'ours' | 'nemo' for a checkpoint directory; raises for anything else."""
    path = Path(path)
    if (path / "config.json").is_file():
        return "hf"
    if (path / CONTEXT).is_dir() and (path / WEIGHTS).is_dir():  # ours in format=nemo too
        return "nemo"
    if (path / SPEC_FILE).is_file():
        return "ours"
    if not path.exists():
        raise CheckpointError(f"model.checkpoint={path}: no such directory")
    raise CheckpointError(
        f"model.checkpoint={path}: not an HF checkpoint (config.json), one of ours "
        f"({SPEC_FILE}) or a NeMo 2 checkpoint (context/ + weights/)"
    )


def checkpoint_config(path) -> dict | None:
    """The HF ``config.json`` dict of an HF checkpoint (None for the others)."""
    path = Path(path)
    return json.loads((path / "config.json").read_text()) if checkpoint_kind(path) == "hf" else None


def checkpoint_spec(path) -> MLASpec:
    kind = checkpoint_kind(path)
    if kind == "hf":
        return spec_from_hf(checkpoint_config(path), f"{path}/config.json")
    if kind == "ours" or (Path(path) / SPEC_FILE).is_file():  # a nemo export of ours: its exact spec beside
        return read_spec(path)
    return MLASpec.from_megatron(nemo_context_config(path))


NEMO_CONFIG_CLASSES = ("DeepSeekV3Config", "DeepSeekV2Config", "DeepSeekV2LiteConfig")


def nemo_context_config(path):
    """The model config of a NeMo 2 checkpoint, read from ``context/model.yaml`` as data: only plain values,
    into one of NeMo's DeepSeek config classes. NeMo's own ``io.load_context`` would instantiate every
    ``_target_`` the file names (any importable callable: code a checkpoint author chooses)."""
    import yaml
    from nemo.collections import llm

    file = Path(path) / CONTEXT / "model.yaml"
    if not file.is_file():
        raise CheckpointError(f"{path}: a NeMo 2 checkpoint without context/model.yaml")
    config = (yaml.safe_load(file.read_text()) or {}).get("config") or {}
    target = str(config.get("_target_", "")).rsplit(".", 1)[-1]
    if target not in NEMO_CONFIG_CLASSES:
        raise CheckpointError(
            f"{file}: model config {config.get('_target_')!r} is not one of NeMo's DeepSeek "
            f"configs {NEMO_CONFIG_CLASSES}"
        )
    cls = getattr(llm, target)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    plain = {
        k: v
        for k, v in config.items()
        if k in fields and not isinstance(v, dict) and not (isinstance(v, list) and any(isinstance(x, dict) for x in v))
    }
    return cls(**plain)
