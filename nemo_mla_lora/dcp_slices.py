"""Read some experts of a stacked tensor [E, out, in] from a Megatron torch_dist checkpoint.

Megatron's ``dist_checkpointing.load`` cannot do it in a one-process world: for the fragments a request
does not hold it writes shard metadata placed on rank ``(rank + 1) % world_size``, which is this rank when
the world has one process, and torch's ShardedTensor then counts more shards here than were given
("Number of local shards (1) does not match ... (8)"). A torch_dist checkpoint is a torch
Distributed Checkpoint (DCP), so this reads the chosen rows of dim 0 through DCP's own reader and read
planning (``create_read_items_for_chunk_list``), straight into the caller's buffers. Callers check the
directory with ``safe_load.check_dist_checkpoint`` first (DCP unpickles ``.metadata``, as Megatron does).
"""

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list


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
                chunk = ChunkStorageMetadata(offsets=torch.Size((e,) + (0,) * buf.dim()),
                                             sizes=torch.Size((1,) + tuple(buf.shape)))
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
