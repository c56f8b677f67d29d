"""The placement study's LoRA variants: what each one adapts, as ``MLALoRA`` keyword arguments.

MLA variants: the named placements, each MLA target alone, and the part-selective ones the field
discusses (K-only kv-up, latent-only kv-down). Twin variants (standard attention, ``twin.py``): the
same placements where standard attention has a counterpart (``linear_qkv`` for the MLA internals).
On models without q compression (``q_lora_rank=None``) the q down/up variants do not exist and
``linear_q_proj`` does; ``available`` drops what a model lacks.
"""

from dataclasses import dataclass, field

from nemo_mla_lora.peft.placements import ATTENTION

MLA = "mla"
TWIN = "twin"


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # "placement" | "single" | "part" | "twin"
    peft: dict = field(default_factory=dict)  # MLALoRA kwargs besides dim/alpha
    needs: tuple = ()  # leaves the model must have


def _single(leaf: str) -> Variant:
    return Variant(leaf, "single", {"target_modules": [leaf]}, (leaf,))


MLA_VARIANTS = {
    v.name: v
    for v in [
        Variant("nemo_official", "placement", {"placement": "nemo_official"}),
        Variant("all_linear", "placement", {"placement": "all_linear"}),
        Variant("safe", "placement", {"placement": "safe"}),
        Variant("down_only", "placement", {"placement": "down_only"}, ("linear_kv_down_proj",)),
        _single("linear_q_down_proj"),
        _single("linear_q_up_proj"),
        _single("linear_q_proj"),
        _single("linear_kv_down_proj"),
        _single("linear_kv_up_proj"),
        _single("linear_proj"),
        Variant(
            "kv_up_k_only",
            "part",
            {"target_modules": ["linear_kv_up_proj"], "parts": {"linear_kv_up_proj": "k"}},
            ("linear_kv_up_proj",),
        ),
        Variant(
            "kv_down_latent_only",
            "part",
            {"target_modules": ["linear_kv_down_proj"], "parts": {"linear_kv_down_proj": "latent"}},
            ("linear_kv_down_proj",),
        ),
    ]
}

# Standard attention: "attention" is the counterpart of nemo_official (all attention linears).
TWIN_VARIANTS = {
    v.name: v
    for v in [
        Variant("attention", "twin", {"target_modules": ["linear_qkv", "linear_proj"]}, ("linear_qkv",)),
        Variant(
            "all_linear",
            "twin",
            {"target_modules": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]},
            ("linear_qkv",),
        ),
        Variant("safe", "twin", {"target_modules": ["linear_proj", "linear_fc1", "linear_fc2"]}, ("linear_qkv",)),
        Variant("linear_qkv", "twin", {"target_modules": ["linear_qkv"]}, ("linear_qkv",)),
    ]
}

# Which MLA variant each twin variant is compared with (claim 4).
TWIN_COUNTERPART = {"attention": "nemo_official", "all_linear": "all_linear", "safe": "safe"}

# Attention targets alone (claim 2) and the latent-bottleneck variants (claim 1).
ATTENTION_SINGLES = ATTENTION  # each MLA attention linear alone
DOWN = ("down_only", "linear_q_down_proj", "linear_kv_down_proj", "kv_down_latent_only")


def lookup(names, arch: str) -> list[Variant]:
    table = MLA_VARIANTS if arch == MLA else TWIN_VARIANTS
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown {arch} study variants {unknown}; expected names from {sorted(table)}")
    return [table[n] for n in names]


def available(variants, present_leaves: set) -> tuple[list[Variant], list[Variant]]:
    """(variants the model can take, variants it lacks a needed leaf for)."""
    keep = [v for v in variants if set(v.needs) <= present_leaves]
    return keep, [v for v in variants if v not in keep]
