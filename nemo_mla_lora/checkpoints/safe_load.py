"""No code runs from a checkpoint: every pickle the project reads is first read by a restricted unpickler.

Megatron's and PyTorch's distributed checkpoints keep their metadata (``.metadata``) as a pickle that torch
reads with an unrestricted ``pickle.load``, and ``common.pt`` / Lightning checkpoints are ``torch.load``
files. Before any of them is handed to those loaders, ``check_dist_checkpoint`` / ``check_torch_file`` read
it with an unpickler that admits only the classes these formats are made of (below) and fails on anything
else, naming the file and the class: a crafted file is refused before it can run code.
"""

import pickle
from pathlib import Path

import torch

from nemo_mla_lora.checkpoints.errors import CheckpointError

_DCP = "torch.distributed.checkpoint."
ALLOWED = {
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"),
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan"),
    (_DCP + "filesystem", "_StorageInfo"),
    (_DCP + "metadata", "Metadata"),
    (_DCP + "metadata", "BytesStorageMetadata"),
    (_DCP + "metadata", "ChunkStorageMetadata"),
    (_DCP + "metadata", "MetadataIndex"),
    (_DCP + "metadata", "StorageMeta"),
    (_DCP + "metadata", "TensorProperties"),
    (_DCP + "metadata", "TensorStorageMetadata"),
    (_DCP + "metadata", "_MEM_FORMAT_ENCODING"),
    (_DCP + "planner", "TensorWriteData"),
    (_DCP + "planner", "WriteItem"),
    (_DCP + "planner", "WriteItemType"),
    (_DCP + "planner", "SavePlan"),
    (_DCP + "planner", "BytesIOWriteData"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
}
DTYPES = {
    str(t).removeprefix("torch.")
    for t in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


class UnsafeCheckpoint(CheckpointError):
    pass


class _Restricted(pickle.Unpickler):
    def __init__(self, handle, where):
        super().__init__(handle)
        self.where = where

    def find_class(self, module, name):
        if (module, name) in ALLOWED or (module == "torch" and name in DTYPES):
            return super().find_class(module, name)
        raise UnsafeCheckpoint(
            f"{self.where}: refusing to unpickle {module}.{name} (not a class a Megatron/"
            f"PyTorch distributed checkpoint is made of); the file may be crafted to run code"
        )


def check_pickle(path) -> None:
    """Read ``path`` with the restricted unpickler (result discarded); raises ``UnsafeCheckpoint``."""
    with open(path, "rb") as handle:
        try:
            _Restricted(handle, path).load()
        except UnsafeCheckpoint:
            raise
        except Exception as err:  # truncated or not a pickle
            raise CheckpointError(f"{path}: unreadable checkpoint metadata ({type(err).__name__}: {err})") from None


def check_torch_file(path):
    """A ``torch.save`` file must load with ``weights_only=True`` (torch's own restricted unpickler); returns it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UnsafeCheckpoint(f"{path}: refused by torch.load(weights_only=True): {err}") from None


def check_dist_checkpoint(directory) -> None:
    """``.metadata`` and ``common.pt`` of a Megatron dist-checkpoint, before Megatron's loaders read them."""
    directory = Path(directory)
    check_pickle(directory / ".metadata")
    if (directory / "common.pt").is_file():
        check_torch_file(directory / "common.pt")
