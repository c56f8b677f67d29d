"""Many unmerged LoRA adapters in one batch on a served base (absorbed at load), with the cache still latent.

Each request (batch row) names one adapter, or none (index 0). The adapters' deltas are applied as
factored corrections next to the absorbed einsums, never by materializing per-head K or V:

    q down/up, q_proj, kv down, proj:   y[i] += s_i (x[i] A_i^T) B_i^T                    per row i
    kv up, K rows:                      q_lat[h] += s_i A_i^T (B_K,i[h]^T q_nope[h])      [b, s, h, c]
    kv up, V rows:                      o[h]     += s_i B_V,i[h] (A_i o_lat[h])           [s, b, h, dv]

with, for ``linear_kv_up_proj``, A [r, c] and B viewed [h, dn + dv, r] split into B_K [h, dn, r] and
B_V [h, dv, r]. An adapter on ``linear_kv_down_proj`` changes each request's own c_kv and k_rope: the
cache stays kv_lora_rank + qk_rope_head_dim values per token.

Batched without per-row gathers: the n loaded adapters' factors are stacked along the rank into m = n*r
slots (ranks zero-padded to the largest, scale folded into B: both exact), laid out once at load for
plain matrix products: A [m, in], B^T [m, out]; for kv-up B_K [h, dn, m] and B_V [h, m, dv]. Every row
is projected onto all m slots, the slots of other adapters are zeroed by the row's mask [b, m], and one
product with B adds the row's own delta: three kernels per target (mm, mask, addmm), every factor read
once per step instead of a per-row copy of its adapter's factors. On CUDA in 16 bits, ``lora_kernels`` fuses
the mask, the second product and the add (two launches per linear target, one per kv-up correction). The extra
FLOPs, b*m*(in + out), are
small while m is. Index legend: b batch, s positions, h heads, d head dim, c latent, r rank, n loaded
adapters, m = n*r slots.
"""

import torch

from nemo_mla_lora.arch.mla_spec import MLASpec
from nemo_mla_lora.peft.placements import ATTENTION

KERNEL_MAX_SLOTS = 256  # lora_kernels' per-head kernels hold z [rows, slots] in registers; more take torch ops
SUPPORTED = ATTENTION  # every MLA attention linear; MLP/expert adapters must be merged first


class AdapterBank:
    """Several unmerged adapters laid out once for one batch: each row of a batch picks one (or none) by id.

    Args:
        spec: the served model's MLA dimensions.
        factors: adapter name -> {module: (A [r, in], B [out, r] full height, scale)}
            (``open_adapter(...).factors``); ranks may differ (zero-padded to the largest).
        device, dtype: where and in which dtype the stacked factors live.
        kernels: apply the corrections through ``kernels.lora_kernels`` (one or two launches each instead of
            three to five); None: ``_use_kernels``' choice (CUDA, bf16/fp16).
    """

    def __init__(self, spec: MLASpec, factors: dict, device="cpu", dtype=torch.float32, kernels: bool | None = None):
        self.spec, self.names = spec, ["none"] + list(factors)
        per_module = list(factors.values())
        modules = sorted({m for f in per_module for m in f})
        unsupported = [m for m in modules if m.rsplit(".", 1)[-1] not in SUPPORTED]
        if unsupported:
            raise ValueError(
                f"multi-adapter decode applies adapters on the MLA attention linears {SUPPORTED}; "
                f"merge the others into the base first. Found: {unsupported[:5]}"
            )
        self.rank = max((a.shape[0] for f in per_module for a, _, _ in f.values()), default=0)
        self.a, self.b_t = {}, {}  # module -> A [m, in], B^T [m, out]; adapter i (1-based id) at slots (i-1)*r..
        self.b_k, self.b_v = {}, {}  # linear_kv_up_proj modules -> B_K [h, dn, m], B_V [h, m, dv]
        for m in modules:
            a_stack, b_stack = self._stack([f.get(m) for f in per_module])
            self.a[m], self.b_t[m] = a_stack.to(device, dtype), b_stack.mT.contiguous().to(device, dtype)
            if m.endswith("linear_kv_up_proj"):  # B^T [m, h*(dn+dv)] -> B_K [h, dn, m], B_V [h, m, dv]
                dn = spec.qk_nope_head_dim
                b_heads = self.b_t.pop(m).view(-1, spec.num_heads, dn + spec.v_head_dim)  # [m, h, dn + dv]
                self.b_k[m] = b_heads[..., :dn].permute(1, 2, 0).contiguous()
                self.b_v[m] = b_heads[..., dn:].permute(1, 0, 2).contiguous()
        self.kernels = _use_kernels(kernels, torch.device(device), dtype, self.rank * len(factors))

    def _stack(self, factors: list) -> tuple[torch.Tensor, torch.Tensor]:
        """[(A [r_i, in], B [out, r_i], scale) or None per adapter] -> A [n*r, in], B [out, n*r] in float64."""
        have = [f for f in factors if f is not None]
        r, n = self.rank, len(factors)
        a_stack = torch.zeros(n * r, have[0][0].shape[1], dtype=torch.float64)
        b_stack = torch.zeros(have[0][1].shape[0], n * r, dtype=torch.float64)
        for i, f in enumerate(factors):
            if f is not None:
                a, b, scale = f
                a_stack[i * r : i * r + a.shape[0]] = a.double()
                b_stack[:, i * r : i * r + b.shape[1]] = scale * b.double()
        return a_stack, b_stack

    @classmethod
    def load(
        cls, spec: MLASpec, directories: dict, device="cpu", dtype=torch.float32, kernels: bool | None = None
    ) -> "AdapterBank":
        """``directories``: name -> adapter directory (ours or HF PEFT), all for the base of ``spec``."""
        from nemo_mla_lora.checkpoints.sources import open_adapter

        adapters = {name: open_adapter(d, spec) for name, d in directories.items()}
        return cls(spec, {name: a.factors(a.modules) for name, a in adapters.items()}, device, dtype, kernels)

    def ids(self, names) -> torch.Tensor:
        """Row adapter names (None or "none" for the base) -> indices [b]."""
        unknown = [n for n in names if n not in self.names and n is not None]
        if unknown:
            raise ValueError(f"unknown adapters {unknown}; loaded: {self.names[1:]}")
        return torch.tensor([self.names.index(n or "none") for n in names])

    def row_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [b] -> [b, n*r]: 1 on the slots of row i's adapter, 0 elsewhere (all 0 for "none")."""
        onehot = torch.nn.functional.one_hot(ids.to(self._device()).long(), len(self.names))[:, 1:]  # [b, n]
        return onehot.repeat_interleave(self.rank, dim=1).to(self._dtype())

    def for_layer(self, layer: int, ids: torch.Tensor, mask: torch.Tensor | None = None) -> "LayerCorrections":
        """``mask``: ``row_mask(ids)``, computed once per forward and shared by the layers."""
        return LayerCorrections(
            self, f"decoder.layers.{layer}.self_attention", self.row_mask(ids) if mask is None else mask
        )

    def _device(self):
        return next(iter(self.a.values())).device if self.a else "cpu"

    def _dtype(self):
        return next(iter(self.a.values())).dtype if self.a else torch.float32


class LayerCorrections:
    """One layer's factored corrections for a batch whose row i uses the adapter that ``mask[i]`` selects."""

    def __init__(self, bank: AdapterBank, prefix: str, mask: torch.Tensor):
        self.bank, self.prefix, self.mask = bank, prefix, mask  # mask [b, m]

    def linear(self, leaf: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [s, b, out] + the row-wise delta of ``leaf`` for x [s, b, in]."""
        m = f"{self.prefix}.{leaf}"
        if m not in self.bank.a:
            return y
        s, b, _ = x.shape
        z = (x.reshape(s * b, -1) @ self.bank.a[m].T).view(s, b, -1)  # [s, b, m]: every slot
        if self.bank.kernels and y.is_contiguous():
            return lora_kernels().expand_add(y, z, self.mask, self.bank.b_t[m], b)  # mask, product, add: one launch
        return torch.addmm(y.reshape(s * b, -1), (z * self.mask).view(s * b, -1), self.bank.b_t[m]).view_as(y)

    def q_lat(self, q_nope: torch.Tensor, q_lat: torch.Tensor) -> torch.Tensor:
        """q_lat [b, s, h, c] + sum_d q_nope[s, b, h, d] B_K[h, d, m] A[m, c] (the row's own slots)."""
        m = self._kv_up()
        if m is None:
            return q_lat
        if self.bank.kernels and q_lat.stride(-1) == 1 and q_nope.stride(-1) == 1:
            return lora_kernels().q_lat_add(q_lat, q_nope, self.bank.b_k[m], self.bank.a[m], self.mask)
        z = torch.einsum("sbhd,hdm->bshm", q_nope, self.bank.b_k[m]) * self.mask[:, None, None, :]  # [b, s, h, m]
        return q_lat + z @ self.bank.a[m]

    def o(self, o_lat: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """o [s, b, h, dv] + B_V[h, m, dv] (A[m, c] o_lat[b, s, h, c]) (the row's own slots)."""
        m = self._kv_up()
        if m is None:
            return o
        if self.bank.kernels and o.stride(-1) == 1 and o_lat.stride(-1) == 1:
            return lora_kernels().o_add(o, o_lat, self.bank.a[m], self.bank.b_v[m], self.mask)
        z = (o_lat @ self.bank.a[m].T) * self.mask[:, None, None, :]  # [b, s, h, m]
        return o + torch.einsum("bshm,hmd->sbhd", z, self.bank.b_v[m])

    def _kv_up(self) -> str | None:
        m = f"{self.prefix}.linear_kv_up_proj"
        return m if m in self.bank.a else None


def lora_kernels():
    from nemo_mla_lora.inference.kernels import lora_kernels as kernels  # Triton: imported only where it runs

    return kernels


def _use_kernels(asked: bool | None, device: torch.device, dtype: torch.dtype, slots: int) -> bool:
    """Auto: CUDA, 16-bit (the kernels' fp32 form is exact but spills registers at V3's dims: cuBLAS is the
    faster fp32 path), Triton importable, at most ``KERNEL_MAX_SLOTS`` slots."""
    import importlib.util

    if asked is not None:
        return asked
    triton = importlib.util.find_spec("triton") is not None
    sixteen_bits = dtype in (torch.bfloat16, torch.float16)
    return triton and device.type == "cuda" and sixteen_bits and 0 < slots <= KERNEL_MAX_SLOTS


class NoCorrections:
    """The merged or base-only case: every correction is the identity."""

    def linear(self, leaf, x, y):
        return y

    def q_lat(self, q_nope, q_lat):
        return q_lat

    def o(self, o_lat, o):
        return o
