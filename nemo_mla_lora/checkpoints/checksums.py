"""Per-tensor checksums: what ``manifest.json`` records for every tensor an export writes, and the check every
reader runs against it."""

import hashlib

import torch

from nemo_mla_lora.checkpoints.errors import ChecksumError

CHECKSUM = "xxh3_128"  # manifest format 2; format 1 wrote 16 hex digits of sha256, without a prefix


def tensor_checksum(t: torch.Tensor, algorithm: str = CHECKSUM) -> str:
    """What the manifest records per tensor: ``xxh3_128:<32 hex digits>`` of its bytes as stored.

    xxh3 hashes about 7x faster than sha256; at checkpoint size the checksum is a pass over every byte
    written. It guards against corruption, it is not a signature.

    Args:
        t: the tensor, as stored (dtype and layout included).
        algorithm: ``"xxh3_128"``, or ``"sha256"`` for format 1's value.

    Returns:
        The checksum string as the manifest records it.
    """
    data = memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    if algorithm == "sha256":
        return hashlib.sha256(data).hexdigest()[:16]
    import xxhash

    return f"{CHECKSUM}:{xxhash.xxh3_128(data).hexdigest()}"


def _algorithm(recorded: str) -> str:
    return recorded.split(":", 1)[0] if ":" in recorded else "sha256"


def check_checksums(tensors: dict, checksums: dict | None, where) -> None:
    """Each of ``tensors`` against the manifest's checksum (names the manifest lacks are an error too).

    Args:
        tensors: name -> tensor as read.
        checksums: name -> recorded checksum (``manifest.json``'s ``tensor_checksums``); None skips the check.
        where: the file or directory named in the error.
    """
    if checksums is None:
        return
    for name, t in tensors.items():
        if name not in checksums:
            raise ChecksumError(f"{where}: {name} is not in manifest.json (a tensor the export did not write)")
        if tensor_checksum(t, _algorithm(checksums[name])) != checksums[name]:
            raise ChecksumError(
                f"{where}: {name} does not match its checksum in manifest.json (corrupted or "
                f"changed since export); `python -m nemo_mla_lora.recipes.verify_export` checks all"
            )
