"""The export step: read base + adapter group by group, merge, (absorb,) write, verify, rename.

    export(base="runs/x/base", adapter="runs/x/adapter", output="runs/x/export", fmt="mcore")

Formats, named by what loads them (manifest.json's ``loaded_by``): ``mcore`` (default: merged standard
Megatron dist-ckpt, which Megatron's latent-cache engine and ``recipes.generate`` absorb at load),
``absorbed`` (split K/V up projections: megatron-core 0.17-0.18's absorbed module), ``hf`` (merged HF
safetensors with the source's config.json), ``hf_peft`` (the unmerged adapters as HF PEFT files). Output
appears only when everything, verification included, passed.

Memory: tensors are read one group (embedding, one decoder layer, final) at a time; every writer writes a
group as it comes (``hf`` a shard, the dist-ckpt formats one Megatron save: ``dist_stream.py``) and
``verify`` runs layer by layer, with a latent cache (c_kv + k_rope only) for ``mcore`` and ``absorbed``.
"""

import json
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from nemo_mla_lora.checkpoint import CheckpointError, atomic_dir, check_names, check_output, file_hash
from nemo_mla_lora.data.tokenizer import copy_tokenizer
from nemo_mla_lora.export import absorb, manifest, nemo_format
from nemo_mla_lora.export.merge import MergeError, merge_state
from nemo_mla_lora.export.sources import check_complete, groups, open_adapter, open_base
from nemo_mla_lora.export.verify import compare_streaming
from nemo_mla_lora.export.writers import DistCkptWriter, HFWriter, NemoWriter, write_hf_peft

log = logging.getLogger(__name__)
MERGED_FORMATS = ("absorbed", "mcore", "nemo", "hf")  # merged weights: verified, served by recipes.generate
FORMATS = (*MERGED_FORMATS, "hf_peft")
DEFAULT_NAMES = {"mcore": "te", "nemo": "te"}  # layer-spec names of a dist-ckpt export: TE, as Megatron and NeMo build


class VerificationError(RuntimeError):
    pass


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def export(base, adapter, output, fmt: str = "mcore", fold: bool = False, overwrite: bool = False,
           verify: bool = True, tolerance: float | None = None, progress: bool = True, names: str | None = None,
           tokenizer: str | None = None) -> dict:
    """Run the export; returns the manifest (also written as ``manifest.json``). ``adapter=None`` exports
    the base alone (e.g. an absorbed base for multi-adapter serving). ``names``: ``te`` | ``local`` layer-spec
    names of the ``mcore``/``nemo`` formats (default ``DEFAULT_NAMES``); ``tokenizer``: the ``nemo`` context's
    (default: the base's own files, else the byte tokenizer of the tiny models)."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}; expected one of {FORMATS}")
    names = names or DEFAULT_NAMES.get(fmt, "local")
    check_names(names)
    if names != "local" and fmt not in DEFAULT_NAMES:
        raise ValueError(f"names={names} applies to formats {sorted(DEFAULT_NAMES)}; {fmt} has its own names")
    if adapter is None and fmt == "hf_peft":
        raise ValueError("format=hf_peft writes an adapter; adapter=null gives none")
    if fold and fmt != "absorbed":
        raise ValueError("fold=true applies to format=absorbed only")
    check_output(output, (base, adapter))  # before any reading: a bad output is refused at once
    source = open_base(base)
    spec = source.spec
    check_complete(source, spec, base)  # every tensor the model needs, with its shape, before anything is written
    if fmt == "nemo":
        tokenizer = nemo_format.export_tokenizer(base, tokenizer, spec)
        differs = nemo_format.stock_differences(spec) if names == "te" else []
        for d in differs:
            log.warning("NeMo's DeepSeek model (TE spec) differs from DeepSeek's here: %s; names=local writes "
                        "nemo_mla_lora's exact layer spec into the context", d)
    lora = open_adapter(adapter, spec)
    unknown = [m for m in lora.modules if f"{m}.weight" not in set(source.names)]
    if unknown:
        raise MergeError(f"adapter {adapter} has modules the base lacks: {unknown[:5]} (adapter for another model?)")
    if fold:
        cost = absorb.fold_cost(spec)
        log.warning("folding: %s params/layer (folded) vs %s (split), x%.2f; decode FLOPs likewise; %s",
                    cost["folded"]["params_per_layer"], cost["split"]["params_per_layer"],
                    cost["folded_over_split"], cost["folding_pays_when"])
    with atomic_dir(output, overwrite, sources=(base, adapter)) as tmp:
        if fmt == "hf_peft":
            info = _export_hf_peft(source, lora, spec, tmp)
        else:
            writer = _writer(fmt, tmp, spec, source, names, tokenizer)
            info = _export_merged(source, lora, spec, fmt, fold, writer, tmp, verify, tolerance, progress)
            info["tokenizer_files"] = copy_tokenizer(base, tmp)
            if fmt in DEFAULT_NAMES:
                info["names"] = names
            if fmt == "nemo":
                info["nemo"] = {"tokenizer": tokenizer, "differs_from_deepseek": differs}
        info["source"] = {"base": {"path": str(base), "hash": file_hash(base)},  # hashes the input files
                          "adapter": {"path": str(adapter), "hash": file_hash(adapter)} if adapter else None}
        (tmp / "manifest.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    return info


def _writer(fmt, tmp, spec, source, names, tokenizer):
    if fmt == "hf":
        return HFWriter(tmp, spec, spec.num_layers + 2, getattr(source, "config", None))
    if fmt == "nemo":
        return NemoWriter(tmp, spec, names, tokenizer)
    return DistCkptWriter(tmp, spec, names)


def _export_merged(source, lora, spec, fmt, fold, writer, tmp, verify, tolerance, progress) -> dict:
    grouped = groups(source.names)
    order = ["pre"] + list(range(spec.num_layers)) + ["post"]
    dtype = None
    for key in tqdm(order, desc=f"export {fmt}", unit="group", disable=not progress):
        names = grouped.get(key, [])
        tensors = source.load(names)
        factors = lora.factors(_modules(names))
        merged = merge_state(tensors, factors)
        if fmt == "absorbed" and isinstance(key, int):
            merged = absorb.absorb_layer(merged, f"decoder.layers.{key}.self_attention", spec, fold=fold)
        dtype = dtype or _dtype_name(next(iter(tensors.values())))
        writer.add(merged)
        del tensors, merged, factors
    writer.finish()
    info = manifest.build(fmt, spec, dtype, lora.scales, writer.checksums,
                          absorb.fold_cost(spec) if fold else None)
    if verify:  # read the written export back, group by group, against base + adapter re-read from disk
        export_reader = _group_reader(tmp, fmt, writer.checksums)  # the files as written, checksummed
        report = compare_streaming(
            export_reader, lambda g: source.load(grouped.get(g, [])),
            lambda layer: lora.factors(_modules(grouped.get(layer, []))),
            spec, absorbed=fmt in ("absorbed", "mcore", "nemo"), tolerance=tolerance, dtype=dtype)
        info["verify"] = report
        if not report["passed"]:
            raise VerificationError(f"export differs from the unmerged model: max |logit diff| "
                                    f"{report['max_abs_logit_diff']:.3g} > tolerance {report['tolerance']:.3g} x max |logit| "
                                    f"{report['max_abs_logit']:.3g}")
    return info


def _modules(names) -> list[str]:
    """Module names of the ``.weight`` tensors among ``names`` (what an adapter can attach to)."""
    return [n[: -len(".weight")] for n in names if n.endswith(".weight")]


def _open_export(directory, fmt: str, checksums: dict | None = None):
    """(reader, its flat tensor names) for a written ``absorbed``/``mcore``/``hf`` export; every tensor read is
    checked against ``checksums`` when given."""
    from nemo_mla_lora.checkpoint import CheckpointReader
    from nemo_mla_lora.export.sources import HFBase

    if fmt == "hf":
        reader = HFBase(directory, dtype=torch.float32, checksums=checksums)
        return reader, reader.names
    if fmt == "nemo":
        reader = CheckpointReader(Path(directory) / nemo_format.WEIGHTS, checksums, prefix=nemo_format.PREFIX)
        return reader, reader.names()
    reader = CheckpointReader(directory, checksums)
    return reader, reader.names()


def manifest_checksums(directory) -> dict:
    """The per-tensor checksums of an export's ``manifest.json`` (refused if it has none)."""
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no manifest.json; pass verify_checksums=false to read it unchecked")
    checksums = json.loads(path.read_text()).get("tensor_checksums")
    if not checksums:
        raise CheckpointError(f"{path}: no tensor_checksums")
    return checksums


def _group_reader(directory, fmt: str, checksums: dict | None = None):
    """group -> that group's tensors of a written export (flat Megatron names)."""
    reader, names = _open_export(directory, fmt, checksums)
    grouped = groups(names)
    return lambda g: reader.load(grouped.get(g, []))


def read_export(directory, fmt: str, verify_checksums: bool = True) -> dict:
    """All tensors of a written ``absorbed``/``mcore``/``hf`` export, under flat Megatron names, each checked
    against the manifest's checksum while it is read (unless ``verify_checksums=False``)."""
    reader, names = _open_export(directory, fmt, manifest_checksums(directory) if verify_checksums else None)
    return reader.load(names)


def verify_checksums(directory, progress: bool = True) -> dict:
    """Every tensor of an export against its manifest, group by group (memory: one group); raises on the first
    mismatch, naming the tensor and file. Returns {format, tensors checked}."""
    fmt = json.loads((Path(directory) / "manifest.json").read_text())["format"]
    checksums = manifest_checksums(directory)
    if fmt == "hf_peft":
        from safetensors.torch import load_file

        from nemo_mla_lora.checkpoint import check_checksums

        check_checksums(load_file(Path(directory) / "adapter_model.safetensors"), checksums, directory)
        return {"format": fmt, "tensors": len(checksums)}
    reader, names = _open_export(directory, fmt, checksums)
    grouped = groups(names)
    for key in tqdm(list(grouped), desc="checksums", unit="group", disable=not progress):
        reader.load(grouped[key])
    read = set(reader.hf_names) if fmt == "hf" else set(names)
    missing = sorted(set(checksums) - read)
    if missing:
        raise CheckpointError(f"{directory}: tensors in manifest.json but not in the files: {missing[:5]}")
    return {"format": fmt, "tensors": len(read)}


def _export_hf_peft(source, lora, spec, tmp) -> dict:
    factors = lora.factors(lora.modules)
    ranks = {a.shape[0] for a, _, _ in factors.values()}
    if len(ranks) != 1:
        raise MergeError(f"HF PEFT needs one rank for all modules; adapters have ranks {sorted(ranks)}")
    scale = next(iter(lora.scales.values()))
    r = ranks.pop()
    warnings = write_hf_peft(factors, r, scale * r, tmp, base_name=str(getattr(source, "directory", "")))
    for w in warnings:
        log.warning(w)
    from safetensors.torch import load_file

    from nemo_mla_lora.checkpoint import tensor_checksum

    written = load_file(tmp / "adapter_model.safetensors")
    info = manifest.build("hf_peft", spec, "float32", lora.scales, {k: tensor_checksum(t) for k, t in written.items()})
    info["warnings"] = warnings
    return info
