"""``adapter_config.json`` of an HF PEFT LoRA adapter read with peft's semantics (0.21: ``LoraConfig``'s fields and
defaults, ``check_target_module_exists``, ``get_pattern_key``): every field honoured, harmless (and why) or refused
with its name. Used by ``hf_peft.HFPeftAdapter``.
"""

import copy
import json
import re
from pathlib import Path

from nemo_mla_lora.checkpoints.errors import CheckpointError

# Fields that do not change the merged weights, and why.
HARMLESS = {
    "task_type": "the model class (checked: CAUSAL_LM)",
    "auto_mapping": "the class AutoPeftModel picks",
    "peft_version": "metadata",
    "base_model_name_or_path": "metadata",
    "revision": "metadata",
    "inference_mode": "training switch",
    "lora_dropout": "training only",
    "megatron_core": "used with megatron_config",
    "loftq_config": "used with init_lora_weights=loftq",
    "eva_config": "initialisation only",
    "corda_config": "initialisation only",
    "lora_ga_config": "initialisation only",
    "qalora_group_size": "used with use_qalora",
    "ensure_weight_tying": "tied embeddings (an adapter on them is refused)",
    "runtime_config": "runtime only",
}
HONOURED = {
    "peft_type",
    "r",
    "lora_alpha",
    "use_rslora",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "use_dora",
    "modules_to_save",
    "init_lora_weights",
    "fan_in_fan_out",
    "bias",
    "lora_bias",
}
# Fields whose any value but off changes what the adapter computes in ways this export does not reproduce.
REFUSED_IF_SET = (
    "megatron_config",
    "trainable_token_indices",
    "velora_config",
    "alora_invocation_tokens",
    "use_qalora",
    "monteclora_config",
    "layer_replication",
    "target_parameters",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
)
# init_lora_weights values that leave the base as it is (others rewrite it: PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA)
# or make another layer (MiCA); of these, B starts at zero for all but False and orthogonal.
PLAIN_INITS, ZERO_B_INITS = (True, False, "gaussian", "orthogonal", "eva"), (True, "gaussian", "eva")


class AdapterRefused(CheckpointError):
    pass


def _off(value) -> bool:
    return value is None or value is False or value == [] or value == {}


def read_config(path: Path) -> dict:
    """``adapter_config.json`` with peft's defaults, every field judged (module docstring); refusals name the field.

    Args:
        path: the adapter's ``adapter_config.json``.
    """
    raw = json.loads(path.read_text())
    _check_fields(raw, path)
    config = copy.deepcopy(PEFT_DEFAULTS)  # its {} patterns are this config's own
    config.update({k: v for k, v in raw.items() if k in config and v is not None})
    _check_values(config, raw, path)
    return config


PEFT_DEFAULTS = {  # peft's LoraConfig defaults of the fields this reader honours
    "r": 8,
    "lora_alpha": 8,
    "use_rslora": False,
    "target_modules": None,
    "exclude_modules": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "use_dora": False,
    "modules_to_save": None,
    "init_lora_weights": True,
    "fan_in_fan_out": False,
    "bias": "none",
    "lora_bias": False,
}
REFUSED_VALUES = {  # field -> why a value other than the plain one is refused
    "fan_in_fan_out": "DeepSeek's linears store W as [out, in]",
    "bias": "DeepSeek's linears have no bias to train",
    "target_modules": "peft would guess targets",
    "init_lora_weights": "this initialisation rewrites the base weights or makes another layer type",
}


def _check_fields(raw: dict, path: Path) -> None:
    """The adapter's kind and task, the fields refused when set, and no set field this reader does not know."""
    if raw.get("peft_type") != "LORA":
        raise AdapterRefused(f"{path}: peft_type={raw.get('peft_type')!r}; only LORA adapters are read")
    if raw.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterRefused(f"{path}: task_type={raw['task_type']!r}; the base is a causal LM (CAUSAL_LM)")
    for name in REFUSED_IF_SET:
        if not _off(raw.get(name)):
            raise AdapterRefused(
                f"{path}: {name}={raw[name]!r} is not supported by this export (peft's merge of it "
                f"is not reproduced); refused rather than dropped"
            )
    unknown = {k: v for k, v in raw.items() if k not in HONOURED | set(HARMLESS) | set(REFUSED_IF_SET)}
    set_unknown = sorted(k for k, v in unknown.items() if not _off(v))
    if set_unknown:
        raise AdapterRefused(
            f"{path}: fields unknown to this reader are set: " + ", ".join(f"{k}={unknown[k]!r}" for k in set_unknown)
        )


def _check_values(config: dict, raw: dict, path: Path) -> None:
    """The honoured fields' values this export reproduces (``REFUSED_VALUES``), and a positive rank and alpha."""
    checks = {
        "fan_in_fan_out": config["fan_in_fan_out"] is False,
        "bias": config["bias"] == "none",
        "init_lora_weights": any(
            config["init_lora_weights"] == v and type(config["init_lora_weights"]) is type(v) for v in PLAIN_INITS
        ),
        "target_modules": config["target_modules"] is not None,
    }
    for name, ok in checks.items():
        if not ok:
            raise AdapterRefused(f"{path}: {name}={raw.get(name)!r} is refused ({REFUSED_VALUES[name]})")
    for name in ("r", "lora_alpha"):
        if not isinstance(config[name], (int, float)) or config[name] <= 0:
            raise AdapterRefused(f"{path}: {name}={config[name]!r}; expected a positive number")


def pattern_value(patterns: dict, key: str, default):
    """peft's ``get_pattern_key`` + ``.get``: the first pattern key matching the end of ``key`` after a dot.

    Args:
        patterns: ``rank_pattern`` or ``alpha_pattern``; key: the HF module name; default: ``r`` or ``lora_alpha``.
    """
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return patterns[pattern]
    return patterns.get(key, default)


def targeted(config: dict, key: str) -> bool:
    """peft's ``check_target_module_exists`` for the module named ``key``.

    Args:
        config: ``read_config``'s result; key: the HF module name, e.g. ``model.layers.0.self_attn.o_proj``.
    """
    exclude = config["exclude_modules"]
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config["modules_to_save"] or []):
        return False
    targets = config["target_modules"]
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    layers = config["layers_to_transform"]
    if not found or layers is None or (isinstance(layers, list) and not layers):
        return found
    patterns = config["layers_pattern"]
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
    if not match:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers
