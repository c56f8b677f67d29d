"""Pipeline parallelism in four gloo processes (``pp_worker``), laid out as NeMo's DeepSeek-V3 LoRA recipe lays
out its 61 layers (first stage one layer more): the tiny models' 3 layers as 2 + 1, the dense layer and an MoE
layer on stage 0, an MoE layer on stage 1. PP=2 (x DP=2), PP=2 x TP=2 (+SP) and PP=2 x EP=2, through Megatron's pipeline
schedule with 3 micro-batches, against the same model in this process (PP=1), float64, for a DeepSeek-V2 variant
(no q compression, YaRN) and a DeepSeek-V3 one (q compression, tied embeddings: Megatron keeps a copy of the
word embeddings on the last stage):

- every micro-batch's loss and every adapter gradient (B != 0) equal the PP=1 run's;
- adapter checkpoints are stage-independent: the same keys (global layer numbers) saved under PP=1, PP=2 and
  PP=2 x TP=2; PP=1's loaded under PP=2 and PP=2's loaded under PP=1 give the same tensors;
- the export callback under PP=2 writes the same export, tensor for tensor, as a one-process export of the base
  and adapter saved at PP=1, and its verification passes."""

import json
from multiprocessing import forkserver
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port
from pp_worker import DTYPE, LAYOUTS, PEFT_KWARGS, adapter_tensors, build, load, micro_batches
from support.bench import bench_module
from support.hf import MAKER
from tp_worker import global_grads

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("v2_lite_greedy_yarn_noq", "v3_tied_yarn_q")
# what the four workers import: once, in the forkserver they are forked from, not four times on two cores
PRELOAD = ["pp_worker", "nemo_mla_lora.peft", "nemo_mla_lora.callbacks.export", "megatron.core.pipeline_parallel"]
CASES = [(v, lay) for v in VARIANTS for lay in LAYOUTS]
# Largest difference allowed, relative to max(1, |PP=1 value|) over a tensor: float64 throughout, but Megatron computes
# the router's scores (sigmoid: moe_utils) and attention's softmax (attention_softmax_in_fp32) in float32. PP=2
# computes what one process does in the same order: measured 0 (losses and gradients, both variants). TP=2's
# reductions round float64 sums differently, which those float32 steps can turn into a float32 rounding: measured
# losses 0 (V2) / 8.7e-8 (V3), gradients 4.4e-9 (V2) / 1.8e-8 (V3). EP=2 dispatches tokens to the other rank's
# experts and combines their outputs in another order: measured gradients 2.6e-9 (V2) / 1.1e-8 (V3).
BOUNDS = {"pp2": 1e-12, "pp2_tp2": 1e-6, "pp2_ep2": 1e-6}


def reference(directory: Path, variant: str) -> dict:
    """The tiny HF checkpoint as a one-process (PP=1) adapted model with B != 0: base and adapter saved (the
    checkpoints the workers start from), one step over the micro-batches, a one-process export."""
    from nemo_mla_lora.checkpoints import dist_ckpt
    from nemo_mla_lora.checkpoints.sources import HFBase
    from nemo_mla_lora.export.pipeline import export
    from nemo_mla_lora.models.from_spec import config_from_spec
    from nemo_mla_lora.models.tiny import build_model
    from nemo_mla_lora.peft import MLALoRA
    from nemo_mla_lora.peft.state import randomize_b

    hf = HFBase(MAKER.make(variant, directory / "hf"), dtype=DTYPE)
    model = dist_ckpt.load_weights(build_model(config_from_spec(hf.spec, DTYPE)), hf.load(hf.names), variant)
    peft = MLALoRA(**PEFT_KWARGS)
    model = peft(model).train()
    randomize_b(model)
    dist_ckpt.save_base(model, hf.spec, directory / "base")
    dist_ckpt.save_adapter(model, peft, hf.spec, directory / "adapter")
    model.zero_grad(set_to_none=True)
    losses = []
    micro = micro_batches(hf.spec.vocab_size)
    for tokens, positions, mask in micro:  # what the schedule computes: sum of micro-batch means / count
        loss = model(tokens, positions, mask, labels=tokens).mean()
        (loss / len(micro)).backward()
        losses.append(loss.detach())
    export(directory / "base", directory / "adapter", directory / "export_pp1", verify=False, progress=False)
    return {"losses": losses, "grads": global_grads(model), "tensors": adapter_tensors(model), "spec": hf.spec}


@pytest.fixture(scope="module")
def runs(mcore, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    refs = {v: reference(root / v, v) for v in VARIANTS}
    mp.get_context("forkserver").set_forkserver_preload(PRELOAD)  # workers forked from one that imported NeMo
    try:
        mp.start_processes(
            _run, args=(4, free_port(), str(root), list(VARIANTS)), nprocs=4, join=True, start_method="forkserver"
        )
    finally:
        forkserver._forkserver._stop()  # the server holds NeMo in memory: not for the rest of the session
    got = {(v, lay): torch.load(root / v / f"{lay}.pt") for v, lay in CASES}
    return root, refs, got


def _run(rank, world, port, root, variants):
    from pp_worker import worker

    worker(rank, world, port, root, variants)


@pytest.mark.slow
@pytest.mark.parametrize("variant, layout", CASES)
def test_loss_and_adapter_grads_match_pp1(runs, variant, layout):
    _, refs, got = runs
    ref, run = refs[variant], got[(variant, layout)]
    stages = {r["stage"]: r for r in run["ranks"]}
    assert stages[0]["layers"] == [0, 1] and stages[1]["layers"] == [2], stages  # the recipe's uneven split
    assert stages[0]["embedding"] and not stages[0]["output_layer"], stages[0]
    assert stages[1]["output_layer"] and not stages[1]["embedding"], stages[1]
    assert not stages[0]["losses"] and len(stages[1]["losses"]) == len(ref["losses"])
    if layout == "pp2" and ref["spec"].tie_word_embeddings:  # the last stage's copy of the word embeddings
        assert torch.equal(stages[1]["tied"], stages[0]["tied"])
    losses = torch.stack(ref["losses"])
    torch.testing.assert_close(
        torch.stack(stages[1]["losses"]),
        losses,
        rtol=0,
        atol=BOUNDS[layout] * max(1.0, losses.abs().max().item()),
        msg=lambda m: f"{variant} {layout}: micro-batch losses\n{m}",
    )
    assert set(run["grads"]) == set(ref["grads"]), sorted(set(run["grads"]) ^ set(ref["grads"]))
    assert "decoder.layers.2.self_attention.linear_proj" not in run["grads"]  # excluded by its global index
    assert "decoder.layers.0.self_attention.linear_proj" in run["grads"]  # the last stage's local layer 0 is not
    for name, (da, db) in ref["grads"].items():
        if "local_experts" not in name:  # a routed expert may get no token in these batches
            assert da.abs().sum() > 0 and db.abs().sum() > 0, name
        # PP=2 x EP=2: the stage's two data-parallel ranks are fed the same micro-batches and the dispatcher sends
        # both copies of every token to the experts, so a routed expert's gradients are twice PP=1's
        k = 2.0 if layout == "pp2_ep2" and "local_experts" in name else 1.0
        for got_g, ref_g, what in ((run["grads"][name][0], da, "dA"), (run["grads"][name][1], db, "dB")):
            bound = BOUNDS[layout] * max(1.0, k * ref_g.abs().max().item())
            torch.testing.assert_close(
                got_g, k * ref_g, atol=bound, rtol=0, msg=lambda m, t=f"{variant} {layout} {name} {what}": f"{t}\n{m}"
            )


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_adapter_checkpoints_are_stage_independent(runs, variant):
    root, refs, got = runs
    d, ref = root / variant, refs[variant]
    keys = _shapes(d / "adapter")
    assert any(".layers.2." in k for k in keys)
    for layout in LAYOUTS:  # the same keys (global layer numbers), shapes and module list whatever the layout
        saved = _shapes(d / f"adapter_{layout}")
        assert saved == keys, sorted(set(saved) ^ set(keys))
        info = json.loads((d / f"adapter_{layout}" / "adapter.json").read_text())
        assert info["modules"] == json.loads((d / "adapter" / "adapter.json").read_text())["modules"], layout
    # PP=1's checkpoint loaded under PP=2: every stage holds the tensors PP=1 saved under those names
    loaded = {}
    for rank in got[(variant, "pp2")]["ranks"]:
        loaded.update(rank["tensors"])
    assert set(loaded) == set(ref["tensors"]), sorted(set(loaded) ^ set(ref["tensors"]))
    for name, t in ref["tensors"].items():
        assert torch.equal(loaded[name], t), f"PP=1 -> PP=2: {name}"
    # PP=2's (and PP=2 x TP=2's) checkpoint loaded under PP=1
    for layout in LAYOUTS:
        model = build(ref["spec"])
        load(model, d / "base", d / f"adapter_{layout}")
        back = adapter_tensors(model)
        assert set(back) == set(ref["tensors"]), layout
        for name, t in ref["tensors"].items():
            assert torch.equal(back[name], t), f"{layout} -> PP=1: {name}"


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_export_callback_under_pp2_matches_one_process_export(runs, variant):
    from nemo_mla_lora.export.pipeline import read_export

    root, _, _ = runs
    d = root / variant
    manifest = json.loads((d / "callback_pp2" / "export" / "manifest.json").read_text())
    assert manifest["verify"]["passed"], manifest["verify"]
    one, two = read_export(d / "export_pp1", "mcore"), read_export(d / "callback_pp2" / "export", "mcore")
    assert set(one) == set(two), sorted(set(one) ^ set(two))
    for name in one:
        assert torch.equal(two[name], one[name]), f"{variant}: {name}"
    compare = bench_module("compare_exports").compare  # as the GPU runs compare
    result = compare(d / "export_pp1", d / "callback_pp2" / "export")
    assert result["identical"] == result["tensors"] == len(one) and not result["names_in_one_only"], result


def _shapes(directory) -> dict:
    """{key: global shape} of a dist-checkpoint's tensors."""
    from megatron.core import dist_checkpointing

    return {k: tuple(v.global_shape) for k, v in dist_checkpointing.load_tensors_metadata(str(directory)).items()}
