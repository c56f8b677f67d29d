"""Many unmerged LoRA adapters in one batch on an absorbed base, with the cache still latent.

Each request (batch row) names one adapter, or none (index 0). The adapters' deltas are applied as
factored corrections next to the absorbed einsums, never by materializing per-head K or V:

    q down/up, q_proj, kv down, proj:   y[i] += s_i (x[i] A_i^T) B_i^T                    per row i
    kv up, K rows:                      q_lat[h] += s_i A_i^T (B_K,i[h]^T q_nope[h])      [b, s, h, c]
    kv up, V rows:                      o[h]     += s_i B_V,i[h] (A_i o_lat[h])           [s, b, h, dv]

with, for ``linear_kv_up_proj``, A [r, c] and B viewed [h, dn + dv, r] split into B_K [h, dn, r] and
B_V [h, dv, r]. An adapter on ``linear_kv_down_proj`` changes each request's own c_kv and k_rope: the
cache stays kv_lora_rank + qk_rope_head_dim values per token.

Batched without per-row gathers: the n loaded adapters' factors are stacked along the rank, A [n, r, in]
and B [n, out, r] (ranks zero-padded to the largest, scale folded into B: both exact). Every row is
projected onto all n*r slots, x A^T -> [s, b, n, r], the slots of other adapters are zeroed by the row's
one-hot [b, n], and one product with B adds the row's own delta. Each step reads every factor once
(n*r*(in + out) values) instead of a per-row copy of its adapter's factors; the extra FLOPs, b*n*r*(in +
out), are small while n*r is. Index legend: b batch, s positions, h heads, d head dim, c latent, r rank,
n loaded adapters.
"""

import torch

from nemo_mla_lora.mla_spec import MLASpec

SUPPORTED = ("linear_q_down_proj", "linear_q_up_proj", "linear_q_proj", "linear_kv_down_proj",
             "linear_kv_up_proj", "linear_proj")


class AdapterBank:
    def __init__(self, spec: MLASpec, factors: dict, device="cpu", dtype=torch.float32):
        """``factors``: name -> {module: (A [r, in], B [out, r] full height, scale)} (``open_adapter(...).factors``)."""
        self.spec, self.names = spec, ["none"] + list(factors)
        per_module = list(factors.values())
        modules = sorted({m for f in per_module for m in f})
        unsupported = [m for m in modules if m.rsplit(".", 1)[-1] not in SUPPORTED]
        if unsupported:
            raise ValueError(f"multi-adapter decode applies adapters on the MLA attention linears {SUPPORTED}; "
                             f"merge the others into the base first. Found: {unsupported[:5]}")
        self.a, self.b = {}, {}  # module -> [n, r, in], [n, out, r]; adapter i (1-based id) at slot i - 1
        for m in modules:
            have = [f[m] for f in per_module if m in f]
            r = max(a.shape[0] for a, _, _ in have)
            a_stack = torch.zeros(len(per_module), r, have[0][0].shape[1], dtype=torch.float64)
            b_stack = torch.zeros(len(per_module), have[0][1].shape[0], r, dtype=torch.float64)
            for i, f in enumerate(per_module):
                if m in f:
                    a, b, scale = f[m]
                    a_stack[i, :a.shape[0]] = a.double()
                    b_stack[i, :, :b.shape[1]] = scale * b.double()
            self.a[m], self.b[m] = a_stack.to(device, dtype), b_stack.to(device, dtype)

    @classmethod
    def load(cls, spec: MLASpec, directories: dict, device="cpu", dtype=torch.float32) -> "AdapterBank":
        """``directories``: name -> adapter directory (ours or HF PEFT), all for the base of ``spec``."""
        from nemo_mla_lora.export.sources import open_adapter

        adapters = {name: open_adapter(d, spec) for name, d in directories.items()}
        return cls(spec, {name: a.factors(a.modules) for name, a in adapters.items()}, device, dtype)

    def ids(self, names) -> torch.Tensor:
        """Row adapter names (None or "none" for the base) -> indices [b]."""
        unknown = [n for n in names if n not in self.names and n is not None]
        if unknown:
            raise ValueError(f"unknown adapters {unknown}; loaded: {self.names[1:]}")
        return torch.tensor([self.names.index(n or "none") for n in names])

    def for_layer(self, layer: int, ids: torch.Tensor) -> "LayerCorrections":
        return LayerCorrections(self, f"decoder.layers.{layer}.self_attention", ids.to(self._device()))

    def _device(self):
        return next(iter(self.a.values())).device if self.a else "cpu"


class LayerCorrections:
    """One layer's factored corrections for a batch whose row i uses adapter ``ids[i]`` (0: none)."""

    def __init__(self, bank: AdapterBank, prefix: str, ids: torch.Tensor):
        self.bank, self.prefix = bank, prefix
        n = len(bank.names) - 1
        self.onehot = torch.nn.functional.one_hot(ids.long(), n + 1)[:, 1:]  # [b, n]; the "none" row is all 0

    def _factors(self, leaf: str):
        m = f"{self.prefix}.{leaf}"
        if m not in self.bank.a:
            return None
        a, b = self.bank.a[m], self.bank.b[m]  # [n, r, in], [n, out, r]
        return a, b, self.onehot.to(a.dtype)

    def linear(self, leaf: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [s, b, out] + the row-wise delta of ``leaf`` for x [s, b, in]."""
        f = self._factors(leaf)
        if f is None:
            return y
        a, b, onehot = f
        z = torch.einsum("sbi,nri->sbnr", x, a) * onehot[None, :, :, None]  # [s, b, n, r]: own slots only
        return y + torch.einsum("sbnr,nor->sbo", z, b)

    def q_lat(self, q_nope: torch.Tensor, q_lat: torch.Tensor) -> torch.Tensor:
        """q_lat [b, s, h, c] + sum_d q_nope[s, b, h, d] B_K[n, h, d, r] A[n, r, c] (the row's own n)."""
        f = self._kv_up()
        if f is None:
            return q_lat
        a, b_k, _, onehot = f
        z = torch.einsum("sbhd,nhdr->bshnr", q_nope, b_k) * onehot[:, None, None, :, None]  # [b, s, h, n, r]
        return q_lat + torch.einsum("bshnr,nrc->bshc", z, a)

    def o(self, o_lat: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """o [s, b, h, dv] + B_V[n, h, dv, r] (A[n, r, c] o_lat[b, s, h, c]) (the row's own n)."""
        f = self._kv_up()
        if f is None:
            return o
        a, _, b_v, onehot = f
        z = torch.einsum("bshc,nrc->bshnr", o_lat, a) * onehot[:, None, None, :, None]  # [b, s, h, n, r]
        return o + torch.einsum("bshnr,nhdr->sbhd", z, b_v)

    def _kv_up(self):
        """linear_kv_up_proj's A [n, r, c], B_K [n, h, dn, r], B_V [n, h, dv, r] (B viewed [n, h, dn+dv, r])
        and the one-hot [b, n]."""
        f = self._factors("linear_kv_up_proj")
        if f is None:
            return None
        a, b, onehot = f
        s = self.bank.spec
        view = b.view(b.shape[0], s.num_heads, s.qk_nope_head_dim + s.v_head_dim, -1)
        return a, view[:, :, :s.qk_nope_head_dim], view[:, :, s.qk_nope_head_dim:], onehot


class NoCorrections:
    """The merged or base-only case: every correction is the identity."""

    def linear(self, leaf, x, y):
        return y

    def q_lat(self, q_nope, q_lat):
        return q_lat

    def o(self, o_lat, o):
        return o
