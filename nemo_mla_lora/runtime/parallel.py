"""Process-group set-up for driving a Megatron-Core model directly (tests, CPU recipes, tools).

NeMo's ``MegatronStrategy`` does this itself on the GPU path; here it is for the plain-Lightning CPU
path and for tests that spawn gloo processes. One process or a ``torchrun``-style environment.
"""

import os
import socket
from contextlib import contextmanager

import torch
import torch.distributed as dist

from nemo_mla_lora.runtime import cpu_compat, te_compat
from nemo_mla_lora.runtime.processes import install_checkpoint_queue, process_age


def rank() -> int:
    """This process's torch.distributed rank (0 when not distributed)."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def init_megatron(
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    seed: int = 1234,
    port: int | None = None,
    marks: dict | None = None,
) -> None:
    """Initialise torch.distributed (gloo on CPU, nccl on GPU) and Megatron's model-parallel groups.

    Args:
        tp: tensor parallel size.
        pp: pipeline parallel size (on the CPU too: ``cpu_compat``'s pipeline shims).
        ep: expert parallel size.
        etp: expert tensor parallel size (None: Megatron's default, ``tp``).
        seed: torch's and Megatron's RNG seed.
        port: the rendezvous port of a process of our own (default: a free one).
        marks: if given, gets the process's age (s) after Megatron's import (``megatron_import``), after the
            process group (``process_group``) and after Megatron's parallel state (``parallel_state``).
    """

    def mark(name: str) -> None:
        if marks is not None:
            marks[name] = process_age()

    cpu_compat.apply()
    te_compat.apply()
    from megatron.core import parallel_state

    mark("megatron_import")
    if not dist.is_initialized():
        _init_process_group(port)
    mark("process_group")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    cpu_compat.seed(seed)
    install_checkpoint_queue()  # Megatron's checkpoint writer's helper process dies with this one
    mark("parallel_state")


def _init_process_group(port: int | None) -> None:
    """torch.distributed's world from the launcher's environment (torchrun's RANK / WORLD_SIZE / LOCAL_RANK), or a
    world of one process of our own on a free port (never an inherited one); gloo on CPU, nccl on GPU."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "WORLD_SIZE" not in os.environ:  # one process of our own: never reuse an inherited port
        os.environ["MASTER_PORT"] = str(port or free_port())
        loopback_for_gloo()
    elif port:
        os.environ["MASTER_PORT"] = str(port)
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    backend = "gloo" if cpu_compat.cuda_absent() else "nccl"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group(backend=backend, rank=rank, world_size=world)


def loopback_for_gloo() -> None:
    """For a world of one process of our own: gloo's groups (the world's on the CPU, Megatron's gloo groups
    everywhere) on the loopback interface. Without ``GLOO_SOCKET_IFNAME`` gloo picks its interface by resolving
    this host's name, which waits out the resolver's timeouts where the name is not in /etc/hosts and no DNS
    answers (a machine without network). A ``GLOO_SOCKET_IFNAME`` already set is kept."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    names = {name for _, name in socket.if_nameindex()}
    loopback = next((name for name in ("lo", "lo0") if name in names), None)
    if loopback is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = loopback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def megatron_session(**kwargs):
    """``with megatron_session(tp=1):`` initialise, run, tear down."""
    init_megatron(**kwargs)
    try:
        yield
    finally:
        destroy()
