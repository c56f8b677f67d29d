"""Shims for machines without Transformer Engine (the CPU here, and GPU images that lack it).

Applied only when ``transformer_engine.pytorch`` cannot be imported (``apply()`` is a no-op otherwise),
together with the TE-free layer spec (``models/layer_spec.py``). Each answers a failure seen without it, on the
CPU and under NeMo's trainer on GPUs without TE (docs/stack.md):

1. megatron-core's TE extension sets ``te = MagicMock()`` when TE is missing, so
   ``multi_latent_attention.HAVE_TE`` is wrongly True, and ``moe_utils.te_general_gemm`` is undefined
   (NameError in the MoE router). Both are set to what "TE absent" means.
2. NeMo's PEFT modules: ``peft.utils.HAVE_TE`` must be False (else ``isinstance() arg 2 must be a
   type``) and ``peft.lora.te`` must not be NeMo's unavailable-module placeholder (else
   ``UnavailableError``); it becomes a namespace whose TE classes match no module.
"""

import types

_APPLIED = False


def transformer_engine_absent() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401

        return False
    except Exception:  # ImportError, or a broken install that fails on import
        return True


def apex_wgrad_fusion_available() -> bool:
    """Whether Apex's ``fused_weight_gradient_mlp_cuda`` imports: NeMo's DeepSeek configs default to
    ``gradient_accumulation_fusion=True``, and Megatron's own ``ColumnParallelLinear`` (the output layer, also in
    the TE spec) raises at its first forward without that kernel (TE present, Apex absent)."""
    import importlib.util

    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


class _AbsentTEModule:
    """Stands for TE's module classes: nothing is an instance of it."""


def apply() -> bool:
    """Install the shims if Transformer Engine is absent. Idempotent. Returns whether they are active."""
    global _APPLIED
    if _APPLIED:
        return True
    if not transformer_engine_absent():
        return False
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.multi_latent_attention as mla

    import nemo_mla_lora

    mla.HAVE_TE = False
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    nemo_mla_lora.when_nemo_peft_imported(_patch_nemo_peft)  # not importing NeMo (0.6 GB) for it
    _APPLIED = True
    return True


def _patch_nemo_peft(nemo_peft) -> None:
    from nemo.collections.llm.peft import lora, utils

    utils.HAVE_TE = False
    lora.HAVE_TE = lora.HAVE_TE_FUSED_LORA = False
    if not isinstance(lora.te, types.ModuleType):
        lora.te = types.SimpleNamespace(Linear=_AbsentTEModule, LayerNormLinear=_AbsentTEModule)
