"""The export at real size: a DeepSeek-family HF checkpoint larger than RAM, exported under a memory sampler.

    .venv/bin/python bench/export_scale.py make  --shape v2-lite --layers 24 --out /data/v2lite   # ~28 GB
    .venv/bin/python bench/export_scale.py make  --shape v3 --layers 2 --dense 1 --fp8 --out /data/v3fp8
    .venv/bin/python bench/export_scale.py disk  --dir /data                   # cold read / write MB/s
    .venv/bin/python bench/export_scale.py run   --base /data/v2lite --formats hf absorbed mcore nemo \\
        --disk /data/disk.json --results bench/results/export_scale/v2lite

``make`` writes the checkpoint shard by shard (safetensors' own ``save_file``, shards of about 2 GB): the
tensor names and shapes are those of DeepSeek's released files (``hf_tensors``), in their order, the
values are random (linears std 0.02, norms around 1; ``--fp8``: e4m3 weights with 128x128 block scales as
DeepSeek-V3 ships them), plus an HF PEFT LoRA (rank 16, alpha 32, B != 0) on every linear, experts included,
in ``<out>/adapter``. ``disk`` measures this disk: a file written and fsynced, then read back with its
pages dropped from the cache. ``run`` refuses an output that exists (it deletes each export it wrote, unless
``--keep``), drops the base's pages, runs ``recipes.export`` in a child process
(verify=full unless ``--verify``) while sampling its RSS every 0.2 s, and writes per format: wall, peak RSS
(the kernel's high-water mark), bytes read/written by the process, the disk-bound time (base bytes at the
read rate + export bytes at the write rate) and its share of the wall, the export's own phase times
(manifest ``timing``); then ``rss.png`` (RSS over time, every format) and ``results.json``.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import textwrap
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # released configs' dimensions (num_hidden_layers and first_k_dense_replace set by the command)
    "v2-lite": ("deepseek_v2", dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                moe_intermediate_size=1408, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
                n_routed_experts=64, num_experts_per_tok=6, kv_lora_rank=512, q_lora_rank=None,
                qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, routed_scaling_factor=1.0,
                topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False, max_position_embeddings=163840,
                rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                              "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707})),
    "v3": ("deepseek_v3", dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432,
           moe_intermediate_size=2048, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
           n_routed_experts=256, num_experts_per_tok=8, kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128,
           qk_rope_head_dim=64, v_head_dim=128, routed_scaling_factor=2.5, n_group=8, topk_group=4,
           norm_topk_prob=True, max_position_embeddings=163840,
           rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})),
}
SHARD_BYTES = 2 << 30
BLOCK = 128


def _config(shape: str, layers: int, dense: int | None):
    from transformers import DeepseekV2Config, DeepseekV3Config

    model_type, fields = SHAPES[shape]
    fields = dict(fields, num_hidden_layers=layers, first_k_dense_replace=1 if dense is None else dense,
                  tie_word_embeddings=False, torch_dtype="bfloat16")
    config = (DeepseekV2Config if model_type == "deepseek_v2" else DeepseekV3Config)(**fields)
    if model_type == "deepseek_v2":
        config.scoring_func = "softmax"
    return config


def hf_tensors(config) -> dict:
    """HF tensor name -> shape for ``config`` (config.json's fields, or transformers' config object): the layout of
    DeepSeek's released files as the package reads them (``checkpoints.hf_peft.hf_layout``), not the installed
    transformers' modules: transformers 5 (the GPU image's) keeps routed experts fused in memory
    (``experts.gate_up_proj``), so its state dict is not that layout. tests/test_real_size_bench.py holds it equal
    to transformers 4.57's state dict."""
    from nemo_mla_lora.arch.hf_config import spec_from_hf
    from nemo_mla_lora.checkpoints.hf_peft import hf_layout

    return hf_layout(spec_from_hf(config))


def _random(name: str, shape: tuple, fp8: bool) -> dict:
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    if len(shape) == 1:  # norms around 1, V3's e_score_correction_bias small
        scale = 0.01 if "e_score" in name else 0.1
        return {name: (1.0 * ("e_score" not in name) + scale * torch.randn(shape, generator=gen)).to(torch.bfloat16)}
    linear = "proj" in name and "embed" not in name
    if not (fp8 and linear):
        std = 1.0 if "embed" in name else 0.02
        return {name: torch.empty(shape, dtype=torch.bfloat16).normal_(0, std, generator=gen)}
    w = (torch.randn(shape, generator=gen) * 64).clamp_(-448, 448).to(torch.float8_e4m3fn)
    blocks = (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))
    scale = (0.02 / 64) * (0.5 + torch.rand(blocks, generator=gen))
    return {name: w, name.replace(".weight", ".weight_scale_inv"): scale.float()}


def make(args) -> None:
    config = _config(args.shape, args.layers, args.dense)
    print(json.dumps(write_checkpoint(Path(args.out), config, args.fp8, args.rank)))


def write_checkpoint(out: Path, config, fp8: bool = False, rank: int = 16, shard_bytes: int = SHARD_BYTES) -> dict:
    """An HF checkpoint of ``config`` (random values, see the module docstring) and its LoRA in ``out/adapter``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=False)
    if fp8:
        config.quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [BLOCK, BLOCK]}
    config.to_json_file(out / "config.json")
    tensors = hf_tensors(config)
    count, current = 0, {}
    for name, shape in sorted(tensors.items(), key=lambda kv: _file_order(kv[0])):
        current.update(_random(name, shape, fp8))
        if sum(t.numel() * t.element_size() for t in current.values()) >= shard_bytes:
            count += 1
            _write_shard(out, count, current, save_file)
            current = {}
    if current:
        count += 1
        _write_shard(out, count, current, save_file)
    weight_map = {}
    for i in range(1, count + 1):  # rename to the -of-N convention once N is known
        dst = f"model-{i:05d}-of-{count:05d}.safetensors"
        (out / f"part-{i:05d}.safetensors").rename(out / dst)
        weight_map.update({k: dst for k in _keys(out / dst)})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    _make_adapter(out / "adapter", tensors, rank)
    return {"dir": str(out), "shards": count, "bytes": _size(out, "model-*.safetensors"),
            "adapter_bytes": _size(out / "adapter", "*")}


def _file_order(name: str) -> tuple:
    """Where a tensor goes in the shards, as DeepSeek's files have them: embedding, layer by layer, norm, lm_head."""
    layer = re.search(r"\.layers\.(\d+)\.", name)
    return (1, int(layer.group(1))) if layer else ((0, 0) if "embed_tokens" in name else (2, 0))


def _write_shard(out: Path, index: int, tensors: dict, save_file) -> None:
    save_file(tensors, str(out / f"part-{index:05d}.safetensors"), metadata={"format": "pt"})
    print(f"shard {index}: {sum(t.numel() * t.element_size() for t in tensors.values()) / 1e9:.2f} GB", flush=True)


def _keys(path: Path) -> list:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return list(f.keys())


def _make_adapter(directory: Path, tensors: dict, rank: int) -> None:
    """An HF PEFT LoRA on every linear (attention, dense MLP, shared and routed experts), B != 0."""
    from safetensors.torch import save_file

    directory.mkdir()
    lora, targets = {}, set()
    for name, shape in tensors.items():
        if len(shape) != 2 or "proj" not in name:
            continue
        module = name.removesuffix(".weight")
        gen = torch.Generator().manual_seed(zlib.crc32(module.encode()))
        a = torch.randn(rank, shape[1], generator=gen) / shape[1] ** 0.5
        b = 0.01 * torch.randn(shape[0], rank, generator=gen)
        lora[f"base_model.model.{module}.lora_A.weight"] = a.to(torch.bfloat16)
        lora[f"base_model.model.{module}.lora_B.weight"] = b.to(torch.bfloat16)
        targets.add(module.rsplit(".", 1)[-1])
    save_file(lora, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False, "use_rslora": False}))


def _size(directory: Path, pattern: str) -> int:
    return sum(f.stat().st_size for f in Path(directory).rglob(pattern) if f.is_file())


def drop_cache(directory: Path) -> None:
    """Evict the files' pages from the page cache (no root needed: fsync, then POSIX_FADV_DONTNEED)."""
    for f in Path(directory).rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def disk(args) -> None:
    path, total, chunk = Path(args.dir) / "disk_probe.bin", args.gb << 30, os.urandom(64 << 20)
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(total // len(chunk)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    write = total / (time.perf_counter() - start)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    start = time.perf_counter()
    while os.read(fd, 16 << 20):
        pass
    read = total / (time.perf_counter() - start)
    os.close(fd)
    path.unlink()
    result = {"bytes": total, "write_MBps": round(write / 1e6, 1), "read_cold_MBps": round(read / 1e6, 1)}
    (Path(args.dir) / "disk.json").write_text(json.dumps(result))
    print(json.dumps(result))


class Sampler(threading.Thread):
    """RSS, high-water mark and I/O bytes of one process, every ``period`` seconds, until it exits."""

    def __init__(self, pid: int, period: float = 0.2, kill_above_gib: float | None = None):
        super().__init__(daemon=True)
        self.kill_above_gib, self.killed = kill_above_gib, False
        self.pid, self.period, self.samples, self.hwm, self.io, self.cpu = pid, period, [], 0, {}, 0.0

    def run(self):
        start = time.perf_counter()
        while True:
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
                io = Path(f"/proc/{self.pid}/io").read_text()
                stat = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                return
            fields = {k: v.split()[0] for k, _, v in (line.partition(":") for line in status.splitlines()) if v.split()}
            if "VmRSS" not in fields:  # a zombie: exited
                return
            self.samples.append((time.perf_counter() - start, int(fields["VmRSS"]) / 2**20))  # GiB
            self.hwm = max(self.hwm, int(fields.get("VmHWM", 0)) / 2**20)
            if self.kill_above_gib and self.samples[-1][1] > self.kill_above_gib:  # before the machine runs out
                os.kill(self.pid, 9)
                self.killed = True
            self.cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
            self.io = {k: int(v) for k, _, v in (line.partition(":") for line in io.splitlines()) if v.strip()}
            time.sleep(self.period)


# An older checkout's export (--code DIR: its package first on the path), called without its Hydra config.
OLD_EXPORT = """
import sys
from nemo_mla_lora.runtime import parallel
from nemo_mla_lora.export.pipeline import export
if __name__ == "__main__":
    parallel.init_megatron()
    export(sys.argv[1], sys.argv[2], sys.argv[3], fmt=sys.argv[4])
"""


def run_one(base: Path, adapter: Path | None, fmt: str, output: Path, verify: str, extra: list,
            code: str | None = None, kill_above_gib: float | None = None, cpus: set | None = None) -> dict:
    if output.exists():  # the run deletes what it wrote: never something that was there before
        raise SystemExit(f"{output} exists; remove it or choose another --work")
    drop_cache(base)
    if adapter:
        drop_cache(adapter)
    cmd = [sys.executable, "-m", "nemo_mla_lora.recipes.export", f"base={base}",
           f"adapter={adapter if adapter else 'null'}", f"output={output}", f"format={fmt}", f"verify={verify}", *extra]
    env = dict(os.environ)
    if code:
        cmd = [sys.executable, "-c", OLD_EXPORT, str(base), str(adapter), str(output), fmt]
        env["PYTHONPATH"] = code
    start = time.perf_counter()
    if cpus:  # the export on these cores only (its torch threads follow the affinity)
        env["OMP_NUM_THREADS"] = str(len(cpus))
    proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    sampler = Sampler(proc.pid, kill_above_gib=kill_above_gib)
    sampler.start()
    log = proc.communicate()[0]
    wall = time.perf_counter() - start
    sampler.join()
    if sampler.killed:
        return {"format": fmt, "killed": f"RSS passed {kill_above_gib} GiB after {wall:.0f} s", "wall_s": round(wall, 1),
                "peak_rss_GiB": round(sampler.hwm, 3), "samples": sampler.samples, "code": code}
    if proc.returncode != 0:
        raise SystemExit(f"export {fmt} failed (exit {proc.returncode}):\n{log[-4000:]}")
    manifest = json.loads((output / "manifest.json").read_text())
    return {"format": fmt, "code": code, "cores": len(cpus or os.sched_getaffinity(0)), "wall_s": round(wall, 1), "cpu_s": round(sampler.cpu, 1), "peak_rss_GiB": round(sampler.hwm, 3),
            "read_GB": round(sampler.io.get("read_bytes", 0) / 1e9, 2),
            "written_GB": round(sampler.io.get("write_bytes", 0) / 1e9, 2),
            "base_GB": round(_size(base, "*") / 1e9, 2), "export_GB": round(_size(output, "*") / 1e9, 2),
            "timing": manifest.get("timing"), "verify": manifest.get("verify"), "samples": sampler.samples}


def run(args) -> None:
    disk_speed = json.loads(Path(args.disk).read_text())
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    base, rows = Path(args.base), []
    adapter = None if args.no_adapter else base / "adapter"
    base_files = [f for f in base.iterdir() if f.is_file()]
    for fmt in args.formats:
        output = Path(args.work) / f"export_{fmt}"
        cpus = {int(c) for c in args.cpus.split(",")} if args.cpus else None
        row = run_one(base, adapter, fmt, output, args.verify, args.extra, args.code, args.kill_above_gib, cpus)
        if "killed" in row:
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "samples"}), flush=True)
            subprocess.run(["rm", "-rf", str(output), str(output.parent / f".{output.name}.partial")], check=True)
            continue
        read_s = sum(f.stat().st_size for f in base_files) / (disk_speed["read_cold_MBps"] * 1e6)
        write_s = row["export_GB"] * 1e9 / (disk_speed["write_MBps"] * 1e6)
        row.update(disk_bound_s=round(read_s + write_s, 1), share_of_disk_speed=round((read_s + write_s) / row["wall_s"], 3))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "samples"}), flush=True)
        _save(results_dir, disk_speed, base, rows)
        if not args.keep:
            subprocess.run(["rm", "-rf", str(output)], check=True)
    _save(results_dir, disk_speed, base, rows)
    plot(rows, results_dir / "rss.png", args.title or base.name)


def _save(results_dir: Path, disk_speed: dict, base: Path, rows: list) -> None:
    (results_dir / "results.json").write_text(json.dumps(
        {"disk": disk_speed, "base": str(base), "command": " ".join(sys.argv), "rows": rows}, indent=1))


def plot(rows: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for row in rows:
        t, rss = zip(*row["samples"]) if row["samples"] else ((), ())
        what = "before, killed" if "killed" in row else ("before" if row.get("code") else "")
        ax.plot(t, rss, label=f"{row['format']} {what} (peak {row['peak_rss_GiB']:.2f} GiB, {row['wall_s']:.0f} s)")
    ax.axhline(2.0, color="grey", linestyle="--", linewidth=1, label="2 GiB")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (GiB)")
    ax.set_title(textwrap.fill(f"export of {title}: resident memory over time", 90), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--shape", choices=sorted(SHAPES), default="v2-lite")
    m.add_argument("--layers", type=int, default=24)
    m.add_argument("--dense", type=int, default=None, help="first_k_dense_replace (default 1)")
    m.add_argument("--fp8", action="store_true")
    m.add_argument("--rank", type=int, default=16, help="LoRA rank (peft.dim)")
    m.add_argument("--out", required=True)
    d = sub.add_parser("disk")
    d.add_argument("--dir", required=True)
    d.add_argument("--gb", type=int, default=8)
    r = sub.add_parser("run")
    r.add_argument("--base", required=True)
    r.add_argument("--formats", nargs="+", default=["hf", "absorbed", "mcore", "nemo"])
    r.add_argument("--disk", required=True)
    r.add_argument("--work", default=None)
    r.add_argument("--results", required=True)
    r.add_argument("--verify", default="full")
    r.add_argument("--no-adapter", action="store_true")
    r.add_argument("--keep", action="store_true")
    r.add_argument("--title", default=None)
    r.add_argument("--extra", nargs="*", default=[], help="more recipes.export overrides")
    r.add_argument("--code", default=None, help="an older checkout to run instead (its export(), defaults)")
    r.add_argument("--kill-above-gib", type=float, default=None, help="stop an export whose RSS passes this")
    r.add_argument("--cpus", default=None, help="comma-separated cores to run the export on (default: all)")
    args = ap.parse_args()
    if args.cmd == "run" and args.work is None:
        args.work = str(Path(args.base).parent)
    {"make": make, "disk": disk, "run": run}[args.cmd](args)


if __name__ == "__main__":
    main()
