"""Runs that must not silently do nothing, serving what the README promises, and early errors (CPU, fast).

Each case is one a user hit through ``recipes.finetune`` / ``recipes.generate``: every prompt longer than
``data.seq_length`` (held-out loss 0 -> 0, an export written), ``trainer.max_steps=0``, an ``output_dir`` that
overlaps ``model.checkpoint``, a directory given as ``data.train``, an ``hf`` export refused by generate, and
serving requests that failed late or not at all (``temperature=nan``, ``top_k`` beyond the vocabulary, JSON
booleans as token ids, a ``dump_logits`` path that is missing its folder or overwrites the export's manifest).
"""

import json
import logging
import shutil
import subprocess
import sys

import pytest
import torch
from support.hf import MAKER, hf_model

from nemo_mla_lora.config.compose import compose
from nemo_mla_lora.data.prompt_answer import DataError
from nemo_mla_lora.recipes import finetune

VARIANT = "v3_noaux_yarn_q"  # V3 sigmoid routing, YaRN, q compression


def listing(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def write_jsonl(path, prompts, answer="ok"):
    path.write_text("".join(json.dumps({"prompt": p, "answer": answer}) + "\n" for p in prompts))
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny HF base (transformers' own classes), an HF PEFT adapter on every MLA linear with B != 0 made by
    peft, and their merged ``hf`` export."""
    from peft import LoraConfig, get_peft_model

    from nemo_mla_lora.export.pipeline import export

    root = tmp_path_factory.mktemp("served")
    base = MAKER.make(VARIANT, root / "base")
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
    )
    model = get_peft_model(hf_model(base), lora)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(root / "adapter")
    report = export(base, root / "adapter", root / "hf", fmt="hf", progress=False)
    assert report["verify"]["passed"], report["verify"]
    return {"root": root, "base": base, "export": root / "hf"}


def generate_cfg(checkpoint, *overrides):
    return compose("generate", [f"checkpoint={checkpoint}", *overrides])


# ------------------------------------------------------------------ finetune: data that cannot train


def test_every_prompt_beyond_seq_length_is_refused_before_anything_is_written(tmp_path):
    """The CLI case (exit 0, "0.0000 -> 0.0000" and an export before): the embedded task's prompts are 13-17
    tokens; at data.seq_length=8 every answer is cut off. Refused naming the file, the count and the longest
    prompt, before the base is trained and before output_dir exists."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "nemo_mla_lora.recipes.finetune", f"output_dir={out}", "data.seq_length=8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert (
        "upper_train.jsonl: all 1000 examples lose their answer to data.seq_length=8 (the longest prompt is 17 tokens"
    ) in proc.stderr, proc.stderr[-3000:]
    assert "training the base model" not in proc.stderr + proc.stdout
    assert not out.exists() and listing(tmp_path) == []


def cpu_cfg(tmp_path, train, val):
    """The CPU trainer on JSONL ``train`` / ``val`` at data.seq_length=16, micro-batches of 2."""
    return compose(
        "finetune",
        [
            f"data.train={train}",
            f"data.validation={val}",
            "data.seq_length=16",
            "trainer.micro_batch_size=2",
            f"output_dir={tmp_path}/run",
        ],
    )


def test_some_prompts_beyond_seq_length_warn_with_the_count(tmp_path, caplog):
    train = write_jsonl(tmp_path / "train.jsonl", ["short"] * 4 + ["x" * 40] * 2)  # BOS + 5 / BOS + 40 tokens
    val = write_jsonl(tmp_path / "val.jsonl", ["short"] * 2)
    cfg = cpu_cfg(tmp_path, train, val)
    with caplog.at_level(logging.WARNING):
        prepared = finetune.prepare(cfg, tmp_path / "run")
    assert (
        f"{train}: 2 of 6 examples lose their answer to data.seq_length=16 (the longest prompt is 41 tokens)"
        in caplog.text
    )
    masks = [b["loss_mask"] for b in prepared["data"]["train"]]
    assert sum(int(m.sum()) for m in masks) > 0  # the others still train
    assert not (tmp_path / "run").exists()


def test_validation_set_without_answer_tokens_is_refused(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", ["short"] * 4)
    val = write_jsonl(tmp_path / "val.jsonl", ["y" * 30, "z" * 20])
    cfg = cpu_cfg(tmp_path, train, val)
    with pytest.raises(
        DataError,
        match=rf"{val}: all 2 examples lose their answer to data.seq_length=16 \(the "
        r"longest prompt is 31 tokens, the shortest 21\)",
    ):
        finetune.prepare(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def megatron_cfg(tmp_path, train, val, seq_length):
    return compose(
        "finetune",
        [
            "trainer=megatron",
            "model=deepseek_v3",
            "data.tokenizer=byte",
            "data.kind=jsonl",
            f"data.train={train}",
            f"data.validation={val}",
            f"data.seq_length={seq_length}",
            f"output_dir={tmp_path}/run",
        ],
    )


def test_megatron_jsonl_is_counted_before_nemo_gets_it(tmp_path, caplog):
    """trainer=megatron, data.kind=jsonl: NeMo keeps an answer and cuts its prompt's end, so a set of which no
    example fits is refused, and a set where some do not is warned about."""
    val = write_jsonl(tmp_path / "val.jsonl", ["short"] * 2)
    long = write_jsonl(tmp_path / "long.jsonl", ["x" * 40] * 3)
    with pytest.raises(
        DataError,
        match=rf"{long}: 3 of 3 examples are longer than data.seq_length=16 .*longest "
        r"prompt is 40 tokens.*no example would train as written",
    ):
        finetune.prepare(megatron_cfg(tmp_path, long, val, 16), tmp_path / "run")
    mixed = write_jsonl(tmp_path / "mixed.jsonl", ["short"] * 3 + ["x" * 40])
    with caplog.at_level(logging.WARNING):
        finetune.prepare(megatron_cfg(tmp_path, mixed, val, 16), tmp_path / "run")
    assert f"{mixed}: 1 of 4 examples are longer than data.seq_length=16" in caplog.text
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("trainer", ["cpu", "megatron"])
def test_directory_as_train_set_says_so(tmp_path, trainer):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "training.jsonl", ["short"] * 4)
    val = write_jsonl(tmp_path / "val.jsonl", ["short"] * 2)
    cfg = (
        megatron_cfg(tmp_path, data, val, 64)
        if trainer == "megatron"
        else compose("finetune", [f"data.train={data}", f"data.validation={val}", f"output_dir={tmp_path}/run"])
    )
    with pytest.raises(DataError, match=rf"dataset {data} is a directory; expected a JSONL file .*'training.jsonl'"):
        finetune.prepare(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ finetune: config refusals


@pytest.mark.parametrize("steps", [0, -1])
def test_max_steps_below_one_is_refused_at_validation(tmp_path, steps):
    with pytest.raises(ValueError, match=rf"trainer.max_steps={steps}; expected >= 1"):
        compose("finetune", [f"trainer.max_steps={steps}", f"output_dir={tmp_path}/run"])
    with pytest.raises(ValueError, match=r"data.base_pretrain_steps=0; expected >= 1"):
        compose("finetune", ["data.base_pretrain_steps=0", f"output_dir={tmp_path}/run"])
    assert listing(tmp_path) == []


def test_output_dir_overlapping_the_checkpoint_is_refused_before_any_work(served, tmp_path):
    base = served["base"]
    before = {p: (base / p).read_bytes() for p in listing(base) if (base / p).is_file()}
    for output in (base, base / "run", base.parent):
        with pytest.raises(
            ValueError,
            match=rf"output_dir={output} \(model.checkpoint={base}\): .*overlaps the "
            "source",
        ):
            compose("finetune", [f"model.checkpoint={base}", f"output_dir={output}"])
    assert {p: (base / p).read_bytes() for p in listing(base) if (base / p).is_file()} == before
    compose("finetune", [f"model.checkpoint={base}", f"output_dir={tmp_path}/run"])  # beside it is fine


# ------------------------------------------------------------------ generate: hf exports, request checks


def test_generate_serves_an_hf_export_as_transformers_runs_it(mcore, served, tmp_path):
    """``checkpoint=<format=hf export>`` (refused with "no mla_spec.json" before): prompt logits, every decode
    step's logits and the greedy tokens equal transformers' own forward of the same directory (fp32)."""
    from nemo_mla_lora.recipes import generate

    ids = [[1, 85, 80, 80, 70, 32, 61], [1, 99, 98]]
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    cfg = generate_cfg(
        served["export"],
        f"prompt_ids_file={tmp_path / 'ids.json'}",
        "max_new_tokens=5",
        f"dump_logits={tmp_path / 'dump.pt'}",
    )
    records = generate.run(cfg)
    assert listing(tmp_path) == ["dump.pt", "ids.json"]  # written whole: no temp file left
    merged, base = hf_model(served["export"]), hf_model(served["base"])
    for record, prompt in zip(torch.load(tmp_path / "dump.pt"), ids):
        tokens = record["tokens"]
        with torch.no_grad():
            greedy = merged.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, eos_token_id=None)[0]
            expected = merged(tokens[None]).logits[0]
            unadapted = base(tokens[None]).logits[0]
        assert torch.equal(tokens, greedy[: len(tokens)]), (tokens, greedy)
        n = len(prompt)
        torch.testing.assert_close(record["prompt_logits"], expected[:n], atol=1e-4, rtol=0)
        torch.testing.assert_close(record["logits"], expected[n - 1 : n - 1 + len(record["logits"])], atol=1e-4, rtol=0)
        assert (expected - unadapted).abs().max() > 1e-2  # the adapter (B != 0) is in what was compared
    assert all(torch.equal(r["tokens"], d["tokens"]) for r, d in zip(records, torch.load(tmp_path / "dump.pt")))


def test_generate_serves_a_plain_hf_directory_only_unchecked(mcore, served, tmp_path):
    from nemo_mla_lora.checkpoints.errors import CheckpointError
    from nemo_mla_lora.recipes import generate

    with pytest.raises(CheckpointError, match="without manifest.json .* pass verify_checksums=false"):
        generate.run(generate_cfg(served["base"], "prompt='abc'", "max_new_tokens=2"))
    record = generate.run(generate_cfg(served["base"], "prompt='abc'", "max_new_tokens=2", "verify_checksums=false"))[0]
    with torch.no_grad():
        expected = hf_model(served["base"])(record["tokens"][None]).logits[0]
    torch.testing.assert_close(record["prompt_logits"], expected[:4], atol=1e-4, rtol=0)  # BOS + 3 bytes


@pytest.fixture
def no_weights_read(monkeypatch):
    """Any weight read fails the test: the request must be refused before."""
    from nemo_mla_lora.inference.engine import AbsorbedMLAEngine

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the request was checked")

    monkeypatch.setattr(AbsorbedMLAEngine, "load", refuse)


def test_bad_requests_are_refused_before_weights_load(served, tmp_path, no_weights_read):
    from nemo_mla_lora.recipes import generate

    export = served["export"]
    vocab = json.loads((export / "config.json").read_text())["vocab_size"]
    for value in ("nan", "inf", "-inf"):
        with pytest.raises(ValueError, match=rf"temperature={value}; expected a finite number >= 0"):
            generate.run(generate_cfg(export, "prompt='abc'", f"temperature={value}"))
    with pytest.raises(ValueError, match=rf"top_k={vocab + 1}; expected 1..{vocab} \(the model's vocab_size\)"):
        generate.run(generate_cfg(export, "prompt='abc'", "temperature=1.0", f"top_k={vocab + 1}"))
    for ids, shown in (([[1, True, 5]], r"\[0\]\[1\]=True"), ([[1, 2], [3, 2.0]], r"\[1\]\[1\]=2.0")):
        (tmp_path / "ids.json").write_text(json.dumps(ids))
        with pytest.raises(ValueError, match=rf"token ids must be integers; {shown}"):
            generate.run(generate_cfg(export, f"prompt_ids_file={tmp_path / 'ids.json'}"))
    from nemo_mla_lora.recipes.generate import check_request  # the Python API path checks the same

    with pytest.raises(ValueError, match=r"token ids must be integers; \[0\]\[0\]=False"):
        check_request(generate_cfg(export), [[False]], served_spec(export))


def served_spec(directory):
    from nemo_mla_lora.inference.engine import served

    return served(directory)[1]


def test_dump_logits_path_is_checked_before_generating(served, tmp_path, no_weights_read):
    """A missing folder failed after the whole generation; a path in the export overwrote its manifest."""
    from nemo_mla_lora.recipes import generate

    export = served["export"]
    before = {p: (export / p).read_bytes() for p in listing(export) if (export / p).is_file()}
    cases = (
        (tmp_path / "missing" / "dump.pt", r"its folder .*missing does not exist"),
        (tmp_path, "is a directory; expected a file path"),
        (export / "manifest.json", rf"is inside checkpoint={export}; it would write into it"),
        (export / "new.pt", rf"is inside checkpoint={export}"),
        (export, rf"is inside checkpoint={export}"),
    )
    for path, message in cases:
        with pytest.raises(ValueError, match=message):
            generate.run(generate_cfg(export, "prompt='abc'", f"dump_logits={path}"))
    (tmp_path / "ids.json").write_text("[[1, 2]]")
    with pytest.raises(ValueError, match="is prompt_ids_file; it would overwrite it"):
        generate.run(
            generate_cfg(export, f"prompt_ids_file={tmp_path / 'ids.json'}", f"dump_logits={tmp_path / 'ids.json'}")
        )
    assert {p: (export / p).read_bytes() for p in listing(export) if (export / p).is_file()} == before
    assert listing(tmp_path) == ["ids.json"]


def test_tokenizer_hint_names_generates_key(served, tmp_path, no_weights_read):
    from nemo_mla_lora.data.tokenizer import TOKENIZER_FILES
    from nemo_mla_lora.recipes import generate

    bare = tmp_path / "bare"
    shutil.copytree(served["export"], bare, ignore=shutil.ignore_patterns(*TOKENIZER_FILES))
    with pytest.raises(ValueError, match=r"has no tokenizer files; set tokenizer=<an HF tokenizer id or path>") as err:
        generate.run(generate_cfg(bare, "prompt='abc'"))
    assert "data.tokenizer" not in str(err.value)


def test_generate_on_a_truncated_manifest_is_one_line_naming_it(served, tmp_path, no_weights_read):
    import shutil

    from nemo_mla_lora.checkpoints.errors import CheckpointError
    from nemo_mla_lora.recipes import generate

    broken = tmp_path / "export"
    shutil.copytree(served["export"], broken)
    text = (broken / "manifest.json").read_text()
    (broken / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match=rf"{broken}/manifest.json"):
        generate.run(generate_cfg(broken, "prompt='abc'", "max_new_tokens=2"))
