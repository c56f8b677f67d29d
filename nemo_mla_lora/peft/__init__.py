"""MLA-aware LoRA for NeMo / Megatron-Core.

``MLALoRA`` and ``MLALoRALinear`` (NeMo PEFT classes: importing them imports NeMo) load on first use, so
that code needing only the pure parts (``parts``, ``placements``, ``merge``: merging factors into weights) does not
pay for NeMo.
"""

_LAZY = {
    "MLALoRA": "nemo_mla_lora.peft.mla_lora",
    "MLALoRALinear": "nemo_mla_lora.peft.mla_lora",
    "PLACEMENTS": "nemo_mla_lora.peft.placements",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
