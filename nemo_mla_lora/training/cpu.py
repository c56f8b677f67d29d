"""The CPU path: a plain Lightning trainer over the same Megatron-Core GPTModel NeMo would train.

NeMo's trainer (MegatronStrategy) needs CUDA; this drives the identical module with Lightning's CPU
accelerator: masked next-token loss, AdamW with warmup + cosine, gradient clipping, validation loss.
"""

import math

import lightning as L
import torch


def causal_mask(seq: int, device=None) -> torch.Tensor:
    return torch.ones(1, 1, seq, seq, dtype=torch.bool, device=device).triu(1)  # True = masked


def masked_loss(model, batch) -> torch.Tensor:
    """Mean next-token loss over loss_mask (the answer tokens)."""
    tokens, labels, mask = batch["tokens"], batch["labels"], batch["loss_mask"]
    b, s = tokens.shape
    positions = torch.arange(s, device=tokens.device).expand(b, s)
    per_token = model(tokens, positions, causal_mask(s, tokens.device), labels=labels)  # [b, s]
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def lr_lambda(warmup: int, max_steps: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def adamw(params, optim_cfg, lr: float, max_steps: int, min_ratio: float):
    """AdamW with the config's betas/eps/weight decay, and its warm-up + cosine schedule down to
    ``min_ratio`` x ``lr``: (optimizer, per-step LambdaLR)."""
    o = optim_cfg
    opt = torch.optim.AdamW(
        params, lr=lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, weight_decay=o.weight_decay
    )
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o.warmup_steps, max_steps, min_ratio))


class MegatronLM(L.LightningModule):
    """A Megatron-Core GPTModel as a LightningModule (only parameters with requires_grad train)."""

    def __init__(self, model, optim_cfg, max_steps: int, lr: float | None = None):
        super().__init__()
        self.model, self.optim_cfg, self.max_steps = model, optim_cfg, max_steps
        self.lr = lr if lr is not None else optim_cfg.lr

    def training_step(self, batch, batch_idx):
        loss = masked_loss(self.model, batch)
        self.log("train_loss", loss, prog_bar=True, on_step=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", masked_loss(self.model, batch), prog_bar=True, on_epoch=True)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt, sched = adamw(
            params, self.optim_cfg, self.lr, self.max_steps, self.optim_cfg.min_lr / self.lr if self.lr else 0.0
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, loader, limit: int | None = None, device=None) -> float:
    """Token-weighted mean masked loss over ``loader`` (batches moved to ``device`` if given)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        batch = to_device(batch, device) if device is not None else batch
        n = batch["loss_mask"].sum().item()
        total += masked_loss(model, batch).item() * n
        count += n
    model.train(was_training)
    if not count:
        raise ValueError(
            "evaluate: no answer tokens in the held-out batches (loss_mask is 0 everywhere); a loss of 0 "
            "would mean nothing"
        )
    return total / count


def make_trainer(
    trainer_cfg, root_dir, max_steps: int, clip_grad: float = 1.0, callbacks=(), checkpoints: bool = True, logger=True
):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from nemo_mla_lora.training.garbage import gc_callbacks

    cbs = [*callbacks, *gc_callbacks(trainer_cfg)]
    if checkpoints:
        cbs.append(
            ModelCheckpoint(
                dirpath=f"{root_dir}/checkpoints",
                every_n_train_steps=trainer_cfg.checkpoint_every_n_steps,
                save_last=True,
                save_top_k=-1,
            )
        )
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        val_check_interval=trainer_cfg.val_check_interval,
        check_val_every_n_epoch=None,  # validation every val_check_interval global steps, resumed runs included
        limit_val_batches=trainer_cfg.limit_val_batches,
        log_every_n_steps=trainer_cfg.log_every_n_steps,
        gradient_clip_val=clip_grad or None,
        enable_checkpointing=checkpoints,
        callbacks=cbs,
        default_root_dir=str(root_dir),
        logger=CSVLogger(str(root_dir), name="logs") if logger else False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        precision=trainer_cfg.precision,
    )
