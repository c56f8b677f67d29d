"""Reading a Megatron dist-checkpoint (torch_dist) by flat name, a few tensors at a time.

Checkpoint keys are Megatron's sharded keys (routed experts stacked: ``...mlp.experts.experts.linear_fc1.weight``
[E, out, in]); ``CheckpointReader`` hands out *flat* names (``...mlp.experts.local_experts.3.linear_fc1.weight``),
the module names of a TP=1/EP=1 model, and reads each routed expert as its own row of the stacked tensor.

Whole tensors come through Megatron's ``dist_checkpointing.load`` (default strictness). Expert rows come
through torch DCP's own reader (``load_rows``): Megatron's loader cannot read some fragments of a tensor in
a one-process world. For the fragments a request does not hold it writes shard metadata placed on rank
``(rank + 1) % world_size``, which is this rank when the world has one process, and torch's ShardedTensor
then counts more shards here than were given ("Number of local shards (1) does not match ... (8)"). A
torch_dist checkpoint is a torch Distributed Checkpoint, so the chosen rows of dim 0 are read with DCP's read
planning (``create_read_items_for_chunk_list``), straight into the caller's buffers. The directory is
checked with ``safe_load.check_dist_checkpoint`` first (Megatron and DCP unpickle ``.metadata``).
"""

import re
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from nemo_mla_lora.arch import keymap
from nemo_mla_lora.checkpoints.checksums import check_checksums
from nemo_mla_lora.checkpoints.errors import CheckpointError
from nemo_mla_lora.checkpoints.safe_load import check_dist_checkpoint

_STACKED = re.compile(r"^(.*\.mlp\.experts)\.experts\.(linear_fc[12]\..+)$")


class CheckpointReader:
    """Reads tensors of a dist-checkpoint by flat name, a few at a time; with ``checksums`` (an export's
    manifest) every tensor read is checked against them."""

    def __init__(self, directory, checksums: dict | None = None, prefix: str = ""):
        """``prefix``: the part of every key before Megatron's names (NeMo 2's ``module.``); keys without it
        (a NeMo training checkpoint's optimizer states) are not model tensors and are skipped."""
        from megatron.core import dist_checkpointing

        self.directory, self.checksums = Path(directory), checksums
        if not (self.directory / ".metadata").is_file():
            raise CheckpointError(f"{self.directory} is not a Megatron dist-checkpoint (no .metadata)")
        check_dist_checkpoint(self.directory)  # before Megatron's unrestricted unpickling
        try:
            self.metadata = dist_checkpointing.load_tensors_metadata(str(self.directory))
        except Exception as err:  # unreadable metadata: truncated or foreign
            raise CheckpointError(f"{self.directory}: cannot read checkpoint metadata: {err}") from err
        self.flat = {}  # flat name -> (key, expert index or None, shape)
        for key, meta in self.metadata.items():
            if not key.startswith(prefix):
                continue
            name = key[len(prefix) :]
            m = _STACKED.match(name)
            if m:
                for e in range(meta.global_shape[0]):
                    self.flat[f"{m.group(1)}.local_experts.{e}.{m.group(2)}"] = (key, e, meta.global_shape[1:])
            else:  # TE-spec names (fused norms) read under the local spec's names
                self.flat[keymap.from_te_name(name)] = (key, None, tuple(meta.global_shape))
        if not self.flat:
            raise CheckpointError(f"{self.directory}: no tensors under the key prefix {prefix!r}")

    def names(self) -> list[str]:
        return sorted(self.flat)

    def dtype(self, name: str) -> torch.dtype:
        return self.metadata[self.flat[name][0]].dtype

    def load(self, names) -> dict:
        """Tensors by flat name; a routed expert is read as its own row of the stacked tensor (as Megatron's
        expert layers ask for it), so memory holds the experts asked for, not the layer's. Whole tensors go
        through Megatron's loader; expert rows through torch DCP's (``load_rows``: Megatron's cannot read
        some fragments of a tensor in a one-process world)."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing import ShardedTensor

        missing = [n for n in names if n not in self.flat]
        if missing:
            raise CheckpointError(
                f"{self.directory}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}"
            )
        request, rows, out = {}, {}, {}
        for n in names:
            key, expert, shape = self.flat[n]
            meta = self.metadata[key]
            if expert is None:
                request[n] = ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=meta.dtype), replica_id=0)
            else:  # [out, in] at index ``expert`` of the stacked [E, out, in]
                out[n] = rows.setdefault(key, {})[expert] = torch.empty(shape, dtype=meta.dtype)
        try:
            if request:
                out.update(dist_checkpointing.load(request, str(self.directory)))
            if rows:
                load_rows(self.directory, rows)
        except (Exception, CheckpointException) as err:  # torch DCP raises a BaseException
            raise CheckpointError(
                f"{self.directory}: failed to read {names[:3]}...: {err} (truncated or incomplete checkpoint?)"
            ) from err
        check_checksums(out, self.checksums, self.directory)
        return out


class _RowsPlanner(DefaultLoadPlanner):
    """Plans reads of ``wanted[key] = {row: buffer [out, in]}`` (row ``e`` of dim 0 of stored ``key``)."""

    def __init__(self, wanted: dict):
        super().__init__()
        self.wanted = wanted

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, rows in self.wanted.items():
            md = self.metadata.state_dict_metadata.get(key)
            if not isinstance(md, TensorStorageMetadata):
                raise KeyError(f"{key}: not a tensor of this checkpoint")
            for e, buf in rows.items():
                if tuple(md.size[1:]) != tuple(buf.shape) or not 0 <= e < md.size[0]:
                    raise ValueError(f"{key}: stored {tuple(md.size)}, asked for row {e} of shape {tuple(buf.shape)}")
                chunk = ChunkStorageMetadata(
                    offsets=torch.Size((e,) + (0,) * buf.dim()), sizes=torch.Size((1,) + tuple(buf.shape))
                )
                items += create_read_items_for_chunk_list(key, md, [chunk])
        return LoadPlan(items)

    def resolve_tensor(self, read_item) -> torch.Tensor:
        buf = self.wanted[read_item.dest_index.fqn][read_item.dest_index.offset[0]].unsqueeze(0)  # [1, out, in]
        for dim, (lo, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            buf = buf.narrow(dim, lo, n)
        return buf

    def commit_tensor(self, read_item, tensor: torch.Tensor) -> None:
        pass  # read into the caller's buffer in place


def load_rows(directory, wanted: dict) -> None:
    """Fill ``wanted[key][e]`` (a [out, in] buffer in the stored dtype) with row e of stored tensor ``key``."""
    dcp_load({}, storage_reader=FileSystemReader(str(directory)), planner=_RowsPlanner(wanted), no_dist=True)
