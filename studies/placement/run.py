"""Placement study: where LoRA belongs in MLA, measured (README.md beside this file reads its output).

    python -m studies.placement                                  # CPU default, minutes
    python -m studies.placement model=mla_study_gpu study=gpu    # one GPU
    python -m studies.placement study.variants=[kv_up_k_only,safe] study.seeds=[1]

Trains one base (and, for claim 4, its standard-attention twin of matched size: ``twin.py``) on
``data.base_pretrain``, then fine-tunes a copy under every (variant, LR scale, seed) of ``study`` on
``data.train`` and evaluates on ``data.validation``. Each finished run is appended to
``runs.jsonl``; a rerun with the same ``output_dir`` skips finished runs (and the saved bases), so a run cut
short by ``study.time_budget_s`` or a lost machine continues where it stopped. At the end: ``results.csv``
(one row per run), ``summary.md`` (table over seeds and the four claims judged), ``claims.json`` and plots.
"""

import json
import logging
import os
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from nemo_mla_lora.checkpoints.dist_ckpt import load_weights
from nemo_mla_lora.training.metrics import read as read_jsonl
from studies.placement.config import CONF_DIR, register, validate_study

register()
log = logging.getLogger("studies.placement")


def pretrain(model, cfg, device) -> None:
    """Full-parameter training on the generic task (the base the LoRA task was never shown)."""
    from nemo_mla_lora.data.prompt_answer import make_loader
    from studies.placement.train import train

    d = cfg.data
    loader = make_loader(d.base_pretrain, d.seq_length, d.packed, cfg.study.batch_size, True, cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    # train() ends at min_lr / lr of the peak, whatever the peak: the base's schedule has the LoRA one's shape
    losses, _ = train(model, params, loader, d.base_pretrain_lr, d.base_pretrain_steps, cfg.optim, device)
    log.info("base pretraining: train loss %.3f -> %.3f over %d steps", losses[0], losses[-1], len(losses))


def base(arch: str, cfg, out: Path, device):
    """``make_base()`` for the MLA base (from model.checkpoint, or pretrained) or its twin: a fresh frozen
    model with the base weights (pretrained bases are cached in ``out``)."""
    from nemo_mla_lora.models.from_config import nemo_model_config
    from nemo_mla_lora.models.tiny import build_model
    from studies.placement.twin import standard_attention_twin

    config = nemo_model_config(cfg.model)
    config = config if arch == "mla" else standard_attention_twin(config)
    cached = Path(cfg.study.base_dir or out) / f"base_{arch}.pt"
    if arch == "mla" and cfg.model.checkpoint:
        from nemo_mla_lora.checkpoints.sources import open_base

        source = open_base(cfg.model.checkpoint)
        state = source.load(source.names)
    elif cached.is_file():
        state = torch.load(cached, map_location=device, weights_only=True)
    else:
        log.info(
            "pretraining the %s base on %s for %d steps", arch, cfg.data.base_pretrain, cfg.data.base_pretrain_steps
        )
        torch.manual_seed(cfg.seed)
        model = build_model(config).to(device)
        pretrain(model, cfg, device)
        state = model.state_dict()
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, cached.with_suffix(".tmp"))
        os.replace(cached.with_suffix(".tmp"), cached)  # other shards wait for the whole file

    def make_base():
        model = build_model(config).to(device)
        return load_weights(model, state, f"{arch} base (model {cfg.model.name})").requires_grad_(False)

    return make_base


def model_leaves(model, arch: str) -> set:
    """The adaptable leaves a study model has, from its ``MLASpec`` or Megatron config (no model built)."""
    mlp = {"linear_fc1", "linear_fc2", "linear_proj"}
    if arch == "twin":
        return mlp | {"linear_qkv"}
    q = {"linear_q_down_proj", "linear_q_up_proj"} if model.q_lora_rank else {"linear_q_proj"}
    return mlp | q | {"linear_kv_down_proj", "linear_kv_up_proj"}


def grid(cfg) -> list[tuple]:
    """(arch, variant, lr_scale, seed) for every run of this shard ("i/n": every n-th run from the i-th),
    seed by seed: a grid cut short by its time budget has whole seeds of every variant. Variants a model
    lacks are logged and dropped."""
    from nemo_mla_lora.models.architecture import resolve
    from studies.placement import variants

    per_arch = []
    for arch, names in ((variants.MLA, cfg.study.variants), (variants.TWIN, cfg.study.twin_variants)):
        if not names:
            continue
        keep, dropped = variants.available(variants.lookup(names, arch), model_leaves(resolve(cfg.model), arch))
        if dropped:
            log.info("%s model lacks what %s need: skipped", arch, [v.name for v in dropped])
        per_arch += [(arch, v) for v in keep]
    runs = [(arch, v, s, seed) for seed in cfg.study.seeds for arch, v in per_arch for s in cfg.study.lr_scales]
    index, count = (int(x) for x in cfg.study.shard.split("/"))
    return runs[index::count]


def read_runs(path: Path) -> list[dict]:
    return read_jsonl(path) if path.is_file() else []


def run_grid(cfg, out: Path, device) -> None:
    from nemo_mla_lora.data.prompt_answer import make_loader
    from studies.placement.train import run_one

    runs_path = out / "runs.jsonl"
    done = {(r["arch"], r["variant"], r["lr_scale"], r["seed"]) for r in read_runs(runs_path)}
    todo = [r for r in grid(cfg) if (r[0], r[1].name, r[2], r[3]) not in done]
    log.info("%d runs to do (%d already in %s)", len(todo), len(done), runs_path)
    if not todo:
        return
    bases = {arch: base(arch, cfg, out, device) for arch in sorted({r[0] for r in todo})}
    d, s = cfg.data, cfg.study
    val = make_loader(d.validation, d.seq_length, d.packed, s.batch_size, False, cfg.seed)
    start = time.time()
    for i, (arch, variant, scale, seed) in enumerate(todo, 1):
        train_loader = make_loader(d.train, d.seq_length, d.packed, s.batch_size, True, seed)
        record = run_one(bases[arch], arch, variant, scale, seed, cfg, train_loader, val, device)
        with open(runs_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        log.info(
            "[%d/%d] %s %s LR x%g seed %d: held-out %.3f -> %.3f (%d trainable, %.1f s)",
            i,
            len(todo),
            arch,
            variant.name,
            scale,
            seed,
            record["heldout_before"],
            record["heldout_final"],
            record["trainable"],
            record["wall_s"],
        )
        if s.time_budget_s is not None and time.time() - start > s.time_budget_s and i < len(todo):
            log.warning("time budget %.0f s spent: %d runs left; rerun to continue", s.time_budget_s, len(todo) - i)
            return


def report(cfg, out: Path) -> list[dict]:
    from studies.placement import claims, metrics
    from studies.placement import report as tables

    records = read_runs(out / "runs.jsonl")
    rows = [metrics.summarise(r, cfg.optim.warmup_steps, cfg.study.spike_factor) for r in records]
    agg = tables.aggregate(rows)
    judged = claims.judge(rows, agg)
    tables.write_csv(rows, out / "results.csv")
    (out / "claims.json").write_text(json.dumps(judged, indent=2))
    (out / "summary.md").write_text(
        f"# Placement study: {cfg.model.name}, {len(rows)} runs\n\n{tables.markdown(agg)}\n"
        f"## The four claims\n\n{claims.markdown(judged)}"
    )
    if cfg.study.plots and rows:
        from studies.placement import plots

        plots.loss_curves(
            records, 1.0 if 1.0 in cfg.study.lr_scales else cfg.study.lr_scales[0], out / "loss_curves.png"
        )
        plots.final_vs_lr(agg, out / "final_vs_lr.png")
        plots.stability(agg, out / "stability.png")
    return judged


@hydra.main(config_path=str(CONF_DIR), config_name="placement_study", version_base=None)
def main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    validate_study(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    from nemo_mla_lora.runtime import parallel

    parallel.init_megatron(seed=cfg.seed)
    if cfg.study.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device(cfg.study.device)
    if cfg.study.pretrain_only:
        base(cfg.study.pretrain_only, cfg, out, device)
        print(f"bases in {cfg.study.base_dir or out}")
        return
    run_grid(cfg, out, device)
    for c in report(cfg, out):
        print(f"claim {c['claim']}: {c['verdict']} - {c['text']}")
    print(f"results: {(out / 'summary.md').resolve()}")
