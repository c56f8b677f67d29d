"""The group-by-group Megatron dist-checkpoint writer against one ``dist_checkpointing.save`` of every
tensor: same keys, shapes and values through Megatron's own loader, experts stacked as in one call."""

import pytest
import torch

from nemo_mla_lora.checkpoints.dist_ckpt import sharded_tensors
from nemo_mla_lora.checkpoints.dist_stream import StreamingDistCkpt
from nemo_mla_lora.checkpoints.errors import CheckpointError


def groups():
    gen = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    return [
        {"embedding.word_embeddings.weight": r(11, 6)},
        {
            "decoder.layers.0.self_attention.linear_proj.weight": r(6, 8),
            "decoder.layers.0.mlp.linear_fc1.weight": r(16, 6),
        },
        {
            "decoder.layers.1.self_attention.linear_proj.weight": r(6, 8),
            **{f"decoder.layers.1.mlp.experts.local_experts.{e}.linear_fc1.weight": r(4, 6) for e in range(3)},
        },
        {"decoder.final_layernorm.weight": r(6), "output_layer.weight": r(11, 6)},
    ]


def load_all(directory) -> dict:
    from megatron.core import dist_checkpointing

    request = dist_checkpointing.load_tensors_metadata(str(directory))
    return dict(dist_checkpointing.load(request, str(directory)).items())


def one_call(flat: dict) -> dict:
    """Megatron ShardedTensors of ``flat`` built here, not by ``sharded_tensors``: each tensor whole, the routed
    experts of a layer stacked into one [E, out, in] tensor, as one ``dist_checkpointing.save`` stores them."""
    from megatron.core.dist_checkpointing import ShardedTensor

    out, experts = {}, {}
    for name, t in flat.items():
        if ".local_experts." in name:
            head, rest = name.split(".local_experts.")
            e, leaf = rest.split(".", 1)
            experts.setdefault(f"{head}.experts.{leaf}", {})[int(e)] = t  # SequentialMLP's stacked key
        else:
            out[name] = ShardedTensor.from_rank_offsets(name, t, replica_id=0)
    for key, by_expert in experts.items():
        stacked = torch.stack([by_expert[e] for e in sorted(by_expert)])  # [E, out, in]
        out[key] = ShardedTensor.from_rank_offsets(key, stacked, replica_id=0)
    return out


def test_streamed_checkpoint_equals_one_save(mcore, tmp_path):
    from megatron.core import dist_checkpointing

    (tmp_path / "one").mkdir()
    dist_checkpointing.save(one_call({k: v for g in groups() for k, v in g.items()}), str(tmp_path / "one"))
    stream = StreamingDistCkpt(tmp_path / "streamed")
    for group in groups():
        stream.add(sharded_tensors(group))
    stream.finish()
    assert not list((tmp_path / "streamed").glob(".part*")), "part directories left behind"
    one, streamed = load_all(tmp_path / "one"), load_all(tmp_path / "streamed")
    assert sorted(one) == sorted(streamed) and len(one) == 7  # the layer-1 experts are one stacked tensor
    for key in one:
        assert torch.equal(one[key], streamed[key]), key
    stacked = [k for k in streamed if "experts" in k]
    assert len(stacked) == 1 and streamed[stacked[0]].shape == (3, 4, 6)
    chunks = stream.metadata.state_dict_metadata[stacked[0]].chunks  # one per expert: what expert layers request
    assert sorted(tuple(c.offsets) for c in chunks) == [(e, 0, 0) for e in range(3)]


def test_parts_are_written_in_this_process_and_a_failed_write_is_raised(mcore, tmp_path, monkeypatch):
    """Megatron's plan and per-file writer, run here: no process is forked per part (a fork makes every page
    this process writes afterwards a copy), and a write that fails is raised naming its file."""
    import os

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    stream = StreamingDistCkpt(tmp_path / "here")
    stream.add(sharded_tensors(groups()[0]), check=True)  # the first save sets up Megatron's results queue
    monkeypatch.setattr(os, "fork", lambda: pytest.fail("a process was forked to write a part"))
    for group in groups()[1:]:
        stream.add(sharded_tensors(group), check=True)
    stream.finish()
    assert torch.equal(load_all(tmp_path / "here")["output_layer.weight"], groups()[3]["output_layer.weight"])

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(filesystem_async, "_write_item", disk_full)
    with pytest.raises(CheckpointError, match=r"writing .*\.distcp failed: .*No space left"):
        StreamingDistCkpt(tmp_path / "full").add(sharded_tensors(groups()[1]))


def test_a_tensor_written_twice_or_nothing_written_fails(mcore, tmp_path):
    stream = StreamingDistCkpt(tmp_path / "twice")
    stream.add(sharded_tensors(groups()[0]))
    with pytest.raises(CheckpointError, match="embedding.word_embeddings.weight chunk at .* written twice"):
        stream.add(sharded_tensors(groups()[0]))
    with pytest.raises(CheckpointError, match="no tensors"):
        StreamingDistCkpt(tmp_path / "empty").finish()


def test_experts_split_over_parts_equal_one_save_and_a_missing_expert_fails(mcore, tmp_path):
    """A layer's experts written in chunks (one part each, as the export's units do) load as the stacked
    tensor one save writes, each part read back as it is written; a chunk never written fails finish()."""
    from megatron.core import dist_checkpointing

    layer = groups()[2]
    experts = {k: v for k, v in layer.items() if "local_experts" in k}
    (tmp_path / "one").mkdir()
    dist_checkpointing.save(one_call(layer), str(tmp_path / "one"))
    stream = StreamingDistCkpt(tmp_path / "chunks")
    stream.add(sharded_tensors({k: v for k, v in layer.items() if k not in experts}, 3), check=True)
    for e in (2, 0, 1):  # in any order
        name = f"decoder.layers.1.mlp.experts.local_experts.{e}.linear_fc1.weight"
        stream.add(sharded_tensors({name: experts[name]}, num_experts=3), check=True)
    stream.finish()
    one, chunks = load_all(tmp_path / "one"), load_all(tmp_path / "chunks")
    assert sorted(one) == sorted(chunks)
    for key in one:
        assert torch.equal(one[key], chunks[key]), key
    partial = StreamingDistCkpt(tmp_path / "partial")
    partial.add(sharded_tensors({k: experts[k] for k in list(experts)[:2]}, num_experts=3))
    with pytest.raises(CheckpointError, match=r"chunks hold 48 of 72 elements"):
        partial.finish()


def test_a_large_tensor_is_saved_in_row_chunks_and_loads_whole(mcore, tmp_path):
    """Above ``max_bytes`` a tensor is cut into row chunks, one part each (as tensor parallelism shards a
    vocabulary), each read back as written; Megatron loads the whole tensor, equal to a one-call save."""
    from megatron.core import dist_checkpointing

    group = groups()[3]
    (tmp_path / "one").mkdir()
    dist_checkpointing.save(sharded_tensors(group), str(tmp_path / "one"))
    stream = StreamingDistCkpt(tmp_path / "rows")
    stream.add(sharded_tensors(dict(group), max_bytes=3 * 6 * 4), check=True, max_bytes=3 * 6 * 4)
    stream.finish()
    assert stream.parts == 1 + 4  # the norm; the 11 rows of the output layer in chunks of 3 rows
    packed = StreamingDistCkpt(tmp_path / "packed")  # row chunks packed several to a part
    packed.add(sharded_tensors(dict(group), max_bytes=3 * 6 * 4), check=True, max_bytes=1 << 20)
    packed.finish()
    assert packed.parts == 1
    one = load_all(tmp_path / "one")
    for directory in ("rows", "packed"):
        rows = load_all(tmp_path / directory)
        assert sorted(one) == sorted(rows)
        for key in one:
            assert torch.equal(one[key], rows[key]), (directory, key)


@pytest.mark.parametrize("part", [0, 1], ids=["megatron_loader", "stored_bytes"])
def test_a_changed_byte_in_a_written_part_is_caught(mcore, tmp_path, monkeypatch, part):
    """The read-back of each part: part 0 (every 16th) through Megatron's loader, the others by comparing
    each tensor's stored bytes (beside the next save, at the latest in ``finish``); a byte changed on disk
    between the write and the check fails either way, and no ``.metadata`` is written."""
    from nemo_mla_lora.checkpoints import dist_stream

    written = dist_stream._write_here
    stream = StreamingDistCkpt(tmp_path / "out")

    def write_then_corrupt(request):
        written(request)
        if stream.parts == part:  # one byte inside the first tensor's stored bytes
            from torch.distributed.checkpoint import FileSystemReader

            where = tmp_path / "out" / f".part{part:05d}"
            info = next(iter(FileSystemReader(str(where)).read_metadata().storage_data.values()))
            with open(where / info.relative_path, "r+b") as f:
                at, size = dist_stream._raw_bytes_span(f, info.offset, info.length)
                f.seek(at + size // 2)
                byte = f.read(1)
                f.seek(at + size // 2)
                f.write(bytes([byte[0] ^ 0x10]))

    monkeypatch.setattr(dist_stream, "_write_here", write_then_corrupt)
    with pytest.raises(CheckpointError, match="reads back different"):  # part 1's check runs beside the next save
        for group in groups()[:2]:
            stream.add(sharded_tensors(group), check=True)
        stream.finish()
    assert not (tmp_path / "out" / ".metadata").exists()  # never a loadable checkpoint


@pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
def test_every_data_file_is_synced_before_finish_returns(mcore, tmp_path, monkeypatch, check):
    """Each part's files are synced by the sync threads as the parts go (the export's final sync then finds
    them clean): by the time ``finish`` returns, every data file of the checkpoint was synced, checked or not."""
    import os

    synced, real_fsync = set(), os.fsync

    def fsync(fd):
        synced.add(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    stream = StreamingDistCkpt(tmp_path / "out")
    for group in groups():
        stream.add(sharded_tensors(group), check=check)
    stream.finish()
    data_files = {os.path.realpath(p) for p in (tmp_path / "out").glob("*.distcp")}
    assert len(data_files) >= len(groups())
    assert data_files <= synced, sorted(data_files - synced)
