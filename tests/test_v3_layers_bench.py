"""bench/v3_layers.py: the per-layer measurement runs on CPU at tiny dims (its layers' parameter counts equal to
the config's arithmetic), and the paper projection of DeepSeek-V3 gives the numbers worked out here by hand."""

import json
from pathlib import Path

import pytest
import torch
from support.bench import bench_module

v3_layers, vp, vs = (bench_module(name) for name in ("v3_layers", "v3_projection", "v3_shapes"))

# DeepSeek-V3 by hand (config.json: hidden 7168, 128 heads, q_lora 1536, kv_lora 512, rope 64, nope/v 128,
# FFN 18432, 256 experts of 2048, one shared expert, vocab 129280, 3 dense + 58 MoE layers)
H, S, MICRO = 7168, 2048, 1
DUP_ATTN = H * 1536 + H * 576  # q/kv down projections: whole on every TP rank
SPLIT_ATTN = 1536 * 128 * 192 + 512 * 128 * 256 + 128 * 128 * H  # q up, kv up, output projection
NORMS = 2 * H + 1536 + 512
ROUTED, SHARED, ROUTER = 256 * 3 * H * 2048, 3 * H * 2048, 256 * H
DENSE_MLP = 3 * H * 18432


@pytest.fixture(scope="module")
def measured(tmp_path_factory, mcore):
    out = tmp_path_factory.mktemp("v3") / "tiny.json"
    argv = ["measure", "--dims", "tiny", "--seq", "16", "--iters", "1", "--warmup", "0", "--stack", "1"]
    argv += ["--rounds", "2"]  # the variants in turn twice
    assert v3_layers.main(argv + ["--out", str(out)]) == 0
    return json.loads(out.read_text()) | {"out": str(out)}


@pytest.mark.slow  # builds 34 tiny layer stacks (the layer rows twice): ~30 s on 2 busy cores
def test_measure_tiny_writes_every_row_with_the_configs_counts(measured):
    assert measured["schema"] == "v3_layers/1" and measured["complete"] and measured["dims"] == "tiny"
    layer_rows = [r for r in measured["rows"] if r["kind"] in ("dense", "moe")]
    assert all(r["rounds"] == 2 and len(r["step_ms_runs"]) == 2 for r in layer_rows)  # one step per round, both kept
    rows = {(r["kind"], r["shard"], r["variant"]): r for r in measured["rows"]}
    variants = ("frozen", "nemo_official", "all_linear_r64")
    expected = [(k, "tp1ep1", v) for k in ("dense", "moe") for v in variants]
    expected += [(k, "tp2ep1", v) for k in ("dense", "moe") for v in variants] + [
        ("moe", "tp1ep2", v) for v in variants
    ]
    expected += [("head", "tp1ep1", "frozen"), ("head", "tp2ep1", "frozen")]
    expected += [("stack", "tp1ep1", v) for v in ("frozen", "nemo_official")]
    assert sorted(rows) == sorted(expected)
    for key, r in rows.items():
        assert 0 < r["fwd_ms"] <= r["step_ms"] and r["act_bytes"] > 0, key
        if r["kind"] != "head":  # Megatron's built layers against the config's arithmetic (v3_shapes)
            assert (r["base_params"], r["trainable"]) == (r["analytic_params"], r["analytic_trainable"]), key
    assert rows[("moe", "tp1ep1", "frozen")]["trainable"] == 0
    assert (
        0
        < rows[("moe", "tp1ep1", "nemo_official")]["trainable"]
        < rows[("moe", "tp1ep1", "all_linear_r64")]["trainable"]
    )
    assert rows[("moe", "tp2ep1", "frozen")]["heads"] == 2 and rows[("moe", "tp1ep2", "frozen")]["experts"] == 3
    stack = rows[("stack", "tp1ep1", "nemo_official")]
    assert stack["layers"] == 2 and stack["moe_layers"] == 1 and stack["sum_of_layers_ms"] > 0
    assert "projection" not in measured  # projected for DeepSeek-V3's dims only
    assert "| stack | tp1ep1 | nemo_official | 2 |" in Path(measured["out"]).with_suffix(".md").read_text()


def test_tp_share_runs_down_projections_on_its_sequence_shard(mcore):
    spec = v3_layers.shard_spec(v3_layers.load_spec("tiny"), 2, 1)
    assert (spec.num_heads, spec.moe_ffn_hidden_size, spec.shared_expert_ffn_hidden_size) == (2, 18, 36)
    model = v3_layers.apply_variant(v3_layers.build_stack(spec, [1], 8, torch.float32, 0), "nemo_official")
    v3_layers.sequence_parallel_down_projections(model, 2)
    seen = {}  # a pre-hook registered after the cut sees what the adapted q down projection computes on
    down = model.layers[0].self_attention.linear_q_down_proj
    down.register_forward_pre_hook(lambda m, args: seen.update(rows=args[0].shape[0]))  # None: args unchanged
    x = torch.randn(8, 1, spec.hidden_size, requires_grad=True)
    out = v3_layers.forward(model, x)
    out.sum().backward()
    assert seen["rows"] == 4 and out.shape == x.shape and x.grad.abs().sum() > 0


def test_shards_refused_with_their_reason():
    with pytest.raises(ValueError, match="not TP and EP > 1 together"):
        v3_layers.parse_shard("tp2ep8")
    assert v3_layers.parse_shard("ep32") == (1, 32) and v3_layers.parse_shard("tp8") == (8, 1)
    with pytest.raises(ValueError, match="local experts < top-k"):
        v3_layers.shard_spec(v3_layers.load_spec("tiny"), 1, 6)


def test_bad_runs_refused_before_any_layer_is_built(tmp_path):
    with pytest.raises(SystemExit, match="does not divide by TP 2"):
        v3_layers.main(["measure", "--dims", "tiny", "--seq", "15", "--out", str(tmp_path / "t.json")])
    with pytest.raises(SystemExit, match="its folder does not exist"):
        v3_layers.main(["measure", "--dims", "tiny", "--out", str(tmp_path / "no" / "t.json")])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a GPU"):
            v3_layers.main(["measure", "--out", str(tmp_path / "v3.json")])
    assert not list(tmp_path.iterdir())


def hand_table(moe: bool = True) -> list[dict]:
    """Round numbers: a dense layer 8 ms and 2 GiB kept at TP 1, an MoE layer 16 ms and 4 GiB, the TP 8 head 4 ms."""
    rows = [dict(kind="head", shard="tp8ep1", variant="frozen", step_ms=4.0, fwd_ms=1.0, act_bytes=1 << 30)]
    for kind, ms, gib in (("dense", 8.0, 2), ("moe", 16.0, 4)):
        if kind == "moe" and not moe:
            continue
        for variant in vs.VARIANTS:
            rows.append(
                dict(kind=kind, shard="tp1ep1", variant=variant, step_ms=ms, fwd_ms=ms / 4, act_bytes=gib << 30)
            )
    return rows


NO_COMM = {"nvlink_busbw_gbps": 1e30, "nvlink_alltoall_gbps": 1e30, "ib_per_gpu_gbps": 1e30}


@pytest.fixture(scope="module")
def v3():
    return v3_layers.load_spec("v3")


def test_official_layout_is_nemos_recipe_and_splits_61_layers(v3):
    lay = vs.official_layout()
    assert (lay.tp, lay.pp, lay.ep, lay.etp, lay.gpus, lay.dp) == (8, 5, 1, 8, 40, 1)
    assert (lay.global_batch, lay.micro_batch, lay.seq, lay.microbatches) == (128, 1, 2048, 128)
    assert lay.stage_layers == (13, 12, 12, 12, 12) and sum(lay.stage_layers) == v3.num_layers == 61
    assert vs.stage_kinds(v3, lay) == [{"dense": 3, "moe": 10}] + [{"dense": 0, "moe": 12}] * 4
    for alt in vs.ep_layouts(lay):
        alt.check(v3)
        assert sum(alt.stage_layers) == 61
    with pytest.raises(ValueError, match="layout bad: .*stage_layers"):
        vs.Layout("bad", 8, 5, 1, 8, 40, (13, 12, 12, 12, 11), 128, 1, 2048).check(v3)


def test_weights_per_gpu_by_hand(v3):
    moe_layer = NORMS + DUP_ATTN + SPLIT_ATTN + ROUTER + ROUTED + SHARED
    total = 3 * (NORMS + DUP_ATTN + SPLIT_ATTN + DENSE_MLP) + 58 * moe_layer + 2 * 129280 * H + H
    assert round(total / 1e9, 1) == 671.0  # DeepSeek-V3's published count without the MTP module
    proj = vp.project(hand_table(), v3, [vs.official_layout()], ["frozen"], NO_COMM)
    stages = proj["results"]["nemo_official_tp8_pp5_ep1"]["variants"]["frozen"]["stages"]
    per_moe = NORMS + DUP_ATTN + ROUTER + (SPLIT_ATTN + ROUTED + SHARED) // 8  # EP 1: experts split by ETP = TP
    assert stages[1]["weights_bf16_gib"] * 2**30 == 12 * per_moe * 2
    vocab_rows = 133120 // 8  # 129280 padded to a multiple of 1280 x 8
    assert stages[4]["weights_bf16_gib"] * 2**30 == (12 * per_moe + vocab_rows * H + H) * 2
    # over the 40 GPUs: the model once, plus 7 more copies of what TP duplicates, plus the vocabulary padding
    duplicated = 3 * (NORMS + DUP_ATTN) + 58 * (NORMS + DUP_ATTN + ROUTER) + H  # + the final norm
    everywhere = sum(8 * st["weights_bf16_gib"] * 2**30 for st in stages) / 2
    assert everywhere == total + 7 * duplicated + 2 * (133120 - 129280) * H
    assert stages[1]["weights_fp8_rowwise_gib"] < 0.52 * stages[1]["weights_bf16_gib"]


def test_activations_and_step_time_by_hand(v3):
    proj = vp.project(hand_table(), v3, [vs.official_layout()], ["frozen", "nemo_official"], NO_COMM)
    frozen = proj["results"]["nemo_official_tp8_pp5_ep1"]["variants"]["frozen"]
    first, last = frozen["stages"][0], frozen["stages"][4]
    assert first["inflight_microbatches"] == 5 and first["activations_gib"] == 5 * (3 * 2 + 10 * 4) / 8
    assert last["inflight_microbatches"] == 1 and last["head_activations_gib"] == 1.0
    t = frozen["time"]  # no communication: stage ms = layers x measured ms / 8 (+ the head on the last stage)
    assert t["stage_ms"] == [3 * 1 + 10 * 2, 24, 24, 24, 24 + 4]
    assert t["step_s"] == pytest.approx((23 + 24 * 3 + 28 + 127 * 28) / 1e3)
    assert t["bubble_fraction"] == pytest.approx(1 - 128 * 28 / (123 + 127 * 28))
    official = proj["results"]["nemo_official_tp8_pp5_ep1"]["variants"]["nemo_official"]
    r = 32  # q/kv down whole (duplicated); q up, kv up: B split by 8; output projection: A split by 8
    per_layer = r * (H + 1536) + r * (H + 576) + r * (1536 + 128 * 192 // 8) + r * (512 + 128 * 256 // 8)
    per_layer += r * (128 * 128 // 8 + H)
    assert official["stages"][1]["trainable_params"] == 12 * per_layer
    assert official["stages"][1]["lora_states_gib"] * 2**30 == 12 * per_layer * 18


def test_communication_volumes_by_hand(v3):
    official, ep8 = vs.official_layout(), vs.ep_layouts(vs.official_layout())[0]
    moe = vp.comm_per_layer(v3, official, True)
    tp_forward = S * (1536 + 512 + 64 + H) * 2 + 2 * S * H * 2  # latents + q/k rope gathered, proj; shared expert
    assert moe["tp_bytes"] == 2 * tp_forward * 7 / 8
    assert moe["etp_bytes"] == 2 * (S * 8 * H * 2 + S * 8 * H * 4) * 7 / 8  # permuted tokens in bf16, out in fp32
    assert moe["tp_ms"] == pytest.approx(moe["tp_bytes"] / 360e9 * 1e3)
    alt = vp.comm_per_layer(v3, ep8, True)
    assert alt["tp_bytes"] == alt["etp_bytes"] == 0 and alt["ep_link"] == "nvlink"
    assert alt["ep_bytes"] == 2 * 2 * S * 8 * H * 2 * 7 / 8  # dispatch + combine, forward + backward
    assert (ep8.dp, ep8.microbatches) == (8, 16)


def test_missing_measurements_are_named_not_guessed(v3):
    proj = vp.project(hand_table(moe=False), v3, [vs.official_layout()], ["nemo_official"])
    r = proj["results"]["nemo_official_tp8_pp5_ep1"]["variants"]["nemo_official"]
    assert r["time"]["step_s"] is None and "worst_bf16_gib" not in r
    assert "act moe tp1ep1 nemo_official" in r["missing"] and "missing moe tp1ep1 nemo_official" in r["missing"]
    with pytest.raises(ValueError, match="unknown assumptions"):
        vp.project(hand_table(), v3, [vs.official_layout()], ["frozen"], {"nvlink": 1})


def test_project_cli_writes_json_and_markdown(tmp_path):
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"card": "by hand", "rows": hand_table()}))
    out = tmp_path / "projection.json"
    assert v3_layers.main(["project", "--table", str(table), "--out", str(out), "--assume", "reserve_gib=6"]) == 0
    proj = json.loads(out.read_text())
    assert proj["assumptions"]["reserve_gib"]["value"] == 6
    assert set(proj["results"]) == {
        "nemo_official_tp8_pp5_ep1",
        "tp1_pp5_ep8",
        "tp1_pp5_ep8_recompute",
        "tp1_pp2_ep32_recompute",
    }
    text = out.with_suffix(".md").read_text()
    assert "per-layer table: by hand" in text and "| reserve_gib | 6 |" in text
    assert all(f"| {name} |" in text for name in vp.ASSUMPTIONS)


def test_v3_plan_and_partial_save_project_what_is_measured(v3, tmp_path):
    args = v3_layers.argparse.Namespace(
        dims="v3", shards=v3_layers.SHARDS["v3"], out=str(tmp_path / "v3.json"), variants=list(vs.VARIANTS)
    )
    shares = {shard: v3_layers.shard_spec(v3, *shard) for _, shard, _ in v3_layers.plan(args)}
    assert sorted(shares) == [(1, 1), (1, 8), (1, 32), (8, 1)]
    assert (shares[(8, 1)].num_heads, shares[(8, 1)].moe_ffn_hidden_size, shares[(8, 1)].num_experts) == (16, 256, 256)
    assert (shares[(1, 8)].num_experts, shares[(1, 8)].moe_num_groups) == (32, 8)
    assert (shares[(1, 32)].num_experts, shares[(1, 32)].moe_num_groups) == (8, 1)  # 8 groups of 1 hold 4 < top-8
    rows = hand_table() + [dict(kind="moe", shard="tp1ep8", variant="frozen", layers=1, skipped="weights too big")]
    result = {"card": "by hand", "config": "deepseek_v3", "dtype": "bfloat16", "seq": 2048, "rows": rows}
    v3_layers.save(args, result, v3)
    saved = json.loads((tmp_path / "v3.json").read_text())
    official = saved["projection"]["results"]["nemo_official_tp8_pp5_ep1"]["variants"]["nemo_official"]
    assert official["time"]["step_s"] > 0 and official["missing"] == []
    assert "| moe | tp1ep8 | frozen | 1 | - |" in (tmp_path / "v3.md").read_text()
    part = saved["summary"]
    assert part["rows"]["moe/tp1ep8/frozen"]["note"] == "weights too big" and part["card"] == "by hand"
    assert part["projection"]["nemo_official_tp8_pp5_ep1"]["nemo_official"]["step_s"] == official["time"]["step_s"]
