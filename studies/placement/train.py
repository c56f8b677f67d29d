"""One placement-study run: a copy of the frozen base, one LoRA variant, AdamW for a fixed step budget.

The loss (answer-masked next-token), optimizer (AdamW, warm-up then cosine to ``min_lr``) and gradient
clipping are the finetune recipe's (``training/cpu.py``), run as a plain loop so that every step's loss and
pre-clip gradient norm are recorded and a hundred runs pay no trainer setup. CPU or CUDA.
"""

import itertools
import math
import time

import torch

from nemo_mla_lora.training import cpu


def train(model, params, loader, lr: float, steps: int, optim_cfg, device, on_eval=None, eval_every: int = 0):
    """``steps`` optimizer steps on ``params``; returns (train losses, pre-clip grad norms). Stops at the
    first non-finite loss. ``on_eval(step)`` is called every ``eval_every`` steps and after the last."""
    o = optim_cfg
    # the schedule's shape does not depend on the LR scale: min_lr is the same fraction of every peak LR
    opt, sched = cpu.adamw(params, o, lr, steps, o.min_lr / o.lr)
    batches = itertools.cycle(loader)
    losses, norms = [], []
    model.train()
    for step in range(1, steps + 1):
        loss = cpu.masked_loss(model, cpu.to_device(next(batches), device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, o.clip_grad or math.inf)
        losses.append(loss.item())
        norms.append(norm.item())
        if not math.isfinite(losses[-1]):
            break
        opt.step()
        sched.step()
        if on_eval and ((eval_every and step % eval_every == 0) or step == steps):
            on_eval(step)
    return losses, norms


def run_one(make_base, arch: str, variant, lr_scale: float, seed: int, cfg, train_loader, val_loader, device) -> dict:
    """LoRA (``variant``) on a fresh frozen base from ``make_base()``; the record ``study.metrics.summarise``
    reads."""
    from nemo_mla_lora.peft import MLALoRA

    start = time.time()
    torch.manual_seed(seed)  # LoRA A init; the training order comes from the loader's seed
    peft = MLALoRA(dim=cfg.peft.dim, alpha=cfg.peft.alpha, **variant.peft)
    model = peft(make_base())
    params = [p for p in model.parameters() if p.requires_grad]
    before = cpu.evaluate(model, val_loader, device=device)
    curve = {}

    def on_eval(step):
        curve[step] = cpu.evaluate(model, val_loader, device=device)

    lr = cfg.optim.lr * lr_scale
    losses, norms = train(
        model, params, train_loader, lr, cfg.study.steps, cfg.optim, device, on_eval, cfg.study.eval_every
    )
    final = curve.get(cfg.study.steps, math.nan)  # absent when the run stopped at a non-finite loss
    return {
        "arch": arch,
        "variant": variant.name,
        "kind": variant.kind,
        "lr_scale": lr_scale,
        "lr": lr,
        "seed": seed,
        "trainable": sum(p.numel() for p in params),
        "heldout_before": before,
        "heldout_final": final,
        "heldout_curve": curve,
        "train_loss": losses,
        "grad_norm": norms,
        "wall_s": round(time.time() - start, 2),
    }
