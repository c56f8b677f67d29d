"""Triton kernels for serving: latent decode attention (``triton_decode``, portable; ``hopper_decode``, TMA tiles)
and the multi-adapter LoRA corrections (``lora_kernels``). They import nothing else of this package."""
