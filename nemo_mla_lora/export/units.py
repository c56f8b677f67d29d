"""The export's plan: the checkpoint cut into units that are read, merged, verified and written one at a time.

A unit is what must be in memory together: the embedding ('pre'); per decoder layer its attention (input
norm and every ``self_attention`` tensor), its MLP head (the pre-MLP norm, router, shared experts, or the
dense MLP) and its routed experts in chunks of consecutive experts of at most ``budget`` bytes (at least
one expert); the final norm and output layer ('post'). Peak memory follows the largest unit, not the
layer: a DeepSeek-V3 MoE layer is ~22 GB in bf16, one of its experts 88 MB.
"""

import re
from dataclasses import dataclass

from nemo_mla_lora.checkpoints.sources import groups

DEFAULT_BUDGET = 128 << 20  # bytes of base tensors per expert chunk
_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")


@dataclass
class Unit:
    group: object  # 'pre' | layer index | 'post'
    kind: str  # pre | attention | mlp | experts | post
    names: list  # flat Megatron names of the base tensors
    experts: tuple = ()  # expert indices of an 'experts' unit
    closes_group: bool = False  # the group's last unit
    nbytes: int = 0


def _kind(name: str) -> str:
    if _EXPERT.search(name):
        return "experts"
    if ".self_attention." in name or name.endswith("input_layernorm.weight"):
        return "attention"
    return "mlp"


def plan(names, nbytes: dict, budget: int = DEFAULT_BUDGET) -> list[Unit]:
    """Units in the order the export handles them. ``nbytes``: flat name -> bytes as read."""
    grouped, units = groups(names), []
    order = ["pre"] + sorted(k for k in grouped if isinstance(k, int)) + ["post"]
    for key in order:
        members = grouped.get(key, [])
        if not isinstance(key, int):
            group_units = [Unit(key, key, sorted(members))]
        else:
            group_units = _layer_units(key, members, nbytes, budget)
        group_units[-1].closes_group = True
        for u in group_units:
            u.nbytes = sum(nbytes[n] for n in u.names)
        units += group_units
    return units


def _layer_units(layer: int, members, nbytes: dict, budget: int) -> list[Unit]:
    by_kind, experts = {"attention": [], "mlp": []}, {}
    for n in members:
        kind = _kind(n)
        if kind == "experts":
            experts.setdefault(int(_EXPERT.search(n).group(1)), []).append(n)
        else:
            by_kind[kind].append(n)
    units = [Unit(layer, k, sorted(v)) for k, v in by_kind.items() if v]
    chunk, size = [], 0
    for e in sorted(experts):
        e_bytes = sum(nbytes[n] for n in experts[e])
        if chunk and size + e_bytes > budget:
            units.append(_experts_unit(layer, chunk, experts))
            chunk, size = [], 0
        chunk.append(e)
        size += e_bytes
    if chunk:
        units.append(_experts_unit(layer, chunk, experts))
    return units


def _experts_unit(layer: int, chunk: list, experts: dict) -> Unit:
    return Unit(layer, "experts", sorted(n for e in chunk for n in experts[e]), experts=tuple(chunk))
