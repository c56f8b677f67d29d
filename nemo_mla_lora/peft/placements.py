"""Named LoRA placements for MLA models, each with the learning-rate scale it suggests.

Targets are Megatron leaf names. ``linear_fc1`` / ``linear_fc2`` match dense MLPs, shared experts and
routed experts alike. Models without q compression (``q_lora_rank=None``: DeepSeek-V2-Lite, Moonlight)
have ``linear_q_proj`` where others have ``linear_q_down_proj`` + ``linear_q_up_proj``; a named placement
takes whichever the model has. The LR scales (0.5-0.8x for placements that touch MLA internals) are
the field's advice, to be tested by the placement study, not measured facts.
"""

from collections.abc import Iterable
from dataclasses import dataclass

ATTENTION = (
    "linear_q_down_proj",
    "linear_q_up_proj",
    "linear_q_proj",
    "linear_kv_down_proj",
    "linear_kv_up_proj",
    "linear_proj",
)
MLA_INTERNAL = ("linear_q_down_proj", "linear_q_up_proj", "linear_q_proj", "linear_kv_down_proj", "linear_kv_up_proj")
MLP = ("linear_fc1", "linear_fc2")
ALL_TARGETS = ATTENTION + MLP
# Standard attention's fused projection: adaptable so that the placement study can train LoRA on a
# standard-attention twin of an MLA model (studies/placement/twin.py). No named placement uses it; exports are MLA only.
STANDARD_QKV = "linear_qkv"
ADAPTABLE = ALL_TARGETS + (STANDARD_QKV,)


@dataclass(frozen=True)
class Placement:
    name: str
    targets: tuple
    lr_scale: float
    description: str


PLACEMENTS = {
    p.name: p
    for p in [
        Placement("nemo_official", ATTENTION, 0.7, "the five attention linears, as NeMo's DeepSeek-V3 LoRA recipe"),
        Placement("all_linear", ALL_TARGETS, 0.8, "attention, dense MLPs, shared and routed experts"),
        Placement(
            "safe",
            ("linear_proj",) + MLP,
            1.0,
            "output projection + MLP/experts; attention internals frozen, latent cache untouched",
        ),
        Placement("kv_up", ("linear_kv_up_proj",), 0.6, "linear_kv_up_proj only (K and V up projections)"),
        Placement(
            "down_only",
            ("linear_q_down_proj", "linear_kv_down_proj"),
            0.5,
            "the q/kv down projections (the latent bottleneck)",
        ),
    ]
}


def get(name: str) -> Placement:
    if name not in PLACEMENTS:
        raise ValueError(f"unknown placement {name!r}; expected one of {sorted(PLACEMENTS)}")
    return PLACEMENTS[name]


def suggested_lr_scale(targets: Iterable[str]) -> float:
    """For a free-form target list: 0.8 if it touches MLA internals, else 1.0."""
    leaves = {t.rsplit(".", 1)[-1] for t in targets}
    return 0.8 if leaves & set(MLA_INTERNAL) else 1.0


def resolve_for_model(targets: Iterable[str], present_leaves: set) -> tuple:
    """A named placement on a given model: keep the q projections the model has (q down/up, or q_proj)."""
    q_leaves = {"linear_q_down_proj", "linear_q_up_proj", "linear_q_proj"}
    return tuple(t for t in targets if t not in q_leaves or t in present_leaves)
