"""MLA-aware LoRA for NeMo / Megatron-Core."""

from nemo_mla_lora.peft.mla_lora import MLALoRA, MLALoRALinear  # noqa: F401
from nemo_mla_lora.peft.placements import PLACEMENTS  # noqa: F401
