"""CPU compatibility shims for megatron-core 0.15.3 on a CPU-only torch build.

Applied only when CUDA is absent (``apply()`` is a no-op on a GPU machine). Each shim answers one
failure seen without it (docs/stack.md):

1. mcore calls ``torch.cuda.current_device()`` unconditionally (RotaryEmbedding, YarnRotaryEmbedding,
   the MoE router's buffers, GlobalMemoryBuffer, dist-checkpointing) and ``torch.cuda.synchronize()``
   in dist-checkpoint save: both answer for the CPU.
2. ``model_parallel_cuda_manual_seed`` asserts CUDA: ``seed()`` below uses the inference RNG tracker
   (plain ``torch.manual_seed``) instead.

Transformer-Engine-absent fixes are not CPU shims (the GPU machine lacks TE too): ``te_compat.py``
and the TE-free layer spec in ``models/layer_spec.py``.
"""

import torch

_APPLIED = False


def cuda_absent() -> bool:
    return not torch.cuda.is_available()


def apply() -> bool:
    """Install the shims if CUDA is absent. Idempotent. Returns whether shims are active."""
    global _APPLIED
    if not cuda_absent():
        return False
    if _APPLIED:
        return True
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    _APPLIED = True
    return True


def seed(value: int) -> None:
    """Seed torch and Megatron's RNG tracker, on CPU or GPU."""
    from megatron.core import tensor_parallel

    if cuda_absent():
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
        torch.manual_seed(value)
    else:
        tensor_parallel.model_parallel_cuda_manual_seed(value)
        torch.manual_seed(value)
