"""The latent KV cache: per layer and token only c_kv (kv_lora_rank values, after the kv norm) and the
roped shared key k_rope (qk_rope_head_dim values), preallocated for ``max_length`` tokens.

Shapes: c_kv [L, b, T, c], k_rope [L, b, T, dr] (L layers, b batch, T max length, c latent, dr rope dim).
Every row of the batch holds the same number of tokens (``length``)."""

from dataclasses import dataclass

import torch

from nemo_mla_lora.mla_spec import MLASpec


@dataclass
class LatentKVCache:
    c_kv: torch.Tensor
    k_rope: torch.Tensor
    length: int = 0

    @classmethod
    def allocate(cls, spec: MLASpec, batch: int, max_length: int, dtype, device="cpu") -> "LatentKVCache":
        shape = (spec.num_layers, batch, max_length)
        return cls(torch.zeros(*shape, spec.kv_lora_rank, dtype=dtype, device=device),
                   torch.zeros(*shape, spec.qk_rope_head_dim, dtype=dtype, device=device))

    @property
    def max_length(self) -> int:
        return self.c_kv.shape[2]

    def write(self, layer: int, c_kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store c_kv [b, s, c] and k_rope [b, s, dr] at positions length..length+s-1 of ``layer``;
        returns that layer's filled cache, [b, t, c] and [b, t, dr] with t = length + s."""
        s = c_kv.shape[1]
        end = self.length + s
        if end > self.max_length:
            raise ValueError(f"latent cache holds {self.max_length} tokens; {self.length} + {s} requested")
        self.c_kv[layer, :, self.length:end] = c_kv
        self.k_rope[layer, :, self.length:end] = k_rope
        return self.c_kv[layer, :, :end], self.k_rope[layer, :, :end]

    def advance(self, s: int) -> None:
        """After every layer wrote its ``s`` new tokens."""
        self.length += s

    def bytes_per_token(self) -> int:
        """Allocated bytes per cached token, all layers."""
        per_layer = self.c_kv.shape[-1] * self.c_kv.element_size() + self.k_rope.shape[-1] * self.k_rope.element_size()
        return self.c_kv.shape[0] * per_layer
