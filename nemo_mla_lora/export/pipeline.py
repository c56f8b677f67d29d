"""The export step: read base + adapter group by group, merge, (absorb,) write, verify, rename.

    export(base="runs/x/base", adapter="runs/x/adapter", output="runs/x/export", fmt="mcore")

Formats, named by what loads them (manifest.json's ``loaded_by``): ``mcore`` (default: merged standard
Megatron dist-ckpt, which Megatron's latent-cache engine and ``recipes.generate`` absorb at load),
``absorbed`` (split K/V up projections: megatron-core 0.17-0.18's absorbed module), ``hf`` (merged HF
safetensors with the source's config.json), ``hf_peft`` (the unmerged adapters as HF PEFT files). Output
appears only when everything, verification included, passed.

Memory and reads: the checkpoint is cut into units (``units.py``: the embedding, a layer's attention, its
MLP head, chunks of its experts of at most ``budget`` bytes, the final norm and output layer). A reader
thread reads the next unit (each HF tensor hashed while in memory: the manifest's source hash needs no
second read), this thread merges and verifies the current one (``verify.py``: the unmerged model before
the merge, the export after, both on the tensors in memory), and a writer thread writes the previous one
and reads it back for a bit-for-bit comparison (``stages.py``). Each byte of an HF base is read once.
"""

import json
import logging
import math
import time
from pathlib import Path

from tqdm import tqdm

from nemo_mla_lora.arch import absorb
from nemo_mla_lora.checkpoints.dist_ckpt import check_names
from nemo_mla_lora.checkpoints.output_dir import atomic_dir, check_target
from nemo_mla_lora.checkpoints.safetensors_io import file_hash
from nemo_mla_lora.checkpoints.sources import check_complete, open_adapter, open_base
from nemo_mla_lora.data.tokenizer import copy_tokenizer
from nemo_mla_lora.export import manifest, nemo_format, stages
from nemo_mla_lora.export.integrity import manifest_checksums, read_export, verify_checksums  # noqa: F401 (read here)
from nemo_mla_lora.export.peft_reference import open_reference
from nemo_mla_lora.export.quantize import FP8Quantize, check_weight_dtype
from nemo_mla_lora.export.units import DEFAULT_BUDGET, plan
from nemo_mla_lora.export.verify import StreamingVerify, check_mode
from nemo_mla_lora.export.writers import DistCkptWriter, HFWriter, NemoWriter, check_hf_peft_writable, write_hf_peft
from nemo_mla_lora.peft.merge import MergeError, merge_unit
from nemo_mla_lora.runtime.memory import release_freed_memory
from nemo_mla_lora.runtime.processes import process_age

log = logging.getLogger(__name__)
MERGED_FORMATS = ("absorbed", "mcore", "nemo", "hf")  # merged weights: verified, served by recipes.generate
FORMATS = (*MERGED_FORMATS, "hf_peft")
DEFAULT_NAMES = {"mcore": "te", "nemo": "te"}  # layer-spec names of a dist-ckpt export: TE, as Megatron and NeMo build
LATENT_FORMATS = ("absorbed", "mcore", "nemo")  # verified through the latent-cache forward


class VerificationError(RuntimeError):
    pass


def export(
    base: str | Path,
    adapter: str | Path | None,
    output: str | Path,
    fmt: str = "mcore",
    fold: bool = False,
    overwrite: bool = False,
    verify: str | bool = "full",
    tolerance: float | None = None,
    progress: bool = True,
    names: str | None = None,
    tokenizer: str | None = None,
    verify_layers: list[int] | None = None,
    budget: int = DEFAULT_BUDGET,
    weight_dtype: str | None = None,
) -> dict:
    """Merge ``adapter`` into ``base`` and write ``output`` in format ``fmt``, verified against the unmerged
    model; the output is written beside and renamed in only when everything passed.

    Args:
        base: our base checkpoint, an HF directory (bf16/fp32 or FP8) or a NeMo 2 checkpoint.
        adapter: our adapter checkpoint or an HF PEFT directory; None exports the base alone (a merged base that
            ``recipes.generate`` serves with unmerged adapters).
        output: the export directory; refused before any work if it overlaps a source or is not ours to replace.
        fmt: ``mcore`` | ``nemo`` | ``absorbed`` | ``hf`` | ``hf_peft`` (``format=`` in the configs and CLIs;
            ``fmt`` here because ``format`` is a Python builtin).
        fold: ``absorbed`` only: add the folded per-head products.
        overwrite: replace a previous export of ours (its ``manifest.json``) or an empty directory.
        verify: ``full`` | ``sample`` (the ``verify_layers``) | ``none`` (``verify.py``).
        tolerance: the verify bound (default: by dtype).
        progress: show a progress bar.
        names: ``te`` | ``local`` layer-spec names of the ``mcore``/``nemo`` formats (default ``DEFAULT_NAMES``).
        tokenizer: the ``nemo`` context's tokenizer (default: the base's own files, else the tiny models' byte
            tokenizer).
        verify_layers: ``sample``'s layers (default: first, first MoE, last).
        budget: bytes of experts read, merged and written as one unit.
        weight_dtype: ``hf`` only: ``fp8_block`` writes the linear weights in DeepSeek-V3's FP8 block format
            (``export/quantize.py``); None: as merged.

    Returns:
        The manifest (also written as ``manifest.json``), with the verify report and the timing per phase.
    """
    entered, age = time.perf_counter(), process_age()  # the process's start (imports, config) before export()
    verify, names = _check_request(fmt, verify, weight_dtype, names, adapter, fold)
    sources = (base, adapter, tokenizer if tokenizer and Path(tokenizer).exists() else None)
    # before any reading: a bad output (a source, not ours to overwrite, another writer's) is refused at once
    check_target(output, sources, overwrite, replaces=(manifest.MANIFEST,))
    source = open_base(base)
    spec = source.spec
    check_complete(source, spec, base)  # every tensor the model needs, with its shape, before anything is written
    nemo_info = None
    if fmt == "nemo":
        tokenizer = nemo_format.export_tokenizer(base, tokenizer, spec)
        nemo_info = {"tokenizer": tokenizer, "differs_from_deepseek": _stock_differences(spec, names)}
    lora = _open_lora(adapter, spec, source, fmt)
    if fold:
        _warn_fold_cost(spec)
    with atomic_dir(output, overwrite, sources=sources, replaces=(manifest.MANIFEST,)) as tmp:
        if fmt == "hf_peft":
            info = _export_hf_peft(source, lora, spec, tmp)
        else:
            writer = _writer(fmt, tmp, spec, source, names, tokenizer, verify != "none", weight_dtype)
            verifier = StreamingVerify(
                spec,
                fmt in LATENT_FORMATS,
                verify,
                verify_layers,
                tolerance,
                _dtype_name(source.layout()),
                reading=open_reference(adapter),
            )
            quantize = FP8Quantize(spec, verify, verify_layers, verifier.dtype) if weight_dtype else None
            info = _export_merged(source, lora, spec, fmt, fold, writer, verifier, progress, budget, quantize)
            info["tokenizer_files"] = copy_tokenizer(base, tmp)
            if fmt in DEFAULT_NAMES:
                info["names"] = names
            if nemo_info is not None:
                info["nemo"] = nemo_info
        _finish_manifest(info, tmp, source, base, adapter, entered, age)
    return info


def _check_request(fmt, verify, weight_dtype, names, adapter, fold) -> tuple[str, str]:
    """(verify mode, layer-spec names) of an export request whose arguments agree; raises ValueError otherwise."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}; expected one of {FORMATS}")
    verify = check_mode(verify)
    check_weight_dtype(weight_dtype, fmt)
    names = names or DEFAULT_NAMES.get(fmt, "local")
    check_names(names)
    if names != "local" and fmt not in DEFAULT_NAMES:
        raise ValueError(f"names={names} applies to formats {sorted(DEFAULT_NAMES)}; {fmt} has its own names")
    if adapter is None and fmt == "hf_peft":
        raise ValueError("format=hf_peft writes an adapter; adapter=null gives none")
    if fold and fmt != "absorbed":
        raise ValueError("fold=true applies to format=absorbed only")
    return verify, names


def _stock_differences(spec, names: str) -> list[str]:
    """Where NeMo's stock DeepSeek model (TE spec names) differs from DeepSeek's, each logged as a warning."""
    differs = nemo_format.stock_differences(spec) if names == "te" else []
    for d in differs:
        log.warning(
            "NeMo's DeepSeek model (TE spec) differs from DeepSeek's here: %s; names=local writes "
            "nemo_mla_lora's exact layer spec into the context",
            d,
        )
    return differs


def _open_lora(adapter, spec, source, fmt: str):
    """The adapter, every field and tensor of an HF PEFT adapter judged before anything is written, and every
    module of it present in the base."""
    lora = open_adapter(adapter, spec)
    if fmt == "hf_peft":
        check_hf_peft_writable(lora)
    names = set(source.names)  # once: the comprehension would rebuild it per module (V3's experts: tens of thousands)
    unknown = [m for m in lora.modules if f"{m}.weight" not in names]
    if unknown:
        raise MergeError(f"adapter {adapter} has modules the base lacks: {unknown[:5]} (adapter for another model?)")
    return lora


def _warn_fold_cost(spec) -> None:
    cost = absorb.fold_cost(spec)
    log.warning(
        "folding: %s params/layer (folded) vs %s (split), x%.2f; decode FLOPs likewise; %s",
        cost["folded"]["params_per_layer"],
        cost["split"]["params_per_layer"],
        cost["folded_over_split"],
        cost["folding_pays_when"],
    )


def _finish_manifest(info: dict, tmp: Path, source, base, adapter, entered: float, age: float) -> None:
    """The sources' hashes, the timing outside the stages and the written files' checksums into ``info``, then
    ``info`` as ``manifest.json`` in ``tmp``."""
    start = time.perf_counter()
    info["source"] = {
        "base": {"path": str(base), "hash": source.content_hash()},  # HF: digests taken while reading
        "adapter": {"path": str(adapter), "hash": file_hash(adapter)} if adapter else None,
    }
    if "timing" in info:
        timing = info["timing"]
        timing["source_hash"] = round(time.perf_counter() - start, 2)
        # before_export: process start to export(); outside_stages: export()'s own setup and finish to here
        timing["before_export"] = age
        timing["outside_stages"] = round(time.perf_counter() - entered - timing["wall"], 2)
    info["architecture_checksums"] = manifest.architecture_checksums(tmp, info)  # every file written by now
    (tmp / manifest.MANIFEST).write_text(json.dumps(info, indent=2, sort_keys=True))


def _dtype_name(layout: dict) -> str:
    """The dtype of the export's weights: the embedding's as read (FP8 bases are dequantized)."""
    return str(layout["embedding.word_embeddings.weight"][0]).removeprefix("torch.")


def _writer(fmt, tmp, spec, source, names, tokenizer, check, weight_dtype=None):
    if fmt == "hf":
        return HFWriter(tmp, spec, getattr(source, "config", None), check, fp8=weight_dtype == "fp8_block")
    if fmt == "nemo":
        return NemoWriter(tmp, spec, names, tokenizer, check)
    return DistCkptWriter(tmp, spec, names, check)


def _export_merged(source, lora, spec, fmt, fold, writer, verifier, progress, budget, quantize=None) -> dict:
    """Every unit read, merged (absorbed, quantized), verified and written through ``stages.run``; the manifest
    with the timing per phase and the verify report (raises ``VerificationError`` where it failed)."""
    layout = source.layout()
    units = plan(source.names, {n: d.itemsize * math.prod(shape) for n, (d, shape) in layout.items()}, budget)
    writer.begin(units, layout)
    bar = tqdm(
        total=sum(u.nbytes for u in units), desc=f"export {fmt}", unit="B", unit_scale=True, disable=not progress
    )
    merge_seconds = [0.0]

    def written(unit) -> None:
        release_freed_memory()  # the unit's freed tensors back to the OS before the next one is read
        bar.update(unit.nbytes)

    timing = stages.run(
        units,
        lambda u: source.load(u.names),
        _unit_processor(lora, spec, fmt, fold, verifier, quantize, merge_seconds),
        writer.add,
        on_done=written,
        alone=lambda u: u.nbytes > budget,  # the embedding, the output layer: by themselves
    )
    bar.close()
    writer.finish()
    timing.update(
        merge=round(merge_seconds[0], 2),
        verify=round(verifier.seconds, 2),
        units=len(units),
        largest_unit_bytes=max(u.nbytes for u in units),
    )
    if hasattr(writer, "stream"):  # the dist-ckpt writers: Megatron's save and the read-back, apart
        timing.update({f"write_{k}": round(v, 2) for k, v in writer.stream.seconds.items()})
    return _merged_manifest(fmt, spec, fold, lora, writer, verifier, quantize, timing)


def _unit_processor(lora, spec, fmt, fold, verifier, quantize, merge_seconds: list[float]):
    """``process(unit, tensors) -> tensors to write`` for ``stages.run``: the unmerged reference, the merge in
    place, the absorption (``absorbed``), the FP8 quantization, the export's side of the verify; the merge's
    seconds added into ``merge_seconds[0]``."""

    def process(unit, tensors):
        factors = lora.factors(_modules(unit.names))
        verifier.reference(unit, tensors, factors)
        start = time.perf_counter()
        merge_unit(tensors, factors)  # in place: the base tensors as read are ours alone
        if fmt == "absorbed" and unit.kind == "attention":
            tensors = absorb.absorb_layer(tensors, f"decoder.layers.{unit.group}.self_attention", spec, fold=fold)
        merge_seconds[0] += time.perf_counter() - start
        if quantize is not None:  # written: FP8 in HF names; verified: those weights dequantized
            written, tensors = quantize(unit, tensors)
            verifier.export(unit, tensors)
            return written
        verifier.export(unit, tensors)
        return tensors

    return process


def _merged_manifest(fmt, spec, fold, lora, writer, verifier, quantize, timing: dict) -> dict:
    """The manifest of a merged export with ``timing``, the verify report and the FP8 report; raises
    ``VerificationError`` where the export differs from the unmerged model past the bound."""
    info = manifest.build(
        fmt, spec, verifier.dtype, lora.scales, writer.checksums, absorb.fold_cost(spec) if fold else None
    )
    info["timing"] = timing
    report = verifier.report()
    if quantize is not None:
        report = quantize.widen(report)
        info["fp8"] = quantize.report()
        timing["fp8_quantize"] = round(quantize.seconds, 2)  # with the FP8-vs-merge forward
    info["verify"] = report
    if not report["passed"]:
        raise VerificationError(
            f"export differs from the unmerged model ({report['mode']} verify): "
            + json.dumps({k: v for k, v in report.items() if k != "compared"})
        )
    return info


def _modules(names) -> list[str]:
    """Module names of the ``.weight`` tensors among ``names`` (what an adapter can attach to)."""
    return [n[: -len(".weight")] for n in names if n.endswith(".weight")]


def _export_hf_peft(source, lora, spec, tmp) -> dict:
    factors = lora.factors(lora.modules)
    ranks = {a.shape[0] for a, _, _ in factors.values()}
    if len(ranks) != 1:
        raise MergeError(f"HF PEFT needs one rank for all modules; adapters have ranks {sorted(ranks)}")
    scale = next(iter(lora.scales.values()))
    dim = ranks.pop()
    warnings = write_hf_peft(factors, dim, scale * dim, tmp, base_name=str(getattr(source, "directory", "")))
    for w in warnings:
        log.warning(w)
    from safetensors.torch import load_file

    from nemo_mla_lora.checkpoints.checksums import tensor_checksum

    written = load_file(tmp / "adapter_model.safetensors")
    info = manifest.build("hf_peft", spec, "float32", lora.scales, {k: tensor_checksum(t) for k, t in written.items()})
    info["warnings"] = warnings
    return info
