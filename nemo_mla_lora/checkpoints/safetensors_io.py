"""safetensors files read and written tensor by tensor, with positioned I/O and no mapping of the file.

``safetensors.safe_open`` maps a whole shard and ``save_file`` builds a shard's bytes in memory; at the
size of a DeepSeek checkpoint (shards of several GB, a V3 MoE layer of ~22 GB) both cost memory in
proportion to the shard. Here:

- ``SafetensorsFile`` parses and validates the header (JSON, read as data: dtypes known, shapes and
  offsets consistent, the data section tiled exactly), then ``read`` fills one tensor with ``os.preadv``
  and keeps the xxh3-128 digest of its bytes, computed while they are in memory (hash while reading).
- ``SafetensorsWriter`` writes a shard whose layout (names, dtypes, shapes) is known before its tensors
  are: the header first, then each tensor at its offset as it comes, in any order.
- ``directory_hash`` is the content hash of a checkpoint directory: every file by relative path; a
  safetensors file by its header and its tensors' digests in offset order (so the digests taken while
  reading make the hash without a second read), any other file by its bytes.
"""

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import torch
import xxhash

from nemo_mla_lora.checkpoints.checksums import CHECKSUM
from nemo_mla_lora.checkpoints.errors import CheckpointError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 << 20  # safetensors' own limit


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of contiguous ``t`` (shared memory, no copy)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _pread_into(fd: int, view: memoryview, offset: int, where: str) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{where}: file ends {len(view) - done} bytes early (truncated?)")
        done += n


class SafetensorsFile:
    def __init__(self, path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{self.path}: not a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(MAX_HEADER, size - 8):
                raise CheckpointError(f"{self.path}: header length {n} exceeds the file ({size} bytes)")
            self.header_bytes = raw + f.read(n)
        try:
            header = json.loads(self.header_bytes[8:])
        except ValueError as err:
            raise CheckpointError(f"{self.path}: header is not JSON: {err}") from None
        self.metadata = header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries = {name: self._entry(name, e) for name, e in header.items()}
        self._check_tiling(size - self.data_start)
        self.digests = {}  # name -> sha256 of its bytes, for every tensor read so far
        self._map = None  # a read-only memory map of the file, made by the first read_slice

    def _entry(self, name, e) -> tuple:
        """(dtype, shape, start, end) of one header entry, checked."""
        try:
            dtype, shape, (start, end) = DTYPES[e["dtype"]], [int(d) for d in e["shape"]], e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{self.path}: header entry {name!r} is not a known dtype/shape/data_offsets: {e!r}"
            ) from None
        numel = 1
        for d in shape:
            numel *= d
        if min(shape, default=0) < 0 or end - start != numel * dtype.itemsize:
            raise CheckpointError(
                f"{self.path}: {name}: data_offsets {start}..{end} hold {end - start} bytes, "
                f"shape {shape} of {e['dtype']} needs {numel * dtype.itemsize}"
            )
        return dtype, tuple(shape), int(start), int(end)

    def _check_tiling(self, data_len: int) -> None:
        position = 0
        for name, (_, _, start, end) in sorted(self.entries.items(), key=lambda kv: kv[1][2]):
            if start != position:
                raise CheckpointError(f"{self.path}: {name} starts at {start}, expected {position} (overlap or gap)")
            position = end
        if position != data_len:
            raise CheckpointError(f"{self.path}: tensors end at {position}, data section is {data_len} bytes")

    def keys(self) -> list[str]:
        return list(self.entries)

    def __iter__(self):
        return iter(self.entries)  # tensor names, as keys()

    def shape(self, name: str) -> tuple:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``name`` (into ``out`` when given: contiguous, same dtype and number of elements); its
        xxh3-128 digest goes into ``digests``."""
        dtype, shape, start, end = self.entries[name]
        t = torch.empty(shape, dtype=dtype) if out is None else out
        if t.dtype != dtype or t.numel() * t.element_size() != end - start or not t.is_contiguous():
            raise CheckpointError(f"{self.path}: {name} is {shape} {dtype}; target is {tuple(t.shape)} {t.dtype}")
        view = _bytes_of(t)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            _pread_into(fd, view, self.data_start + start, f"{self.path}: {name}")
        finally:
            os.close(fd)
        self.digests[name] = xxhash.xxh3_128(view).hexdigest()
        return t

    def read_slice(self, name: str, index: tuple) -> torch.Tensor:
        """``name``[``index``] as stored, copied out of a read-only memory map of the file: only the slice's pages
        are read. Not digested (a slice is not the tensor).

        Args:
            name: the tensor.
            index: one ``slice`` (step 1) per dimension.
        """
        dtype, shape, start, end = self.entries[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        size = dtype.itemsize
        data = self._map[self.data_start + start : self.data_start + end].reshape(*shape[:-1], shape[-1] * size)
        last = index[-1]  # [..., in] as bytes: the last dimension's slice in bytes
        part = np.ascontiguousarray(data[(*index[:-1], slice(last.start * size, last.stop * size))])
        return torch.from_numpy(part).view(dtype)

    def release_map(self) -> None:
        """Drop the memory map ``read_slice`` made (the next slice maps the file again)."""
        self._map = None

    def content_hash(self) -> str:
        """sha256 over the header and every tensor's xxh3-128 digest in offset order (tensors not read yet are
        read now, for their digest only)."""
        digest = hashlib.sha256(b"safetensors-content-v2")
        digest.update(hashlib.sha256(self.header_bytes).digest())
        for name, _ in sorted(self.entries.items(), key=lambda kv: kv[1][2]):
            if name not in self.digests:
                self.read(name)
            digest.update(name.encode() + b"\0" + self.digests[name].encode())
        return digest.hexdigest()


class SafetensorsWriter:
    """A shard of known layout (name -> (dtype, shape)); ``write`` each tensor once, then ``close``."""

    def __init__(self, path, layout: dict, metadata: dict | None = None):
        self.path, self.layout = Path(path), layout
        header, position = {}, 0
        for name in sorted(layout):
            dtype, shape = layout[name]
            numel = 1
            for d in shape:
                numel *= d
            header[name] = {
                "dtype": CODES[dtype],
                "shape": list(shape),
                "data_offsets": [position, position + numel * dtype.itemsize],
            }
            position += numel * dtype.itemsize
        if metadata:
            header["__metadata__"] = metadata
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # data aligned to 8 bytes, as safetensors pads
        self.data_start, self.offsets, self.written, self._buffer = 8 + len(text), header, set(), None
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, struct.pack("<Q", len(text)) + text, 0)
        os.ftruncate(self.fd, self.data_start + position)

    def write(self, name: str, t: torch.Tensor) -> None:
        if name not in self.layout or name in self.written:
            raise CheckpointError(
                f"{self.path}: {name} is {'written twice' if name in self.written else 'not in the layout'}"
            )
        dtype, shape = self.layout[name]
        if t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{self.path}: {name} is {tuple(t.shape)} {t.dtype}, layout says {shape} {dtype}")
        view = _bytes_of(t.contiguous())
        offset, done = self.data_start + self.offsets[name]["data_offsets"][0], 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)
        self.written.add(name)

    def checksum(self, name: str, chunk: int = 8 << 20) -> str:
        """``tensor_checksum`` of the bytes the file holds for ``name`` now (read back from the page cache
        right after writing, ``chunk`` bytes at a time into one reused buffer, each hashed while in cache)."""
        start, end = self.offsets[name]["data_offsets"]
        if self._buffer is None or len(self._buffer) != chunk:
            self._buffer = bytearray(chunk)
        digest = xxhash.xxh3_128()
        for position in range(start, end, len(self._buffer)):
            view = memoryview(self._buffer)[: min(len(self._buffer), end - position)]
            _pread_into(self.fd, view, self.data_start + position, str(self.path))
            digest.update(view)
        return f"{CHECKSUM}:{digest.hexdigest()}"

    def close(self) -> None:
        missing = sorted(set(self.layout) - self.written)
        os.close(self.fd)
        if missing:
            raise CheckpointError(f"{self.path}: {len(missing)} tensors never written: {missing[:5]}")


def _file_digest(path: Path) -> str:
    digest = xxhash.xxh3_128()
    with open(path, "rb") as handle:  # in chunks: a file can be many GB
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def directory_hash(directory, opened: dict | None = None) -> str:
    """Content hash of a checkpoint directory (see the module docstring). ``opened``: relative path ->
    ``SafetensorsFile`` already read (their digests are reused, nothing is read twice)."""
    directory, opened = Path(directory), opened or {}
    digest = hashlib.sha256()
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = f.relative_to(directory).as_posix()
        digest.update(rel.encode() + b"\0")
        if f.suffix == ".safetensors":
            digest.update((opened.get(rel) or SafetensorsFile(f)).content_hash().encode())
        else:
            digest.update(_file_digest(f).encode())
    return digest.hexdigest()


INDEX = "model.safetensors.index.json"


def file_hash(directory) -> str:
    """Content hash of a checkpoint directory (``directory_hash``: every file by path;
    a safetensors file by its header and tensor digests, so an export hashes its HF base while reading
    it). Memoised on the files' names, sizes and modification times: the export callback hashes the base
    once for ``adapter.json`` and once more for the manifest, and a base can be terabytes."""
    files = sorted(f for f in Path(directory).rglob("*") if f.is_file())
    signature = (
        str(Path(directory).resolve()),
        tuple((f.relative_to(directory).as_posix(), f.stat().st_size, f.stat().st_mtime_ns) for f in files),
    )
    if signature not in _HASHES:
        _HASHES[signature] = directory_hash(directory)
    return _HASHES[signature]


_HASHES: dict = {}


def _hub_blob(root: Path, real: Path) -> bool:
    """A file of a Hugging Face hub cache snapshot: ``<repo>/snapshots/<rev>/f`` links to ``<repo>/blobs/<hash>``."""
    return root.parent.name == "snapshots" and real.parent == root.parent.parent / "blobs"


def inside(directory, name, where) -> Path:
    """``directory / name`` for a file name read from ``where`` (an index), refused unless it stays inside
    ``directory``: a relative path without ``..``, and no symlink leading out (except a Hugging Face hub cache
    snapshot's links to its own ``blobs/``).

    Args:
        directory: the checkpoint directory.
        name: the relative file name as written in ``where``.
        where: the file that named it (for the error).
    """
    directory = Path(directory)
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise CheckpointError(f"{where}: shard {name!r} is not a relative path inside {directory}")
    root, real = directory.resolve(), (directory / name).resolve()
    if root not in real.parents and not _hub_blob(root, real):
        raise CheckpointError(f"{where}: shard {name!r} resolves to {real}, outside {directory} (a symlink out)")
    return directory / name


def read_shards(directory) -> tuple[dict | None, list[str]]:
    """(weight_map or None, shard file names) of an HF checkpoint directory: its ``model.safetensors.index.json``
    (read as data: a JSON object whose ``weight_map`` maps tensor names to shard files, each inside the directory,
    ``inside``) or its single ``model.safetensors``.

    Args:
        directory: the HF checkpoint directory.
    """
    directory = Path(directory)
    index = directory / INDEX
    if not index.is_file():
        if not (directory / "model.safetensors").is_file():
            raise CheckpointError(f"{directory}: no model.safetensors or {INDEX}")
        inside(directory, "model.safetensors", directory)
        return None, ["model.safetensors"]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except ValueError as err:
        raise CheckpointError(f"{index}: not valid JSON ({err})") from None
    except (KeyError, TypeError):
        raise CheckpointError(f"{index}: no weight_map") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map is not an object of tensor name -> shard file")
    shards = sorted(set(weight_map.values()))
    for name in shards:
        inside(directory, name, index)
    missing = [f for f in shards if not (directory / f).is_file()]
    if missing:
        raise CheckpointError(f"{directory}: index names missing shard files {missing}")
    return weight_map, shards
