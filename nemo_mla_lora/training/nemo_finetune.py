"""The GPU path: NeMo's ``llm.finetune`` with ``MegatronStrategy`` (TP/PP/EP/CP/SP from the config).

``build(cfg)`` returns the keyword arguments of ``llm.finetune`` (model, data, trainer, optim, peft,
log, resume) so they can be inspected, tested against the official recipe, and run by ``run(cfg)``.
Constructing the trainer needs no GPU; fitting does. Not yet run on a GPU (see the GPU issue): the
tokenizer comes from the restored base checkpoint's NeMo context, which ``model.checkpoint`` must provide.
"""

from nemo_mla_lora.models.from_config import nemo_model_config


def optimizer(cfg):
    from megatron.core.optimizer import OptimizerConfig
    from nemo import lightning as nl
    from nemo.lightning.pytorch.optim import CosineAnnealingScheduler

    o = cfg.optim
    opt_config = OptimizerConfig(
        optimizer=o.name, lr=o.lr, min_lr=o.min_lr, adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps, weight_decay=o.weight_decay, clip_grad=o.clip_grad, bf16="bf16" in cfg.trainer.precision,
        use_distributed_optimizer=cfg.trainer.use_distributed_optimizer,
    )
    scheduler = CosineAnnealingScheduler(max_steps=cfg.trainer.max_steps, warmup_steps=o.warmup_steps,
                                         constant_steps=0, min_lr=o.min_lr)
    return nl.MegatronOptimizerModule(config=opt_config, lr_scheduler=scheduler)


def strategy(cfg):
    from nemo import lightning as nl

    t = cfg.trainer
    return nl.MegatronStrategy(
        tensor_model_parallel_size=t.tensor_parallel, pipeline_model_parallel_size=t.pipeline_parallel,
        expert_model_parallel_size=t.expert_parallel, context_parallel_size=t.context_parallel,
        sequence_parallel=t.sequence_parallel, gradient_as_bucket_view=True, ckpt_async_save=False,
        ckpt_load_strictness="log_all",
    )


def data(cfg):
    from nemo.collections import llm

    t, d = cfg.trainer, cfg.data
    if d.kind == "squad":
        return llm.SquadDataModule(seq_length=d.seq_length, micro_batch_size=t.micro_batch_size,
                                   global_batch_size=t.global_batch_size, packed_sequence_specs=None)
    # NeMo's FineTuningDataModule reads <root>/training.jsonl and validation.jsonl ({"input", "output"}).
    from nemo.collections.llm.gpt.data.fine_tuning import FineTuningDataModule
    return FineTuningDataModule(dataset_root=str(d.train), seq_length=d.seq_length,
                                micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size)


def build(cfg, peft, callbacks=()) -> dict:
    from nemo import lightning as nl
    from nemo.collections import llm

    t = cfg.trainer
    trainer = nl.Trainer(
        devices=t.devices, num_nodes=t.num_nodes, accelerator="gpu", strategy=strategy(cfg), max_steps=t.max_steps,
        val_check_interval=t.val_check_interval, limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps, plugins=nl.MegatronMixedPrecision(precision=t.precision),
        callbacks=list(callbacks),
    )
    resume = nl.AutoResume(resume_if_exists=t.resume_if_exists, resume_ignore_no_checkpoint=True,
                           restore_config=nl.RestoreConfig(path=cfg.model.checkpoint) if cfg.model.checkpoint else None)
    log = nl.NeMoLogger(log_dir=cfg.output_dir, ckpt=nl.ModelCheckpoint(every_n_train_steps=t.checkpoint_every_n_steps,
                                                                         save_last=True))
    model = llm.GPTModel(nemo_model_config(cfg.model, t))
    return dict(model=model, data=data(cfg), trainer=trainer, optim=optimizer(cfg), peft=peft, log=log, resume=resume)


def run(cfg, peft, callbacks=()):
    from nemo.collections import llm

    return llm.finetune(**build(cfg, peft, callbacks))
