"""The Markdown of ``bench/v3_layers.py``: the measured per-layer rows and the paper projection made from them."""

from v3_projection import FORMULAS


def measured_markdown(result: dict) -> str:
    """The measured rows as a Markdown table (the projection's input), stacks beside the sum of their layers."""
    lines = [
        f"## Measured on {result['card']}: {result['config']}, {result['dtype']}, sequence {result['seq']} x 1",
        "",
        "| kind | shard | variant | layers | fwd ms | fwd+bwd ms | sum of its layers ms | kept MiB | "
        "peak MiB | weights GiB | trainable | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:

        def num(key, scale=1.0, fmt=".2f", r=r):
            return "-" if r.get(key) is None else format(r[key] / scale, fmt)

        lines.append(
            f"| {r['kind']} | {r['shard']} | {r['variant']} | {r.get('layers', '-')} | {num('fwd_ms')} | "
            f"{num('step_ms')} | {num('sum_of_layers_ms')} | {num('act_bytes', 2**20, ',.0f')} | "
            f"{num('step_peak_bytes', 2**20, ',.0f')} | {num('weight_bytes', 2**30)} | "
            f"{num('trainable', 1, ',.0f')} | {r.get('skipped') or r.get('error') or ''} |"
        )
    return "\n".join(lines) + "\n"


def _f(x, fmt: str = ".1f") -> str:
    return "n/a" if x is None else format(x, fmt)


def markdown(proj: dict, measured_on: str = "") -> str:
    """The projection as Markdown: assumptions, layouts, per layout x variant, communication, stage memory."""
    lines = [
        f"# DeepSeek-V3 LoRA on paper{f' (per-layer table: {measured_on})' if measured_on else ''}",
        "",
        *[f"- {line}" for line in FORMULAS],
        "",
        "| assumption | value | why |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v['value']} | {v['why']} |" for k, v in proj["assumptions"].items()]
    lines += [
        "",
        "| layout | GPUs | TP | PP | EP | ETP | DP | layers per stage | micro-batches | recompute | source |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lay in proj["layouts"]:
        kinds = " / ".join(f"{k['dense']}d+{k['moe']}m" for k in proj["stage_kinds"][lay["name"]])
        lines.append(
            f"| {lay['name']} | {lay['gpus']} | {lay['tp']} | {lay['pp']} | {lay['ep']} | {lay['etp']} | "
            f"{lay['dp']} | {kinds} | {lay['microbatches']} | {lay['recompute']} | {lay['source']} |"
        )
    lines += [
        "",
        "| layout | variant | worst stage GiB (weights bf16 / FP8 / FP8 + transposes) | fits | step s | "
        "bubble | tokens/s | tokens/s/GPU | missing |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    kinds = ("bf16", "fp8_rowwise", "fp8")
    for name, res in proj["results"].items():
        for variant, r in res["variants"].items():
            t = r["time"]
            worst = " / ".join(_f(r.get(f"worst_{w}_gib")) for w in kinds)
            fits = " / ".join("n/a" if f"fits_{w}" not in r else "yes" if r[f"fits_{w}"] else "no" for w in kinds)
            lines.append(
                f"| {name} | {variant} | {worst} | "
                f"{fits} | {_f(t['step_s'], '.2f')} | {_f(t.get('bubble_fraction'), '.3f')} | "
                f"{_f(t.get('tokens_per_s'), ',.0f')} | {_f(t.get('tokens_per_s_per_gpu'), ',.0f')} | "
                f"{'; '.join(r['missing']) or '-'} |"
            )
    lines += [
        "",
        "| layout | layer | TP MB | expert-TP MB | EP MB (link) | comm ms (fwd + bwd, per micro-batch) |",
        "|---|---|---|---|---|---|",
    ]
    for name, res in proj["results"].items():
        for kind, c in res["comm_per_layer"].items():
            lines.append(
                f"| {name} | {kind} | {c['tp_bytes'] / 1e6:.1f} | {c['etp_bytes'] / 1e6:.1f} | "
                f"{c['ep_bytes'] / 1e6:.1f} ({c['ep_link']}) | {c['ms']:.2f} |"
            )
    lines += [
        "",
        "| layout | variant | stage | weights GiB (bf16 / FP8 / FP8 + transposes) | LoRA + Adam GiB | "
        "activations GiB (in flight) | head GiB | total GiB (same three) | stage ms per micro-batch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in proj["results"].items():
        for variant, r in res["variants"].items():
            for i, st in enumerate(r["stages"]):
                lines.append(
                    f"| {name} | {variant} | {i} | {st['weights_bf16_gib']:.1f} / "
                    f"{st['weights_fp8_rowwise_gib']:.1f} / {st['weights_fp8_gib']:.1f} | "
                    f"{st['lora_states_gib']:.2f} | {_f(st['activations_gib'])} ({st['inflight_microbatches']}) | "
                    f"{_f(st['head_activations_gib'], '.2f')} | {_f(st.get('total_bf16_gib'))} / "
                    f"{_f(st.get('total_fp8_rowwise_gib'))} / {_f(st.get('total_fp8_gib'))} | "
                    f"{_f(r['time']['stage_ms'][i], '.1f')} |"
                )
    return "\n".join(lines) + "\n"


def summary(result: dict) -> dict:
    """The compact part a results summary reads: per row its times and memory, per layout and variant the step time
    and the worst stage's memory (None where a measurement is missing)."""
    mib = 2**20
    rows = {}
    for r in result["rows"]:
        rows[f"{r['kind']}/{r['shard']}/{r['variant']}"] = {
            "step_ms": r.get("step_ms"),
            "fwd_ms": r.get("fwd_ms"),
            "kept_mib": None if r.get("act_bytes") is None else r["act_bytes"] / mib,
            "peak_mib": None if r.get("peak_bytes") is None else r["peak_bytes"] / mib,
            "trainable": r.get("trainable"),
            "note": r.get("skipped") or r.get("error"),
        }
    projection = {}
    for name, res in result.get("projection", {}).get("results", {}).items():
        projection[name] = {
            v: {
                "step_s": r["time"]["step_s"],
                "tokens_per_s": r["time"].get("tokens_per_s"),
                **{f"worst_{w}_gib": r.get(f"worst_{w}_gib") for w in ("bf16", "fp8_rowwise", "fp8")},
                "missing": r["missing"],
            }
            for v, r in res["variants"].items()
        }
    spec = next((r["layer_spec"] for r in result["rows"] if r.get("layer_spec")), None)
    return {
        "card": result["card"],
        "layer_spec": spec,
        "complete": result.get("complete", False),
        "rows": rows,
        "projection": projection,
    }
