"""CPU compatibility shims for megatron-core 0.15.3 on a CPU-only torch build.

Applied only when CUDA is absent (``apply()`` is a no-op on a GPU machine). Each shim answers one
failure seen without it (docs/stack.md):

1. mcore calls ``torch.cuda.current_device()`` unconditionally (RotaryEmbedding, YarnRotaryEmbedding,
   the MoE router's buffers, GlobalMemoryBuffer, dist-checkpointing) and ``torch.cuda.synchronize()``
   in dist-checkpoint save: both answer for the CPU.
2. ``model_parallel_cuda_manual_seed`` asserts CUDA: ``seed()`` below uses the inference RNG tracker
   (plain ``torch.manual_seed``) instead.
3. Pipeline parallelism: the schedules' CUDA token counter and the tied embeddings' ``.cuda()``
   (``pipeline_shims``).

Transformer-Engine-absent fixes are not CPU shims (the GPU machine lacks TE too): ``te_compat.py``
and the TE-free layer spec in ``models/layer_spec.py``.
"""

import types

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
    pipeline_shims()
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


def pipeline_shims() -> None:
    """Megatron-Core 0.15.3 under pipeline parallelism on a CPU-only torch (no-ops elsewhere). Idempotent.

    1. Every pipeline schedule (``get_forward_backward_func``'s) makes its token counter with
       ``torch.zeros([], device="cuda")``: the schedules module gets a ``torch`` whose ``zeros`` puts a ``"cuda"``
       tensor on the CPU (everything else is torch itself).
    2. With tied embeddings, ``LanguageModule.setup_embeddings_and_output_layer`` moves the first and last stages'
       copies of the word embeddings to the GPU (``weight.data.cuda()``) before summing them over the embedding
       group: there ``Tensor.cuda`` leaves a tensor where it is.
    """
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.pipeline_parallel import schedules

    if not isinstance(schedules.torch, _CpuZerosTorch):
        schedules.torch = _CpuZerosTorch("torch")
    setup = LanguageModule.setup_embeddings_and_output_layer
    if getattr(setup, "keeps_cpu_tensors", False):
        return

    def setup_on_cpu(self) -> None:
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *args, **kwargs: t
        try:
            setup(self)
        finally:
            torch.Tensor.cuda = cuda

    setup_on_cpu.keeps_cpu_tensors = True
    LanguageModule.setup_embeddings_and_output_layer = setup_on_cpu


class _CpuZerosTorch(types.ModuleType):
    """``torch`` for a module that asks for CUDA tensors by name on a CPU-only build (``pipeline_shims``)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)
