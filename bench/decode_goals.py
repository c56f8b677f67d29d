"""The decode goals read from one roofline sweep (``decode_roofline.py``'s JSON): per shape, ours (the best of our
kernels' graphed rows, and ``ours``: what the engine's ``triton`` backend runs) against FlashMLA's time and the
card's roofs.

    python bench/decode_goals.py bench/results/<card>_decode_hopper/decode_roofline.json [--json OUT]

Goals (bench/README.md, 4.3): 64 heads at least 70% of copy bandwidth, 128 heads at least 50% of the bf16 matmul roof,
and at every shape at least 0.95x FlashMLA's speed (FlashMLA's time / ours >= 0.95). Rows without a ``flashmla``
kernel (it did not run) leave the last goal out (checked for our best launch, and for ``ours``, what the engine
runs, as ``engine_flashmla_goal_met``); where it ran, each miss of the first two goals is also listed
apart where FlashMLA itself meets the bar at that shape (a miss there is ours to close, not the shape's limit). A
kernel whose result failed the sweep's own check (``CHECK_BOUND``) is left out at that head count, FlashMLA's
included. Index legend: h heads, b batch, t context.
"""

import argparse
import json
import sys
from pathlib import Path

OURS = ("portable", "tma", "tma_t", "gluon", "gluon_seesaw", "gluon_seesaw_t32", "ours")  # our kernels; "default" may be FlashMLA's choice
COPY_AT_64, MATMUL_AT_128, VS_FLASHMLA = 0.70, 0.50, 0.95
# a kernel whose result in the sweep's own check (max |kernel - fp64 equations| on 4 rows of mixed lengths) is above
# this does not count: every correct kernel measured so far gave 0.0038-0.0040 there (bf16 output)
CHECK_BOUND = 0.02


def failed_checks(results: dict) -> set[tuple[str, int]]:
    """(kernel, heads) pairs whose check in the sweep is above ``CHECK_BOUND`` or not a number."""
    return {(key.rsplit("_", 1)[0], int(key.rsplit("_", 1)[1])) for key, err in results.get("checks", {}).items()
            if not err <= CHECK_BOUND}


def shape_goals(shape: dict, wrong: set = frozenset()) -> dict:
    """One shape's row: our best kernel, the engine's row, FlashMLA's, and the goals that apply to it.

    Args:
        shape: one entry of the sweep's ``shapes`` (``heads``, ``batch``, ``context``, ``best.<kernel>``).
        wrong: (kernel, heads) pairs left out (``failed_checks``).
    """
    best = {k: r for k, r in shape["best"].items() if (k, shape["heads"]) not in wrong}
    ours = {k: best[k] for k in OURS if k in best and best[k]["ms"] != float("inf")}
    if not ours:
        raise ValueError(f"shape h={shape['heads']} b={shape['batch']} t={shape['context']}: none of {OURS} ran")
    top = min(ours, key=lambda k: ours[k]["ms"])
    row = {"h": shape["heads"], "b": shape["batch"], "t": shape["context"], "best_ours": top,
           "ours_us": ours[top]["ms"] * 1e3, "share_copy": ours[top]["share_copy"],
           "share_matmul": ours[top]["share_matmul"]}
    if "ours" in ours:
        row["engine_us"] = ours["ours"]["ms"] * 1e3
    peer = best.get("flashmla")
    for heads, share, bar, goal in ((64, "share_copy", COPY_AT_64, "copy_goal_met"),
                                    (128, "share_matmul", MATMUL_AT_128, "matmul_goal_met")):
        if shape["heads"] == heads:
            row[goal] = row[share] >= bar
            if peer is not None:  # whether the shape allows it at all: FlashMLA's share there
                row[f"flashmla_{share}"] = peer[share]
                row[f"flashmla_{goal}"] = peer[share] >= bar
    if peer is not None:
        row["flashmla_us"] = peer["ms"] * 1e3
        row["vs_flashmla"] = row["flashmla_us"] / row["ours_us"]  # >= 1: ours is faster
        row["flashmla_goal_met"] = row["vs_flashmla"] >= VS_FLASHMLA
        if "engine_us" in row:  # the same for the kernel the engine's triton backend runs at this shape
            row["engine_vs_flashmla"] = row["flashmla_us"] / row["engine_us"]
            row["engine_flashmla_goal_met"] = row["engine_vs_flashmla"] >= VS_FLASHMLA
    return row


def summary(results: dict) -> dict:
    """Every shape's row and, per goal, the shapes that miss it.

    Args:
        results: the sweep's JSON (``device``, ``roofs``, ``shapes``).
    """
    if "shapes" not in results:
        raise ValueError(f"expected decode_roofline.py's JSON (keys device, roofs, shapes); got keys {sorted(results)}")
    wrong = failed_checks(results)
    rows = [shape_goals(s, wrong) for s in results["shapes"]]
    def shapes(rows):
        return [f"h{r['h']} b{r['b']} t{r['t']}" for r in rows]

    goals = ("copy_goal_met", "matmul_goal_met", "flashmla_goal_met", "engine_flashmla_goal_met")
    misses = {goal: shapes(r for r in rows if r.get(goal) is False) for goal in goals}
    # the misses at shapes where FlashMLA itself meets the bar: ours to close, not the shape's limit
    misses |= {f"{goal}_where_flashmla_meets_it": shapes(r for r in rows if r.get(goal) is False
                                                          and r.get(f"flashmla_{goal}")) for goal in goals[:2]}
    return {"device": results["device"], "roofs": results["roofs"], "rows": rows, "misses": misses,
            "failed_checks": sorted(f"{k}_{h}" for k, h in wrong)}


def table(s: dict) -> str:
    """The summary as a markdown table (the bench README's form)."""
    lines = ["| h | b | t | best of ours | us | engine us | FlashMLA us | FlashMLA / ours | % copy | % matmul |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        fm = f"{r['flashmla_us']:.1f} | {r['vs_flashmla']:.2f}" if "vs_flashmla" in r else "- | -"
        engine = f"{r['engine_us']:.1f}" if "engine_us" in r else "-"
        lines.append(f"| {r['h']} | {r['b']} | {r['t']} | {r['best_ours']} | {r['ours_us']:.1f} | {engine} | {fm} | "
                     f"{100 * r['share_copy']:.1f} | {100 * r['share_matmul']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", type=Path, help="decode_roofline.json")
    p.add_argument("--json", type=Path, help="also write the summary there")
    args = p.parse_args(argv)
    s = summary(json.loads(args.sweep.read_text()))
    print(f"{s['device']}: copy {s['roofs']['copy_GBps']:.0f} GB/s, matmul {s['roofs']['matmul_bf16_TFLOPs']:.0f} "
          "TFLOP/s")
    print(table(s))
    if s["failed_checks"]:
        print(f"left out, their results off the equations by more than {CHECK_BOUND}: {', '.join(s['failed_checks'])}")
    for goal, shapes in s["misses"].items():
        print(f"{goal}: {'met' if not shapes else 'missed at ' + ', '.join(shapes)}")
    if args.json:
        args.json.write_text(json.dumps(s, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
