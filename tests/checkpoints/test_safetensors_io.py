"""Positioned safetensors I/O against the safetensors library itself (the files HF, vLLM and transformers read)."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from nemo_mla_lora.checkpoints.checksums import tensor_checksum
from nemo_mla_lora.checkpoints.errors import CheckpointError
from nemo_mla_lora.checkpoints.safetensors_io import SafetensorsFile, SafetensorsWriter, directory_hash


def tensors():
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(5, 7, generator=gen).to(torch.bfloat16),
        "b.weight": torch.randn(3, generator=gen),
        "c.weight": (torch.randn(4, 4, generator=gen) * 8).to(torch.float8_e4m3fn),
    }


def test_reads_what_safetensors_wrote_and_writes_what_it_reads(tmp_path):
    save_file(tensors(), str(tmp_path / "lib.safetensors"))
    ours = SafetensorsFile(tmp_path / "lib.safetensors")
    for name, t in tensors().items():
        assert ours.dtype(name) == t.dtype and ours.shape(name) == tuple(t.shape)
        assert torch.equal(ours.read(name).view(torch.uint8), t.view(torch.uint8))
    layout = {n: (t.dtype, tuple(t.shape)) for n, t in tensors().items()}
    writer = SafetensorsWriter(tmp_path / "ours.safetensors", layout, {"format": "pt"})
    for name, t in reversed(list(tensors().items())):  # any order
        writer.write(name, t)
        assert writer.checksum(name) == tensor_checksum(t) != tensor_checksum(torch.zeros_like(t))
        assert writer.checksum(name, chunk=5) == tensor_checksum(t)  # read back across chunk boundaries
    start = writer.data_start + writer.offsets["a.weight"]["data_offsets"][0]
    os.pwrite(writer.fd, b"\x7f", start + 11)  # one byte of the file changes under the writer
    assert writer.checksum("a.weight", chunk=4) != tensor_checksum(tensors()["a.weight"])
    os.pwrite(writer.fd, tensors()["a.weight"].view(torch.uint8).reshape(-1)[11:12].numpy().tobytes(), start + 11)
    writer.close()
    back = load_file(str(tmp_path / "ours.safetensors"))
    assert sorted(back) == sorted(tensors())
    for name, t in tensors().items():
        assert torch.equal(back[name].view(torch.uint8), t.view(torch.uint8))


def test_content_hash_needs_no_second_read_and_sees_every_byte(tmp_path):
    save_file(tensors(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    cold = directory_hash(tmp_path)
    opened = SafetensorsFile(tmp_path / "model.safetensors")
    opened.read("a.weight")  # digests taken while reading are reused
    assert directory_hash(tmp_path, {"model.safetensors": opened}) == cold
    changed = tensors()
    changed["b.weight"][1] += 1
    save_file(changed, str(tmp_path / "model.safetensors"))
    assert directory_hash(tmp_path) != cold


def test_malformed_headers_are_refused_with_the_tensor_named(tmp_path):
    def write(header: dict, data: bytes, name: str):
        text = json.dumps(header).encode()
        (tmp_path / name).write_bytes(struct.pack("<Q", len(text)) + text + data)
        return tmp_path / name

    overlap = write(
        {
            "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        bytes(12),
        "overlap.safetensors",
    )
    with pytest.raises(CheckpointError, match="y starts at 4, expected 8"):
        SafetensorsFile(overlap)
    wrong = write({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), "wrong.safetensors")
    with pytest.raises(CheckpointError, match="x: data_offsets 0..8 hold 8 bytes, shape"):
        SafetensorsFile(wrong)
    short = write({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8), "short.safetensors")
    with pytest.raises(CheckpointError, match="tensors end at 16, data section is 8 bytes"):
        SafetensorsFile(short)
