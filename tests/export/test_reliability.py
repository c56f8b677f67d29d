"""Bad input and faults: nothing lost, nothing partial, a clear error naming the problem (CPU, fast).

Each case is one a user hit: ``output=.`` deleting the working directory, an output that is a file or
overlaps its sources, a failed overwrite, a base missing a tensor, broken data files, bad serving inputs.
"""

import shutil

import pytest
from support.hf import MAKER

from nemo_mla_lora.checkpoints.errors import CheckpointError
from nemo_mla_lora.export.pipeline import VerificationError, export


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    return MAKER.make("v3_noaux_rope_noq", tmp_path_factory.mktemp("base") / "v3")


def listing(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def test_output_dot_is_refused_and_nothing_is_deleted(mcore, hf_base, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("keep me")
    monkeypatch.chdir(work)
    for output in (".", "..", str(work)):
        with pytest.raises(ValueError, match="current directory"):
            export(hf_base, None, output, fmt="hf", overwrite=True, progress=False)
    assert listing(work) == ["precious.txt"] and (work / "precious.txt").read_text() == "keep me"


def test_output_that_is_a_file_or_overlaps_a_source_is_refused(mcore, hf_base, tmp_path):
    target = tmp_path / "export"
    target.write_text("a file")
    with pytest.raises(ValueError, match="is a file"):
        export(hf_base, None, target, fmt="hf", overwrite=True, progress=False)
    assert target.read_text() == "a file" and listing(tmp_path) == ["export"]
    before = listing(hf_base)
    for output in (hf_base, hf_base / "inside", hf_base.parent):
        with pytest.raises(ValueError, match="overlaps the source"):
            export(hf_base, None, output, fmt="hf", overwrite=True, progress=False)
    assert listing(hf_base) == before


def test_failed_overwrite_keeps_the_old_export_and_leaves_nothing(mcore, hf_base, tmp_path):
    out = tmp_path / "exports" / "hf"
    export(hf_base, None, out, fmt="hf", progress=False)
    old = {p: (out / p).read_bytes() for p in listing(out) if (out / p).is_file()}
    with pytest.raises(VerificationError):  # a bound nothing meets: verification fails after writing
        export(hf_base, None, out, fmt="hf", overwrite=True, tolerance=-1.0, progress=False)
    assert {p: (out / p).read_bytes() for p in listing(out) if (out / p).is_file()} == old
    assert [p.name for p in (tmp_path / "exports").iterdir()] == ["hf"]  # no .partial / .replaced left
    export(hf_base, None, out, fmt="hf", overwrite=True, progress=False)  # a good overwrite swaps it in
    assert [p.name for p in (tmp_path / "exports").iterdir()] == ["hf"]


def test_output_is_on_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """The writers leave fsync to atomic_dir: every file and directory of the output is synced, then renamed."""
    import os

    from nemo_mla_lora.checkpoints.output_dir import atomic_dir

    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "weights").mkdir()
        (tmp / "weights" / "a.distcp").write_bytes(b"a")
        (tmp / "manifest.json").write_text("{}")
    partial = str(tmp_path / ".out.partial")
    assert set(synced) == {partial, f"{partial}/weights", f"{partial}/weights/a.distcp", f"{partial}/manifest.json"}
    assert (tmp_path / "out" / "weights" / "a.distcp").read_bytes() == b"a"


def test_failed_export_removes_the_parents_it_created(mcore, hf_base, tmp_path):
    with pytest.raises(VerificationError):
        export(hf_base, None, tmp_path / "a" / "b" / "out", fmt="mcore", tolerance=-1.0, progress=False)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("verify", [True, False])
def test_base_missing_a_tensor_is_refused_before_writing(mcore, hf_base, tmp_path, verify):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(hf_base, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.self_attn.kv_b_proj.weight"]
    tensors["model.layers.2.mlp.experts.0.up_proj.weight"] = tensors["model.layers.2.mlp.experts.0.up_proj.weight"][:-1]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError,
        match=r"missing: \['decoder.layers.1.self_attention.linear_kv_up_proj.weight'\]"
        r".*linear_fc1.weight \(64, 64\) vs \(63, 64\)",
    ):
        export(broken, None, tmp_path / "out", fmt="mcore", verify=verify, progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"prompt": "a", "answer": "b"}\n{"prompt": "c", "answer": \n', r"bad.jsonl:2: JSONDecodeError"),
        (b'{"prompt": "a", "answer": "b"}\n\n{"question": "q"}\n', r"bad.jsonl:3: ValueError: record has neither"),
        (b'{"prompt": "a", "answer": "\xff"}\n', r"bad.jsonl:1: UnicodeDecodeError"),
        (b"\n  \n", r"bad.jsonl: no records"),
    ],
)
def test_data_errors_name_file_and_line(tmp_path, content, message):
    from nemo_mla_lora.data.prompt_answer import DataError, read_jsonl

    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_jsonl(tmp_path / "bad.jsonl")


def test_data_is_checked_before_any_model_is_built(tmp_path):
    """The finetune recipe with an empty validation file fails on the data, before the model exists."""
    import subprocess
    import sys

    (tmp_path / "empty.jsonl").write_text("")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nemo_mla_lora.recipes.finetune",
            f"output_dir={tmp_path}/run",
            f"data.validation={tmp_path}/empty.jsonl",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "empty.jsonl: no records" in proc.stderr
    assert "training the base model" not in proc.stderr + proc.stdout


def test_serving_inputs_are_validated():
    from omegaconf import OmegaConf

    from nemo_mla_lora.models.architecture import builtin_spec
    from nemo_mla_lora.recipes.generate import check_request

    spec = builtin_spec("tiny_mla")
    base = dict(max_new_tokens=4, temperature=0.0, top_k=None, dtype=None)
    check_request(OmegaConf.create(base), [[1, 2, 3]], spec)
    for change, ids, message in (
        (dict(max_new_tokens=0), [[1]], "max_new_tokens=0"),
        (dict(max_new_tokens=-3), [[1]], "max_new_tokens=-3"),
        (dict(temperature=-1.0), [[1]], "temperature=-1.0"),
        (dict(top_k=0), [[1]], "top_k=0"),
        (dict(dtype="fp16"), [[1]], "dtype='fp16'"),
        ({}, [[1] * 253], "exceeds the model's max_position_embeddings 256"),
        ({}, [[1, 9999]], r"token ids \[9999\] outside"),
        ({}, [[1], []], r"prompts \[1\] have no tokens"),
    ):
        with pytest.raises(ValueError, match=message):
            check_request(OmegaConf.create(dict(base, **change)), ids, spec)


@pytest.mark.parametrize("fmt", ["absorbed", "hf"])
def test_corrupted_export_is_refused_on_read(mcore, hf_base, tmp_path, fmt):
    """8 flipped bytes in one data file: the engine / export readers and verify_export name the tensor."""
    import subprocess
    import sys

    from nemo_mla_lora.checkpoints.errors import ChecksumError
    from nemo_mla_lora.export.pipeline import read_export, verify_checksums

    out = tmp_path / fmt
    export(hf_base, None, out, fmt=fmt, progress=False)
    assert verify_checksums(out, progress=False)["tensors"] > 20
    data = sorted(out.glob("*.distcp" if fmt != "hf" else "*.safetensors"), key=lambda p: p.stat().st_size)[-1]
    raw = bytearray(data.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 8] = bytes(b ^ 0xFF for b in raw[middle : middle + 8])
    data.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match="does not match its checksum"):
        read_export(out, fmt)
    read_export(out, fmt, verify_checksums=False)  # the explicit opt-out still reads
    proc = subprocess.run(
        [sys.executable, "-m", "nemo_mla_lora.recipes.verify_export", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "does not match its checksum" in proc.stderr, proc.stderr[-2000:]


class _Payload:
    """Unpickling this runs ``touch <path>``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.path}",))


@pytest.mark.slow
@pytest.mark.parametrize("target", [".metadata", "common.pt"])
def test_crafted_checkpoint_metadata_runs_no_code(mcore, hf_base, tmp_path, target):
    import pickle
    import subprocess
    import sys

    import torch

    from nemo_mla_lora.checkpoints.safe_load import UnsafeCheckpoint
    from nemo_mla_lora.export.pipeline import read_export

    out = tmp_path / "absorbed"
    export(hf_base, None, out, fmt="absorbed", progress=False)
    marker = tmp_path / "pwned"
    if target == ".metadata":
        (out / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    else:
        torch.save({"x": _Payload(marker)}, out / "common.pt")
    with pytest.raises(UnsafeCheckpoint, match="refus"):
        read_export(out, "absorbed", verify_checksums=False)
    (tmp_path / "ids.json").write_text("[[256, 1, 2]]")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nemo_mla_lora.recipes.generate",
            f"checkpoint={out}",
            f"prompt_ids_file={tmp_path / 'ids.json'}",
            "verify_checksums=false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and ("refusing to unpickle" in proc.stderr or "weights_only" in proc.stderr), (
        proc.stderr[-2000:]
    )
    assert not marker.exists()


@pytest.mark.slow
def test_killed_export_leaves_no_process(mcore, hf_base, tmp_path):
    """SIGKILL while Megatron's checkpoint writer has its helper process up: nothing of it survives."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    args = ["-m", "nemo_mla_lora.recipes.export", f"base={hf_base}", "adapter=null", f"output={tmp_path / 'out'}"]
    with open(tmp_path / "stderr.txt", "w") as stderr:  # the child keeps its own handle
        proc = subprocess.Popen([sys.executable, *args, "format=mcore"], stdout=subprocess.DEVNULL, stderr=stderr)
    parent = psutil.Process(proc.pid)
    deadline = time.time() + 240  # until the export is writing: Megatron's helper is up since its init
    while not (tmp_path / ".out.partial").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    children = parent.children(recursive=True)
    assert children, (proc.poll(), (tmp_path / "stderr.txt").read_text()[-2000:])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(3)

    def running(c):  # a zombie or a reaped child is gone
        try:
            return c.is_running() and c.status() != psutil.STATUS_ZOMBIE
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return False

    alive = [(c.pid, c.name()) for c in children if running(c)]
    for pid, _ in alive:
        psutil.Process(pid).kill()
    assert not alive, alive
    assert not (tmp_path / "out").exists()


def test_disk_full_says_so(mcore, hf_base, tmp_path, monkeypatch):
    """Megatron/PyTorch report a full disk as 'unexpected pos ...'; the export says what happened."""
    import errno
    import shutil as sh

    from nemo_mla_lora.export import writers

    def full_disk_save(self, sharded, **kwargs):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file "
            "data/0: file write failed; unexpected pos 704 vs 598"
        )

    usage = sh.disk_usage(tmp_path)
    monkeypatch.setattr(writers.StreamingDistCkpt, "add", full_disk_save)
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage._replace(free=1 << 20))
    with pytest.raises(OSError, match="no space left") as raised:
        export(hf_base, None, tmp_path / "out", fmt="mcore", progress=False)
    assert raised.value.errno == errno.ENOSPC and "unexpected pos" in str(raised.value.__cause__)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


@pytest.mark.slow
def test_killed_and_resumed_run_ends_where_the_uninterrupted_run_ends(tmp_path):
    """SIGKILL after the step-20 checkpoint of a 30-step run, rerun the same command: the same validation
    points and the same final held-out loss as a run never interrupted."""
    import json
    import signal
    import subprocess
    import sys
    import time

    args = [
        "data.base_pretrain_steps=30",
        "trainer.max_steps=30",
        "trainer.val_check_interval=10",
        "trainer.checkpoint_every_n_steps=10",
        "trainer.limit_val_batches=2",
        "export.enabled=false",
    ]

    def run(out, kill_after_step=None):
        cmd = [sys.executable, "-m", "nemo_mla_lora.recipes.finetune", f"output_dir={out}", *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if kill_after_step is not None:
            deadline = time.time() + 300
            while not list((out / "checkpoints").glob(f"*step={kill_after_step}.ckpt")) and time.time() < deadline:
                assert proc.poll() is None, proc.stderr.read()[-2000:]
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return None
        assert proc.wait() == 0, proc.stderr.read()[-2000:]
        return json.loads((out / "summary.json").read_text())

    def validations(out):
        from nemo_mla_lora.training.metrics import read

        return [(r["step"], round(r["val_loss"], 6)) for r in read(out / "lora_metrics.jsonl") if "val_loss" in r]

    straight = run(tmp_path / "straight")
    run(tmp_path / "killed", kill_after_step=20)  # last.ckpt may still say step 10: either resumes exactly
    resumed = run(tmp_path / "killed")
    assert resumed["resumed_from"].endswith("last.ckpt")
    assert resumed["heldout_loss_after"] == pytest.approx(straight["heldout_loss_after"], abs=1e-5)
    assert [s for s, _ in validations(tmp_path / "straight")] == [10, 20, 30]
    assert validations(tmp_path / "killed")[-1] == validations(tmp_path / "straight")[-1]
