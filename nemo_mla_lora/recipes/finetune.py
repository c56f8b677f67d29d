"""LoRA fine-tuning of an MLA model, then the merged export (``export=``: ``mcore`` by default).

    python -m nemo_mla_lora.recipes.finetune [overrides]      # tiny model on CPU, a few minutes
    python -m nemo_mla_lora.recipes.finetune model=deepseek_v3 trainer=megatron model.checkpoint=...

Steps (CPU path): compose + validate the config -> base model (restore, or train the tiny base on its
generic task) -> MLALoRA -> held-out loss before -> train -> held-out loss after -> adapter checkpoint
-> export callback (merge, absorb, write, verify) -> summary.json. trainer=megatron hands the same
model, PEFT and callback to NeMo's llm.finetune.
"""

import json
import logging
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from nemo_mla_lora.config.schema import register
from nemo_mla_lora.config.validate import validate
from nemo_mla_lora.runtime.parallel import rank as checkpoint_rank

log = logging.getLogger("nemo_mla_lora.finetune")
register()


def make_peft(cfg):
    from nemo_mla_lora.peft import MLALoRA

    p = cfg.peft
    return MLALoRA(
        placement=p.placement,
        target_modules=list(p.target_modules),
        exclude_modules=list(p.exclude_modules),
        parts=dict(p.parts),
        dim=p.dim,
        alpha=p.alpha,
        dropout=p.dropout,
    )


def export_callback(cfg, peft, spec, base_dir, out: Path):
    """The ``export`` config group as an ``MLAExportCallback`` (both trainers)."""
    from nemo_mla_lora.callbacks.export import MLAExportCallback

    e = cfg.export
    return MLAExportCallback(
        peft,
        spec,
        base_dir,
        out,
        fmt=e.format,
        fold=e.fold,
        verify=e.verify,
        verify_layers=e.verify_layers,
        tolerance=e.tolerance,
        every_checkpoint=e.every_checkpoint,
        names=e.names,
        tokenizer=nemo_context_tokenizer(cfg, spec) if e.format == "nemo" else None,
        weight_dtype=e.weight_dtype,
    )


def nemo_context_tokenizer(cfg, spec) -> str:
    """The tokenizer a ``nemo`` export's context names: the one the run trained with. The CPU trainer's is
    ``data.tokenizer`` / the checkpoint's files / bytes (``run_tokenizer``); NeMo's trainer's is ``data.tokenizer``
    (``byte``: NeMo's own ByteLevelTokenizer, nemo_data.py) or the restored checkpoint's own (its context's
    tokenizer files; refused now, not after training, when it has none)."""
    from nemo_mla_lora.data.tokenizer import for_run
    from nemo_mla_lora.export.nemo_format import export_tokenizer

    t = cfg.data.tokenizer
    if cfg.trainer.kind != "megatron":
        return for_run(t, cfg.model.checkpoint)
    if t:
        return "nemo_byte" if t == "byte" else t
    if not cfg.model.checkpoint:
        raise ValueError("export=nemo with trainer=megatron: set data.tokenizer (no checkpoint to take it from)")
    return export_tokenizer(cfg.model.checkpoint, None, spec)


def run_tokenizer(cfg, spec):
    """``data.tokenizer``, else the checkpoint's own tokenizer files, else bytes (the tiny models); must fit."""
    from nemo_mla_lora.data import tokenizer

    tok = tokenizer.load(tokenizer.for_run(cfg.data.tokenizer, cfg.model.checkpoint))
    tokenizer.check_fits(tok, spec.vocab_size, f"model {cfg.model.name}")
    return tok


def loaders(cfg, tok, start_step: int = 0) -> dict:
    """Every DataLoader the run needs, built (and so checked: file:line errors, empty sets) before any model.
    Training loaders hold exactly the run's steps; a resumed run's starts at its checkpoint's step."""
    from nemo_mla_lora.data.prompt_answer import make_loader

    d = cfg.data

    def make(path, shuffle, steps=None, start=0):
        return make_loader(
            path,
            d.seq_length,
            d.packed,
            cfg.trainer.micro_batch_size,
            shuffle,
            cfg.seed,
            tok,
            steps=steps,
            start_step=start,
        )

    out = {"train": make(d.train, True, cfg.trainer.max_steps, start_step), "validation": make(d.validation, False)}
    if d.base_pretrain and not cfg.model.checkpoint:
        out["base_train"] = make(d.base_pretrain, True, d.base_pretrain_steps)
        out["base_validation"] = make(d.base_pretrain, False)
    return out


def resume_point(cfg, out: Path) -> tuple[str | None, int]:
    """(``checkpoints/last.ckpt`` to resume from, its global step), or (None, 0). The file is read with
    torch's restricted unpickler first: Lightning unpickles it without restrictions."""
    last = out / "checkpoints" / "last.ckpt"
    if not (cfg.trainer.resume_if_exists and last.exists()):
        return None, 0
    from nemo_mla_lora.checkpoints.safe_load import check_torch_file

    return str(last), int(check_torch_file(last)["global_step"])


def base_model(cfg, out: Path, spec, data: dict):
    """Restore the base, or (tiny default) train it on the generic task and save it."""
    from nemo_mla_lora.checkpoints import dist_ckpt
    from nemo_mla_lora.models.from_config import nemo_model_config
    from nemo_mla_lora.models.tiny import build_model
    from nemo_mla_lora.training import cpu

    model = build_model(nemo_model_config(cfg.model, spec=spec))
    source = cfg.model.checkpoint or (str(out / "base") if (out / "base").exists() else None)
    if source:
        from nemo_mla_lora.checkpoints.sources import open_base

        base = open_base(source)
        dist_ckpt.load_weights(model, base.load(base.names), f"base {source} (model {cfg.model.name})")
        log.info("base restored from %s", source)
        return model, source
    if not cfg.data.base_pretrain:
        raise ValueError("no model.checkpoint given and no data.base_pretrain task to make a base from")
    log.info("training the base model on %s for %d steps", cfg.data.base_pretrain, cfg.data.base_pretrain_steps)
    module = cpu.MegatronLM(model, cfg.optim, cfg.data.base_pretrain_steps, lr=cfg.data.base_pretrain_lr)
    trainer = cpu.make_trainer(
        cfg.trainer, out / "base_training", cfg.data.base_pretrain_steps, cfg.optim.clip_grad, checkpoints=False
    )
    trainer.fit(module, data["base_train"], data["base_validation"])
    dist_ckpt.save_base(model, spec, out / "base")
    return model, str(out / "base")


def prepare_cpu(cfg, out: Path) -> dict:
    """What the CPU run reads before it writes anything: the spec, the resume point and every DataLoader (so
    a data file that cannot train is refused before ``output_dir`` is made)."""
    from nemo_mla_lora.models.architecture import resolve

    spec = resolve(cfg.model)  # the checkpoint's own config
    resume, start_step = resume_point(cfg, out)
    return {"spec": spec, "resume": resume, "data": loaders(cfg, run_tokenizer(cfg, spec), start_step)}


def prepare(cfg, out: Path) -> dict | None:
    """Every check that reads the inputs, before any output: the CPU run's data (``prepare_cpu``), or NeMo's
    JSONL files counted against ``data.seq_length`` (``nemo_data.check_jsonl``)."""
    if cfg.trainer.kind == "megatron":
        from nemo_mla_lora.training.nemo_data import check_jsonl

        check_jsonl(cfg)
        return None
    return prepare_cpu(cfg, out)


def run_cpu(cfg, out: Path, prepared: dict | None = None) -> dict:
    from nemo_mla_lora.training import cpu

    prepared = prepared or prepare_cpu(cfg, out)
    spec, resume, data = prepared["spec"], prepared["resume"], prepared["data"]
    model, base_dir = base_model(cfg, out, spec, data)
    peft = make_peft(cfg)
    model = peft(model)
    val = data["validation"]
    before = cpu.evaluate(model, val)
    log.info(
        "held-out loss before LoRA: %.4f (%s, %d trainable parameters)",
        before,
        peft.placement or "targets",
        sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    lr = cfg.optim.lr * (peft.lr_scale if cfg.peft.apply_lr_scale else 1.0)
    export_cb = export_callback(cfg, peft, spec, base_dir, out)
    from nemo_mla_lora.training.metrics import MetricsLog

    callbacks = [MetricsLog(out / "lora_metrics.jsonl")] + ([export_cb] if cfg.export.enabled else [])
    trainer = cpu.make_trainer(cfg.trainer, out, cfg.trainer.max_steps, cfg.optim.clip_grad, callbacks)
    trainer.fit(cpu.MegatronLM(model, cfg.optim, cfg.trainer.max_steps, lr=lr), data["train"], val, ckpt_path=resume)
    after = cpu.evaluate(model, val)
    log.info("held-out loss after LoRA: %.4f", after)
    result = export_cb.result or {}
    manifest = result.get("manifest") or {}
    if not cfg.export.enabled:  # still save the adapter
        from nemo_mla_lora.checkpoints import dist_ckpt

        dist_ckpt.save_adapter(model, peft, spec, out / "adapter", base_dir=base_dir, overwrite=True)
        result = {"adapter": str(out / "adapter")}
    return {
        "model": cfg.model.name,
        "placement": peft.placement,
        "target_modules": list(peft.target_modules),
        "lora_dim": peft.dim,
        "lora_alpha": peft.alpha,
        "lr": lr,
        "steps": cfg.trainer.max_steps,
        "resumed_from": resume,
        "base_checkpoint": base_dir,
        "heldout_loss_before": before,
        "heldout_loss_after": after,
        "adapter_path": result.get("adapter"),
        "export_path": result.get("export"),
        "export_format": cfg.export.format if cfg.export.enabled else None,
        "kv_cache": manifest.get("kv_cache"),
        "verify": manifest.get("verify"),
    }


def run_megatron(cfg, out: Path) -> dict:
    """NeMo's llm.finetune (base stage if no model.checkpoint, then LoRA) with the export callback."""
    from nemo_mla_lora.models.architecture import resolve
    from nemo_mla_lora.training import metrics, nemo_finetune

    peft = make_peft(cfg)
    spec = resolve(cfg.model)
    export_cb = export_callback(cfg, peft, spec, cfg.model.checkpoint, out)
    stages = nemo_finetune.run(cfg, peft, [export_cb] if cfg.export.enabled else [])
    lora = metrics.read(out / "lora_metrics.jsonl") if (out / "lora_metrics.jsonl").exists() else []
    val = [r["val_loss"] for r in lora if "val_loss" in r]
    train = [r["reduced_train_loss"] for r in lora if "reduced_train_loss" in r]
    manifest = (export_cb.result or {}).get("manifest") or {}
    return {
        "model": cfg.model.name,
        "trainer": "nemo llm.finetune + MegatronStrategy",
        "placement": peft.placement,
        "lora_dim": peft.dim,
        "steps": cfg.trainer.max_steps,
        **stages,
        "train_loss_first_last": [train[0], train[-1]] if train else None,
        "heldout_loss_first_last": [val[0], val[-1]] if val else None,
        "export_path": (export_cb.result or {}).get("export"),
        "export_format": cfg.export.format,
        "kv_cache": manifest.get("kv_cache"),
        "verify": manifest.get("verify"),
    }


@hydra.main(config_path="pkg://nemo_mla_lora.conf", config_name="finetune", version_base=None)
def main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    validate(cfg)  # before any model is built or anything is written
    start = time.time()
    out = Path(cfg.output_dir)
    prepared = prepare(cfg, out)  # the data, checked before output_dir exists
    out.mkdir(parents=True, exist_ok=True)
    if checkpoint_rank() == 0:
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    handler = logging.FileHandler(out / "finetune.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    from nemo_mla_lora.runtime import parallel

    if cfg.trainer.kind == "megatron":
        summary = run_megatron(cfg, out)
    else:
        parallel.init_megatron(seed=cfg.seed)
        summary = run_cpu(cfg, out, prepared)
    if checkpoint_rank() != 0:
        return
    summary["wall_seconds"] = round(time.time() - start, 1)
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2))
    if "heldout_loss_before" in summary:
        print(
            f"held-out loss {summary['heldout_loss_before']:.4f} -> {summary['heldout_loss_after']:.4f}; "
            f"summary: {path.resolve()}"
        )
    else:
        print(f"held-out loss (first, last validation) {summary['heldout_loss_first_last']}; summary: {path.resolve()}")


if __name__ == "__main__":
    main()
