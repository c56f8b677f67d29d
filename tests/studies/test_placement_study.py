"""The placement study: its stability metrics, the standard-attention twin, the variants on real models,
the claim rules on constructed numbers, and the recipe end to end (tiny grid, resume, time budget)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import batch

from studies.placement import claims, metrics
from studies.placement import report as tables
from studies.placement import variants as V

ROOT = Path(__file__).resolve().parents[2]


def test_oscillation_spikes_and_divergence():
    smooth = [5 - 0.1 * i for i in range(30)]
    seesaw = [5 - 0.1 * i + (0.5 if i % 2 else 0) for i in range(30)]
    assert metrics.oscillation(smooth, warmup=5) == pytest.approx(0.0, abs=1e-12)
    assert metrics.oscillation(seesaw, warmup=5) == pytest.approx(0.5, rel=0.05)
    norms = [1.0 + 0.01 * i for i in range(40)]
    assert metrics.spikes(norms, warmup=5) == 0
    norms[25] = 20.0
    assert metrics.spikes(norms, warmup=5) == 1
    assert metrics.spikes(norms, warmup=30) == 0  # inside warm-up: not counted
    assert metrics.diverged([1.0, math.nan], 3.0, 2.0)
    assert metrics.diverged([1.0, 0.5], 3.0, 3.5)
    assert not metrics.diverged([1.0, 0.5], 3.0, 2.0)


def _row(arch, variant, scale, seed, final, osc=0.1, spikes=0, trainable=100):
    return {
        "arch": arch,
        "variant": variant,
        "lr_scale": scale,
        "seed": seed,
        "heldout_before": 5.0,
        "heldout_final": final,
        "oscillation": osc,
        "spikes": spikes,
        "diverged": False,
        "trainable": trainable,
    }


def _rows(spec):
    """spec: (arch, variant, scale) -> (final losses per seed, oscillations per seed)."""
    return [
        _row(a, v, s, i, f, o)
        for (a, v, s), (finals, oscs) in spec.items()
        for i, (f, o) in enumerate(zip(finals, oscs))
    ]


def test_claim_rules_on_constructed_results():
    spec = {}
    for s in (0.5, 1.0, 2.0):
        spec[("mla", "linear_kv_down_proj", s)] = ([2.0, 2.01], [0.50, 0.52])  # down: see-saw
        spec[("mla", "linear_kv_up_proj", s)] = ([1.50, 1.51], [0.10, 0.11])  # kv_up: best single
        spec[("mla", "linear_proj", s)] = ([1.80, 1.81], [0.10, 0.12])
        spec[("mla", "safe", s)] = ([1.20, 1.21], [0.10, 0.11])
        spec[("mla", "all_linear", s)] = ([1.20, 1.22], [0.30, 0.31])
    # MLA's nemo_official is best at 0.5x, the twin's attention at 1x
    for s, m, t in ((0.5, 1.0, 1.6), (1.0, 1.4, 1.2), (2.0, 1.9, 1.5)):
        spec[("mla", "nemo_official", s)] = ([m, m + 0.01], [0.1, 0.1])
        spec[("twin", "attention", s)] = ([t, t + 0.01], [0.1, 0.1])
    rows = _rows(spec)
    judged = {c["claim"]: c for c in claims.judge(rows, tables.aggregate(rows))}
    assert [judged[i]["verdict"] for i in (1, 2, 3, 4)] == ["supported"] * 4, judged

    # the opposite numbers contradict claims 1, 2 and 4; noise makes claim 3 not distinguishable
    for s in (0.5, 1.0, 2.0):
        spec[("mla", "linear_kv_down_proj", s)] = ([1.40, 1.41], [0.05, 0.05])
        spec[("mla", "all_linear", s)] = ([1.20, 1.22], [0.10, 0.50])
    for s, m in ((0.5, 1.9), (1.0, 1.0), (2.0, 1.4)):
        spec[("mla", "nemo_official", s)] = ([m, m + 0.01], [0.1, 0.1])
    rows = _rows(spec)
    judged = {c["claim"]: c for c in claims.judge(rows, tables.aggregate(rows))}
    assert [judged[i]["verdict"] for i in (1, 2, 3, 4)] == [
        "contradicted",
        "contradicted",
        "not distinguishable",
        "contradicted",
    ], judged
    assert "noise" in judged[4]["evidence"][0]


def test_best_lr_and_markdown_mark_the_best_scale():
    rows = [_row("mla", "safe", 1.0, 0, 1.5), _row("mla", "safe", 2.0, 0, 1.2), _row("mla", "safe", 0.5, 0, math.nan)]
    agg = tables.aggregate(rows)
    assert tables.best_lr(agg)[("mla", "safe")]["lr_scale"] == 2.0
    assert "| mla | safe | 100 | 2 | 5.000 | **1.200 ± 0.000** |" in tables.markdown(agg)


def test_twin_matches_the_mla_model_except_attention(mcore):
    from nemo_mla_lora.models.tiny import build_model, tiny_mla_config, tiny_mla_noq_config
    from studies.placement.twin import mla_attention_params, standard_attention_twin

    for make in (tiny_mla_config, tiny_mla_noq_config):
        config = make()
        mla, twin = build_model(config), build_model(standard_attention_twin(config))

        def shapes(m, attn):
            return {n: p.shape for n, p in m.named_parameters() if ("self_attention" in n) == attn}

        assert shapes(mla, False) == shapes(twin, False)  # embeddings, norms, MLP, experts, router, output
        a_mla, a_twin = (sum(s.numel() for s in shapes(m, True).values()) for m in (mla, twin))
        assert a_mla == config.num_layers * mla_attention_params(config)
        assert abs(a_twin - a_mla) / a_mla < 0.05, (a_twin, a_mla)
        tokens, positions, mask = batch()
        assert twin(tokens, positions, mask).shape == mla(tokens, positions, mask).shape


def test_lora_on_the_twins_linear_qkv_is_x_at_bt(mcore):
    """linear_qkv (standard attention, column-parallel) + LoRA == W x + (alpha/r) B A x, with B != 0."""
    from nemo_mla_lora.models.tiny import build_model, tiny_mla_config
    from nemo_mla_lora.peft import MLALoRA
    from studies.placement.twin import standard_attention_twin

    model = MLALoRA(target_modules=["linear_qkv"], dim=3, alpha=6)(
        build_model(standard_attention_twin(tiny_mla_config(torch.float64)))
    )
    wrapped = model.decoder.layers[0].self_attention.linear_qkv
    torch.nn.init.normal_(wrapped.adapter.lora_b)
    x = torch.randn(5, 2, 80, dtype=torch.float64)  # [s, b, hidden]
    a, b, w = wrapped.adapter.lora_a, wrapped.adapter.lora_b, wrapped.to_wrap.weight
    torch.testing.assert_close(wrapped(x)[0], x @ w.T + 2.0 * (x @ a.T) @ b.T, atol=1e-12, rtol=0)


def test_every_variant_applies_to_the_models_that_have_its_targets(mcore):
    from nemo_mla_lora.models.tiny import build_model, tiny_mla_config, tiny_mla_noq_config
    from nemo_mla_lora.peft import MLALoRA
    from nemo_mla_lora.peft.mla_lora import adaptable_modules
    from studies.placement.run import model_leaves
    from studies.placement.twin import standard_attention_twin

    def trainable(variant, config):
        model = MLALoRA(dim=2, alpha=2, **variant.peft)(build_model(config))
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    for config, arch, table in (
        (tiny_mla_config(), V.MLA, V.MLA_VARIANTS),
        (tiny_mla_noq_config(), V.MLA, V.MLA_VARIANTS),
        (standard_attention_twin(tiny_mla_config()), V.TWIN, V.TWIN_VARIANTS),
    ):
        present = {n.rsplit(".", 1)[-1] for n in adaptable_modules(build_model(config))}
        assert model_leaves(config, arch) == present  # what the recipe's grid assumes without building
        keep, dropped = V.available(V.lookup(list(table), arch), present)
        counts = {v.name: trainable(v, config) for v in keep}
        assert all(c > 0 for c in counts.values()), counts
        if arch == V.MLA:
            # part-selective B holds only the chosen rows: K rows (4 heads x 24) of 4 x (24 + 28); latent 40 of 48
            assert counts["kv_up_k_only"] < counts["linear_kv_up_proj"]
            assert counts["kv_down_latent_only"] == counts["linear_kv_down_proj"] - 3 * 2 * 8
        names = {v.name for v in dropped}
        if arch == V.TWIN:
            expected = set()
        else:
            expected = {"linear_q_proj"} if config.q_lora_rank else {"linear_q_down_proj", "linear_q_up_proj"}
        assert names == expected, (arch, names)


@pytest.mark.slow
def test_recipe_runs_a_small_grid_resumes_and_reports(tmp_path):
    args = [
        sys.executable,
        "-m",
        "studies.placement",
        f"output_dir={tmp_path}",
        "study.variants=[all_linear,safe,linear_kv_up_proj,linear_proj,linear_kv_down_proj,kv_up_k_only]",
        "study.twin_variants=[attention]",
        "study.lr_scales=[1.0,2.0]",
        "study.seeds=[1,2]",
        "study.steps=8",
        "study.eval_every=4",
        "optim.warmup_steps=2",
        "data.base_pretrain_steps=20",
    ]
    bases = tmp_path / "bases"  # made first, one process per base, as bench/run_gpu.sh does on two GPUs
    for arch in ("mla", "twin"):
        made = subprocess.run(
            args + [f"study.base_dir={bases}", f"study.pretrain_only={arch}"],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
        )
        assert made.returncode == 0 and (bases / f"base_{arch}.pt").is_file(), made.stderr[-3000:]
    assert not (tmp_path / "runs.jsonl").exists()
    args.append(f"study.base_dir={bases}")
    first = subprocess.run(args + ["study.time_budget_s=0.001"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "pretraining" not in first.stdout + first.stderr  # the shared bases were loaded
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 1  # the budget stops after the first run
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "runs.jsonl").read_text().splitlines()]
    keys = {(r["arch"], r["variant"], r["lr_scale"], r["seed"]) for r in records}
    assert len(records) == len(keys) == 7 * 2 * 2
    assert all(len(r["train_loss"]) == 8 and math.isfinite(r["heldout_final"]) for r in records)
    assert "28 runs" in (tmp_path / "summary.md").read_text() and "### Claim 4" in (tmp_path / "summary.md").read_text()
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 29
    for png in ("loss_curves.png", "final_vs_lr.png", "stability.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert [c["claim"] for c in json.loads((tmp_path / "claims.json").read_text())] == [1, 2, 3, 4]
    again = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)  # nothing left: reports only
    assert again.returncode == 0 and "0 runs to do (28 already" in again.stderr + again.stdout


STUDY_CONF = ROOT / "studies" / "placement" / "conf"
STUDY_GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in STUDY_CONF.iterdir() if g.is_dir()}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in STUDY_GROUPS.items() for o in opts])
def test_every_study_yaml_composes_and_validates(group, option):
    from studies.placement.config import compose

    cfg = compose([f"{group}={option}"])
    assert cfg[group] is not None


def test_placement_study_configs_compose_and_validate():
    from nemo_mla_lora.models.architecture import resolve
    from studies.placement.config import compose

    cpu = compose()
    assert cpu.study.device == "cpu" and cpu.model.name == "tiny_mla" and cpu.data.train.endswith("reverse_train.jsonl")
    assert {0.5, 0.8, 1.0, 2.0} <= set(cpu.study.lr_scales) and len(cpu.study.seeds) >= 2
    assert {"kv_up_k_only", "kv_down_latent_only", "linear_kv_up_proj"} <= set(cpu.study.variants)
    assert (cpu.peft.dim, cpu.peft.alpha) == (8, 16)
    gpu = compose(["model=mla_study_gpu", "study=gpu"])
    assert gpu.study.device == "cuda" and resolve(gpu.model).hidden_size == 1024 and gpu.study.time_budget_s


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["study.variants=[everywhere]"], "unknown mla study variants"),
        (["study.twin_variants=[nemo_official]"], "unknown twin study variants"),
        (["study.steps=5"], "must exceed optim.warmup_steps=10"),
        (["study.lr_scales=[0.0,1.0]"], "positive"),
        (["model.checkpoint=/ckpt/x"], "drop study.twin_variants"),
        (["data.base_pretrain_steps=0"], "to make a base"),
        (["study.device=tpu"], "expected 'cpu' or 'cuda'"),
        (["study.shard=2/2"], "expected 'i/n'"),
        (["study.pretrain_only=both"], "expected mla, twin or null"),
    ],
)
def test_bad_study_values_fail_validation(overrides, message):
    from studies.placement.config import compose

    with pytest.raises(ValueError, match=message):
        compose(overrides)


def test_the_old_entry_point_refuses_with_the_new_command():
    proc = subprocess.run(
        [sys.executable, "-m", "nemo_mla_lora.recipes.placement_study", "study.seeds=[1]"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 1 and "python -m studies.placement" in proc.stderr, proc.stderr
