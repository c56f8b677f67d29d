"""Inference on absorbed checkpoints: a latent KV cache, absorbed MLA attention, generation."""
