"""Outputs that cannot destroy and checks that see everything (CPU, fast).

Each case is one a user hit: ``overwrite=true`` deleting a directory that was not an export, verify_export
missing a deleted tensor, an index reading files outside its directory, an edited architecture passing every
check, bare tracebacks for a truncated manifest / ``--help`` / a pre-made ``.NAME.replaced``, and two writers
into one output. Each asserts the error, its message, and that nothing was lost or left behind.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.hf import MAKER

from nemo_mla_lora.checkpoints.errors import CheckpointError, ChecksumError
from nemo_mla_lora.checkpoints.output_dir import OutputError, atomic_dir
from nemo_mla_lora.export.pipeline import export, read_export, verify_checksums


def listing(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def contents(directory):
    return {p: (directory / p).read_bytes() for p in listing(directory) if (directory / p).is_file()}


def no_sidecars(parent):
    return not [p.name for p in parent.iterdir() if p.name.endswith((".partial", ".lock", ".replaced"))]


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    return MAKER.make("v3_noaux_rope_noq", tmp_path_factory.mktemp("base") / "v3")


@pytest.fixture(scope="module")
def peft_adapter(hf_base, tmp_path_factory):
    """An HF PEFT adapter (B != 0) on the attention of every layer, written as peft's save_pretrained does."""
    from nemo_mla_lora.checkpoints.sources import HFBase, expected_shapes
    from nemo_mla_lora.export.writers import write_hf_peft

    shapes, gen, factors = expected_shapes(HFBase(hf_base).spec), torch.Generator().manual_seed(0), {}
    for name, (rows, cols) in ((n, s) for n, s in shapes.items() if ".self_attention.linear_" in n):
        a, b = torch.randn(4, cols, generator=gen), torch.randn(rows, 4, generator=gen)
        factors[name.removesuffix(".weight")] = (a, b, 2.0)
    directory = tmp_path_factory.mktemp("peft") / "adapter"
    directory.mkdir()
    write_hf_peft(factors, 4, 8.0, directory)
    return directory


@pytest.fixture(scope="module")
def exports(mcore, hf_base, peft_adapter, tmp_path_factory):
    """Pristine exports, one per format tested; each test works on its own copy."""
    root = tmp_path_factory.mktemp("exports")
    for fmt in ("hf", "mcore", "hf_peft"):
        export(hf_base, peft_adapter, root / fmt, fmt=fmt, progress=False)
    return root


def copy(exports, fmt, directory):
    shutil.copytree(exports / fmt, directory / fmt, symlinks=True)
    return directory / fmt


def run_module(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


# overwrite=true replaces only an output of ours


def test_cli_overwrite_refuses_a_user_directory(hf_base, tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("\\chapter{Three years}")
    (thesis / "manifest.json").write_text('{"name": "my web app"}')  # a manifest, not ours
    before = contents(thesis)
    proc = run_module(
        "nemo_mla_lora.recipes.export",
        f"base={hf_base}",
        "adapter=null",
        f"output={thesis}",
        "format=hf",
        "overwrite=true",
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert f"output={thesis} is not an output of nemo_mla_lora" in message and "thesis.tex" in message
    assert "Traceback" not in proc.stderr
    assert contents(thesis) == before and listing(tmp_path) == ["thesis", "thesis/manifest.json", "thesis/thesis.tex"]


def test_overwrite_replaces_our_outputs_and_empty_directories(exports, hf_base, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    export(hf_base, None, empty, fmt="hf", overwrite=True, progress=False)
    assert "manifest.json" in listing(empty)
    old = copy(exports, "mcore", tmp_path)  # a manifest of format_version 2: no producer field
    info = json.loads((old / "manifest.json").read_text())
    del info["producer"], info["architecture_checksums"]
    (old / "manifest.json").write_text(json.dumps(dict(info, format_version=2)))
    export(hf_base, None, old, fmt="hf", overwrite=True, progress=False)
    assert json.loads((old / "manifest.json").read_text())["format"] == "hf"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mcore"]


def test_every_writer_refuses_a_user_directory_and_its_sources(mcore, hf_base, tmp_path):
    from nemo_mla_lora.callbacks.export import MLAExportCallback
    from nemo_mla_lora.checkpoints import dist_ckpt

    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    # refused before the model, spec or peft (None here) is used
    with pytest.raises(OutputError, match=r"not an output of nemo_mla_lora \(no mla_spec.json of ours"):
        dist_ckpt.save_base(None, None, user, overwrite=True)
    with pytest.raises(OutputError, match=r"not an output of nemo_mla_lora \(no adapter.json of ours"):
        dist_ckpt.save_adapter(None, None, None, user, overwrite=True)
    with pytest.raises(ValueError, match="overlaps the source"):  # an adapter saved into its base
        dist_ckpt.save_adapter(None, None, None, hf_base / "adapter", base_dir=hf_base, overwrite=True)
    with pytest.raises(ValueError, match="overlaps the source"):  # the callback's outputs, checked before training
        MLAExportCallback(None, None, base_dir=hf_base, output_dir=hf_base / "run")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "results.csv").write_text("mine")
    with pytest.raises(OutputError, match=re.escape(f"output={tmp_path / 'export'} is not an output of")):
        MLAExportCallback(None, None, base_dir=hf_base, output_dir=tmp_path)
    tokenizer = tmp_path / "tok"
    shutil.copytree(hf_base, tokenizer, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    with pytest.raises(ValueError, match=re.escape(f"overlaps the source {tokenizer}")):  # nemo's tokenizer=
        export(hf_base, None, tokenizer / "out", fmt="nemo", tokenizer=str(tokenizer), progress=False)
    assert (user / "notes.txt").read_text() == "keep" and (tmp_path / "export" / "results.csv").read_text() == "mine"
    assert no_sidecars(tmp_path) and no_sidecars(hf_base.parent) and not (hf_base / "run").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "tok", "user"]


# verify_export: both directions, architecture, index containment


def _rewrite(path, change):
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _drop_from_files(out, fmt) -> str:
    """Delete one tensor from the files (and the index or metadata that names it); returns its name."""
    if fmt == "mcore":
        import pickle

        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(str(out)).read_metadata()
        gone = "decoder.layers.1.self_attention.linear_proj.weight"
        del metadata.state_dict_metadata[gone]
        (out / ".metadata").write_bytes(pickle.dumps(metadata))
        return gone
    path = out / "adapter_model.safetensors" if fmt == "hf_peft" else sorted(out.glob("model-*.safetensors"))[1]
    gone = sorted(load_file(path))[0]
    _rewrite(path, lambda t: t.pop(gone))
    if fmt == "hf":
        index = json.loads((out / "model.safetensors.index.json").read_text())
        del index["weight_map"][gone]
        (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return gone


@pytest.mark.parametrize("fmt", ["hf_peft", "hf", "mcore"])
def test_verify_export_checks_both_directions(exports, tmp_path, fmt):
    out = copy(exports, fmt, tmp_path / "a")
    assert verify_checksums(out, progress=False)["tensors"] > 10
    gone = _drop_from_files(out, fmt)  # manifest -> files
    with pytest.raises(ChecksumError, match=re.escape(f"1 tensors in manifest.json are not in the files: ['{gone}']")):
        verify_checksums(out, progress=False)
    if fmt != "hf_peft":
        with pytest.raises(ChecksumError, match="are not in the files"):
            read_export(out, fmt)
    out = copy(exports, fmt, tmp_path / "b")  # files -> manifest: a tensor the manifest does not list
    info = json.loads((out / "manifest.json").read_text())
    unlisted = sorted(info["tensor_checksums"])[-1]
    del info["tensor_checksums"][unlisted]
    (out / "manifest.json").write_text(json.dumps(info))
    message = f"1 tensors in the files are not in manifest.json: ['{unlisted}']"
    with pytest.raises(ChecksumError, match=re.escape(message)):
        verify_checksums(out, progress=False)


@pytest.mark.slow
def test_verify_export_cli_reports_a_deleted_peft_tensor(exports, tmp_path):
    out = copy(exports, "hf_peft", tmp_path)
    _rewrite(out / "adapter_model.safetensors", lambda t: t.pop(sorted(t)[-1]))
    proc = run_module("nemo_mla_lora.recipes.verify_export", str(out))
    assert proc.returncode == 1 and "are not in the files" in proc.stderr and "OK" not in proc.stdout


@pytest.mark.parametrize(
    "fmt, file, field, value",
    [
        ("hf", "config.json", "rope_theta", 20000.0),
        ("mcore", "mla_spec.json", "rope_base", 20000.0),
        ("mcore", "manifest.json", "mla.moe_scaling_factor", 3.0),
        ("hf_peft", "adapter_config.json", "lora_alpha", 16.0),
    ],
)
def test_an_edited_architecture_is_refused(exports, tmp_path, fmt, file, field, value):
    out = copy(exports, fmt, tmp_path)
    data = json.loads((out / file).read_text())
    holder, key = (data["mla"], field.split(".")[1]) if "." in field else (data, field)
    assert holder[key] != value
    holder[key] = value
    (out / file).write_text(json.dumps(data, indent=2))
    message = re.escape(f"{out / file}: field {field} changed since export (architecture_checksums in manifest.json)")
    with pytest.raises(ChecksumError, match=message):
        verify_checksums(out, progress=False)
    if fmt != "hf_peft":
        with pytest.raises(ChecksumError, match=message):  # what recipes.generate reads through
            read_export(out, fmt)
    if file != "manifest.json":
        (out / file).unlink()
        with pytest.raises(ChecksumError, match=re.escape(f"{out / file}: missing")):
            verify_checksums(out, progress=False)


def test_an_old_manifest_without_architecture_checksums_still_verifies(exports, tmp_path):
    out = copy(exports, "mcore", tmp_path)
    info = json.loads((out / "manifest.json").read_text())
    del info["architecture_checksums"]
    (out / "manifest.json").write_text(json.dumps(info))
    assert verify_checksums(out, progress=False)["architecture"].startswith("not recorded")


@pytest.mark.parametrize("escape", ["dotdot", "absolute", "symlink"])
def test_index_paths_must_stay_inside_the_directory(exports, tmp_path, escape):
    from nemo_mla_lora.checkpoints.sources import HFBase

    out = copy(exports, "hf", tmp_path)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = "model-00002-of-00005.safetensors"
    outside = tmp_path / "outside.safetensors"
    shutil.move(out / shard, outside)
    name = {"dotdot": "../outside.safetensors", "absolute": str(outside), "symlink": shard}[escape]
    if escape == "symlink":
        (out / shard).symlink_to(outside)
    index["weight_map"] = {k: name if f == shard else f for k, f in index["weight_map"].items()}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    expected = "outside" if escape == "symlink" else "is not a relative path inside"
    for read in (lambda: HFBase(out), lambda: read_export(out, "hf", verify_checksums=False)):
        with pytest.raises(CheckpointError, match=re.escape(f"index.json: shard {name!r} ") + f".*{expected}"):
            read()


def test_a_hub_cache_snapshot_reads_through_its_blob_links(exports, tmp_path):
    """Hugging Face's cache links snapshots/<rev>/<file> to ../../blobs/<hash>: inside the repo, accepted."""
    from nemo_mla_lora.checkpoints.sources import HFBase

    repo = tmp_path / "models--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted((exports / "hf").iterdir())):
        shutil.copyfile(f, blobs / f"blob{i}")
        (snapshot / f.name).symlink_to(f"../../blobs/blob{i}")
    assert len(HFBase(snapshot).load(["embedding.word_embeddings.weight"])) == 1


# one-line errors


def test_truncated_manifest_is_named(exports, tmp_path):
    out = copy(exports, "hf", tmp_path)
    text = (out / "manifest.json").read_text()
    (out / "manifest.json").write_text(text[: len(text) // 2])
    for read in (lambda: verify_checksums(out, progress=False), lambda: read_export(out, "hf")):
        with pytest.raises(CheckpointError, match=re.escape(f"{out / 'manifest.json'}: not valid JSON (")) as raised:
            read()
        assert "\n" not in str(raised.value)


def test_verify_export_help_and_bad_arguments(tmp_path):
    proc = run_module("nemo_mla_lora.recipes.verify_export", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and "python -m nemo_mla_lora.recipes.verify_export DIR" in proc.stdout
    proc = run_module("nemo_mla_lora.recipes.verify_export", "-x", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("usage:")
    proc = run_module("nemo_mla_lora.recipes.verify_export", str(tmp_path / "nope"), cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.strip() == f"FAILED: {tmp_path / 'nope'}: no such directory"
    assert listing(tmp_path) == []


def test_a_premade_replaced_symlink_is_refused_before_any_work(exports, hf_base, tmp_path):
    out = copy(exports, "hf", tmp_path)
    before = contents(out)
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "data.bin").write_bytes(b"\x01")
    (tmp_path / ".hf.replaced").symlink_to(target)
    with pytest.raises(OutputError, match=re.escape(f"{tmp_path / '.hf.replaced'} is in the way of replacing {out}")):
        export(hf_base, None, out, fmt="hf", overwrite=True, progress=False)
    assert contents(out) == before and listing(target) == ["data.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hf.replaced", "elsewhere", "hf"]


# one writer at a time


def test_a_second_writer_fails_fast_on_the_lock(mcore, hf_base, tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "first.txt").write_text("first writer")
        lock = tmp_path / ".out.lock"
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid() and set(holder) >= {"pid", "host", "time"}
        message = f"{lock}: {out} is being written by another process (pid {os.getpid()} on "
        with pytest.raises(OutputError, match=re.escape(message)):
            export(hf_base, None, out, fmt="hf", progress=False)
        with pytest.raises(OutputError, match=re.escape(str(lock))), atomic_dir(out, overwrite=True):
            pass
        assert listing(tmp) == ["first.txt"]
    assert listing(out) == ["first.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_dead_runs_leftovers_are_named_not_deleted(mcore, hf_base, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    out, lock, partial = tmp_path / "out", tmp_path / ".out.lock", tmp_path / ".out.partial"
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "time": "earlier"}))
    partial.mkdir()
    (partial / "half.safetensors").write_bytes(b"half")
    before = listing(tmp_path)
    with pytest.raises(
        OutputError,
        match=re.escape(f"{lock} was left by a run that died (pid {dead.pid} ")
        + ".*"
        + re.escape(f"rm {lock} (and rm -r {partial})"),
    ):
        export(hf_base, None, out, fmt="hf", progress=False)
    assert listing(tmp_path) == before
    lock.unlink()
    message = re.escape(f"{partial} is left from a run that did not finish") + ".*" + re.escape(f"rm -r {partial}")
    with pytest.raises(OutputError, match=message):
        export(hf_base, None, out, fmt="hf", progress=False)
    assert (partial / "half.safetensors").read_bytes() == b"half"
    shutil.rmtree(partial)  # as the message says: then the export runs
    export(hf_base, None, out, fmt="hf", progress=False)
    assert no_sidecars(tmp_path) and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


RANK = textwrap.dedent("""
    import sys
    import torch.distributed as dist
    from pathlib import Path
    from nemo_mla_lora.checkpoints.output_dir import atomic_dir
    rank, port, out = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for attempt in range(2):
        try:
            with atomic_dir(out, overwrite=True) as tmp:
                (tmp / f"rank{rank}.txt").write_text(str(tmp))
            print("ok", sorted(p.name for p in out.iterdir()), (out / "rank1.txt").read_text())
        except Exception as err:
            print(f"{type(err).__name__}: {err}")
        dist.barrier()
        if rank == 0 and attempt == 0:  # then neither empty nor a marker of ours: refused on both ranks
            (out / "rank0.txt").unlink()
            (out / "rank1.txt").write_text("not ours")
        dist.barrier()
    dist.destroy_process_group()
""")


def test_distributed_ranks_share_the_temp_dir_and_the_refusal(tmp_path):
    from conftest import free_port

    out, port = tmp_path / "out", free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK, str(r), str(port), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    (zero, zero_again), (one, one_again) = [p.communicate(timeout=120)[0].strip().splitlines()[-2:] for p in procs]
    written = f"ok ['rank0.txt', 'rank1.txt'] {tmp_path / '.out.partial'}"  # both ranks wrote into one temp dir
    assert zero == one == written
    assert zero_again.startswith(f"OutputError: output={out} is not an output of nemo_mla_lora")
    assert one_again.startswith(f"OutputError: rank 0 could not start writing {out}: OutputError: output={out}")
    assert listing(out) == ["rank1.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
