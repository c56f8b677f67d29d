"""A Megatron dist-checkpoint (``torch_dist``) written group by group: peak memory is one group's tensors.

Megatron's ``dist_checkpointing.save`` plans and stages every tensor of one call together, so one call for
a whole merged model holds the model (and a staged copy). Here each group (a unit of ``units.py``: the
embedding, a layer's attention, its MLP head, a chunk of its experts, ...) goes through that same call into
a part directory of its own; its data files then move into the checkpoint under names unique to the part,
and its PyTorch DCP metadata (``.metadata``: Megatron's ``MCoreMetadata``, with each tensor's shape, chunks
and storage location) is merged into the one written at the end, beside Megatron's ``metadata.json`` and
``common.pt``. A stacked expert tensor gets one chunk per expert (what Megatron's expert layers request)
from several parts, and a tensor over the writer's row-chunk size its row chunks; ``finish`` checks every
tensor's chunks cover it exactly once. Each written part's files are synced to disk by a pool of threads as the
parts go (the disk writes while the export runs, several files at once, rather than all at the end; ``finish``
waits for them), and with ``check`` every tensor's stored bytes are compared with what was saved (from the page
cache) on a thread of its own while the next part is saved. An error there surfaces at the next part or at
``finish``. With ``check``, every 16th part (the first included) is also loaded through Megatron's own loader and
compared before the next one starts (about a third of the time loading every part takes; bench/README.md).
Loading is Megatron's own; ``tests/checkpoints/test_dist_stream.py`` checks the result equals a one-call save of
every tensor.
"""

import io
import math
import os
import pickle
import shutil
import struct
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from nemo_mla_lora.checkpoints.dist_ckpt import AXIS0_CHUNK
from nemo_mla_lora.checkpoints.errors import CheckpointError
from nemo_mla_lora.checkpoints.output_dir import fsync_path

WRITER_THREADS = 4  # files of a part written at once, and files synced at once (threads: both release the GIL)
MEGATRON_READ_BACK_EVERY = 16  # parts 0, 16, 32, ... are read back through Megatron's loader, the rest by bytes


class StreamingDistCkpt:
    def __init__(self, directory):
        self.directory, self.metadata, self.parts = Path(directory), None, 0
        # save: Megatron's plan and the file writes; read_back: Megatron's loader on every 16th part; waited: for
        # the previous part's bytes to be compared (beside the next save); synced: finish waiting for the syncs;
        # sharded, hash_wait: the writer's own (the units' ShardedTensors; waiting for a unit's checksums);
        # metadata: reading each part's metadata and merging it; files: each part's directory made, its files
        # renamed into place, the directory removed
        self.seconds = dict.fromkeys(
            ("save", "read_back", "waited", "synced", "sharded", "hash_wait", "metadata", "files"), 0.0
        )
        self._comparer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-back")
        self._syncer = ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="sync")
        self._pending, self._syncs = None, []  # the last part's comparison; every file's sync

    def add(self, sharded: dict, check: bool = False, max_bytes: int | None = None) -> None:
        """Save ``sharded`` (key -> Megatron ShardedTensor/ShardedObject; a tensor chunk not saved by an earlier
        part) now, in parts of at most ``max_bytes`` of tensors (one Megatron save each; a larger tensor is a
        part of its own); with ``check``, read each part back through Megatron's loader and compare."""
        batch, size = {}, 0
        for key, item in sorted(sharded.items(), key=lambda kv: not hasattr(kv[1], "local_shape")):
            nbytes = item.data.numel() * item.data.element_size() if hasattr(item, "local_shape") else 0
            if batch and max_bytes and size + nbytes > max_bytes:
                self._save_part(batch, check)
                batch, size = {}, 0
            batch[key], size = item, size + nbytes
        if batch:
            self._save_part(batch, check)

    def _save_part(self, sharded: dict, check: bool) -> None:
        from megatron.core import dist_checkpointing
        from torch.distributed.checkpoint import FileSystemReader

        part = self.directory / f".part{self.parts:05d}"
        with self.timed("files"):
            part.mkdir(parents=True)
        saved = {k: (v.key, v.data) for k, v in sharded.items() if hasattr(v, "local_shape")}  # save may rewrap
        # a part may hold some chunks of a tensor (experts, rows): whole-tensor coverage is checked in finish()
        with self.timed("save"):
            request = dist_checkpointing.save(
                sharded, str(part), _save_strategy(), validate_access_integrity=False, async_sharded_save=True
            )
            _write_here(request)
        with self.timed("metadata"):
            metadata = FileSystemReader(str(part)).read_metadata()
            stored = _stored_records(saved, metadata) if check else None
        with self.timed("read_back"):
            if check and (stored is None or self.parts % MEGATRON_READ_BACK_EVERY == 0):
                _load_and_compare(sharded, saved, part)  # Megatron's loader, from the part, before the next part
                stored = None
        with self.timed("waited"):
            self._wait_compared()
        with self.timed("files"):
            renamed = self._move_into_place(part, metadata)
        if stored:
            records = [(key, self.directory / info.relative_path, info, data) for key, info, data in stored]
            self._pending = self._comparer.submit(_compare_records, records)
        with self.timed("metadata"):
            if self.metadata is None:
                self.metadata = metadata
            else:
                self._merge(metadata)
        with self.timed("files"):
            shutil.rmtree(part)
        self._syncs += [self._syncer.submit(fsync_path, self.directory / n) for n in renamed]
        self.parts += 1

    def _move_into_place(self, part: Path, metadata) -> list[str]:
        """The part's data files renamed into the checkpoint (``g<part>`` prefixed, ``metadata`` pointed at them),
        the format header's files too for the first part; returns the new file names."""
        _place_chunks(metadata)
        renamed = {}
        for data_file in sorted(part.glob("*.distcp")):
            renamed[data_file.name] = f"g{self.parts:05d}{data_file.name}"
            data_file.rename(self.directory / renamed[data_file.name])
        for info in metadata.storage_data.values():
            info.relative_path = renamed[info.relative_path]
        if self.metadata is None:
            for name in ("metadata.json", "common.pt"):  # the same for every part: Megatron's format header
                (part / name).rename(self.directory / name)
        return list(renamed.values())

    @contextmanager
    def timed(self, field: str):
        """Adds the block's wall time to ``seconds[field]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[field] += time.perf_counter() - start

    def _merge(self, metadata) -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        mine = self.metadata.state_dict_metadata
        for key, meta in metadata.state_dict_metadata.items():
            if key not in mine:
                mine[key] = meta
                continue
            old = mine[key]
            if not (
                isinstance(old, TensorStorageMetadata)
                and isinstance(meta, TensorStorageMetadata)
                and old.size == meta.size
                and old.properties.dtype == meta.properties.dtype
            ):
                raise CheckpointError(f"{self.directory}: {key} written twice")
            seen = {tuple(c.offsets) for c in old.chunks}
            again = [tuple(c.offsets) for c in meta.chunks if tuple(c.offsets) in seen]
            if again:
                raise CheckpointError(f"{self.directory}: {key} chunk at {again[0]} written twice")
            old.chunks.extend(meta.chunks)
        self.metadata.storage_data.update(metadata.storage_data)
        for field in ("planner_data", "mcore_data"):  # optional maps (None when a save had nothing for them)
            merged = {**(getattr(self.metadata, field, None) or {}), **(getattr(metadata, field, None) or {})}
            setattr(self.metadata, field, merged or getattr(self.metadata, field, None))

    def _wait_compared(self) -> None:
        """The previous part's stored bytes compared (``_compare_records``; its error raised here)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def finish(self) -> None:
        """Write the merged metadata; until then the directory is not a loadable checkpoint."""
        self._wait_compared()
        start, syncs, self._syncs = time.perf_counter(), self._syncs, []
        for sync in syncs:
            sync.result()
        self.seconds["synced"] += time.perf_counter() - start
        self._comparer.shutdown()
        self._syncer.shutdown()
        if self.metadata is None:
            raise CheckpointError(f"{self.directory}: no tensors were written")
        _check_coverage(self.metadata, self.directory)
        self.metadata.storage_meta = None  # the reader fills in its own
        tmp = self.directory / ".metadata.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(self.metadata, f)
        os.replace(tmp, self.directory / ".metadata")


def _save_strategy():
    """Megatron's ``torch_dist`` save with one file (bucket) per writer thread of ``_write_here``: Megatron's
    default 2 on a machine of 2 cores, up to ``WRITER_THREADS`` where there are more."""
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    return TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=max(2, min(WRITER_THREADS, os.cpu_count() or 2)))


def _write_here(request) -> None:
    """Carry out Megatron's save request (its plan, its buckets, its per-file writer, its finalize: the
    ``.metadata`` and ``metadata.json``) in this process, without the fsync of each file: Megatron's own
    sync path forks a writer process per save and fsyncs every file, and after each fork every page this
    process then writes is copied (the merge ran 4x slower beside it). The export syncs its
    files once, before its directory is renamed into place (``output_dir.atomic_dir``)."""
    import queue

    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    write = FileSystemWriterAsync.write_preloaded_data  # (processes.py's death signal applies to forked workers only)
    if request.async_fn is not None:  # None: nothing to write
        transform_list, use_msc = request.async_fn.args
        _, buckets, results_queue = request.async_fn_args

        def one(index: int, bucket):  # one file of the part: its own stream, queues and results
            done, count = queue.SimpleQueue(), queue.Queue()
            count.put(index)
            write(transform_list, index, bucket, done, count, use_fsync=False, use_msc=use_msc)
            _, out = done.get()
            if isinstance(out, Exception):
                raise CheckpointError(f"writing {bucket[0]} failed: {out}") from out
            return out

        # the part's files (Megatron's buckets) at once, one thread each: the writes release the GIL
        with ThreadPoolExecutor(max_workers=max(1, len(buckets))) as pool:
            futures = [pool.submit(one, index, bucket) for index, bucket in enumerate(buckets)]
            results = {index: future.result() for index, future in enumerate(futures)}
        results_queue.put(results)
    for finalize in request.finalize_fns:
        finalize()


def _place_chunks(metadata) -> None:
    """Chunks saved as ``{key}@axis0from{first}of{n}`` (``checkpoint.sharded_tensors``: experts of a stacked
    tensor, rows of a large one) become chunks of ``key`` [n, ...] at offset ``first`` of its first axis
    (PyTorch DCP reads each chunk's bytes from its storage entry and places it by its offsets: the tensor a
    one-call save writes, read back whole or resharded)."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    for stored in [k for k in metadata.state_dict_metadata if AXIS0_CHUNK.match(k)]:
        key, first, count = AXIS0_CHUNK.match(stored).groups()
        meta = metadata.state_dict_metadata.pop(stored)
        shift = lambda offsets: torch.Size([offsets[0] + int(first), *offsets[1:]])  # noqa: E731, B023  (this pass only)
        meta.size = torch.Size([int(count), *meta.size[1:]])
        meta.chunks = [ChunkStorageMetadata(shift(c.offsets), c.sizes) for c in meta.chunks]
        if key in metadata.state_dict_metadata:  # another chunk of it in the same part
            metadata.state_dict_metadata[key].chunks.extend(meta.chunks)
        else:
            metadata.state_dict_metadata[key] = meta
        for index in [i for i in metadata.storage_data if i.fqn == stored]:
            info = metadata.storage_data.pop(index)
            metadata.storage_data[MetadataIndex(key, shift(index.offset), index.index)] = info


def _check_coverage(metadata, where) -> None:
    """Every tensor's chunks hold exactly its elements (chunks are disjoint: ``_merge`` refuses repeats)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    for key, meta in metadata.state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata):
            continue
        total, held = math.prod(meta.size), sum(math.prod(c.sizes) for c in meta.chunks)
        if held != total:
            raise CheckpointError(
                f"{where}: {key} {tuple(meta.size)}: chunks hold {held} of {total} elements "
                f"(a part of it was never written)"
            )


def _stored_records(saved: dict, metadata) -> list | None:
    """(stored key, its storage record, the data given to save) for each tensor of ``saved`` (key -> (stored
    key, data)); None where a tensor is not one plain stored record (then only Megatron's loader checks it)."""
    entries = {}
    for index, info in metadata.storage_data.items():
        entries.setdefault(index.fqn, []).append(info)
    if not all(len(entries.get(key, ())) == 1 and data.is_contiguous() for key, data in saved.values()):
        return None
    return [(key, entries[key][0], data) for key, data in saved.values()]


def _compare_records(records: list) -> None:
    """Each (stored key, file, storage record, data) of a written part: the file's stored bytes against the
    data's, from the page cache (``_compare_stored``)."""
    buf = torch.empty(8 << 20, dtype=torch.uint8)
    for key, path, info, data in records:
        if not _compare_stored(path, info.offset, info.length, data, buf):
            raise CheckpointError(f"{path}: {key} reads back different from what was written")


def _load_and_compare(sharded: dict, saved: dict, part) -> None:
    """Load a just-written part back through Megatron and compare every tensor with ``saved``."""
    import dataclasses

    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    request = {
        k: dataclasses.replace(sharded[k], data=torch.empty(sharded[k].local_shape, dtype=data.dtype))
        for k, (_, data) in saved.items()
    }
    try:
        loaded = dist_checkpointing.load(request, str(part), validate_access_integrity=False)
    except (Exception, CheckpointException) as err:  # torch DCP raises a BaseException
        raise CheckpointError(f"{part}: cannot be read back: {err}") from err
    for k, (key, data) in saved.items():
        if not _same_bits(loaded[k].reshape(data.shape), data):
            raise CheckpointError(f"{part}: {key} reads back different from what was written")


class _Window(io.RawIOBase):
    """Bytes [start, start + length) of an open binary file, as a seekable file of their own (zipfile reads a
    torch.save archive stored at an offset of a DCP data file through it)."""

    def __init__(self, f, start: int, length: int):
        super().__init__()
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence] + offset
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(b)[:n])
        self.pos += got
        return got


def _raw_bytes_span(f, start: int, length: int) -> tuple[int, int]:
    """(file offset, size) of the tensor bytes of the torch.save archive stored at [start, start + length):
    its one storage record (``<archive>/data/0``), stored uncompressed."""
    with zipfile.ZipFile(_Window(f, start, length)) as archive:
        records = [i for i in archive.infolist() if i.filename.endswith("/data/0")]
        if len(records) != 1 or records[0].compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{f.name}@{start}: not a torch.save archive of one stored tensor")
        record = records[0]
    f.seek(start + record.header_offset)
    header = f.read(30)  # the local file header: its name and extra field lengths end it
    if header[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{f.name}@{start}: no zip local header at {record.header_offset}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return start + record.header_offset + 30 + name_len + extra_len, record.file_size


def _compare_stored(path: Path, start: int, length: int, data, buf) -> bool:
    """Whether the tensor stored at [start, start + length) of ``path`` holds exactly ``data``'s bytes (row-major,
    ``data`` contiguous), read through ``buf`` (a uint8 tensor) a chunk at a time."""
    expected = data.reshape(-1).view(torch.uint8)
    with open(path, "rb", buffering=0) as f:
        at, size = _raw_bytes_span(f, start, length)
        if size != expected.numel():
            return False
        f.seek(at)
        view = memoryview(buf.numpy())
        for lo in range(0, size, buf.numel()):
            n = min(buf.numel(), size - lo)
            if f.readinto(view[:n]) != n or not _same_bits(buf[:n], expected[lo : lo + n]):
                return False
    return True


def _same_bits(a, b) -> bool:
    """Bit-for-bit equality, compared 8 bytes at a time where the length allows (3x a bf16 ``torch.equal``)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    if a.numel() % 8 == 0:
        a, b = a.view(torch.int64), b.view(torch.int64)
    return torch.equal(a, b)
