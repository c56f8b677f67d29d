"""Our checkpoints on disk: Megatron dist-checkpoints (torch_dist) plus a JSON sidecar.

- base checkpoint:    <dir>/ (dist-ckpt of the base model's tensors) + ``mla_spec.json``
- adapter checkpoint: <dir>/ (dist-ckpt of ``*.adapter.lora_a/lora_b`` only) + ``adapter.json``

Checkpoint keys are Megatron's sharded keys (routed experts stacked: ``...mlp.experts.experts.linear_fc1.weight``
[E, out, in]); readers hand out *flat* names (``...mlp.experts.local_experts.3.linear_fc1.weight``), the
module names of a TP=1/EP=1 model. Writes go to a temp dir renamed at the end.
"""

import json
import re
from pathlib import Path

from nemo_mla_lora.arch import keymap
from nemo_mla_lora.arch.mla_spec import MLASpec
from nemo_mla_lora.checkpoints import output_dir
from nemo_mla_lora.checkpoints.errors import CheckpointError
from nemo_mla_lora.checkpoints.output_dir import atomic_dir
from nemo_mla_lora.checkpoints.safetensors_io import file_hash
from nemo_mla_lora.runtime.parallel import rank

SPEC_FILE, ADAPTER_FILE = output_dir.SPEC_FILE, output_dir.ADAPTER_FILE  # the sidecars that mark our checkpoints
_FLAT_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.local_experts\.(\d+)\.(linear_fc[12]\..+)$")


# A chunk of a tensor along its first axis (experts of a stacked tensor, rows of a large one): stored key, first, count
AXIS0_CHUNK = re.compile(r"^(.*)@axis0from(\d+)of(\d+)$")


def _expert_indices(key: str, indices, num_experts: int | None) -> int:
    """The stacked tensor's expert count: ``num_experts``, or (None) the experts given, which must be 0..n-1."""
    if num_experts is None:
        if sorted(indices) != list(range(len(indices))):
            raise CheckpointError(f"{key}: experts {sorted(indices)} are not 0..{len(indices) - 1}")
        return len(indices)
    if max(indices) >= num_experts:
        raise CheckpointError(f"{key}: expert {max(indices)} of a layer with {num_experts} experts")
    return num_experts


def sharded_tensors(
    flat: dict, num_experts: int | None = None, consume: bool = False, max_bytes: int | None = None
) -> dict:
    """Flat TP=1 tensors -> ShardedTensors under Megatron's keys (routed experts stacked on a leading axis of
    a layer's ``num_experts``, None: the experts given, which must be 0..n-1). Each expert e is its own chunk
    [1, out, in] under ``{key}@axis0from{e}of{E}``, which ``dist_stream`` places at its offset of the stacked
    key when it merges the parts' metadata: Megatron's expert layers read one expert per request, and a chunk of
    several experts would be read whole for each of them (a load 5x slower, measured). With ``max_bytes``, a
    larger tensor is cut the same way into row chunks (as tensor parallelism shards a vocabulary), so that each
    can be saved and read back on its own. ``consume``: each expert is popped from ``flat`` (no copy). The
    chunk keys are for ``dist_stream.StreamingDistCkpt``, which places them; a plain ``dist_checkpointing.save``
    would keep them as keys of their own."""
    from megatron.core.dist_checkpointing import ShardedTensor

    stacked, out = {}, {}
    for name, t in flat.items():
        m = _FLAT_EXPERT.match(name)
        if m:
            stacked.setdefault(f"{m.group(1)}.experts.{m.group(3)}", {})[int(m.group(2))] = name
        elif max_bytes and t.dim() >= 1 and t.numel() * t.element_size() > max_bytes:
            rows = max(1, max_bytes // (t[0].numel() * t.element_size()))
            for first in range(0, t.shape[0], rows):
                stored = f"{name}@axis0from{first}of{t.shape[0]}"
                out[stored] = ShardedTensor.from_rank_offsets(
                    stored, t[first : first + rows].contiguous(), replica_id=0
                )
        else:
            out[name] = ShardedTensor.from_rank_offsets(name, t.contiguous(), replica_id=0)
    for key, experts in stacked.items():
        count = _expert_indices(key, experts, num_experts)
        for e in sorted(experts):  # one chunk [1, out, in] per expert: what Megatron's expert layers ask for
            stored = f"{key}@axis0from{e}of{count}"
            t = flat.pop(experts[e]) if consume else flat[experts[e]]
            out[stored] = ShardedTensor.from_rank_offsets(stored, t.contiguous().unsqueeze(0), replica_id=0)
    return out


_NO_EXTRA_STATE = re.compile(r"(layernorm|norm|router|word_embeddings|output_layer)\.[^.]+$|\.adapter\.")


def extra_states(flat: dict, num_experts: int | None = None) -> dict:
    """The ``_extra_state`` entries Megatron's linears ask for at load (``None`` for local layers), for the
    linear modules among ``flat``'s ``.weight`` tensors, under Megatron's keys (experts: one per expert on
    a stacked key, ``num_experts`` as in ``sharded_tensors``). Without them a default-strictness
    ``dist_checkpointing.load`` fails."""
    from megatron.core.dist_checkpointing import ShardedObject

    out, experts = {}, {}
    for name in flat:
        if not name.endswith(".weight") or _NO_EXTRA_STATE.search(name):
            continue
        module = name[: -len(".weight")]
        m = _FLAT_EXPERT.match(name)
        if m:
            experts.setdefault(f"{m.group(1)}.experts.{m.group(3).rsplit('.', 1)[0]}._extra_state", set()).add(
                int(m.group(2))
            )
        else:
            key = f"{module}._extra_state"
            out[key] = ShardedObject(key, None, (1,), (0,), replica_id=0)
    for key, indices in experts.items():
        count = _expert_indices(key, indices, num_experts)
        for e in sorted(indices):
            out[f"{key}.{e}"] = ShardedObject(key, None, (count,), (e,), replica_id=0)
    return out


# Layer-spec names a dist-checkpoint can have.
NAMES = ("te", "local")

# In the TE spec the norms that stay modules (TE's RMSNorm: input, MoE pre-MLP, final) carry ``_extra_state`` (FP8
# metadata; an empty tensor without FP8) too, and Megatron's TE-spec model asks for it at load. (Its
# TEDotProductAttention does not: bench/README.md lists every key that model asks for.)
_TE_NORM = re.compile(r"^(.*\.(input_layernorm|pre_mlp_layernorm|final_layernorm))\.weight$")


def check_names(names: str) -> None:
    if names not in NAMES:
        raise ValueError(f"names={names!r}; expected one of {NAMES}")


def dense_layers(spec: MLASpec) -> set:
    return {i for i in range(spec.num_layers) if not spec.is_moe_layer(i)}


def named_sharded(
    group: dict, spec: MLASpec, names: str, prefix: str = "", consume: bool = False, max_bytes: int | None = None
) -> dict:
    """One group of flat (local-spec) tensors -> the ShardedTensors and ``_extra_state`` ShardedObjects a model of
    the ``names`` layer spec (``te``: Megatron's Transformer Engine spec; ``local``: the TE-free one) asks for at a
    default-strictness load, under ``prefix`` + its keys (NeMo 2 checkpoints: ``module.``). ``consume``,
    ``max_bytes``: see ``sharded_tensors``."""
    from megatron.core.dist_checkpointing import ShardedObject

    dense = dense_layers(spec)
    rename = (lambda k: keymap.to_te_name(k, dense)) if names == "te" else (lambda k: k)
    out = {}
    experts = spec.num_experts or None
    extras = extra_states(group, experts)
    for key, item in {**sharded_tensors(group, experts, consume, max_bytes), **extras}.items():  # key: unique
        item.key = prefix + rename(item.key)
        out[prefix + rename(key)] = item
    if names == "te":
        for name in group:
            norm = _TE_NORM.match(rename(name))
            if norm:
                key = f"{prefix}{norm.group(1)}._extra_state"
                out[key] = ShardedObject(key, None, (1,), (0,), replica_id=0)
    return out


def write_json(path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True))


def load_weights(model, state: dict, source: str, absent_ok: tuple = ()):
    """``model.load_state_dict(state)`` allowing only ``_extra_state`` entries (and keys ending in one of
    ``absent_ok``) to be missing; anything else missing or unexpected raises. Returns ``model``."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("_extra_state", *absent_ok))]
    if missing or unexpected:
        raise CheckpointError(f"{source} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def read_spec(directory) -> MLASpec:
    path = Path(directory) / SPEC_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {SPEC_FILE} (MLA dimensions of the model)")
    return MLASpec.from_dict(json.loads(path.read_text()))


def _model_sharded(model, adapters: bool) -> dict:
    """The model's own sharded state dict (TP/EP/PP aware), adapters only or base only (with the base's
    ``_extra_state`` entries: Megatron's default-strictness load asks for them)."""
    sharded = model.sharded_state_dict()
    return {
        k: v
        for k, v in sharded.items()
        if (".adapter." in k) == adapters and not (adapters and k.endswith("_extra_state"))
    }


def save_base(model, spec: MLASpec, directory, overwrite: bool = False, sources=()) -> Path:
    """Base model tensors (adapters excluded) + ``mla_spec.json``. Every rank calls it. ``overwrite`` replaces
    only a previous base (its ``mla_spec.json``); ``sources``: checkpoints the output must not overlap (the one
    the model was restored from)."""
    from megatron.core import dist_checkpointing

    with atomic_dir(directory, overwrite, sources=sources, replaces=(SPEC_FILE,)) as tmp:
        dist_checkpointing.save(_model_sharded(model, adapters=False), str(tmp))
        if rank() == 0:
            write_json(tmp / SPEC_FILE, spec.to_dict())
    return Path(directory)


def save_adapter(model, peft, spec: MLASpec, directory, base_dir=None, overwrite: bool = False) -> Path:
    """Adapter tensors only (``<module>.adapter.lora_a`` / ``lora_b``, B holding only its part's rows)
    + ``adapter.json`` (rank, alpha, scale, parts, targets, the model's MLA dims, the base's hash).
    Every rank calls it (dist-checkpointing gathers the shards). ``overwrite`` replaces only a previous adapter
    (its ``adapter.json``); the output must not overlap ``base_dir``."""
    from megatron.core import dist_checkpointing

    from nemo_mla_lora.peft.state import adapter_names

    with atomic_dir(directory, overwrite, sources=(base_dir,), replaces=(ADAPTER_FILE,)) as tmp:  # checks first
        sharded = _model_sharded(model, adapters=True)
        if not sharded:
            raise CheckpointError("the model has no MLALoRA adapters to save")
        info = {
            "dim": peft.dim,
            "alpha": peft.alpha,
            "scale": peft.alpha / peft.dim,
            "parts": dict(peft.parts),
            "placement": peft.placement if not peft.target_modules else None,
            "target_modules": list(peft.target_modules),
            "mla_spec": spec.to_dict(),
            "modules": adapter_names(model),  # every stage's and expert rank's, one-process names
            "base_checkpoint": str(base_dir) if base_dir else None,
            "base_hash": None,  # rank 0's, below: a hash reads the whole base, which the other ranks need not
            "producer": output_dir.PRODUCER,
        }
        dist_checkpointing.save(sharded, str(tmp))
        if rank() == 0:
            info["base_hash"] = file_hash(base_dir) if base_dir else None
            write_json(tmp / ADAPTER_FILE, info)
    return Path(directory)
