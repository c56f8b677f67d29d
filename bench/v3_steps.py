"""One training step's time and memory on one device: the helpers of ``bench/v3_layers.py``."""

import gc
import statistics
import time

import torch
from lora_overhead import device  # bench/ is this script's directory


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Storage bytes autograd keeps for backward, parameters and the input excluded, each storage once."""

    def __init__(self, exclude: set):
        self.seen, self.bytes = set(exclude), 0

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in self.seen:
                self.seen.add(storage.data_ptr())
                self.bytes += storage.nbytes()
            return t

        super().__init__(pack, lambda t: t)


def inputs(hidden: int, seq: int, dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input [s, 1, h] requiring grad and the output gradient, seeded."""
    gen = torch.Generator(device=device()).manual_seed(seed)
    x = torch.randn(seq, 1, hidden, device=device(), dtype=dtype, generator=gen).requires_grad_()
    return x, torch.randn(x.shape, device=device(), dtype=dtype, generator=gen)


def backward(out: torch.Tensor, grad: torch.Tensor) -> None:
    out.backward(grad if out.dim() else None)


def time_steps(fwd, x, grad, params: list, warmup: int, iters: int) -> tuple[list, list]:
    """Forward and forward + backward ms of each timed step (CUDA events on a GPU, wall clock on the CPU)."""
    fwd_ms, step_ms = [], []
    for i in range(warmup + iters):
        x.grad = None
        for p in params:
            p.grad = None
        if x.is_cuda:
            events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            events[0].record()
            out = fwd(x)
            events[1].record()
            backward(out, grad)
            events[2].record()
            torch.cuda.synchronize()
            f, s = events[0].elapsed_time(events[1]), events[0].elapsed_time(events[2])
        else:
            t0 = time.perf_counter()
            out = fwd(x)
            t1 = time.perf_counter()
            backward(out, grad)
            f, s = (t1 - t0) * 1e3, (time.perf_counter() - t0) * 1e3
        del out
        if i >= warmup:
            fwd_ms.append(f)
            step_ms.append(s)
    return fwd_ms, step_ms


def memory_step(fwd, x, grad, params: list) -> dict:
    """One step's bytes: kept for backward (allocated after the forward on a GPU, the output included; the storage
    of the tensors autograd saves on the CPU) and the peak above what was allocated before it."""
    x.grad = None
    for p in params:
        p.grad = None
    cuda = x.is_cuda
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fwd(x)
        retained = torch.cuda.memory_allocated() - before
    else:  # the allocator cannot tell: count the storages autograd saves
        saved = SavedBytes({p.untyped_storage().data_ptr() for p in params} | {x.untyped_storage().data_ptr()})
        with saved:
            out = fwd(x)
    backward(out, grad)
    del out
    if cuda:
        return {
            "act_bytes": retained,
            "act_from": "allocated after forward - before",
            "step_peak_bytes": torch.cuda.max_memory_allocated() - before,
            "peak_bytes": torch.cuda.max_memory_allocated(),  # weights and input included
        }
    return {"act_bytes": saved.bytes, "act_from": "saved tensors' storage", "step_peak_bytes": None, "peak_bytes": None}


def timed_row(fwd, x, grad, model: torch.nn.Module, args) -> dict:
    params = list(model.parameters())
    fwd_ms, step_ms = time_steps(fwd, x, grad, params, args.warmup, args.iters)
    row = memory_step(fwd, x, grad, params)  # after the warm-up: library workspaces are allocated by then
    return row | {
        "fwd_ms": statistics.median(fwd_ms),
        "step_ms": statistics.median(step_ms),
        "step_ms_runs": step_ms,
        "fwd_ms_runs": fwd_ms,
        "base_params": sum(p.numel() for p in params if not p.requires_grad),
        "weight_bytes": sum(p.nbytes for p in params if not p.requires_grad),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "adapter_bytes": sum(p.nbytes for p in params if p.requires_grad),
    }


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fits(nbytes: int) -> str | None:
    """Why ``nbytes`` of weights cannot be built on this GPU now (None: they can)."""
    if not torch.cuda.is_available():
        return None
    free = torch.cuda.mem_get_info()[0]
    return None if nbytes < 0.9 * free else f"weights {nbytes / 2**30:.1f} GiB > 0.9 x free {free / 2**30:.1f} GiB"
