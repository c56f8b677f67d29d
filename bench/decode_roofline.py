"""The latent decode kernels on one Hopper card against its two roofs, shape by shape.

    python bench/decode_roofline.py --out DIR            # GPU: the sweep below, decode_roofline.json + roofline.png
    python bench/decode_roofline.py --out DIR --quick    # GPU: one shape per head count
    ncu ... python bench/decode_roofline.py --out DIR --one tma_t 16 64 4096   # one kernel, one shape, for ncu

Roofs measured in the same run: copy bandwidth (1 GiB device-to-device, read + write counted) and the bf16
matmul peak (8192^3, mean of 10 after warm-up). For each shape (heads x batch x context, bf16, V3's latent
c = 512, d = 64, every row at full length) each kernel runs each of its launch configs, every call replayed
from a CUDA graph of ``REPS`` calls (as serving engines run decode; launch gaps excluded), median of the
replays. Kernels: ``portable`` (``triton_decode``, its default launch), ``tma`` and ``tma_t``
(``hopper_decode``: heads as the MMA's rows, positions as its rows), ``default`` (what the engine runs: where
FlashMLA runs, its ``flashmla`` backend's choice per shape, ``flashmla_or_ours``; elsewhere ``decode_attention``,
as ``ours``), ``ours`` (``decode_attention``, the engine's ``triton`` backend: the
Gluon kernel where ``gluon_backend.gluon_is_faster``, the TMA kernels elsewhere), ``einsum`` (cuBLAS batched GEMMs), and, where the ``flash_mla``
package imports on a Hopper card, ``flashmla`` (FlashMLA's SM90 dense decode, ``inference/kernels/flashmla.py``:
the peer, same cache, same process), and, where it compiles for the card, ``gluon`` (``gluon_decode``: the
warp-specialised kernel, at its default splits and twice them; heads in blocks of 64, so not at 16 heads) and
``gluon_seesaw``, ``gluon_seesaw_t32`` (the seesaw schedule, ``gluon_seesaw.py``, with 64-position tiles in two
stages and 32-position tiles in four; ``--skip KERNEL`` leaves one out). The cache is the engine's
(``LatentKVCache``: c_kv and k_rope side by side in one buffer, rows padded to 64 positions), read by every kernel
in place. Each kernel's numerics are checked against the fp64 equations first. Bytes = the cache read
(b x t x (c + d) x 2); FLOPs = 2 b h t (2c + d). Index legend: b batch, h heads, t context, c latent, d rope dim.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from decode_bench import graphed, timed  # bench/ is this script's directory

from nemo_mla_lora.inference.kernels import gluon_decode, gluon_launch

C, D = 512, 64
HEADS, BATCHES, CONTEXTS = (16, 64, 128), (1, 8, 32, 128), (1024, 4096, 32768)
REPS = 10


def graphed_ms(fn, replays: int = 15) -> float:
    """Milliseconds per call of ``fn`` captured ``REPS`` times in one CUDA graph, median of ``replays``."""
    return timed(graphed(lambda: [fn() for _ in range(REPS)]), replays) / REPS


def roofs() -> dict:
    """Copy: 1 GiB, eager ``copy_`` (an SM copy kernel; inside a CUDA graph the same copy becomes a memcpy
    node on the copy engines, recorded too, slower); matmul: 8192^3 bf16."""
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    copy_ms, graph_copy_ms = timed(lambda: dst.copy_(src), 20), graphed_ms(lambda: dst.copy_(src))
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    tflops = 10 * 2 * 8192 ** 3 / (time.perf_counter() - t0) / 1e12
    return {"copy_GBps": 2 * (1 << 30) / copy_ms / 1e6, "copy_in_graph_GBps": 2 * (1 << 30) / graph_copy_ms / 1e6,
            "matmul_bf16_TFLOPs": tflops}


def kernels():
    from functools import partial

    from nemo_mla_lora.inference.kernels import flashmla
    from nemo_mla_lora.inference.kernels.hopper_decode import decode_attention, latent_decode_attention_tma
    from nemo_mla_lora.inference.kernels.triton_decode import latent_decode_attention

    out = {"portable": latent_decode_attention, "tma": partial(latent_decode_attention_tma, rows="heads"),
           "tma_t": partial(latent_decode_attention_tma, rows="positions"), "default": decode_attention,
           "ours": decode_attention}
    why = flashmla.unavailable()
    if why is None:  # the engine's choice where FlashMLA runs: its kernel for the shapes where it is faster
        out["flashmla"], out["default"] = flashmla.flashmla_decode, flashmla.flashmla_or_ours
    else:
        print(f"flashmla: not measured ({why})", flush=True)
    if (why := gluon_launch.device_problem("cuda", C, D, 64)) is None:
        for schedule in gluon_launch.KERNELS:  # gluon (the ping-pong schedule), gluon_seesaw, gluon_seesaw_t32
            name = "gluon" if schedule == "pingpong" else f"gluon_{schedule}"
            out[name] = partial(gluon_launch.latent_decode_attention_ws, schedule=schedule)
    else:
        print(f"gluon: not measured ({why})", flush=True)
    return out


def runs_at(kind: str, h: int) -> bool:
    """Whether kernel ``kind`` takes ``h`` heads (the Gluon kernels: blocks of 64)."""
    return not kind.startswith("gluon") or h % gluon_decode.BLOCK_H == 0


def latent_cache(b: int, t: int, g: torch.Generator) -> tuple:
    """(c_kv [b, t, C], k_rope [b, t, D]): views of the engine's cache buffer (one layer), N(0, 1) bf16."""
    from nemo_mla_lora.inference.cache import PAGE

    buffer = torch.randn(b, -(-t // PAGE) * PAGE, C + D, device="cuda", generator=g, dtype=torch.bfloat16)
    return buffer[:, :t, :C], buffer[:, :t, C:]


def launches(kind: str, h: int) -> list[dict]:
    if kind in ("portable", "default", "ours", "flashmla"):
        return [{}]
    if kind.startswith("gluon"):
        return [{}, {"splits": "2x"}]
    if kind == "tma":
        shapes = [(64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 8, 3)] if h >= 64 else [(16, 64, 4, 2), (16, 32, 4, 3)]
    else:
        shapes = [(bh, 64, w, 2) for bh, w in ((16, 4), (16, 8), (32, 8), (64, 8)) if bh <= h]
    out = [dict(block_h=bh, block_t=bt, num_warps=w, num_stages=st) for bh, bt, w, st in shapes]
    return out + [dict(cfg, splits="2x") for cfg in out]


def check(fn, h: int) -> float:
    """max |fn - fp64 equations| on 4 rows of lengths 1000, 1, 777, 64 (bf16 inputs)."""
    from nemo_mla_lora.reference.latent import decode_step as reference

    g = torch.Generator(device="cuda").manual_seed(0)
    q, qr = (torch.randn(4, h, n, device="cuda", generator=g, dtype=torch.bfloat16) for n in (C, D))
    ck, kr = latent_cache(4, 1000, g)
    lengths = torch.tensor([1000, 1, 777, 64], device="cuda", dtype=torch.int32)
    return (fn(q, qr, ck, kr, lengths, 0.05).double() - reference(q, qr, ck, kr, lengths, 0.05)).abs().max().item()


def shape_rows(b: int, h: int, t: int, fns: dict, roof: dict) -> dict:
    from nemo_mla_lora.inference.kernels.triton_decode import default_splits

    g = torch.Generator(device="cuda").manual_seed(1)
    q, qr = (torch.randn(b, h, n, device="cuda", generator=g, dtype=torch.bfloat16) for n in (C, D))
    ck, kr = latent_cache(b, t, g)
    lengths = torch.full((b,), t, device="cuda", dtype=torch.int32)
    scale = 0.05
    nbytes, flops = b * t * (C + D) * 2, 2 * b * h * t * (2 * C + D)

    def einsum():
        s = torch.einsum("bhc,btc->bht", q, ck) + torch.einsum("bhd,btd->bht", qr, kr)
        return torch.einsum("bht,btc->bhc", torch.softmax(s.float() * scale, -1).to(q.dtype), ck)

    runs = [{"kernel": "einsum", "ms": graphed_ms(einsum)}]
    for kind, fn in ((k, f) for k, f in fns.items() if runs_at(k, h)):
        for cfg in launches(kind, h):
            kw = dict(cfg, max_length=t)
            if kind.startswith("tma"):  # 1x or 2x the portable kernel's split count for this block
                kw["splits"] = (2 if kw.get("splits") == "2x" else 1) * default_splits(b, h, t, kw["block_h"], q.device)
            if kind.startswith("gluon") and kw.get("splits") == "2x":
                kw["splits"] = 2 * gluon_launch.default_ws_splits(b, h, t, q.device)
            try:
                runs.append(dict(kernel=kind, **cfg, ms=graphed_ms(lambda: fn(q, qr, ck, kr, lengths, scale, **kw))))
            except Exception as err:  # e.g. shared memory over the limit
                runs.append(dict(kernel=kind, **cfg, ms=float("inf"), error=f"{type(err).__name__}: {str(err)[:160]}"))
    for r in runs:
        r["GBps"] = nbytes / r["ms"] / 1e6
        r["share_copy"] = r["GBps"] / roof["copy_GBps"]
        r["TFLOPs"] = flops / r["ms"] / 1e9
        r["share_matmul"] = r["TFLOPs"] / roof["matmul_bf16_TFLOPs"]
    best = {k: min((r for r in runs if r["kernel"] == k), key=lambda r: r["ms"]) for k in ["einsum", *fns]
            if runs_at(k, h)}
    return {"heads": h, "batch": b, "context": t, "bytes": nbytes, "flops": flops, "flop_per_byte": flops / nbytes,
            "best": best, "runs": runs}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roof = results["roofs"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    xs = [2 ** (i / 4) for i in range(8, 40)]
    ax.plot(xs, [min(roof["matmul_bf16_TFLOPs"], roof["copy_GBps"] * x / 1e3) for x in xs], "k-", label="roofs")
    ax.plot(xs, [min(0.5 * roof["matmul_bf16_TFLOPs"], 0.7 * roof["copy_GBps"] * x / 1e3) for x in xs], "k:",
            label="goals: 70% copy, 50% matmul")
    for kind, marker in (("portable", "o"), ("ours", "s"), ("flashmla", "^"), ("gluon", "D"), ("gluon_seesaw", "P"),
                         ("gluon_seesaw_t32", "*"), ("einsum", "x")):
        pts = [(s["flop_per_byte"], s["best"][kind]["TFLOPs"], s["heads"]) for s in results["shapes"]
               if kind in s["best"]]
        for h, color in zip(HEADS, ("C0", "C1", "C2")):
            sel = [(x, y) for x, y, hh in pts if hh == h]
            if sel:
                ax.scatter(*zip(*sel), marker=marker, color=color, alpha=0.7,
                           label=f"{kind}, {h} heads" if kind != "einsum" or h == HEADS[0] else None)
    ax.set(xscale="log", yscale="log", xlabel="FLOP per cached byte", ylabel="TFLOP/s",
           title=f"Latent decode on {results['device']} (best launch per kernel and shape)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip", nargs="+", default=[], metavar="KERNEL", help="kernels not to run (e.g. gluon_seesaw)")
    p.add_argument("--plot", metavar="JSON", help="redraw roofline.png in --out from a results file and exit")
    p.add_argument("--one", nargs=4, metavar=("KERNEL", "H", "B", "T"), help="run one kernel's default launch "
                   "5 times on one shape and exit (for ncu)")
    args = p.parse_args(argv)
    if args.plot:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        plot(json.loads(Path(args.plot).read_text()), Path(args.out) / "roofline.png")
        return 0
    if args.one:
        kind, (h, b, t) = args.one[0], map(int, args.one[1:])
        q, qr = (torch.randn(b, h, n, device="cuda", dtype=torch.bfloat16) for n in (C, D))
        ck, kr = latent_cache(b, t, torch.Generator(device="cuda").manual_seed(1))
        lengths = torch.full((b,), t, device="cuda", dtype=torch.int32)
        for _ in range(5):
            kernels()[kind](q, qr, ck, kr, lengths, 0.05, max_length=t)
        torch.cuda.synchronize()
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fns = {k: f for k, f in kernels().items() if k not in args.skip}
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "roofs": roofs(),
               "checks": {f"{k}_{h}": check(fn, h) for k, fn in fns.items() for h in HEADS if runs_at(k, h)},
               "shapes": []}
    print(json.dumps({k: results[k] for k in ("device", "roofs", "checks")}), flush=True)
    shapes = [(64, h, 4096) for h in HEADS] if args.quick else \
        [(b, h, t) for h in HEADS for b in BATCHES for t in CONTEXTS]
    for b, h, t in shapes:
        row = shape_rows(b, h, t, fns, results["roofs"])
        results["shapes"].append(row)
        print(json.dumps({"h": h, "b": b, "t": t, **{k: round(r["share_copy"], 3) for k, r in row["best"].items()},
                          "tflops": {k: round(r["TFLOPs"]) for k, r in row["best"].items()}}), flush=True)
        (out / "decode_roofline.json").write_text(json.dumps(results, indent=1))
        torch.cuda.empty_cache()
    plot(results, out / "roofline.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
