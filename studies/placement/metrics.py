"""Stability metrics of one LoRA run, from its per-step train loss and pre-clip gradient norm.

- oscillation: standard deviation of the step-to-step train-loss change after warm-up (a smooth descent
  scores low, a see-saw high), in loss units;
- spikes: steps after warm-up whose gradient norm exceeds ``factor`` x the median of the ``window``
  steps before it;
- diverged: a non-finite loss, or a final held-out loss above the loss before training.
"""

import math
import statistics


def oscillation(losses, warmup: int) -> float:
    tail = [x for x in losses[warmup:] if math.isfinite(x)]
    deltas = [b - a for a, b in zip(tail, tail[1:])]
    return statistics.pstdev(deltas) if len(deltas) > 1 else 0.0


def spikes(grad_norms, warmup: int, factor: float = 5.0, window: int = 20) -> int:
    count = 0
    for i in range(max(warmup, 1), len(grad_norms)):
        before = [g for g in grad_norms[max(0, i - window) : i] if math.isfinite(g)]
        if before and grad_norms[i] > factor * statistics.median(before):
            count += 1
    return count


def diverged(losses, heldout_before: float, heldout_final: float) -> bool:
    finite = all(math.isfinite(x) for x in losses) and math.isfinite(heldout_final)
    return not finite or heldout_final > heldout_before


def summarise(record: dict, warmup: int, spike_factor: float) -> dict:
    """The run's row of the results table (record: what ``study.train.run_one`` returned)."""
    losses, norms = record["train_loss"], record["grad_norm"]
    return {
        "arch": record["arch"],
        "variant": record["variant"],
        "lr_scale": record["lr_scale"],
        "lr": record["lr"],
        "seed": record["seed"],
        "trainable": record["trainable"],
        "steps": len(losses),
        "heldout_before": record["heldout_before"],
        "heldout_final": record["heldout_final"],
        "heldout_best": min(record["heldout_curve"].values(), default=record["heldout_final"]),
        "oscillation": oscillation(losses, warmup),
        "spikes": spikes(norms, warmup, spike_factor),
        "max_grad_norm": max(norms, default=0.0),
        "diverged": diverged(losses, record["heldout_before"], record["heldout_final"]),
        "wall_s": record["wall_s"],
    }
