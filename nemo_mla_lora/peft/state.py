"""Read a (single-rank) adapted model as tensors: the base state dict and the LoRA factors.

Names are Megatron module names without the wrapper's ``to_wrap`` level, so the same keys serve the
base checkpoint, the reference forward and the merge/export functions. Under pipeline or expert parallelism
a rank's module names count layers from its stage's first and experts from its first local one;
``global_names`` / ``adapter_names`` give the names a one-process model has (what checkpoints store).
"""

import re
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from nemo_mla_lora.arch import keymap
from nemo_mla_lora.peft.mla_lora import WRAPPERS, MLALoRALinear
from nemo_mla_lora.peft.te_grouped import TEGroupedLoRALinear


def _clean(name: str) -> str:
    return name.replace(".to_wrap", "").removeprefix("module.")


def expert_adapters(name: str, module: TEGroupedLoRALinear) -> list:
    """``...mlp.experts.linear_fc1`` (TE grouped) -> [(``...mlp.experts.local_experts.{e}.linear_fc1``, A_e, B_e)]
    for its local experts e (parameters): the module names ``SequentialMLP`` experts have on this rank."""
    experts, leaf = name.rsplit(".", 1)
    return [
        (f"{experts}.local_experts.{e}.{leaf}", *module.adapter.expert(e)) for e in range(module.adapter.num_experts)
    ]


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


_LAYER = re.compile(r"^(.*?layers\.\d+)(\..*|)$")
_LOCAL_EXPERT = re.compile(r"^(.*\.local_experts)\.(\d+)(\..*|)$")


def global_names(model: nn.Module, names: Iterable[str]) -> dict:
    """{name: its name in a one-process model} for module names of ``model`` on this rank: a transformer layer's
    index in its stage's module list -> ``layer_number - 1`` (Megatron's global layer, which its sharded state
    dict keys carry), a routed expert's local index -> its global one (``SequentialMLP`` experts under expert
    parallelism: ``ep_rank * num_local_experts + local``).

    Args:
        model: the (bare) Megatron model the names come from (``_clean`` names: no ``module.``, no ``to_wrap``).
        names: module or parameter names of ``model``.
    """
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.transformer_layer import TransformerLayer

    layers, local_counts = {}, {}
    for n, m in model.named_modules():
        if isinstance(m, TransformerLayer):
            layers[_clean(n)] = m.layer_number - 1
        elif isinstance(m, SequentialMLP):
            local_counts[f"{_clean(n)}.local_experts"] = m.num_local_experts
    ep_rank = parallel_state.get_expert_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
    out = {}
    for name in names:
        new = name
        expert = _LOCAL_EXPERT.match(new)
        if expert and expert.group(1) in local_counts:
            e = ep_rank * local_counts[expert.group(1)] + int(expert.group(2))
            new = f"{expert.group(1)}.{e}{expert.group(3)}"
        layer = _LAYER.match(new)
        if layer and layer.group(1) in layers:
            new = f"{layer.group(1).rsplit('.', 1)[0]}.{layers[layer.group(1)]}{layer.group(2)}"
        out[name] = new
    return out


def adapter_names(model: nn.Module) -> list:
    """Every adapted module's one-process name (``global_names``) on any rank, sorted. Under torch.distributed
    a collective: every rank calls it (pipeline stages and expert-parallel ranks hold different adapters).

    Args:
        model: the (bare) Megatron model with MLALoRA adapters.
    """
    names = set(global_names(model, adapter_modules(model)).values())
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, sorted(names))
        names = set().union(*parts)
    return sorted(names)


@torch.no_grad()
def randomize_b(model: nn.Module, std: float = 0.2, seed: int = 0) -> None:
    """Give every adapter a non-zero B (tests, and checks that a merge really does something)."""
    gen = torch.Generator().manual_seed(seed)
    for m in adapter_modules(model).values():
        for b in lora_b_parameters(m.adapter):
            b.copy_(torch.randn(b.shape, generator=gen, dtype=torch.float32).to(b.dtype) * std)
