"""Writers of the export formats. Each gets the plan's units (``units.py``) in order, ``add(unit, tensors)``,
and writes into a directory it does not own (the pipeline renames it when everything passed). With
``check``, every unit is read back from what was just written (the page cache) and checked: ``hf`` by the
xxh3-128 digest of the stored bytes against the manifest checksum of the tensor, the dist-ckpt formats through
Megatron's own loader, bit for bit.

| format | what | streams? |
|---|---|---|
| absorbed | Megatron dist-ckpt, merged, ``linear_k_up_proj``/``linear_v_up_proj`` split | yes: a save per unit |
| mcore | Megatron dist-ckpt, merged, standard layout (local or TE-spec names) | yes: a save per unit |
| nemo | NeMo 2 checkpoint: the mcore layout under weights/ (``module.`` keys) + context/ | yes |
| hf | HF DeepSeek-V3 safetensors, a shard per group (layout known up front) + index + config.json | tensor by tensor |
"""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from nemo_mla_lora.arch import keymap
from nemo_mla_lora.arch.hf_config import hf_config_dict
from nemo_mla_lora.checkpoints import fp8
from nemo_mla_lora.checkpoints.checksums import tensor_checksum
from nemo_mla_lora.checkpoints.dist_ckpt import named_sharded, write_json
from nemo_mla_lora.checkpoints.dist_stream import StreamingDistCkpt
from nemo_mla_lora.checkpoints.errors import CheckpointError
from nemo_mla_lora.export import nemo_format
from nemo_mla_lora.peft.merge import MergeError

# Tensors per Megatron save of the dist-ckpt writers (one unit of units.py: each save costs a fork and a
# DCP plan), and the largest tensor saved whole: a larger one (an embedding) goes in row chunks, so that
# reading a part back holds one chunk (PyTorch DCP's loader keeps a serialized and a loaded copy of each
# item besides the target).
PART_BYTES, ROW_CHUNK_BYTES = 128 << 20, 64 << 20


class DistCkptWriter:
    """``names``: the layer spec whose names (and ``_extra_state`` entries) the checkpoint has: ``local`` (the
    TE-free spec) or ``te`` (Megatron's Transformer Engine spec)."""

    def __init__(self, directory: Path, spec, names: str = "local", check: bool = True):
        self.directory, self.spec, self.names, self.checksums, self.dtype = Path(directory), spec, names, {}, None
        self.check = check
        self.stream = StreamingDistCkpt(self.weights_dir())
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checksums")

    def begin(self, units, layout: dict) -> None:
        pass

    def weights_dir(self) -> Path:
        return self.directory

    def sharded(self, group: dict) -> dict:
        return named_sharded(group, self.spec, self.names, consume=True, max_bytes=ROW_CHUNK_BYTES)  # ours now

    def add(self, unit, group: dict) -> None:
        self.dtype = self.dtype or next(iter(group.values())).dtype
        tensors = list(group.items())  # under the flat local names, whatever the stored names
        # hashed beside the save (xxhash releases the GIL): a pass over every byte off the writer's path
        hashed = self._hasher.submit(lambda: {name: tensor_checksum(t) for name, t in tensors})
        with self.stream.timed("sharded"):
            sharded = self.sharded(group)
        self.stream.add(sharded, check=self.check, max_bytes=PART_BYTES)
        with self.stream.timed("hash_wait"):  # the checksums behind the save
            self.checksums.update(hashed.result())

    def finish(self) -> None:
        self._hasher.shutdown()
        self.stream.finish()
        write_json(self.directory / "mla_spec.json", self.spec.to_dict())


class NemoWriter(DistCkptWriter):
    """A NeMo 2 checkpoint (``nemo_format.py``): weights/ under NeMo's ``module.`` keys, then context/."""

    def __init__(self, directory: Path, spec, names: str, tokenizer: str, check: bool = True):
        self.tokenizer = tokenizer
        super().__init__(directory, spec, names, check)

    def weights_dir(self) -> Path:
        return self.directory / nemo_format.WEIGHTS

    def sharded(self, group: dict) -> dict:
        return named_sharded(
            group, self.spec, self.names, prefix=nemo_format.PREFIX, consume=True, max_bytes=ROW_CHUNK_BYTES
        )

    def finish(self) -> None:
        super().finish()
        nemo_format.write_context(self.directory, self.spec, self.dtype, self.names, self.tokenizer)


class HFWriter:
    """One safetensors shard per group (embedding, each decoder layer, final), its header written first
    from the layout (``begin``) and its tensors as their units come. ``source_config``: the HF base's own
    config.json (kept, with the written dtype), None for our bases. ``fp8``: the linear weights in DeepSeek's
    FP8 block format (``checkpoints/fp8.py``); ``add`` then gets each unit already in HF names, quantized."""

    def __init__(self, directory: Path, spec, source_config: dict | None = None, check: bool = True, fp8=False):
        self.directory, self.spec, self.source_config, self.check = Path(directory), spec, source_config, check
        self.fp8 = fp8
        self.weight_map, self.checksums, self.dtype, self.shards, self.open = {}, {}, None, {}, {}

    def begin(self, units, layout: dict) -> None:
        """``layout``: flat name -> (dtype, shape) of the tensors to be written."""
        order = list(dict.fromkeys(u.group for u in units))
        by_group = {}
        for u in units:
            meta = {n: torch.empty(layout[n][1], dtype=layout[n][0], device="meta") for n in u.names}
            by_group.setdefault(u.group, {}).update(keymap.megatron_to_hf(meta))
        for i, group in enumerate(order):
            shard_layout = {h: (t.dtype, tuple(t.shape)) for h, t in by_group[group].items()}
            self.shards[group] = (
                f"model-{i + 1:05d}-of-{len(order):05d}.safetensors",
                fp8.quantized_layout(shard_layout) if self.fp8 else shard_layout,
            )

    def add(self, unit, group: dict) -> None:
        from nemo_mla_lora.checkpoints.safetensors_io import SafetensorsWriter

        shard, shard_layout = self.shards[unit.group]
        if unit.group not in self.open:
            self.open[unit.group] = SafetensorsWriter(self.directory / shard, shard_layout, {"format": "pt"})
        out = self.open[unit.group]
        for name, t in (group if self.fp8 else keymap.megatron_to_hf(group)).items():
            out.write(name, t)
            self.checksums[name] = tensor_checksum(t)
            if self.check and out.checksum(name) != self.checksums[name]:
                raise CheckpointError(f"{out.path}: {name} reads back different from what was written")
            if not name.endswith(fp8.SCALE_SUFFIX) and t.dtype != torch.float8_e4m3fn:
                self.dtype = self.dtype or str(t.dtype).removeprefix("torch.")
            self.weight_map[name] = shard
        if unit.closes_group:
            self.open.pop(unit.group).close()

    def finish(self) -> None:
        total = sum((self.directory / f).stat().st_size for f in set(self.weight_map.values()))
        write_json(
            self.directory / "model.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.weight_map.items()))},
        )
        config = hf_config_dict(self.spec, self.dtype, self.source_config)
        if self.fp8:
            config["quantization_config"] = dict(fp8.QUANTIZATION_CONFIG)
        write_json(self.directory / "config.json", config)


def check_hf_peft_writable(lora) -> None:
    """Refuses, naming the adapter's field, what ``write_hf_peft`` cannot write (plain LoRA factors on linears with
    one r and one lora_alpha): DoRA, embedding LoRA, replaced modules (``lora.unwritable``, HF PEFT sources), and
    ranks or scales that differ between modules (``rank_pattern`` / ``alpha_pattern``). Call it before any output
    exists.

    Args:
        lora: an adapter source (``sources.open_adapter``).
    """
    problems = [
        f"{field} ({', '.join(modules[:3])}{' ...' if len(modules) > 3 else ''})"
        for field, modules in getattr(lora, "unwritable", {}).items()
    ]
    ranks, scales = set(getattr(lora, "hf_ranks", {}).values()), set(getattr(lora, "hf_scales", {}).values())
    if len(ranks) > 1 or len(scales) > 1:
        problems.append(
            f"rank_pattern / alpha_pattern (ranks {sorted(ranks)}, scales {sorted(scales)} differ "
            f"between modules; hf_peft writes one r and one lora_alpha)"
        )
    if problems:
        raise MergeError(
            "format=hf_peft cannot write " + "; ".join(problems) + "; export a merged format "
            "(hf, mcore, absorbed, nemo) instead"
        )


def write_hf_peft(adapter_factors: dict, dim: int, alpha: float, directory: Path, base_name: str | None = None) -> list:
    """The unmerged adapters as HF PEFT files (HF module names). ``linear_fc1`` (shared A) becomes
    gate_proj and up_proj with the same A and B's two halves. Returns warnings. Refuses (naming the module)
    what plain LoRA on linears cannot hold: an ``AdapterEntry`` (DoRA, replaced tensors), the embedding.

    Args:
        adapter_factors: Megatron module -> (A [r, in], B [out, r], scale).
        dim: the LoRA rank (``peft.dim``), written as HF PEFT's ``r``.
        alpha: the lora_alpha written (scale * dim).
        directory: where the two files go.
        base_name: the base's path or id, as base_model_name_or_path.
    """
    from safetensors.torch import save_file

    tensors, targets = {}, set()
    if "embedding.word_embeddings" in adapter_factors:
        raise MergeError(
            "format=hf_peft cannot write LoRA on the embedding (peft's lora_embedding_A/B); export a "
            "merged format instead"
        )
    for module, (a, b, _) in adapter_factors.items():  # an AdapterEntry refuses here, naming its fields
        hf_names = keymap.to_hf_modules(module)
        for hf_name, b_part in zip(hf_names, b.chunk(len(hf_names), dim=0)):
            tensors[f"base_model.model.{hf_name}.lora_A.weight"] = a.clone()  # gate and up get their own copy
            tensors[f"base_model.model.{hf_name}.lora_B.weight"] = b_part.contiguous()
            targets.add(hf_name.rsplit(".", 1)[-1])
    save_file(tensors, str(Path(directory) / "adapter_model.safetensors"), metadata={"format": "pt"})
    write_json(
        Path(directory) / "adapter_config.json",
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": dim,
            "lora_alpha": alpha,
            "lora_dropout": 0.0,
            "target_modules": sorted(targets),
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "base_model_name_or_path": base_name,
            "inference_mode": True,
        },
    )
    warnings = []
    if "kv_b_proj" in targets:
        warnings.append(
            "kv_b_proj is targeted: some serving engines (vLLM's absorbed MLA path: vLLM issue 48974) "
            "silently drop LoRA on kv_b_proj; prefer the merged 'absorbed' or 'hf' export there."
        )
    return warnings
