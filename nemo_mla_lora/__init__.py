"""nemo_mla_lora: MLA-aware LoRA adapters, recipes and absorbed-checkpoint export for NeMo.

Importing the package registers ``MLALoRA`` with NeMo as ``PEFT_STR2CLS["mla_lora"]``.
"""

__version__ = "0.1.0"


def _register_with_nemo() -> None:
    from nemo.collections.llm import peft as nemo_peft

    from nemo_mla_lora.peft.mla_lora import MLALoRA

    nemo_peft.PEFT_STR2CLS.setdefault("mla_lora", MLALoRA)
    nemo_peft.PEFT_STR2CLS.setdefault("MLALoRA", MLALoRA)


_register_with_nemo()
