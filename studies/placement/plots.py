"""The placement study's plots (PNG): loss curves per placement, final loss vs LR scale, stability."""

import statistics
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = plt.get_cmap("tab20")


def _label(arch: str, variant: str) -> str:
    return variant if arch == "mla" else f"twin: {variant}"


def loss_curves(records, lr_scale: float, path) -> None:
    """Train loss per step, mean over seeds, one line per variant, at one LR scale."""
    curves = defaultdict(list)
    for r in records:
        if r["lr_scale"] == lr_scale:
            curves[(r["arch"], r["variant"])].append(r["train_loss"])
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, ((arch, variant), runs) in enumerate(sorted(curves.items())):
        n = min(len(x) for x in runs)
        mean = [statistics.fmean(x[j] for x in runs) for j in range(n)]
        ax.plot(
            range(1, n + 1),
            mean,
            ls="-" if arch == "mla" else "--",
            label=_label(arch, variant),
            lw=1.2,
            color=COLORS(i % 20),
        )
    ax.set(
        xlabel="step",
        ylabel="train loss (mean over seeds)",
        yscale="log",
        title=f"LoRA train loss per placement, LR x{lr_scale:g}",
    )
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def final_vs_lr(agg, path) -> None:
    """Final held-out loss (mean ± std over seeds) against the LR scale, one line per variant."""
    lines = defaultdict(list)
    for a in agg:
        lines[(a["arch"], a["variant"])].append(a)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, ((arch, variant), pts) in enumerate(sorted(lines.items())):
        pts.sort(key=lambda a: a["lr_scale"])
        ax.errorbar(
            [a["lr_scale"] for a in pts],
            [a["final_mean"] for a in pts],
            [a["final_std"] for a in pts],
            ls="-" if arch == "mla" else "--",
            marker="o",
            ms=3,
            capsize=2,
            label=_label(arch, variant),
            color=COLORS(i % 20),
        )
    ax.set(
        xlabel="LR scale (x optim.lr)",
        ylabel="final held-out loss (mean ± sd over seeds)",
        xscale="log",
        title="Final held-out loss vs learning rate",
    )
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stability(agg, path) -> None:
    """Mean oscillation per variant (bars per LR scale); spikes and divergences in the labels."""
    scales = sorted({a["lr_scale"] for a in agg})
    keys = sorted({(a["arch"], a["variant"]) for a in agg})
    by = {(a["arch"], a["variant"], a["lr_scale"]): a for a in agg}
    fig, ax = plt.subplots(figsize=(10, 5.5))
    width = 0.8 / len(scales)
    for j, s in enumerate(scales):
        vals = [by[k + (s,)]["oscillation_mean"] if k + (s,) in by else 0.0 for k in keys]
        ax.bar([i + j * width for i in range(len(keys))], vals, width, label=f"LR x{s:g}")
    labels = []
    for k in keys:
        rows = [by[k + (s,)] for s in scales if k + (s,) in by]
        labels.append(f"{_label(*k)}\n{sum(a['spikes'] for a in rows)} sp, {sum(a['diverged'] for a in rows)} div")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], labels, rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="oscillation (sd of step-to-step loss change)", title="Stability per placement")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
