"""The grouped low-rank add alone (``peft/grouped_add``) against ``torch._grouped_mm`` + ``add_``, bf16 on one GPU:
16 groups of 2,048 rows, widths 4,096 / 7,168, ranks 16 / 64. Per call: GPU time (CUDA events over 50 calls) and
host enqueue time (50 calls behind a long ``torch.cuda._sleep``, so the queue never drains); each pair run twice,
the later figures kept. Prints one JSON line.

    PYTHONPATH=. python3 bench/grouped_add_micro.py
"""
import time, torch, json
from nemo_mla_lora.peft.grouped_add import grouped_lowrank_add_
from nemo_mla_lora.peft.lora_fn import group_offsets
res = {}
for n, r in ((4096, 16), (7168, 16), (7168, 64)):
    counts = [2048] * 16
    t = sum(counts)
    y = torch.randn(t, n, device="cuda", dtype=torch.bfloat16)
    hs = torch.randn(t, r, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(16, n, r, device="cuda", dtype=torch.bfloat16)
    offs = group_offsets(counts, "cuda")
    fa = lambda: grouped_lowrank_add_(y, hs, b.transpose(1, 2), offs, 0.5)
    fb = lambda: y.add_(torch._grouped_mm(hs, b.transpose(1, 2), offs), alpha=0.5)
    row = {}
    for name, f in (("triton", fa), ("torch", fb), ("triton", fa), ("torch", fb)):
        for _ in range(5): f()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(50): f()
        e.record(); torch.cuda.synchronize()
        gpu = s.elapsed_time(e) / 50 * 1e3
        # host: enqueue cost with a long kernel ahead so the queue never drains
        torch.cuda._sleep(200_000_000)
        h0 = time.perf_counter()
        for _ in range(50): f()
        host = (time.perf_counter() - h0) / 50 * 1e6
        torch.cuda.synchronize()
        row[name] = {"gpu_us": round(gpu, 1), "host_us": round(host, 1)}
    res[f"n{n}_r{r}"] = row
print(json.dumps(res))
