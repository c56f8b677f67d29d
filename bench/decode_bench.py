"""Decode benchmarks for absorbed checkpoints (one MLA layer, V3 attention dims by default).

    python bench/decode_bench.py --out decode.json                 # GPU: batch 64, context 4096, bf16
    python bench/decode_bench.py --dims tiny --batch 2 --context 16 --iters 1 --dtype fp32   # CPU smoke

1. KV-cache bytes per token actually allocated: the latent cache (c_kv + k_rope) vs materialized K and V.
2. Decode attention time per step: absorbed (Triton kernel; einsums) vs materialized K/V through PyTorch
   SDPA; achieved bandwidth (cache bytes read per step / time) as a share of the card's copy bandwidth
   measured in the same run; at V3's 128 heads and at one tensor-parallel rank's 16 (TP=8). Optionally a
   sweep of the kernel's launch configs.
3. (and ``engine``: end-to-end decode tokens/s of a 4-layer V3-shaped model through the engine; ``engine_flashmla``,
   ``engine_gluon``, ``engine_gluon_seesaw``, ``engine_gluon_seesaw_t32``: the same through those attention backends,
   the last two with the Gluon kernel's seesaw schedules.)
   A decode step with eight distinct rank-16 adapters on every MLA target, rows spread over them, vs the
   same batch with no adapter (what a merged checkpoint costs): the attention alone and the whole decoder
   layer (V3's dense MLP), eager and replayed from a CUDA graph.
4. Folded products (W_UQ^T W_UK, W_O W_UV per head) vs split weights: parameter bytes and step time.
Every ratio compares numbers from the same run. Index legend: b batch, t context, h heads, c latent.
"""

import argparse
import json
import sys
import time

import torch

V3 = dict(hidden=7168, heads=128, q_lora_rank=1536, kv_lora_rank=512, nope=128, rope=64, v=128, ffn=18432)
TINY = dict(hidden=80, heads=4, q_lora_rank=56, kv_lora_rank=40, nope=24, rope=8, v=28, ffn=320)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SEESAW_SCHEDULES = ("seesaw", "seesaw_t32")  # gluon_launch.KERNELS beside the default ping-pong one


def timed(fn, iters: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def graphed(fn):
    """``fn`` captured once in a CUDA graph -> its replay (what a serving engine's decode step runs: no
    Python or launch cost between kernels). Warm-up on a side stream first, as capture requires."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_bandwidth(device, iters: int) -> float:
    """GB/s of a device-to-device copy of 1 GiB (read + write counted), the card's practical ceiling."""
    n = (1 << 30) // 2 if device.type == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), iters)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def spec_of(d: dict):
    from nemo_mla_lora.arch.mla_spec import MLASpec

    return MLASpec(hidden_size=d["hidden"], num_layers=1, num_heads=d["heads"], q_lora_rank=d["q_lora_rank"],
                   kv_lora_rank=d["kv_lora_rank"], qk_nope_head_dim=d["nope"], qk_rope_head_dim=d["rope"],
                   v_head_dim=d["v"], vocab_size=512, ffn_hidden_size=d["ffn"], rope_factor=40.0,
                   rope_original_max_positions=4096)


def attention_section(d, b, t, dtype, device, iters, use_triton, heads: int | None = None,
                      sweep: bool = True) -> dict:
    """Cache bytes per token and decode attention time: absorbed (kernel, einsums) vs materialized SDPA.
    ``heads``: fewer heads than the model, as one tensor-parallel rank holds them (the latent cache is not
    split by heads: every rank keeps all of it)."""
    from nemo_mla_lora.inference.cache import LatentKVCache

    h, c, dr, dn, dv = heads or d["heads"], d["kv_lora_rank"], d["rope"], d["nope"], d["v"]
    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    cache = LatentKVCache.allocate(spec_of(d), b, t, dtype, device)
    latent_alloc = (torch.cuda.memory_allocated() - before) if device.type == "cuda" else \
        cache.c_kv.nbytes + cache.k_rope.nbytes
    k = torch.randn(b, h, t, dn + dr, dtype=dtype, device=device)  # materialized K and V: [b, h, t, d]
    v = torch.randn(b, h, t, dv, dtype=dtype, device=device)
    cache.c_kv.normal_()
    cache.k_rope.normal_()
    q_lat = torch.randn(b, h, c, dtype=dtype, device=device)
    q_rope = torch.randn(b, h, dr, dtype=dtype, device=device)
    q = torch.randn(b, h, 1, dn + dr, dtype=dtype, device=device)
    scale = (dn + dr) ** -0.5
    c_kv, k_rope = cache.c_kv[0], cache.k_rope[0]  # [b, t, c], [b, t, dr]

    def einsums():
        s = torch.einsum("bhc,btc->bht", q_lat, c_kv) + torch.einsum("bhd,btd->bht", q_rope, k_rope)
        return torch.einsum("bht,btc->bhc", torch.softmax(s.float() * scale, -1).to(dtype), c_kv)

    rows = {"materialized_sdpa": timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), iters),
            "absorbed_einsum": timed(einsums, iters)}
    sweep = []
    if use_triton:
        from nemo_mla_lora.inference.kernels.triton_decode import latent_decode_attention

        lengths = torch.full((b,), t, dtype=torch.int32, device=device)
        rows["absorbed_triton"] = timed(lambda: latent_decode_attention(q_lat, q_rope, c_kv, k_rope, lengths, scale),
                                        iters)
        if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
            from nemo_mla_lora.inference.kernels.hopper_decode import decode_attention  # the TMA kernels on Hopper

            rows["absorbed_tma"] = timed(lambda: decode_attention(q_lat, q_rope, c_kv, k_rope, lengths, scale), iters)
            rows["absorbed_tma_graph"] = timed(graphed(
                lambda: decode_attention(q_lat, q_rope, c_kv, k_rope, lengths, scale, max_length=t)), iters)
            rows["absorbed_triton_graph"] = timed(graphed(
                lambda: latent_decode_attention(q_lat, q_rope, c_kv, k_rope, lengths, scale, max_length=t)), iters)
        sweep = kernel_sweep(lambda **kw: latent_decode_attention(q_lat, q_rope, c_kv, k_rope, lengths, scale, **kw),
                             max(5, iters // 2), sweep_configs(h) if sweep and device.type == "cuda" else [])
        if sweep:
            rows["absorbed_triton_best"] = sweep[0]["ms"]
    read = {"materialized_sdpa": k.nbytes + v.nbytes}
    read.update(dict.fromkeys(("absorbed_einsum", "absorbed_triton", "absorbed_triton_best", "absorbed_tma",
                               "absorbed_tma_graph", "absorbed_triton_graph"),
                              c_kv.nbytes + k_rope.nbytes))
    flops = 2 * b * h * t * (2 * c + dr)  # absorbed: scores over c + dr, then p . c_kv over c
    return {"heads": h, "latent_bytes_per_token": latent_alloc / (b * t),
            "materialized_bytes_per_token": (k.nbytes + v.nbytes) / (b * t), "ms": rows,
            "gb_per_s": {n: read[n] / ms / 1e6 for n, ms in rows.items()}, "absorbed_flops": flops,
            "absorbed_flop_per_byte": flops / read["absorbed_einsum"],
            "absorbed_tflop_per_s": {n: flops / ms / 1e9 for n, ms in rows.items() if n.startswith("absorbed")},
            "kernel_sweep": sweep}


def kernel_sweep(kernel, iters: int, configs) -> list[dict]:
    """Time ``kernel(**config)`` for each launch config; fastest first (a config that fails is recorded)."""
    results = []
    for cfg in configs:
        try:
            results.append(dict(cfg, ms=timed(lambda: kernel(**cfg), iters)))
        except Exception as e:  # e.g. out of shared memory for a large tile
            results.append(dict(cfg, ms=float("inf"), error=f"{type(e).__name__}: {str(e)[:120]}"))
    return sorted(results, key=lambda r: r["ms"])


def sweep_configs(heads: int) -> list[dict]:
    """Launch configs around the best of the first H200 sweep (bench/README.md); head blocks no wider than
    the heads."""
    block_hs = [bh for bh in (16, 32, 64) if bh <= max(16, heads)][-2:]
    return [dict(block_h=bh, block_t=bt, num_warps=w, num_stages=st, splits=sp) for bh in block_hs
            for bt in (32, 64, 128) for w in (4, 8) for st in (2, 3) for sp in (None, 8) if bh > 16 or bt < 128]


def random_bank(spec, attn, n_adapters: int, rank: int, device, dtype, layers: int = 1, kernels=None):
    """``n_adapters`` distinct rank-``rank`` adapters (B != 0) on every MLA target of the first ``layers``."""
    from nemo_mla_lora.inference.adapters import SUPPORTED, AdapterBank

    c, width = spec.kv_lora_rank, spec.num_heads * (spec.qk_nope_head_dim + spec.v_head_dim)
    shapes = {n: (m.weight.shape[1], m.weight.shape[0]) for n, m in attn.named_children() if n in SUPPORTED}
    shapes["linear_kv_up_proj"] = (c, width)
    gen = torch.Generator().manual_seed(0)
    factors = {f"a{i}": {f"decoder.layers.{k}.self_attention.{n}": (torch.randn(rank, i_, generator=gen) * 0.01,
                                                                  torch.randn(o_, rank, generator=gen) * 0.01, 1.0)
                         for k in range(layers) for n, (i_, o_) in shapes.items()} for i in range(n_adapters)}
    return AdapterBank(spec, factors, device, dtype, kernels)


def adapter_section(d, b, t, dtype, device, iters, use_triton, n_adapters: int = 8, rank: int = 16) -> dict:
    """A decode step with ``n_adapters`` distinct adapters on every MLA target vs no adapter (what a merged
    checkpoint costs), same batch and cache: the attention alone (projections, absorbed attention, output
    projection), and the whole decoder layer (norms, attention, V3's dense MLP)."""
    from nemo_mla_lora.runtime import parallel
    from nemo_mla_lora.inference.adapters import NoCorrections
    from nemo_mla_lora.inference.attention import absorbed_attention
    from nemo_mla_lora.inference.cache import LatentKVCache
    from nemo_mla_lora.models.from_spec import config_from_spec
    from nemo_mla_lora.models.tiny import build_model

    parallel.init_megatron()
    spec = spec_of(d)
    layer = build_model(config_from_spec(spec, dtype)).to(device).eval().decoder.layers[0]
    attn, backend = layer.self_attention, "triton" if use_triton else "torch"
    h, c = spec.num_heads, spec.kv_lora_rank
    w_uk, w_uv = (torch.randn(h, n, c, dtype=dtype, device=device) * c ** -0.5
                  for n in (spec.qk_nope_head_dim, spec.v_head_dim))
    banks = {"kernels": random_bank(spec, attn, n_adapters, rank, device, dtype),  # lora_kernels on CUDA
             "torch": random_bank(spec, attn, n_adapters, rank, device, dtype, kernels=False)}
    ids = torch.arange(b, device=device) % n_adapters + 1  # rows spread over the adapters
    x = torch.randn(1, b, spec.hidden_size, dtype=dtype, device=device)

    def step(corrections: str | None, whole_layer: bool):
        cache = LatentKVCache.allocate(spec, b, t + 1, dtype, device)  # t tokens cached, room for one more
        cache.lengths.fill_(t)
        cache.length = t
        corr = banks[corrections].for_layer(0, ids) if corrections else NoCorrections()
        if not whole_layer:
            return lambda: absorbed_attention(x, attn, w_uk, w_uv, cache, 0, corr, backend)

        def run():
            y = x + absorbed_attention(layer.input_layernorm(x), attn, w_uk, w_uv, cache, 0, corr, backend)
            return y + layer.mlp(layer.pre_mlp_layernorm(y))[0]
        return run

    result = {"adapters": n_adapters, "rank": rank, "attention": backend, "mlp_width": spec.ffn_hidden_size}
    with torch.no_grad():  # multi_adapter: corrections through lora_kernels; multi_adapter_torch: in torch ops
        for name, whole in (("attention", False), ("layer", True)):
            base = timed(step(None, whole), iters)
            multi, multi_torch = (timed(step(k, whole), iters) for k in ("kernels", "torch"))
            result[name] = {"ms_no_adapter": base, "ms_multi_adapter": multi, "ratio": multi / base,
                            "ms_multi_adapter_torch": multi_torch, "ratio_torch": multi_torch / base}
            if device.type == "cuda":  # the same steps replayed from CUDA graphs: GPU time, no launch cost
                g_base = timed(graphed(step(None, whole)), iters)
                g_multi, g_torch = (timed(graphed(step(k, whole)), iters) for k in ("kernels", "torch"))
                result[name].update(graph_ms_no_adapter=g_base, graph_ms_multi_adapter=g_multi,
                                    graph_ratio=g_multi / g_base, graph_ms_multi_adapter_torch=g_torch,
                                    graph_ratio_torch=g_torch / g_base)
    return result


def engine_section(d, b, prompt: int, steps: int, dtype, device, backend: str, layers: int = 4,
                   n_adapters: int = 8, rank: int = 16, export: str | None = None) -> dict:
    """End-to-end greedy decode through ``AbsorbedMLAEngine`` (eager, as the engine runs): ``layers`` layers of
    V3's attention and dense MLP, V3's vocabulary, or (``export``) a merged export loaded as ``recipes.generate``
    loads it; batch ``b``, a ``prompt``-token prefill, then ``steps`` decode steps timed. No adapter (a merged
    checkpoint runs exactly this) vs ``n_adapters`` distinct unmerged adapters on every MLA target of every layer,
    rows spread over them. ``backend``: the engine's decode attention (torch, triton, flashmla, gluon)."""
    from dataclasses import replace

    from nemo_mla_lora.runtime import parallel
    from nemo_mla_lora.inference.engine import AbsorbedMLAEngine
    from nemo_mla_lora.models.from_spec import config_from_spec
    from nemo_mla_lora.models.tiny import build_model

    parallel.init_megatron()
    if export:
        start = time.perf_counter()
        engine = AbsorbedMLAEngine.load(export, "bfloat16" if dtype == torch.bfloat16 else "float32", device, backend)
        spec, model, load_s = engine.spec, engine.model, time.perf_counter() - start
        layers = spec.num_layers
    else:
        spec = replace(spec_of(d), num_layers=layers, vocab_size=129280)
        model = build_model(config_from_spec(spec, dtype)).to(device)
        h, c = spec.num_heads, spec.kv_lora_rank
        k_up, v_up = ([torch.randn(h * n, c, dtype=dtype, device=device) * c ** -0.5 for _ in range(layers)]
                      for n in (spec.qk_nope_head_dim, spec.v_head_dim))
        engine, load_s = AbsorbedMLAEngine(model, spec, k_up, v_up, backend), None
    attn = model.decoder.layers[0].self_attention
    banks = {"multi_adapter": random_bank(spec, attn, n_adapters, rank, device, dtype, layers),  # lora_kernels on CUDA
             "multi_adapter_torch": random_bank(spec, attn, n_adapters, rank, device, dtype, layers, kernels=False)}
    tokens = torch.randint(0, min(1000, spec.vocab_size), (b, prompt), device=device)
    out = {"layers": layers, "batch": b, "prompt": prompt, "steps": steps, "adapters": n_adapters, "rank": rank,
           "export": export, "load_seconds": load_s, "attention": backend}
    for name in ("no_adapter", "multi_adapter", "multi_adapter_torch"):
        cache, bank = engine.new_cache(b, prompt + steps + 4), banks.get(name)
        ids = (torch.arange(b, device=device) % n_adapters + 1) if bank else None
        nxt = prefill(engine, tokens, cache, bank, ids)[:, None]  # [b, 1]
        for _ in range(3):  # warm-up: the decode kernels compile on the first step
            nxt = engine.forward(nxt, cache, bank, ids)[:, -1:].argmax(-1)
        torch.cuda.synchronize() if device.type == "cuda" else None
        t0 = time.perf_counter()
        for _ in range(steps):
            nxt = engine.forward(nxt, cache, bank, ids)[:, -1:].argmax(-1)
        torch.cuda.synchronize() if device.type == "cuda" else None
        out[name] = {"tokens_per_s": b * steps / (time.perf_counter() - t0)}
        out[name]["graphed"] = graphed_tokens_per_s(engine, tokens, bank, ids, steps)
    out["ratio"] = out["no_adapter"]["tokens_per_s"] / out["multi_adapter"]["tokens_per_s"]
    out["ratio_torch"] = out["no_adapter"]["tokens_per_s"] / out["multi_adapter_torch"]["tokens_per_s"]
    return out


PREFILL_SCORES = 1 << 29  # score elements per prefill chunk: 2 GiB in fp32


def prefill(engine, tokens, cache, bank=None, ids=None) -> torch.Tensor:
    """The prompt tokens [b, s] into ``cache`` in chunks whose attention scores [b, h, chunk, T] (T the cache's
    allocation) hold at most ``PREFILL_SCORES`` elements (batch 64 x 128 heads x 4,096 positions in one piece
    would be 256 GiB); returns the greedy next token of each row, [b]."""
    b, s = tokens.shape
    chunk = max(1, min(s, PREFILL_SCORES // (b * engine.spec.num_heads * cache.max_length)))
    for lo in range(0, s, chunk):
        logits = engine.forward(tokens[:, lo : lo + chunk], cache, bank, ids)
    return logits[:, -1].argmax(-1)


def graphed_tokens_per_s(engine, tokens, bank, ids, steps: int) -> dict:
    """The same greedy decode with each step replayed from a CUDA graph (``inference/graphs.GraphedDecode``, static
    cache): {"tokens_per_s": ...}, {"skipped": why} where ``graph_unsafe`` refuses the capture, or {"failed":
    error} where the capture itself raised (the eager figures of the section stand)."""
    from nemo_mla_lora.inference.graphs import GraphedDecode, graph_unsafe

    why = graph_unsafe(engine)
    if why:
        return {"skipped": why}
    b, prompt = tokens.shape
    cache = engine.new_cache(b, prompt + steps + 8, static=True)
    nxt = prefill(engine, tokens, cache, bank, ids)  # [b]
    try:
        graphed = GraphedDecode(engine, cache, bank, ids)
    except RuntimeError as err:  # e.g. an op that syncs with the host inside the capture
        return {"failed": f"{type(err).__name__}: {str(err)[:500]}"}
    for _ in range(3):
        nxt = graphed.step(nxt).argmax(-1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = graphed.step(nxt).argmax(-1)
    torch.cuda.synchronize()
    return {"tokens_per_s": b * steps / (time.perf_counter() - t0)}


def backend_skipped(backend: str, d: dict, dtype, device) -> dict | None:
    """{"skipped": why} where the engine refuses attention ``backend`` for these dims, dtype and device
    (``engine.backend_problem``: FlashMLA's package, the Gluon kernel's terms, bf16), else None."""
    from nemo_mla_lora.inference.engine import backend_problem

    why = backend_problem(backend, device, spec_of(d), dtype)
    return {"skipped": why} if why else None


def with_schedule(schedule: str, section):
    """``section()`` with the Gluon kernel's default schedule set to ``schedule`` (``gluon_launch.SCHEDULE``: what
    the engine's gluon and triton backends launch), restored after."""
    from nemo_mla_lora.inference.kernels import gluon_launch

    saved, gluon_launch.SCHEDULE = gluon_launch.SCHEDULE, schedule
    try:
        return section()
    finally:
        gluon_launch.SCHEDULE = saved


def fold_section(d, b, dtype, device, iters) -> dict:
    """Decode-step projections around the attention, split weights vs folded per-head products."""
    from nemo_mla_lora.arch.absorb import fold_cost

    h, c, dn, dv, rq, hid = d["heads"], d["kv_lora_rank"], d["nope"], d["v"], d["q_lora_rank"], d["hidden"]
    w_uq = torch.randn(h, dn, rq, dtype=dtype, device=device)  # q_up's nope rows per head
    w_uk, w_uv = (torch.randn(h, n, c, dtype=dtype, device=device) for n in (dn, dv))
    w_o = torch.randn(hid, h, dv, dtype=dtype, device=device)
    w_uqk = torch.einsum("hdq,hdc->hqc", w_uq, w_uk)  # [h, rq, c]
    w_ov = torch.einsum("ohd,hdc->ohc", w_o, w_uv)  # [hidden, h, c]
    c_q, o_lat = torch.randn(b, rq, dtype=dtype, device=device), torch.randn(b, h, c, dtype=dtype, device=device)

    def split():
        q_lat = torch.einsum("hdc,bhd->bhc", w_uk, torch.einsum("hdq,bq->bhd", w_uq, c_q))
        return q_lat, torch.einsum("ohd,bhd->bo", w_o, torch.einsum("hdc,bhc->bhd", w_uv, o_lat))

    def folded():
        return torch.einsum("hqc,bq->bhc", w_uqk, c_q), torch.einsum("ohc,bhc->bo", w_ov, o_lat)

    e = torch.tensor([], dtype=dtype).element_size()
    return {"cost": fold_cost(spec_of(d)), "ms_split": timed(split, iters), "ms_folded": timed(folded, iters),
            "bytes_split": e * (w_uq.numel() + w_uk.numel() + w_uv.numel() + w_o.numel()),
            "bytes_folded": e * (w_uqk.numel() + w_ov.numel())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", choices=["v3", "tiny"], default="v3")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-triton", action="store_true", help="skip the Triton kernel (CPU without the interpreter)")
    p.add_argument("--no-sweep", action="store_true", help="time the kernel's default launch only")
    p.add_argument("--prompt", type=int, default=512, help="engine section: prefill tokens")
    p.add_argument("--steps", type=int, default=32, help="engine section: decode steps timed")
    p.add_argument("--sections", nargs="*", help="run only these sections")
    p.add_argument("--export", help="engine section: a merged export to decode (recipes.generate's loading)")
    p.add_argument("--out")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d, dtype = V3 if a.dims == "v3" else TINY, DTYPES[a.dtype]
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dims": a.dims,
              "batch": a.batch, "context": a.context, "dtype": a.dtype,
              "copy_gb_per_s": copy_bandwidth(device, a.iters)}
    tri, sweep = not a.no_triton, not a.no_sweep
    sections = {"attention": lambda: attention_section(d, a.batch, a.context, dtype, device, a.iters, tri,
                                                       sweep=sweep),
                "attention_tp8": lambda: attention_section(d, a.batch, a.context, dtype, device, a.iters, tri,
                                                           heads=max(1, d["heads"] // 8), sweep=sweep),
                "adapters": lambda: adapter_section(d, a.batch, a.context, dtype, device, a.iters, tri),
                "engine": lambda: engine_section(d, a.batch, a.prompt, a.steps, dtype, device,
                                                "triton" if tri else "torch", export=a.export),
                "engine_flashmla": lambda: backend_skipped("flashmla", d, dtype, device) or engine_section(
                    d, a.batch, a.prompt, a.steps, dtype, device, "flashmla", export=a.export),
                "engine_gluon": lambda: backend_skipped("gluon", d, dtype, device) or engine_section(
                    d, a.batch, a.prompt, a.steps, dtype, device, "gluon", export=a.export),
                "fold": lambda: fold_section(d, a.batch, dtype, device, a.iters)}
    for schedule in SEESAW_SCHEDULES:  # the engine's gluon backend under the Gluon kernel's other schedules
        sections[f"engine_gluon_{schedule}"] = lambda s=schedule: backend_skipped("gluon", d, dtype, device) or (
            with_schedule(s, lambda: engine_section(d, a.batch, a.prompt, a.steps, dtype, device, "gluon",
                                                    export=a.export)))
    sections = {k: v for k, v in sections.items() if not a.sections or k in a.sections}
    for name, section in sections.items():  # one section failing on the GPU still leaves the others' numbers
        try:
            result[name] = section()
        except Exception as e:
            if device.type != "cuda":
                raise
            result[name] = {"error": f"{type(e).__name__}: {e}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if a.out:  # after every section: a run cut short by its time limit keeps what it measured
            with open(a.out, "w") as f:
                json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
