"""The latent KV cache: per layer and token only c_kv (kv_lora_rank values, after the kv norm) and the
roped shared key k_rope (qk_rope_head_dim values), preallocated for ``max_length`` tokens.

Shapes: c_kv [L, b, T, c], k_rope [L, b, T, dr] (L layers, b batch, T max length, c latent, dr rope dim).
Rows may hold different numbers of tokens (``lengths`` [b]): a right-padded prefill leaves row i valid up to
its prompt length, and each decode step writes row i's new token at position ``lengths[i]``.

Both are views of one buffer ``latents`` [L, b, P, c + dr] (P: T rounded up to ``PAGE`` = 64 positions), each
token's c_kv and k_rope side by side: the layout FlashMLA's paged decode reads (one layer's rows as pages of 64
tokens, ``kernels/flashmla.py``), and one our kernels read through strides."""

from dataclasses import dataclass

import torch

from nemo_mla_lora.arch.mla_spec import MLASpec
from nemo_mla_lora.inference.kernels.flashmla import PAGE  # positions per page of the buffer


@dataclass
class LatentKVCache:
    c_kv: torch.Tensor
    k_rope: torch.Tensor
    lengths: torch.Tensor  # [b] valid tokens per row
    length: int = 0  # the longest row's count, kept on the host: no device sync per layer
    static: bool = False  # attention reads the whole allocation, masked by lengths: fixed shapes (CUDA graphs)

    @classmethod
    def allocate(
        cls, spec: MLASpec, batch: int, max_length: int, dtype, device="cpu", static: bool = False
    ) -> "LatentKVCache":
        """Zeros for ``max_length`` tokens per row in every layer (module docstring: one buffer, two views).

        Args:
            spec: the model's MLA spec (layers, kv_lora_rank, qk_rope_head_dim).
            batch: rows.
            max_length: tokens per row (prompt and generated).
            dtype, device: the cache's.
            static: attention reads the whole allocation (fixed shapes for CUDA graphs: ``inference/graphs.py``).
        """
        c = spec.kv_lora_rank
        pages = -(-max_length // PAGE)
        latents = torch.zeros(
            spec.num_layers, batch, pages * PAGE, c + spec.qk_rope_head_dim, dtype=dtype, device=device
        )  # [L, b, P, c + dr]
        return cls(
            latents[:, :, :max_length, :c],  # [L, b, T, c]
            latents[:, :, :max_length, c:],  # [L, b, T, dr]
            torch.zeros(batch, dtype=torch.long, device=device),
            static=static,
        )

    def positions(self, s: int) -> torch.Tensor:
        """[b, s]: where each row's next ``s`` tokens go (and their rotary positions)."""
        if self.length + s > self.max_length:
            raise ValueError(f"latent cache holds {self.max_length} tokens; position {self.length + s - 1} requested")
        return self.lengths[:, None] + torch.arange(s, device=self.lengths.device)

    @property
    def max_length(self) -> int:
        return self.c_kv.shape[2]

    def write(self, layer: int, c_kv: torch.Tensor, k_rope: torch.Tensor, positions: torch.Tensor):
        """Store c_kv [b, s, c] and k_rope [b, s, dr] of ``layer`` at ``positions`` [b, s] (from ``positions``);
        returns that layer's cache up to the furthest position written, [b, t, c] and [b, t, dr] (``static``:
        the whole allocation, t = ``max_length``; positions past a row's own are masked by the attention)."""
        end = self.max_length if self.static else self.length + c_kv.shape[1]
        rows = torch.arange(c_kv.shape[0], device=c_kv.device)[:, None]  # [b, 1]
        self.c_kv[layer, rows, positions] = c_kv
        self.k_rope[layer, rows, positions] = k_rope
        return self.c_kv[layer, :, :end], self.k_rope[layer, :, :end]

    def advance(self, new_lengths: torch.Tensor | None = None, step: int | None = None) -> None:
        """After every layer wrote: row i now holds ``new_lengths[i]`` valid tokens, or (``step``) every row
        ``step`` more. ``step`` updates ``lengths`` in place and the host count without reading the device (no
        sync; what a CUDA graph replays); ``new_lengths`` reads the longest row back once."""
        if step is not None:
            self.lengths.add_(step)
            self.length += step
            return
        self.lengths = new_lengths.to(self.lengths)
        self.length = int(self.lengths.max())

    def bytes_per_token(self) -> int:
        """Allocated bytes per cached token, all layers."""
        per_layer = self.c_kv.shape[-1] * self.c_kv.element_size() + self.k_rope.shape[-1] * self.k_rope.element_size()
        return self.c_kv.shape[0] * per_layer
