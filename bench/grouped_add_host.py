"""One grouped expert linear with LoRA around it (``lora_fork`` / base ``torch._grouped_mm`` / ``lora_onto``), forward +
backward, with ``lora_around.GROUPED_ADD`` on (the Triton add) and off (``_grouped_mm`` + ``add_``), bf16 on one GPU:
host time per step (until the last launch returns) and wall time (after a synchronize), mean of 30 steps; a tiny
shape (8 rows per expert: host-bound) and two V3-sized ones. Prints one JSON line.

    PYTHONPATH=. python3 bench/grouped_add_host.py
"""
import time, torch, json
from nemo_mla_lora.peft import lora_around
from nemo_mla_lora.peft.lora_fn import group_offsets
res = {}
for t_per, n_in, n_out, r in ((8, 256, 512, 16), (2048, 7168, 4096, 16), (2048, 7168, 4096, 64)):
    counts = [t_per] * 16
    x = torch.randn(sum(counts), n_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(16, n_out, n_in, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(16, r, n_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(16, n_out, r, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(sum(counts), n_out, device="cuda", dtype=torch.bfloat16)
    def step():
        offs = group_offsets(counts, "cuda")
        x1, hs = lora_around.lora_fork(x, a, 0.5, counts, offs)
        y = torch._grouped_mm(x1, w.transpose(1, 2), offs)
        lora_around.lora_onto(y, hs, b, counts, offs).backward(gy)
    row = {}
    for use in (True, False, True, False):
        lora_around.GROUPED_ADD = use
        for _ in range(5): step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(30): step()
        host = (time.perf_counter() - t0) / 30 * 1e3
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 30 * 1e3
        row[f"{'triton' if use else 'torch'}"] = {"host_ms": round(host, 3), "wall_ms": round(wall, 3)}
    res[f"t{t_per}x16_{n_in}_{n_out}_r{r}"] = row
print(json.dumps(res))
