"""Start NeMo's trainer from an HF directory: its safetensors streamed into the built, sharded Megatron model.

Which slice of which tensor a rank holds is read off the model's own ``sharded_state_dict()``, the description
Megatron's dist-checkpointing saves and restores by, so every layout comes out as Megatron shards it, for the
local and the Transformer Engine layer spec alike: TP (column-parallel rows, row-parallel columns, the vocab-parallel
embedding and output layer, the gated ``linear_fc1`` as [gate shard; up shard] per rank through Megatron's
``apply_swiglu_sharded_factory``), EP (a rank's local experts on the stacked key's global expert axis) and PP (keys
carry global layer numbers). Names go through ``keymap.from_sharded_key`` to the flat names
``checkpoints.sources.HFBase`` maps HF tensors to (gate/up into one ``linear_fc1``). A rank reads only its slices:
strided reads of a read-only memory map of the shard file (only the pages of the slice), one slice in host memory at
a time, FP8 weights
dequantized block by block (``dequantize_fp8`` at the slice's origin; to bf16, as the CPU trainer and the export
read them, then cast to the parameter's dtype).

Everything is checked before a byte of a tensor is read, and every problem raises a ``CheckpointError`` naming the
tensors or fields: the HF directory against its own config.json (``check_complete``), the model's architecture
against that config (``check_architecture``), every model tensor against an HF tensor (name and global shape),
every parameter and persistent buffer of the model covered exactly once (adapters and ``_extra_state`` aside), and
every HF tensor loaded by some rank (one all-reduce over the ranks).

``load_hf_checkpoint`` is a plain function (model chunks + directory; the parallel layout is the one the model was
built under); ``HFBaseLoad`` is the Lightning callback NeMo's trainer runs it from.
"""

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch

from nemo_mla_lora.arch import keymap
from nemo_mla_lora.checkpoints.errors import CheckpointError
from nemo_mla_lora.checkpoints.sources import HFBase, check_complete, dequantize_fp8

log = logging.getLogger(__name__)
SHOWN = 6  # names listed per kind of problem


@dataclass
class Piece:
    """One slice a rank owns: ``target`` (the parameter or a view of it) <- ``name``[``index``] (flat TP=1 name).
    For a parameter held in FP8 (``owner``: TE's quantized tensor), ``target`` is a view of a meta tensor of the
    parameter's shape: the load fills a high-precision copy of that one parameter through the same view, then
    copies it into ``owner`` (TE quantizes), so no more than one parameter is ever held in bf16."""

    key: str
    name: str
    index: tuple
    target: torch.Tensor
    owner: torch.Tensor | None = None


@dataclass
class LoadReport:
    """What one rank loaded: its pieces, and the bytes it read per HF tensor (scales of FP8 weights included)."""

    pieces: list = field(default_factory=list)
    bytes_read: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def names(self) -> list[str]:
        return sorted({p.name for p in self.pieces})


def megatron_chunks(modules) -> list:
    """The Megatron-Core ``GPTModel`` inside each of ``modules`` (NeMo's LightningModule, ``Float16Module`` and DDP
    wrappers each hold the next one as ``.module``)."""
    from megatron.core.models.gpt import GPTModel

    out = []
    for m in modules:
        held = m
        while not isinstance(held, GPTModel):
            if not hasattr(held, "module"):
                raise TypeError(
                    f"no Megatron-Core GPTModel inside {type(m).__name__} (stopped at {type(held).__name__})"
                )
            held = held.module
        out.append(held)
    return out


def is_quantized(t: torch.Tensor) -> bool:
    """Whether ``t`` is a parameter Transformer Engine holds in FP8 (``fp8_param``): Megatron's own check."""
    from megatron.core.fp8_utils import is_float8tensor

    return is_float8tensor(t)


def _stand_in(item) -> tuple:
    """(item, None), or for an item whose data is held in FP8: (the item over a meta tensor of the data's shape and
    nominal dtype, the quantized tensor)."""
    if not is_quantized(item.data):
        return item, None
    meta = torch.empty(tuple(item.data.shape), dtype=item.data.dtype, device="meta")
    return dataclasses.replace(item, data=meta), item.data


def _sharded_tensors(chunk) -> list:
    """(``ShardedTensor``, owner) of a chunk's base model: factories built (the gated fc1's two halves),
    ``_extra_state`` objects and adapters left out; ``owner`` is the FP8 parameter behind a stand-in, else None."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    out, todo = [], [(item, None) for item in chunk.sharded_state_dict().values()]
    while todo:
        item, owner = todo.pop()
        if isinstance(item, (ShardedTensorFactory, ShardedTensor)) and owner is None:
            item, owner = _stand_in(item)
        if isinstance(item, ShardedTensorFactory):
            built = item.build()
            built = built.values() if isinstance(built, dict) else built if isinstance(built, list) else [built]
            todo.extend((b, owner) for b in built)
        elif isinstance(item, ShardedTensor):
            if ".adapter." not in item.key:
                out.append((item, owner))
        elif not isinstance(item, ShardedObject):
            raise CheckpointError(f"model sharded state dict holds a {type(item).__name__}, not a tensor or object")
    return out


def _piece(st, base: HFBase, problems: dict, owner: torch.Tensor | None = None) -> tuple:
    """(the HF-side flat name ``st`` has a place at, or None; its ``Piece``, or None with the problem recorded)."""
    p = st.prepend_axis_num
    if st.flattened_range is not None or p > 1 or (p == 1) != keymap.is_stacked_expert_key(st.key):
        problems["layout"].append(f"{st.key} (prepended axes {p}, flattened {st.flattened_range})")
        return None, None
    name = keymap.from_sharded_key(st.key, st.global_offset[0] if p else None)
    if name not in base.parts:
        problems["model tensors with no HF tensor"].append(f"{name} (model key {st.key})")
        return None, None
    expected = base.layout_of(name)[1]
    if tuple(st.global_shape[p:]) != tuple(expected) or tuple(st.data.shape) != tuple(st.local_shape):
        problems["shapes (model, HF)"].append(f"{name} {tuple(st.global_shape[p:])} vs {tuple(expected)}")
        return name, None
    index = tuple(slice(o, o + n) for o, n in zip(st.global_offset[p:], st.local_shape))
    return name, Piece(st.key, name, index, st.data, owner)


def _owner(t: torch.Tensor, owner: torch.Tensor | None = None) -> int:
    if owner is not None:
        return id(owner)
    return id(t if t._base is None else t._base)


def _uncovered(chunk, pieces, reported: set) -> list[str]:
    """Parameters and persistent buffers of ``chunk`` (adapters, ``_extra_state`` and the ``reported`` ones aside)
    that the pieces do not fill exactly once (element count per tensor: a piece is the tensor or a view of it)."""
    filled = {}
    for p in pieces:
        filled[_owner(p.target, p.owner)] = filled.get(_owner(p.target, p.owner), 0) + p.target.numel()
    out = []
    for name, t in chunk.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state") or ".adapter." in name or not isinstance(t, torch.Tensor) or id(t) in reported:
            continue
        if filled.get(id(t), 0) != t.numel():
            out.append(f"{name} ({filled.get(id(t), 0)} of {t.numel()} elements)")
    return out


def check_architecture(chunks, base: HFBase) -> None:
    """The model was built from the directory's own config.json: every field of its ``MLASpec`` that changes the
    numbers (rope, routing, norms: what no tensor shape shows) equal, else a ``CheckpointError`` naming them."""
    from nemo_mla_lora.arch.mla_spec import MLASpec

    for chunk in chunks:
        built = MLASpec.from_megatron(chunk.config)
        differ = {
            f.name: (getattr(built, f.name), getattr(base.spec, f.name))
            for f in dataclasses.fields(MLASpec)
            if f.name != "model_type" and getattr(built, f.name) != getattr(base.spec, f.name)
        }
        if differ:
            raise CheckpointError(
                f"the model was built from another config than {base.directory}/config.json: "
                f"(model, HF) differ in {differ}"
            )


def plan(chunks, base: HFBase) -> list:
    """Every piece the ranks' ``chunks`` own, checked (module docstring); nothing is read. Collective when
    torch.distributed is initialised: every rank must call it."""
    problems = {
        k: []
        for k in (
            "layout",
            "model tensors with no HF tensor",
            "shapes (model, HF)",
            "model tensors not filled exactly once",
            "HF tensors no rank loads",
        )
    }
    pieces, placed = [], set()
    for chunk in chunks:
        mine, reported = [], set()
        for st, owner in _sharded_tensors(chunk):
            name, piece = _piece(st, base, problems, owner)
            mine += [piece] if piece else []
            reported |= set() if piece else {_owner(st.data, owner)}
            placed |= {name} if name else set()
        problems["model tensors not filled exactly once"] += _uncovered(chunk, mine, reported)
        pieces += mine
    position = {n: i for i, n in enumerate(base.names)}
    counts = torch.zeros(len(position) + 1, dtype=torch.int64)
    for name in placed:
        counts[position[name]] = 1
    counts[-1] = sum(len(v) for v in problems.values())
    counts = _sum_over_ranks(counts)
    problems["HF tensors no rank loads"] = [n for n, i in position.items() if counts[i] == 0]
    found = {k: sorted(set(v)) for k, v in problems.items() if v}
    if found:
        raise CheckpointError(
            f"HF directory {base.directory} does not fit the model: "
            + "; ".join(f"{len(v)} {k}: {v[:SHOWN]}{' ...' if len(v) > SHOWN else ''}" for k, v in found.items())
        )
    if counts[-1]:
        raise CheckpointError(f"HF directory {base.directory} does not fit the model on another rank (see its error)")
    return pieces


def _sum_over_ranks(counts: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return counts
    nccl = "nccl" in str(dist.get_backend()) and torch.cuda.is_available()  # "nccl" or "cpu:gloo,cuda:nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    total = counts.to(device)
    dist.all_reduce(total)
    return total.cpu()


class _SliceReader:
    """Slices of HF tensors through read-only memory maps of their shard files (``SafetensorsFile.read_slice``),
    counting the bytes read per tensor."""

    def __init__(self, base: HFBase, report: LoadReport):
        self.base, self.report = base, report

    def raw(self, hf_name: str, index: tuple) -> torch.Tensor:
        """``hf_name``[``index``] as stored (a copy in host memory: only the slice's pages are read)."""
        part = self.base.opened[self.base.files[hf_name]].read_slice(hf_name, index)
        self.report.bytes_read[hf_name] = self.report.bytes_read.get(hf_name, 0) + part.nbytes
        return part

    def read(self, hf_name: str, index: tuple) -> torch.Tensor:
        """The slice in a float dtype (FP8 dequantized at the slice's origin with the tensor's block scales)."""
        t = self.raw(hf_name, index)
        if t.dtype != torch.float8_e4m3fn:
            return t
        scale_name = self.base.scale_name(hf_name)
        scale = self.raw(
            scale_name, tuple(slice(0, n) for n in self.base.opened[self.base.files[scale_name]].shape(scale_name))
        )
        full = self.base.opened[self.base.files[hf_name]].shape(hf_name)
        return dequantize_fp8(
            t, scale, self.base.dtype, name=hf_name, origin=(index[0].start, index[1].start), full_shape=full
        )

    def close(self) -> None:
        for st in self.base.opened.values():
            st.release_map()


@torch.no_grad()
def _load_pieces(reader: _SliceReader, pieces: list) -> None:
    """Every piece copied in; the pieces of an FP8 parameter into one high-precision copy of it (the pieces' meta
    views laid on it), then into the parameter, which TE quantizes, one parameter at a time."""
    held = {}
    for p in pieces:
        if p.owner is None:
            _load_piece(reader, p, p.target)
        else:
            held.setdefault(id(p.owner), []).append(p)
    for group in held.values():
        owner = group[0].owner
        stage = torch.empty(tuple(owner.shape), dtype=owner.dtype, device=owner.device)
        for p in group:
            _load_piece(reader, p, stage.as_strided(p.target.size(), p.target.stride(), p.target.storage_offset()))
        owner.copy_(stage)
        del stage


@torch.no_grad()
def _load_piece(reader: _SliceReader, p: Piece, target: torch.Tensor) -> None:
    """Copy ``p`` into ``target``, HF part by part: a fused ``linear_fc1``'s rows are [gate; up], its slice's rows
    come from each."""
    row, rows = 0, p.index[0]
    for hf_name in reader.base.parts[p.name]:
        height = reader.base.opened[reader.base.files[hf_name]].shape(hf_name)[0]
        lo, hi = max(rows.start, row), min(rows.stop, row + height)
        if lo < hi:
            part = reader.read(hf_name, (slice(lo - row, hi - row), *p.index[1:]))
            target[lo - rows.start : hi - rows.start].copy_(part)
        row += height


def load_hf_checkpoint(chunks, directory) -> LoadReport:
    """Stream the HF directory ``directory`` into the model: each rank reads and copies in only the slices its
    ``chunks`` own (module docstring), after every check passed.

    Args:
        chunks: the rank's model chunks (Megatron-Core ``GPTModel``s, or NeMo's wrappers of them; one per virtual
            pipeline stage), built under the parallel layout in force; adapters may already wrap their linears.
        directory: an HF DeepSeek directory (config.json + safetensors; bf16/fp32, or FP8 with block scales).

    Returns:
        The rank's ``LoadReport`` (pieces loaded, bytes read per HF tensor).
    """
    start = time.perf_counter()
    base = HFBase(directory)  # headers only; FP8 dequantized to bf16 as HFBase reads it for the CPU trainer
    check_complete(base, base.spec, directory)
    chunks = megatron_chunks(chunks)
    check_architecture(chunks, base)
    report = LoadReport(pieces=plan(chunks, base))
    reader = _SliceReader(base, report)
    try:
        _load_pieces(reader, report.pieces)
    finally:
        reader.close()
    report.seconds = time.perf_counter() - start
    return report


class HFBaseLoad(pl.Callback):
    """Loads the HF base into NeMo's model at ``on_fit_start``: after ``MegatronStrategy.setup`` built the model
    (where a NeMo checkpoint's ``RestoreConfig`` is restored) and before the PEFT transform (``on_train_epoch_start``),
    so the adapters wrap modules that already hold the HF weights. It also records ``directory`` as the base of the
    adapter checkpoints NeMo saves, and a resumed run (NeMo reads the base again from that path, through Megatron's
    dist-checkpoint loader) takes the trainer state from the adapter checkpoint and keeps the weights loaded here.

    Args:
        directory: the HF directory (``model.checkpoint``).
    """

    def __init__(self, directory):
        self.directory = Path(directory)
        self.report = None

    def on_fit_start(self, trainer, pl_module) -> None:
        chunks = getattr(trainer.strategy, "megatron_parallel", None) or trainer.strategy.model  # one per VP stage
        self.report = load_hf_checkpoint(list(chunks), self.directory)
        total = sum(self.report.bytes_read.values())
        log.info(
            "rank %d: base streamed from %s: %d slices of %d HF tensors, %.2f GB read in %.1f s",
            trainer.global_rank,
            self.directory,
            len(self.report.pieces),
            len(self.report.bytes_read),
            total / 1e9,
            self.report.seconds,
        )
        io = _adapter_io(trainer.strategy)
        if io is not None:
            _keep_hf_base_on_resume(io, self.directory)


def _adapter_io(strategy):
    """NeMo's ``WrappedAdapterIO`` among the strategy's checkpoint IO wrappers (None without PEFT)."""
    from nemo.lightning.pytorch.callbacks.peft import WrappedAdapterIO

    io, seen = getattr(strategy, "_checkpoint_io", None), 0
    while io is not None and seen < 8:
        if isinstance(io, WrappedAdapterIO):
            return io
        io, seen = getattr(io, "checkpoint_io", None), seen + 1
    return None


def _keep_hf_base_on_resume(io, directory: Path) -> None:
    """``io`` records ``directory`` as the base in the adapter checkpoints' metadata; its ``load_checkpoint`` of a
    resumed adapter checkpoint (an ``AdapterPath`` whose base is ``directory``) returns the adapter checkpoint's
    trainer state without reading a base: the HF weights are in the model already (``MegatronStrategy`` loads the
    empty base state dict non-strictly: ``ckpt_load_strictness='log_all'``)."""
    io.model_ckpt_path = directory
    original = io.load_checkpoint

    def load_checkpoint(path, sharded_state_dict=None, map_location=None, strict=None):
        base = getattr(path, "base_model_path", None)
        if base is None or Path(str(base)).resolve() != directory.resolve():
            return original(path, sharded_state_dict, map_location, strict)
        io.adapter_ckpt_path, io.model_ckpt_path = Path(str(path)), directory
        return io.checkpoint_io.load_checkpoint(path, sharded_state_dict={})

    io.load_checkpoint = load_checkpoint
