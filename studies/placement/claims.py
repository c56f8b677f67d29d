"""The four claims the placement study tests, each judged from the aggregates by a fixed rule.

A difference counts only when it exceeds twice its standard error over seeds
(``2 * sqrt(sd_a^2/n_a + sd_b^2/n_b)``); with two or three seeds that error is itself rough, which the
verdicts say. Verdicts: "supported", "contradicted", "not distinguishable" (within noise or mixed).

1. LoRA on the down projections (the latent bottleneck) trains less stably: oscillation of the down
   variants against the other attention-only variants, per LR scale.
2. ``linear_kv_up_proj`` matters most among the attention targets: best-LR final held-out loss of each
   attention target alone.
3. Output projection + MLP (``safe``) is about as good as ``all_linear`` and more stable.
4. MLA wants a lower LoRA learning rate than standard attention (0.5-0.8x): best LR scale of each MLA
   placement against its standard-attention twin's.
"""

import math
import statistics
from collections import defaultdict

from studies.placement import variants as V
from studies.placement.report import best_lr


def _noise(a_sd, a_n, b_sd, b_n) -> float:
    return 2 * math.sqrt(a_sd**2 / max(a_n, 1) + b_sd**2 / max(b_n, 1))


def _compare(a: list, b: list) -> str:
    """'higher' / 'lower' / 'same' for mean(a) against mean(b), beyond 2 standard errors."""
    if not a or not b:
        return "missing"
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    diff = statistics.fmean(a) - statistics.fmean(b)
    if abs(diff) <= _noise(sd(a), len(a), sd(b), len(b)):
        return "same"
    return "higher" if diff > 0 else "lower"


def _overall(results: list[str], supports: str) -> str:
    """Majority over LR scales: 'supports' direction -> supported, the opposite -> contradicted."""
    opposite = "lower" if supports == "higher" else "higher"
    if results.count(supports) > len(results) / 2 and opposite not in results:
        return "supported"
    if results.count(opposite) > len(results) / 2 and supports not in results:
        return "contradicted"
    return "not distinguishable"


def _per_scale(rows, names, key) -> dict:
    out = defaultdict(list)
    for r in rows:
        if r["arch"] == V.MLA and r["variant"] in names:
            out[r["lr_scale"]].append(r[key])
    return out


def claim_down_unstable(rows) -> dict:
    others = [n for n in V.ATTENTION_SINGLES + ("kv_up_k_only",) if n not in V.DOWN]
    down, rest = _per_scale(rows, V.DOWN, "oscillation"), _per_scale(rows, others, "oscillation")
    scales = sorted(set(down) & set(rest))
    results = [_compare(down[s], rest[s]) for s in scales]
    spikes = {
        g: sum(r["spikes"] for r in rows if r["arch"] == V.MLA and r["variant"] in names)
        for g, names in (("down", V.DOWN), ("other", others))
    }
    divs = {
        g: sum(bool(r["diverged"]) for r in rows if r["arch"] == V.MLA and r["variant"] in names)
        for g, names in (("down", V.DOWN), ("other", others))
    }
    evidence = [
        f"LR x{s:g}: oscillation down {statistics.fmean(down[s]):.3f} vs other attention "
        f"{statistics.fmean(rest[s]):.3f} ({r})"
        for s, r in zip(scales, results)
    ]
    evidence.append(
        f"grad-norm spikes: down {spikes['down']}, other {spikes['other']}; "
        f"divergences: down {divs['down']}, other {divs['other']}"
    )
    return {"claim": 1, "verdict": _overall(results, "higher") if scales else "missing", "evidence": evidence}


def claim_kv_up_most(agg) -> dict:
    best = {v: a for (arch, v), a in best_lr(agg).items() if arch == V.MLA and v in V.ATTENTION_SINGLES}
    if "linear_kv_up_proj" not in best or len(best) < 2:
        return {"claim": 2, "verdict": "missing", "evidence": ["needs linear_kv_up_proj and another single target"]}
    ranked = sorted(best.values(), key=lambda a: a["final_mean"])
    kv = best["linear_kv_up_proj"]
    evidence = [f"{a['variant']}: {a['final_mean']:.3f} ± {a['final_std']:.3f} (LR x{a['lr_scale']:g})" for a in ranked]
    rival = ranked[1] if ranked[0] is kv else ranked[0]
    beyond = abs(kv["final_mean"] - rival["final_mean"]) > _noise(
        kv["final_std"], kv["seeds"], rival["final_std"], rival["seeds"]
    )
    if ranked[0] is kv:
        verdict = "supported" if beyond else "not distinguishable"
    else:
        verdict = "contradicted" if beyond else "not distinguishable"
    return {"claim": 2, "verdict": verdict, "evidence": evidence}


def claim_safe_as_good(rows, agg) -> dict:
    best = best_lr(agg)
    if (V.MLA, "safe") not in best or (V.MLA, "all_linear") not in best:
        return {"claim": 3, "verdict": "missing", "evidence": ["needs safe and all_linear"]}
    s, a = best[(V.MLA, "safe")], best[(V.MLA, "all_linear")]
    worse = s["final_mean"] - a["final_mean"] > _noise(s["final_std"], s["seeds"], a["final_std"], a["seeds"])
    osc_s, osc_a = _per_scale(rows, ("safe",), "oscillation"), _per_scale(rows, ("all_linear",), "oscillation")
    scales = sorted(set(osc_s) & set(osc_a))
    stab = [_compare(osc_s[x], osc_a[x]) for x in scales]
    more_stable = _overall(stab, "lower")
    evidence = [
        f"best LR: safe {s['final_mean']:.3f} ± {s['final_std']:.3f} (x{s['lr_scale']:g}, "
        f"{s['trainable']:,} params) vs all_linear {a['final_mean']:.3f} ± {a['final_std']:.3f} "
        f"(x{a['lr_scale']:g}, {a['trainable']:,} params): {'worse' if worse else 'as good or better'}"
    ]
    evidence += [
        f"LR x{x:g}: oscillation safe {statistics.fmean(osc_s[x]):.3f} vs all_linear "
        f"{statistics.fmean(osc_a[x]):.3f} ({r})"
        for x, r in zip(scales, stab)
    ]
    if worse:
        verdict = "contradicted"
    else:
        verdict = "supported" if more_stable == "supported" else "not distinguishable"
    return {"claim": 3, "verdict": verdict, "evidence": evidence + [f"more stable: {more_stable}"]}


def _loss_gap(by, arch, variant, scale, best) -> tuple[float, float]:
    """(final loss at ``scale`` minus at the best scale, its noise); NaNs when ``scale`` was not run."""
    at = by.get((arch, variant, scale))
    if at is None:
        return math.nan, math.nan
    return at["final_mean"] - best["final_mean"], _noise(best["final_std"], best["seeds"], at["final_std"], at["seeds"])


def claim_lower_lr(agg) -> dict:
    """Supported: MLA's best scale is below the twin's and MLA loses beyond noise at the twin's best.
    Contradicted: MLA's best is at or above the twin's and MLA loses beyond noise one grid step lower.
    Both best at the grid's largest scale: not distinguishable (the optima are not bracketed)."""
    best = best_lr(agg)
    by = {(a["arch"], a["variant"], a["lr_scale"]): a for a in agg}
    scales = sorted({a["lr_scale"] for a in agg})
    evidence, calls = [], []
    for twin, mla in V.TWIN_COUNTERPART.items():
        if (V.TWIN, twin) not in best or (V.MLA, mla) not in best:
            continue
        m, t = best[(V.MLA, mla)], best[(V.TWIN, twin)]
        ratio = m["lr_scale"] / t["lr_scale"]
        if m["lr_scale"] == t["lr_scale"] == scales[-1]:  # both optima at or beyond the grid's top
            calls.append("not distinguishable")
            evidence.append(
                f"{mla} (MLA) and twin {twin}: both best at the largest LR scale run, x{scales[-1]:g}; "
                f"the optima lie at or above it and cannot be compared"
            )
            continue
        if ratio < 1:
            cost, noise = _loss_gap(by, V.MLA, mla, t["lr_scale"], m)
            calls.append("supported" if cost > noise else "not distinguishable")
            where = f"at the twin's best LR x{t['lr_scale']:g}"
        else:
            lower = [s for s in scales if s < t["lr_scale"]]
            cost, noise = _loss_gap(by, V.MLA, mla, lower[-1], m) if lower else (math.nan, math.nan)
            calls.append("contradicted" if cost > noise else "not distinguishable")
            where = f"one step lower, x{lower[-1]:g}" if lower else "lower (not run)"
        evidence.append(
            f"{mla} (MLA) best LR x{m['lr_scale']:g} vs twin {twin} best x{t['lr_scale']:g} "
            f"(ratio {ratio:.2g}); MLA {where}: {cost:+.3f} held-out loss (noise {noise:.3f})"
        )
    if not calls:
        return {"claim": 4, "verdict": "missing", "evidence": ["needs twin variants and their MLA counterparts"]}
    verdict = calls[0] if len(set(calls)) == 1 else "not distinguishable"
    return {"claim": 4, "verdict": verdict, "evidence": evidence}


CLAIMS = {
    1: "LoRA on the down projections (the latent bottleneck) trains less stably",
    2: "LoRA on linear_kv_up_proj matters most among the attention targets",
    3: "output projection + MLP alone is about as good as LoRA everywhere and more stable",
    4: "MLA wants a lower LoRA learning rate than standard attention (0.5-0.8x)",
}


def judge(rows, agg) -> list[dict]:
    found = [claim_down_unstable(rows), claim_kv_up_most(agg), claim_safe_as_good(rows, agg), claim_lower_lr(agg)]
    return [dict(c, text=CLAIMS[c["claim"]]) for c in found]


def markdown(judged) -> str:
    lines = []
    for c in judged:
        lines.append(f"### Claim {c['claim']}: {c['text']}\n\n**{c['verdict']}**\n")
        lines += [f"- {e}" for e in c["evidence"]]
        lines.append("")
    return "\n".join(lines)
