"""A Megatron dist-checkpoint (``torch_dist``) written group by group: peak memory is one group's tensors.

Megatron's ``dist_checkpointing.save`` plans and stages every tensor of one call together, so one call for
a whole merged model holds the model (and a staged copy). Here each group (the embedding, one decoder
layer, the final norm and output layer) goes through that same call into a part directory of its own; its
data files then move into the checkpoint under names unique to the group, and its PyTorch DCP metadata
(``.metadata``: Megatron's ``MCoreMetadata``, with each tensor's shape, chunks and storage location) is
merged into the one written at the end, beside Megatron's ``metadata.json`` and ``common.pt``. Loading is
Megatron's own; ``tests/test_dist_stream.py`` checks the result equals a one-call save of every tensor.
"""

import os
import pickle
import shutil
from pathlib import Path

from nemo_mla_lora.checkpoint import CheckpointError


class StreamingDistCkpt:
    def __init__(self, directory):
        self.directory, self.metadata, self.parts = Path(directory), None, 0

    def add(self, sharded: dict) -> None:
        """Save ``sharded`` (key -> Megatron ShardedTensor, keys not used by an earlier group) now."""
        from megatron.core import dist_checkpointing
        from torch.distributed.checkpoint import FileSystemReader

        part = self.directory / f".part{self.parts:05d}"
        part.mkdir(parents=True)
        dist_checkpointing.save(sharded, str(part))
        metadata = FileSystemReader(str(part)).read_metadata()
        renamed = {}
        for data_file in sorted(part.glob("*.distcp")):
            renamed[data_file.name] = f"g{self.parts:05d}{data_file.name}"
            data_file.rename(self.directory / renamed[data_file.name])
        for info in metadata.storage_data.values():
            info.relative_path = renamed[info.relative_path]
        if self.metadata is None:
            for name in ("metadata.json", "common.pt"):  # the same for every part: Megatron's format header
                (part / name).rename(self.directory / name)
            self.metadata = metadata
        else:
            self._merge(metadata)
        shutil.rmtree(part)
        self.parts += 1

    def _merge(self, metadata) -> None:
        again = sorted(set(metadata.state_dict_metadata) & set(self.metadata.state_dict_metadata))
        if again:
            raise CheckpointError(f"{self.directory}: tensors written twice: {again[:5]}")
        self.metadata.state_dict_metadata.update(metadata.state_dict_metadata)
        self.metadata.storage_data.update(metadata.storage_data)
        for field in ("planner_data", "mcore_data"):  # optional maps (None when a save had nothing for them)
            merged = {**(getattr(self.metadata, field, None) or {}), **(getattr(metadata, field, None) or {})}
            setattr(self.metadata, field, merged or getattr(self.metadata, field, None))

    def finish(self) -> None:
        """Write the merged metadata; until then the directory is not a loadable checkpoint."""
        if self.metadata is None:
            raise CheckpointError(f"{self.directory}: no tensors were written")
        self.metadata.storage_meta = None  # the reader fills in its own
        tmp = self.directory / ".metadata.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(self.metadata, f)
        os.replace(tmp, self.directory / ".metadata")
