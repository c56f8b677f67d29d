"""Serving merged exports: the engine absorbs ``linear_kv_up_proj`` at load (any merged format), a latent KV cache,
absorbed MLA attention, unmerged adapters in one batch (``adapters``), generation; Triton kernels in ``kernels/``."""
