"""``lora_overhead.py --summary PATH``: the LoRA cost table on a bf16 and an FP8 frozen base, in one process.

Cells (``SUMMARY``): the frozen layer, MLALoRA ``nemo_official`` r16, ``all_linear`` r16 and r64, and NeMo's own
``llm.peft.LoRA`` on ``nemo_official``'s targets (r16, alpha 16), each on the ``--dtype`` base (key suffix ``bf16``,
or ``fp32``) and, with ``--fp8``, on the FP8 base (suffix ``fp8``). Each cell builds the layer afresh (same seed),
times forward + backward (``lora_overhead.measure``: median of ``--iters`` steps after ``--warmup``) and reads the
peak GPU memory. PATH: ``card``, ``step_ms`` and ``peak_gib`` (the peak allocated during the steps, the layer's
weights, adapters and inputs included) per cell, plus ``step_peak_gib`` (the peak minus what was allocated before
the steps), ``resident_gib``, ``trainable``, ``fp8_weights`` (parameters held as FP8 tensors), ``step_ms_runs``,
``errors`` and ``complete``. On the TE spec (``PEERS_TE``) also NeMo's LoRA through Transformer Engine's op fuser
(``nemo_lora_fused_r16``), which does not count toward ``complete``.
"""

import statistics
import sys
import traceback

import torch

# (name, variant of lora_overhead.with_lora, rank)
SUMMARY = (("frozen", "base", 0), ("nemo_official_r16", "nemo_official", 16), ("all_linear_r16", "all_linear", 16),
           ("all_linear_r64", "all_linear", 64), ("nemo_lora_r16", "nemo_lora", 16))
# On the TE spec also NeMo's LoRA through TE's op fuser (``TEFusedLoRALinear``): measured once per round after the
# cells above, under ``nemo_lora_fused_r16_<base>``; a failure there is recorded in ``errors`` and leaves ``complete``
PEERS_TE = (("nemo_lora_fused_r16", "nemo_lora_fused", 16),)
MEMORY = (("peak_gib", "total_peak_mib"), ("step_peak_gib", "step_peak_mib"), ("resident_gib", "resident_mib"))


def header(args, bench) -> dict:
    """What the run measured on: card, shapes, FP8 recipe, versions; the per-cell maps empty."""
    fp8 = args.fp8 if args.fp8 != "none" else None
    result = {"card": bench.card(), "spec": args.spec, "dims": args.dims, "seq": args.seq, "batch": args.batch,
              "dtype": args.dtype, "fp8": fp8, "fp8_config": dict(zip(("fp8", "fp8_recipe"), bench.FP8[fp8]))
              if fp8 else None, "experts": args.experts, "ddp": getattr(args, "ddp", False), "warmup": args.warmup,
              "iters": args.iters, "rounds": getattr(args, "rounds", 1),
              "torch": torch.__version__, "step_ms": {}, "peak_gib": {}, "step_peak_gib": {}, "resident_gib": {},
              "trainable": {}, "fp8_weights": {}, "step_ms_runs": {}, "errors": {}, "complete": False}
    if args.spec == "te":
        import transformer_engine

        result["transformer_engine"] = getattr(transformer_engine, "__version__", None)
    return result


def record(result: dict, key: str, row: dict) -> None:
    """One measured cell into ``result``; a cell measured twice (the frozen base) keeps its runs' median time and
    the larger peak."""
    runs = result["step_ms_runs"].setdefault(key, [])
    runs.append(row["median_ms"])
    result["step_ms"][key] = statistics.median(runs)
    result["trainable"][key], result["fp8_weights"][key] = row["trainable"], row["fp8_weights"]
    for out, field in MEMORY:
        gib, seen = (row[field] / 1024 if field in row else None), result[out].get(key)
        result[out][key] = gib if gib is None or seen is None else max(gib, seen)


def summary(args, bench) -> int:
    """Measure every cell and write ``args.summary``; 0 when every cell has a result.

    Args:
        args: ``lora_overhead.py``'s parsed arguments (``summary``, ``fp8``, ``dtype``, shapes, steps).
        bench: the ``lora_overhead`` module (``measure``, ``card``, ``write_json``, ``FP8``).

    The frozen base is measured first and last; with ``args.rounds`` > 1 every cell once per round, in forward and
    reversed order in turn, each cell's figure the median of its runs. PATH is rewritten after each cell, so a cut run keeps what
    finished. A cell that raises is recorded under ``errors`` (its traceback on stderr) and the run goes on to the
    others, so that one GPU call measures them all; the exit code is 1 while a cell is missing.
    """
    high = "bf16" if args.dtype == "bf16" else "fp32"
    bases = [(high, "none")] + ([("fp8", args.fp8)] if args.fp8 != "none" else [])
    expected = [f"{name}_{label}" for name, _, _ in SUMMARY for label, _ in bases]
    result = header(args, bench)
    peers = PEERS_TE if args.spec == "te" else ()
    n_rounds = getattr(args, "rounds", 1)
    cells = [c for order in bench.rounds(SUMMARY, n_rounds) for c in order]
    # the peers once per round after every required cell (a fault in another package's path cannot cost those),
    # then the frozen base again
    for name, variant, rank in cells + list(peers) * n_rounds + list(SUMMARY[:1]):
        for label, fp8 in bases:
            key = f"{name}_{label}"
            try:
                row = bench.measure(args, variant, rank, fp8)
            except Exception as e:  # recorded, printed, and the exit code says so
                traceback.print_exc()
                result["errors"][key] = f"{type(e).__name__}: {e}"[:2000]
                continue
            record(result, key, row)
            print(f"{key}: {row['median_ms']:.2f} ms", file=sys.stderr, flush=True)
            result["complete"] = all(k in result["step_ms"] for k in expected)
            bench.write_json(args.summary, result)
    bench.write_json(args.summary, result)
    print(table(result, [label for label, _ in bases], SUMMARY + peers))
    missing = [k for k in expected if k not in result["step_ms"]]
    if missing:
        print(f"summary {args.summary}: no result for {missing}; errors: {result['errors']}", file=sys.stderr)
        return 1
    return 0


def table(result: dict, labels: list[str], cells=SUMMARY) -> str:
    """One row per cell: step time, its ratio to the frozen base of the same precision, memory."""
    lines = [(f"card: {result['card']}; spec {result['spec']}, seq {result['seq']} x batch {result['batch']}, "
              f"FP8 {result['fp8_config']}; step ms: median of {result['iters']} steps"),
             "| variant | base | trainable | step ms | x frozen | peak GiB | step peak GiB | resident GiB |",
             "|---|---|---|---|---|---|---|---|"]

    def gib(v):
        return "-" if v is None else f"{v:.2f}"

    for name, _, _ in cells:
        for label in labels:
            key, frozen = f"{name}_{label}", result["step_ms"].get(f"frozen_{label}")
            if key not in result["step_ms"]:
                lines.append(f"| {name} | {label} | - | failed | - | - | - | - |")
                continue
            ms = result["step_ms"][key]
            ratio = "-" if frozen is None else f"{ms / frozen:.3f}"
            lines.append(f"| {name} | {label} | {result['trainable'][key]:,} | {ms:.2f} | {ratio} | "
                         f"{gib(result['peak_gib'][key])} | {gib(result['step_peak_gib'][key])} | "
                         f"{gib(result['resident_gib'][key])} |")
    return "\n".join(lines)
