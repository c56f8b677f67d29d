"""The GPU path: NeMo's ``llm.finetune`` with ``MegatronStrategy`` (TP/PP/EP/CP/SP from the config).

``build(cfg, peft, ...)`` returns the keyword arguments of ``llm.finetune`` (model, data, trainer, optim,
peft, log, resume) so they can be inspected and tested against the official recipe; ``run`` fits them.
Constructing the arguments needs no GPU; fitting does.

Base weights come from ``model.checkpoint``: an HF directory is streamed into the sharded model when fitting
starts (``hf_load.HFBaseLoad``: each rank reads only its slices, no NeMo checkpoint is written), its tokenizer
files are the run's unless ``data.tokenizer`` says otherwise; a NeMo checkpoint is restored through NeMo's
``RestoreConfig``. Without either, ``data.base_pretrain`` makes the base first: a full-parameter ``llm.finetune``
(``peft=None``) on that task, whose last checkpoint the LoRA stage restores.
"""

import logging
from pathlib import Path

from nemo_mla_lora.checkpoints.kind import checkpoint_kind
from nemo_mla_lora.models.from_config import nemo_model_config
from nemo_mla_lora.training.metrics import MetricsLog
from nemo_mla_lora.training.nemo_data import data_module, make_tokenizer

log = logging.getLogger(__name__)


def optimizer(cfg, lr: float, max_steps: int):
    from megatron.core.optimizer import OptimizerConfig
    from nemo import lightning as nl
    from nemo.lightning.pytorch.optim import CosineAnnealingScheduler

    o = cfg.optim
    opt_config = OptimizerConfig(
        optimizer=o.name,
        lr=lr,
        min_lr=o.min_lr,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        weight_decay=o.weight_decay,
        clip_grad=o.clip_grad,
        bf16="bf16" in cfg.trainer.precision,
        use_distributed_optimizer=cfg.trainer.use_distributed_optimizer,
    )
    scheduler = CosineAnnealingScheduler(
        max_steps=max_steps, warmup_steps=min(o.warmup_steps, max_steps // 4), constant_steps=0, min_lr=o.min_lr
    )
    return nl.MegatronOptimizerModule(config=opt_config, lr_scheduler=scheduler)


def strategy(cfg):
    from nemo import lightning as nl

    t = cfg.trainer
    return nl.MegatronStrategy(
        tensor_model_parallel_size=t.tensor_parallel,
        pipeline_model_parallel_size=t.pipeline_parallel,
        expert_model_parallel_size=t.expert_parallel,
        context_parallel_size=t.context_parallel,
        sequence_parallel=t.sequence_parallel,
        gradient_as_bucket_view=True,
        ckpt_async_save=False,
        ckpt_load_strictness="log_all",
        # megatron-core 0.15.3's fully-parallel save and load call np.product (gone in NumPy 2): they fail at
        # the first checkpoint under TP=2, and at the LoRA stage's restore of the base under EP=2 (two
        # data-parallel replicas). Each rank still writes and reads its own shards.
        ckpt_parallel_save=False,
        ckpt_parallel_load=False,
    )


FP8_FORMATS = {"blockwise": "e4m3", "tensorwise": "hybrid", "delayed": "hybrid"}  # TE's formats per recipe


def precision_plugin(cfg):
    """NeMo's ``MegatronMixedPrecision`` for the run: ``trainer.precision``, and with ``model.fp8`` Transformer
    Engine's FP8 recipe for the frozen linears (Megatron enters TE's autocast per layer and, with
    ``model.fp8_param``, builds the layers' weights in FP8); refused where Transformer Engine does not import."""
    from nemo import lightning as nl

    m, t = cfg.model, cfg.trainer
    if m.get("fp8") is None:
        return nl.MegatronMixedPrecision(precision=t.precision)
    from nemo_mla_lora.runtime.te_compat import transformer_engine_absent

    if transformer_engine_absent():
        raise RuntimeError(
            f"model.fp8={m.fp8!r} runs on Transformer Engine's layers, and transformer_engine does not import here: "
            "install it (NeMo's containers have it) or set model.fp8=null"
        )
    return nl.MegatronMixedPrecision(
        precision=t.precision, fp8=FP8_FORMATS[m.fp8], fp8_recipe=m.fp8, fp8_param_gather=bool(m.fp8_param)
    )


def trainer(cfg, max_steps: int, callbacks):
    from nemo import lightning as nl

    t = cfg.trainer
    return nl.Trainer(
        devices=t.devices,
        num_nodes=t.num_nodes,
        accelerator="gpu",
        strategy=strategy(cfg),
        max_steps=max_steps,
        val_check_interval=t.val_check_interval,
        limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps,
        plugins=precision_plugin(cfg),
        callbacks=list(callbacks),
        num_sanity_val_steps=0,
    )


def lightning_model(cfg, tokenizer=None):
    """NeMo's ``llm.GPTModel`` for the run (its ``configure_model()`` builds the Megatron-Core model under the
    parallel layout in force: what the strategy calls, and what tests call on CPU)."""
    from nemo.collections import llm

    return llm.GPTModel(nemo_model_config(cfg.model, cfg.trainer), tokenizer=tokenizer)


def build(cfg, peft, callbacks=(), stage: str = "lora", restore: str | None = None) -> dict:
    """``llm.finetune`` arguments for one stage: ``lora`` (``peft`` on the base: an HF directory streamed in by
    ``HFBaseLoad``, or a NeMo checkpoint restored by ``RestoreConfig``) or ``base`` (full-parameter training of the
    base on ``data.base_pretrain``)."""
    from nemo import lightning as nl

    from nemo_mla_lora.training.garbage import gc_callbacks
    from nemo_mla_lora.training.hf_load import HFBaseLoad

    t, d, out = cfg.trainer, cfg.data, Path(cfg.output_dir)
    base = stage == "base"
    restore = None if base else restore or cfg.model.checkpoint
    hf = restore is not None and Path(restore).exists() and checkpoint_kind(restore) == "hf"
    tokenizer = make_tokenizer(d.tokenizer or (restore if hf else None))
    steps = d.base_pretrain_steps if base else t.max_steps
    lr = d.base_pretrain_lr if base else cfg.optim.lr * (peft.lr_scale if cfg.peft.apply_lr_scale else 1.0)
    train, validation = (d.base_pretrain, d.base_pretrain) if base else (d.train, d.validation)
    resume = nl.AutoResume(
        resume_if_exists=t.resume_if_exists,
        resume_ignore_no_checkpoint=True,
        restore_config=nl.RestoreConfig(path=restore, load_artifacts=tokenizer is None) if restore and not hf else None,
    )
    logger = nl.NeMoLogger(
        explicit_log_dir=str(out / f"{stage}_training"),
        ckpt=nl.ModelCheckpoint(every_n_train_steps=t.checkpoint_every_n_steps, save_last=True, save_top_k=1),
    )
    metrics = MetricsLog(out / f"{stage}_metrics.jsonl")
    loaders = [HFBaseLoad(restore)] if hf else []
    return dict(
        model=lightning_model(cfg, tokenizer),
        data=data_module(cfg, tokenizer, train, validation, out / "nemo_data" / stage),
        trainer=trainer(cfg, steps, [*loaders, metrics, *callbacks, *gc_callbacks(t)]),
        optim=optimizer(cfg, lr, steps),
        peft=None if base else peft,
        log=logger,
        resume=resume,
    )


def last_checkpoint(log_dir) -> str:
    """The newest NeMo checkpoint (a directory holding ``weights/``) under ``log_dir``."""
    found = sorted((p.parent for p in Path(log_dir).rglob("weights") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no NeMo checkpoint (a directory with weights/) under {log_dir}")
    return str(found[-1])


def run(cfg, peft, callbacks=()) -> dict:
    """Base stage if needed, then the LoRA stage; returns the paths of both stages' outputs."""
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from nemo.collections import llm

    from nemo_mla_lora.runtime.processes import install_checkpoint_queue

    install_checkpoint_queue()  # Megatron's checkpoint writer's helper process dies with this one
    out, restore = Path(cfg.output_dir), None
    if not cfg.model.checkpoint:
        if not cfg.data.base_pretrain:
            raise ValueError(
                "trainer=megatron needs model.checkpoint (an HF directory or a NeMo checkpoint) or data.base_pretrain"
            )
        log.info("no model.checkpoint: training the base on %s", cfg.data.base_pretrain)
        llm.finetune(**build(cfg, peft, stage="base"))
        destroy_num_microbatches_calculator()  # the LoRA stage sets its own batch sizes
        restore = last_checkpoint(out / "base_training")
        log.info("base checkpoint: %s", restore)
    llm.finetune(**build(cfg, peft, callbacks, stage="lora", restore=restore))
    return {"base_checkpoint": restore or cfg.model.checkpoint, "lora_log": str(out / "lora_training")}
