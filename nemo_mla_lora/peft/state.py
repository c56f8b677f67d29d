"""Read a (single-rank) adapted model as tensors: the base state dict and the LoRA factors.

Names are Megatron module names without the wrapper's ``to_wrap`` level, so the same keys serve the
base checkpoint, the reference forward and the merge/export functions.
"""

import torch
from torch import nn

from nemo_mla_lora import keymap
from nemo_mla_lora.peft.mla_lora import WRAPPERS, MLALoRALinear
from nemo_mla_lora.peft.te_grouped import TEGroupedLoRALinear


def _clean(name: str) -> str:
    return name.replace(".to_wrap", "").removeprefix("module.")


def expert_adapters(name: str, module: TEGroupedLoRALinear) -> list:
    """``...mlp.experts.linear_fc1`` (TE grouped) -> [(``...mlp.experts.local_experts.{e}.linear_fc1``, A_e, B_e)]
    for its local experts e (parameters): the module names ``SequentialMLP`` experts have on this rank."""
    experts, leaf = name.rsplit(".", 1)
    return [(f"{experts}.local_experts.{e}.{leaf}", *module.adapter.expert(e))
            for e in range(module.adapter.num_experts)]


def lora_b_parameters(adapter: nn.Module) -> list:
    """An adapter's B parameters: ``lora_b``, or a TE grouped adapter's ``lora_b{e}``."""
    return [p for n, p in adapter.named_parameters(recurse=False) if n.startswith("lora_b")]


def base_state_dict(model: nn.Module) -> dict:
    """The base model's tensors (adapters and ``_extra_state`` dropped), detached, under the local spec's flat
    names (a TE-spec model's fused norms and grouped experts renamed: ``keymap.from_te_state_name``), the names
    ``adapter_factors`` uses."""
    out = {}
    for k, v in model.state_dict().items():
        name = keymap.from_te_state_name(_clean(k))
        if ".adapter." not in k and name is not None and isinstance(v, torch.Tensor):
            out[name] = v.detach()
    return out


def adapter_factors(model: nn.Module) -> dict:
    """module name -> (A [r, in], B [out, r] with zero rows outside the part, scale); TE grouped experts
    per expert (``expert_adapters``)."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, MLALoRALinear):
            out[_clean(n)] = (m.adapter.lora_a.detach(), m.adapter.full_b(), m.adapter.scale)
        elif isinstance(m, TEGroupedLoRALinear):
            out.update({e: (a.detach(), b.detach(), m.adapter.scale) for e, a, b in expert_adapters(_clean(n), m)})
    return out


def adapter_modules(model: nn.Module) -> dict:
    """Wrapped module name -> wrapper (a TE grouped wrapper once, under its own name)."""
    return {_clean(n): m for n, m in model.named_modules() if isinstance(m, WRAPPERS)}


@torch.no_grad()
def randomize_b(model: nn.Module, std: float = 0.2, seed: int = 0) -> None:
    """Give every adapter a non-zero B (tests, and checks that a merge really does something)."""
    gen = torch.Generator().manual_seed(seed)
    for m in adapter_modules(model).values():
        for b in lora_b_parameters(m.adapter):
            b.copy_(torch.randn(b.shape, generator=gen, dtype=torch.float32).to(b.dtype) * std)
