"""An export against its ``manifest.json``, both ways: every tensor the manifest lists is in the files and every
tensor the files hold is in the manifest, each with its checksum; and the architecture files against their
recorded checksums (``manifest.check_architecture``).

    read_export(DIR, fmt)      every tensor of a merged export, checked while it is read (``recipes.generate``)
    verify_checksums(DIR)      the whole export, group by group (``python -m nemo_mla_lora.recipes.verify_export``)
"""

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from nemo_mla_lora.checkpoints.checksums import check_checksums
from nemo_mla_lora.checkpoints.errors import CheckpointError, ChecksumError
from nemo_mla_lora.checkpoints.sources import groups
from nemo_mla_lora.export import manifest, nemo_format

log = logging.getLogger(__name__)
PEFT_WEIGHTS = "adapter_model.safetensors"


def manifest_checksums(directory) -> dict:
    """The per-tensor checksums of an export's ``manifest.json`` (refused if it has none), after its architecture
    files are checked against theirs.

    Args:
        directory: an export.
    """
    info = manifest.read_manifest(directory, hint="pass verify_checksums=false to read it unchecked")
    checksums = info.get("tensor_checksums")
    if not checksums or not isinstance(checksums, dict):
        raise CheckpointError(f"{Path(directory) / manifest.MANIFEST}: no tensor_checksums")
    if not manifest.check_architecture(directory, info):
        log.warning(
            "%s: manifest format_version %s records no architecture checksums; its mla_spec.json / "
            "config.json are not checked (re-export to cover them)",
            directory,
            info.get("format_version"),
        )
    return checksums


def _open_export(directory, fmt: str, checksums: dict | None = None):
    """(reader, its flat tensor names) for a written ``absorbed``/``mcore``/``nemo``/``hf`` export; every tensor
    read is checked against ``checksums`` when given."""
    from nemo_mla_lora.checkpoints.dist_reader import CheckpointReader
    from nemo_mla_lora.checkpoints.sources import HFBase

    if fmt == "hf":
        reader = HFBase(directory, dtype=torch.float32, checksums=checksums)
        return reader, reader.names
    if fmt == "nemo":
        reader = CheckpointReader(Path(directory) / nemo_format.WEIGHTS, checksums, prefix=nemo_format.PREFIX)
        return reader, reader.names()
    reader = CheckpointReader(directory, checksums)
    return reader, reader.names()


def compare_names(where, stored, checksums: dict) -> None:
    """The tensors the files hold against those the manifest lists, both ways (``ChecksumError`` naming them).

    Args:
        where: the export or file (for the error).
        stored: the names the files hold, as the manifest names them.
        checksums: the manifest's ``tensor_checksums``.
    """
    missing, extra = sorted(set(checksums) - set(stored)), sorted(set(stored) - set(checksums))
    problems = ([f"{len(missing)} tensors in manifest.json are not in the files: {missing[:5]}"] if missing else []) + (
        [f"{len(extra)} tensors in the files are not in manifest.json: {extra[:5]}"] if extra else []
    )
    if problems:
        raise ChecksumError(f"{where}: " + "; ".join(problems) + " (changed since export)")


def _check_names(directory, fmt: str, reader, names, checksums: dict) -> None:
    """Both ways for a merged export: an ``hf`` one by every tensor of every shard its index names (HF names),
    plus no safetensors file the index leaves out; a dist-checkpoint by its metadata's tensors."""
    if fmt != "hf":
        compare_names(directory, names, checksums)
        return
    unnamed = sorted(p.name for p in Path(directory).glob("*.safetensors") if p.name not in reader.opened)
    if unnamed:
        raise ChecksumError(f"{directory}: safetensors files that the index does not name: {unnamed[:5]}")
    compare_names(directory, reader.files, checksums)


def read_export(directory, fmt: str, verify_checksums: bool = True) -> dict:
    """All tensors of a written ``absorbed``/``mcore``/``nemo``/``hf`` export, under flat Megatron names; unless
    ``verify_checksums=False``, the architecture and the tensor names are checked against the manifest first
    and each tensor against its checksum while it is read.

    Args:
        directory: the export.
        fmt: its format (manifest.json's ``format``).
        verify_checksums: check against manifest.json.
    """
    checksums = manifest_checksums(directory) if verify_checksums else None
    reader, names = _open_export(directory, fmt, checksums)
    if checksums is not None:
        _check_names(directory, fmt, reader, names, checksums)
    return reader.load(names)


def _verify_hf_peft(directory, checksums: dict) -> int:
    from nemo_mla_lora.checkpoints.safetensors_io import SafetensorsFile

    path = Path(directory) / PEFT_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the hf_peft export's adapter tensors)")
    weights = SafetensorsFile(path)
    compare_names(path, weights.keys(), checksums)
    for name in weights:  # one tensor in memory at a time
        check_checksums({name: weights.read(name)}, checksums, path)
    return len(checksums)


def verify_checksums(directory, progress: bool = True) -> dict:
    """Every tensor of an export against its manifest, both ways (each listed tensor present, each stored tensor
    listed, each checksum equal), group by group (memory: one group), and the architecture files against theirs;
    raises on the first difference, naming the tensor or field and the file. Returns {format, tensors checked,
    architecture: checked | not recorded}.

    Args:
        directory: the export.
        progress: show a progress bar.
    """
    from nemo_mla_lora.export.pipeline import FORMATS

    info = manifest.read_manifest(directory)
    fmt = info.get("format")
    if fmt not in FORMATS:
        raise CheckpointError(f"{Path(directory) / manifest.MANIFEST}: format {fmt!r}; expected one of {FORMATS}")
    checksums = manifest_checksums(directory)
    architecture = "checked" if "architecture_checksums" in info else "not recorded (re-export to cover it)"
    if fmt == "hf_peft":
        return {"format": fmt, "tensors": _verify_hf_peft(directory, checksums), "architecture": architecture}
    reader, names = _open_export(directory, fmt, checksums)
    _check_names(directory, fmt, reader, names, checksums)
    grouped = groups(names)
    for key in tqdm(list(grouped), desc="checksums", unit="group", disable=not progress):
        reader.load(grouped[key])
    return {"format": fmt, "tensors": len(checksums), "architecture": architecture}
