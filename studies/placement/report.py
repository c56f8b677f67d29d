"""The placement study's tables: one CSV row per run, and a markdown summary over seeds.

``aggregate`` groups runs by (arch, variant, lr_scale): mean and sample standard deviation of the final
held-out loss over seeds, mean oscillation, spikes and divergences summed. ``best_lr`` picks, per (arch,
variant), the LR scale with the lowest mean final held-out loss (a diverged run counts as its final loss,
or +inf when that is not finite).
"""

import csv
import math
import statistics
from collections import defaultdict

COLUMNS = (
    "arch",
    "variant",
    "lr_scale",
    "lr",
    "seed",
    "trainable",
    "steps",
    "heldout_before",
    "heldout_final",
    "heldout_best",
    "oscillation",
    "spikes",
    "max_grad_norm",
    "diverged",
    "wall_s",
)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def aggregate(rows) -> list[dict]:
    groups = defaultdict(list)
    for r in rows:
        groups[(r["arch"], r["variant"], r["lr_scale"])].append(r)
    out = []
    for (arch, variant, scale), runs in sorted(groups.items()):
        finals = [_finite(r["heldout_final"]) for r in runs]
        spread = statistics.stdev(finals) if len(finals) > 1 and all(map(math.isfinite, finals)) else 0.0
        out.append(
            {
                "arch": arch,
                "variant": variant,
                "lr_scale": scale,
                "seeds": len(runs),
                "trainable": runs[0]["trainable"],
                "heldout_before": statistics.fmean(r["heldout_before"] for r in runs),
                "final_mean": statistics.fmean(finals),
                "final_std": spread,
                "oscillation_mean": statistics.fmean(r["oscillation"] for r in runs),
                "spikes": sum(r["spikes"] for r in runs),
                "diverged": sum(bool(r["diverged"]) for r in runs),
            }
        )
    return out


def best_lr(agg) -> dict:
    """(arch, variant) -> the aggregate row of its best LR scale."""
    best = {}
    for a in agg:
        key = (a["arch"], a["variant"])
        if key not in best or a["final_mean"] < best[key]["final_mean"]:
            best[key] = a
    return best


def write_csv(rows, path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in COLUMNS})


def markdown(agg) -> str:
    """Per (arch, variant): one row per LR scale; the best scale's loss in bold."""
    best = best_lr(agg)
    lines = [
        "| arch | variant | trainable | LR scale | held-out before | final held-out (mean ± std over seeds) "
        "| oscillation | grad-norm spikes | diverged |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in agg:
        loss = f"{a['final_mean']:.3f} ± {a['final_std']:.3f}"
        if best[(a["arch"], a["variant"])] is a:
            loss = f"**{loss}**"
        lines.append(
            f"| {a['arch']} | {a['variant']} | {a['trainable']:,} | {a['lr_scale']:g} | "
            f"{a['heldout_before']:.3f} | {loss} | {a['oscillation_mean']:.3f} | {a['spikes']} | "
            f"{a['diverged']}/{a['seeds']} |"
        )
    return "\n".join(lines) + "\n"
