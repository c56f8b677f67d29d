"""trainer=megatron from an HF directory (``training/hf_load.py``): the model built as NeMo's trainer builds it
(``llm.GPTModel.configure_model``), the safetensors streamed into it slice by slice, compared with the CPU
trainer's load of the same directory (``recipes.finetune.base_model``: the whole tensors through
``load_state_dict``) and with transformers' own forward; FP8 with block scales; TP=2, EP=2 and PP=2 in two gloo
processes, each rank reading only its shards; every misfit refused before a tensor is read."""

import dataclasses
import json
import re
import shutil

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port
from hf_start_worker import CASES, build, logits, overrides
from support.hf import MAKER, hf_model, prompt_tokens

from nemo_mla_lora.checkpoints.errors import CheckpointError
from nemo_mla_lora.checkpoints.sources import HFBase
from nemo_mla_lora.peft.state import base_state_dict
from nemo_mla_lora.training.hf_load import load_hf_checkpoint, plan

VARIANTS = {"v2_noq": "v2_lite_greedy_yarn_noq", "v3": "v3_noaux_yarn_q"}  # V2 without q compression; V3 with
FP8_LINEAR = re.compile(
    r"\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|"
    r"down_proj)\.weight$"
)
PEFT = dict(placement="all_linear", dim=4, alpha=8)


def fp8_copy(src, dst):
    """``src`` as DeepSeek-V3 ships: linear weights in FP8 e4m3 with 128x128 block scales (``weight_scale_inv``:
    each block's max |w| / 448), the rest as it was."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    out = {}
    for name, w in load_file(src / "model.safetensors").items():
        if not FP8_LINEAR.search(name):
            out[name] = w
            continue
        rows, cols = w.shape
        padded = torch.zeros(-(-rows // 128) * 128, -(-cols // 128) * 128)
        padded[:rows, :cols] = w.abs()
        scale = padded.view(padded.shape[0] // 128, 128, -1, 128).amax(dim=(1, 3)) / 448.0
        per_element = scale.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
        out[name] = (w / per_element).to(torch.float8_e4m3fn)
        out[name.replace(".weight", ".weight_scale_inv")] = scale
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_start")
    out = {key: MAKER.make(variant, root / key) for key, variant in VARIANTS.items()}
    out["v3_fp8"] = fp8_copy(out["v3"], root / "v3_fp8")
    return out


def cpu_trainer_model(directory, out):
    """The CPU trainer's base: ``recipes.finetune.base_model`` on the directory (whole tensors, load_state_dict)."""
    from nemo_mla_lora.config.compose import compose
    from nemo_mla_lora.models.architecture import resolve
    from nemo_mla_lora.recipes import finetune

    cfg = compose("finetune", [f"model.checkpoint={directory}", f"output_dir={out}"])
    model, source = finetune.base_model(cfg, out, resolve(cfg.model), {})
    assert source == str(directory)
    return model.eval()


def sizes(directory) -> dict:
    """HF tensor name -> its bytes on disk (headers only)."""
    base = HFBase(directory)
    return {h: st.entries[h][3] - st.entries[h][2] for st in base.opened.values() for h in st}


@pytest.mark.parametrize("which", ["v2_noq", "v3", "v3_fp8"])
def test_loads_what_the_cpu_trainer_loads(mcore, dirs, tmp_path, which):
    directory = dirs[which]
    model = build(directory)
    report = load_hf_checkpoint([model], directory)
    cpu = cpu_trainer_model(directory, tmp_path)
    tokens = prompt_tokens(262)
    got, expected = logits(model, tokens), logits(cpu, tokens)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    ours, theirs = base_state_dict(model), base_state_dict(cpu)
    assert set(ours) == set(theirs) and all(torch.equal(ours[n], theirs[n]) for n in ours)
    assert report.bytes_read == sizes(directory)  # one process: every tensor (and FP8 scale) read once, whole
    if which == "v3_fp8":  # it went through FP8: 3 mantissa bits, within a block's scale
        original = HFBase(dirs["v3"]).load(["decoder.layers.1.self_attention.linear_kv_up_proj.weight"])
        w = original["decoder.layers.1.self_attention.linear_kv_up_proj.weight"]
        loaded = ours["decoder.layers.1.self_attention.linear_kv_up_proj.weight"]
        assert 0 < (loaded - w).abs().max() < 0.07 * w.abs().max()
        return
    with torch.no_grad():
        reference = hf_model(directory)(tokens).logits
    torch.testing.assert_close(got, reference, atol=2e-5, rtol=0)


def _adapters(model) -> dict:
    return {n: p for n, p in model.named_parameters() if ".adapter." in n}


def test_adapters_wrap_the_hf_weights_and_the_export_reads_the_hf_base(mcore, dirs, tmp_path):
    """Loaded then wrapped (what NeMo's trainer does), wrapped then loaded (into ``to_wrap``), and the CPU trainer's
    base wrapped, with the same adapters (B != 0): the same logits. The export callback at train end reads the HF
    directory as the base and records it as the export's source."""
    from nemo_mla_lora.arch.mla_spec import MLASpec
    from nemo_mla_lora.callbacks.export import MLAExportCallback
    from nemo_mla_lora.peft import MLALoRA
    from nemo_mla_lora.peft.state import randomize_b

    directory, tokens = dirs["v3"], prompt_tokens(262)
    first = build(directory)
    load_hf_checkpoint([first], directory)
    base_logits = logits(first, tokens)
    first = MLALoRA(**PEFT)(first)
    randomize_b(first, seed=3)
    wrapped_then_loaded = MLALoRA(**PEFT)(build(directory))
    cpu = MLALoRA(**PEFT)(cpu_trainer_model(directory, tmp_path))
    for other in (wrapped_then_loaded, cpu):
        with torch.no_grad():
            for name, p in _adapters(other).items():
                p.copy_(_adapters(first)[name])
    report = load_hf_checkpoint([wrapped_then_loaded], directory)
    assert any(".to_wrap." in name for name, _ in wrapped_then_loaded.named_parameters())
    assert not any(".adapter." in p.key for p in report.pieces)
    adapted = logits(first, tokens)
    assert (adapted - base_logits).abs().max() > 1e-2
    torch.testing.assert_close(logits(wrapped_then_loaded, tokens), adapted, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(cpu, tokens), adapted, atol=1e-6, rtol=0)

    holder = torch.nn.Module()
    holder.model = first
    callback = MLAExportCallback(MLALoRA(**PEFT), MLASpec.from_megatron(first.config), directory, tmp_path / "run")
    callback.run(holder, "")
    manifest = json.loads((tmp_path / "run" / "export" / "manifest.json").read_text())
    assert manifest["verify"]["passed"] and manifest["source"]["base"]["path"] == str(directory)
    assert json.loads((tmp_path / "run" / "adapter" / "adapter.json").read_text())["base_checkpoint"] == str(directory)
    assert not (tmp_path / "run" / "base").exists()  # the HF directory is the base: nothing saved from the model


def test_finetune_arguments_stream_the_hf_directory_with_its_tokenizer(dirs, tmp_path, monkeypatch):
    """``nemo_finetune.build`` on an HF directory: no RestoreConfig, the loader callback first, the directory's own
    tokenizer files (NeMo's ``AutoTokenizer``) for the model and the data (validation accepted the directory)."""
    from transformers import AutoTokenizer

    from nemo_mla_lora.config.compose import compose
    from nemo_mla_lora.recipes.finetune import make_peft
    from nemo_mla_lora.training import nemo_finetune
    from nemo_mla_lora.training.hf_load import HFBaseLoad

    monkeypatch.setattr(nemo_finetune, "trainer", lambda cfg, steps, callbacks: {"callbacks": callbacks})
    cfg = compose("finetune", overrides(dirs["v3"]) + ["data=cpu", f"output_dir={tmp_path}"])
    args = nemo_finetune.build(cfg, make_peft(cfg))
    assert args["resume"].restore_config is None and type(args["peft"]).__name__ == "MLALoRA"
    first = args["trainer"]["callbacks"][0]
    assert isinstance(first, HFBaseLoad) and first.directory == dirs["v3"]
    text = "upper: abc = ABC"
    expected = AutoTokenizer.from_pretrained(dirs["v3"]).encode(text, add_special_tokens=False)
    assert args["model"].tokenizer.text_to_ids(text) == expected and args["data"].tokenizer is args["model"].tokenizer


def test_the_callback_loads_nemo_s_model_and_records_the_base_for_resume(mcore, dirs, tmp_path):
    """``HFBaseLoad.on_fit_start`` on NeMo's own objects as ``MegatronStrategy.setup`` leaves them (NeMo's trainer
    needs CUDA; its strategy is stood for by the two attributes the callback reads): ``MegatronParallel`` over the
    ``llm.GPTModel`` LightningModule, and PEFT's ``WrappedAdapterIO``, which then names the HF directory as the base
    of the adapter checkpoints it writes and keeps a resumed run from reading a base from it."""
    from types import SimpleNamespace

    from nemo.lightning.io.pl import MegatronCheckpointIO
    from nemo.lightning.megatron_parallel import MegatronParallel
    from nemo.lightning.pytorch.callbacks.peft import WrappedAdapterIO

    from nemo_mla_lora.config.compose import compose
    from nemo_mla_lora.training import nemo_finetune
    from nemo_mla_lora.training.hf_load import HFBaseLoad

    directory = dirs["v3"]
    lightning = nemo_finetune.lightning_model(compose("finetune", overrides(directory)))
    lightning.configure_model()
    io = WrappedAdapterIO(MegatronCheckpointIO(save_ckpt_format="torch_dist"))
    strategy = SimpleNamespace(megatron_parallel=MegatronParallel(lightning, cpu=True), _checkpoint_io=io)
    callback = HFBaseLoad(directory)
    callback.on_fit_start(SimpleNamespace(strategy=strategy, global_rank=0), lightning)
    expected = base_state_dict(cpu_trainer_model(directory, tmp_path))
    assert all(torch.equal(t, expected[n]) for n, t in base_state_dict(lightning.module).items())
    assert len(callback.report.pieces) > 0 and io.model_ckpt_path == directory
    assert "load_checkpoint" in vars(io)  # the resume path (needs CUDA in NeMo's loader) is the bench's to run


def _misbuilt(directory, **changes):
    """The model trainer=megatron would build if the directory's config said ``changes``."""
    from nemo_mla_lora.config.compose import compose
    from nemo_mla_lora.models.architecture import resolve
    from nemo_mla_lora.models.from_config import nemo_model_config
    from nemo_mla_lora.models.tiny import build_model

    cfg = compose("finetune", overrides(directory))
    spec = dataclasses.replace(resolve(cfg.model), **changes)
    return build_model(nemo_model_config(cfg.model, cfg.trainer, spec=spec))


def test_a_directory_that_does_not_fit_is_refused_before_any_read(mcore, dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    directory = dirs["v3"]
    cases = [
        (dict(tie_word_embeddings=True), r"1 HF tensors no rank loads: \['output_layer.weight'\]"),
        (
            dict(vocab_size=264),
            r"2 shapes \(model, HF\): \['embedding.word_embeddings.weight \(264, 64\) vs "
            r"\(262, 64\)', 'output_layer.weight \(264, 64\) vs \(262, 64\)'\]$",
        ),
        (
            dict(num_layers=4, moe_layer_pattern=(0, 1, 1, 1)),  # every tensor of layer 3, nothing else
            r"does not fit the model: 29 model tensors with no HF tensor: "
            r"\['decoder.layers.3.input_layernorm.weight [^;]*$",
        ),
    ]
    for changes, message in cases:  # load_hf_checkpoint names the config fields first; plan names the tensors
        model = _misbuilt(directory, **changes)
        before = {n: t.clone() for n, t in base_state_dict(model).items()}
        with pytest.raises(CheckpointError, match=f"built from another config .* differ in .*'{next(iter(changes))}'"):
            load_hf_checkpoint([model], directory)
        with pytest.raises(CheckpointError, match=message):
            plan([model], HFBase(directory))
        assert all(torch.equal(t, before[n]) for n, t in base_state_dict(model).items())  # nothing was copied in
    with pytest.raises(CheckpointError, match=r"differ in \{'rope_base': \(20000.0, 10000.0\)\}"):  # same shapes
        load_hf_checkpoint([_misbuilt(directory, rope_base=20000.0)], directory)
    model = build(directory)  # a layer spec whose sharded state dict left a tensor out
    full = model.sharded_state_dict
    model.sharded_state_dict = lambda: {k: v for k, v in full().items() if k != "decoder.final_layernorm.weight"}
    with pytest.raises(
        CheckpointError,
        match=r"1 model tensors not filled exactly once: \['decoder.final_layernorm"
        r".weight \(0 of 64 elements\)'\]; 1 HF tensors no rank loads",
    ):
        load_hf_checkpoint([model], directory)
    shutil.copytree(directory, tmp_path / "short")
    state = load_file(directory / "model.safetensors")
    del state["model.layers.2.self_attn.kv_b_proj.weight"]
    save_file(state, tmp_path / "short" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"1 missing: \['decoder.layers.2.self_attention.linear_kv_up_proj"):
        load_hf_checkpoint([build(directory)], tmp_path / "short")


@pytest.mark.slow
def test_tp2_ep2_pp2_ranks_read_and_load_only_their_shards(mcore, dirs, tmp_path):
    tokens = prompt_tokens(262)
    torch.save(tokens, tmp_path / "tokens.pt")
    reference = {}
    for which in {w for layout, w in CASES if layout != "pp2"}:
        model = build(dirs[which])
        load_hf_checkpoint([model], dirs[which])
        reference[which] = logits(model, tokens)
    mp.spawn(
        _run,
        args=(2, free_port(), {k: str(v) for k, v in dirs.items()}, str(tmp_path / "tokens.pt"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    for layout, which in CASES:
        ranks = [torch.load(tmp_path / f"{layout}_{which}_rank{r}.pt") for r in (0, 1)]
        for rank, got in enumerate(ranks):  # every slice bit for bit the slice of the whole tensor
            assert got["mismatched"] == [], (layout, which, rank, got["mismatched"][:5])
            if got["logits"] is not None:  # fp32; SDPA's CPU kernel blocks by heads per rank (test_tensor_parallel)
                torch.testing.assert_close(
                    got["logits"],
                    reference[which],
                    atol=5e-6,
                    rtol=0,
                    msg=lambda m, c=f"{layout} {which} rank {rank}": f"{c}\n{m}",
                )
        _check_reads(layout, sizes(dirs[which]), [r["bytes_read"] for r in ranks])


# TP-sharded on the local spec (its q/kv down projections are column-parallel; the TE spec duplicates them)
TP_SHARDED = re.compile(
    r"embed_tokens|lm_head|q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|"
    r"up_proj|down_proj"
)
LAYER = re.compile(r"^model\.layers\.(\d+)\.")
EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")


def _check_reads(layout, size, reads):
    """What each of the two ranks read: TP=2 half of every sharded weight (rows or columns) and whole replicated
    ones; EP=2 only its own half of the routed experts; PP=2 only its stage's layers."""
    experts = 1 + max((int(m.group(1)) for m in map(EXPERT.search, size) if m), default=0)
    for h, full in size.items():
        got = [r.get(h, 0) for r in reads]
        if layout == "tp2":
            sharded = TP_SHARDED.search(h) and not h.endswith("_scale_inv")  # each rank reads the block scales
            assert got == ([full // 2] * 2 if sharded else [full] * 2), (h, got, full)
        elif layout == "ep2":
            expert = EXPERT.search(h)
            owner = None if expert is None else int(expert.group(1)) // (experts // 2)
            assert got == ([full, full] if owner is None else [full * (r == owner) for r in (0, 1)]), (h, got)
        else:
            layer = LAYER.match(h)
            stage = (1 if int(layer.group(1)) >= 1 else 0) if layer else (0 if "embed_tokens" in h else 1)
            assert got == [full * (r == stage) for r in (0, 1)], (h, got)
    total = sum(size.values())
    assert all(sum(r.values()) < (0.65 if layout == "tp2" else 0.8) * total for r in reads), layout


def _run(rank, world, port, dirs, tokens_path, out_dir):
    from hf_start_worker import worker

    worker(rank, world, port, dirs, tokens_path, out_dir)


def test_parameters_held_in_fp8_load_through_one_parameter_copy_at_a_time(mcore, dirs, monkeypatch):
    """Parameters TE holds in FP8 (``fp8_param``; here: every linear weight, marked as such) are filled through a
    high-precision copy of one parameter at a time, the pieces' views (the gated fc1's [gate; up] halves included)
    laid on it, then copied in; the model ends equal to the plain load. (TE's own quantizing copy runs on the GPU.)"""
    from nemo_mla_lora.training import hf_load

    directory = dirs["v3"]
    plain = build(directory)
    load_hf_checkpoint([plain], directory)
    model = build(directory)
    marked = {id(p) for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2 and "linear" in n}
    monkeypatch.setattr(hf_load, "is_quantized", lambda t: id(t) in marked)
    stages = []
    real_empty = torch.empty

    def counting_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if kwargs.get("device") is not None and str(kwargs["device"]) != "meta":
            stages.append(t.shape)
        return t

    monkeypatch.setattr(hf_load.torch, "empty", counting_empty)
    report = load_hf_checkpoint([model], directory)
    held = [p for p in report.pieces if p.owner is not None]
    assert {id(p.owner) for p in held} == marked and all(p.target.device.type == "meta" for p in held)
    assert any(p.name.endswith("mlp.linear_fc1.weight") and p.index[0].start > 0 for p in held)  # a half of fc1
    assert len(stages) == len(marked)  # one copy per parameter
    ours, theirs = base_state_dict(model), base_state_dict(plain)
    assert set(ours) == set(theirs) and all(torch.equal(ours[n], theirs[n]) for n in ours)
