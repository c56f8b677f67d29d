"""The ``nemo`` export: a NeMo 2 checkpoint that NeMo's own tools take as they are.

    out/weights/   Megatron dist-checkpoint; keys are NeMo's: ``module.`` (its MegatronParallel wrapper) + Megatron's
                   names, in the Transformer Engine layer spec's naming (``names="te"``: the fused
                   ``linear_q_up_proj.layer_norm_weight``, ...) or the TE-free local spec's (``names="local"``),
                   with the ``_extra_state`` entries that spec's modules ask for at a default-strictness load
    out/context/   ``io.json`` + ``model.yaml``: NeMo's own ``io_dump`` of a ``DeepSeekModel`` holding its
                   ``DeepSeekV2Config``/``DeepSeekV3Config`` and tokenizer (files copied in by NeMo)
    out/manifest.json, mla_spec.json   ours (NeMo ignores them)

Read by ``llm.generate`` (``io.load_context`` + ``MegatronStrategy`` restore; bench/README.md),
``llm.export_ckpt(target="hf")`` (``HFDeepSeekExporter``: ``model.yaml`` + ``weights/``;
tests/export/test_nemo_export.py) and ``llm.finetune``'s ``RestoreConfig(path=...)`` (the same restore as
``llm.generate``; not run on its own).
Names: NeMo's DeepSeek configs build ``get_gpt_decoder_block_spec(config, use_transformer_engine=HAVE_TE)``,
and NeMo's containers always have TE, so ``te`` is the default; NeMo's own
TE-free spec cannot build MLA (its local core attention refuses ``k_channels``), so ``local`` writes our layer spec
into the context (``nemo_mla_lora`` must be importable where it is loaded).
"""

import functools
import logging
from pathlib import Path

import torch

from nemo_mla_lora.arch.mla_spec import MEGATRON_FIELDS, MLASpec
from nemo_mla_lora.checkpoints.kind import CONTEXT, PREFIX, WEIGHTS, is_nemo_checkpoint  # noqa: F401  (the layout it writes)

log = logging.getLogger(__name__)
TOKENIZER_DIR = "nemo_tokenizer"  # a context's HF tokenizer files (NeMo's import names it so)


def model_config(spec: MLASpec, dtype: torch.dtype, names: str):
    """NeMo's stock ``DeepSeekV2Config``/``DeepSeekV3Config`` for ``spec`` as the consumer builds it: TE spec (the
    config's own default layer spec, with TE) or our local spec with DeepSeek's exact routing and latent eps."""
    from nemo.collections import llm

    from nemo_mla_lora.models.from_spec import group_score, megatron_routing

    args = {theirs: getattr(spec, ours) for ours, theirs in MEGATRON_FIELDS.items()}
    args.update(megatron_routing(spec))
    args.update(
        seq_length=spec.rope_original_max_positions,
        max_position_embeddings=spec.max_positions,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        moe_aux_loss_coeff=0.0,
        gradient_accumulation_fusion=False,
    )  # a training fusion needing APEX: generate/export do without
    if names == "te":  # the config's default, with TE decided by the consumer's machine, not this one
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        args["transformer_layer_spec"] = functools.partial(get_gpt_decoder_block_spec, use_transformer_engine=True)
    else:  # without TE: the settings our local spec runs with (no grouped GEMM package, no fused kernels)
        from nemo_mla_lora.models.from_spec import CPU_SAFE
        from nemo_mla_lora.models.layer_spec import local_mla_block_spec

        args.update(CPU_SAFE)

        args["transformer_layer_spec"] = functools.partial(
            local_mla_block_spec, group_score=group_score(spec), latent_norm_eps=spec.latent_norm_eps
        )
    cls = llm.DeepSeekV2Config if spec.model_type == "deepseek_v2" else llm.DeepSeekV3Config
    return cls(**args)


def stock_differences(spec: MLASpec) -> list[str]:
    """Where NeMo's stock DeepSeek model (TE spec) computes something other than DeepSeek's own model."""
    from nemo_mla_lora.models.from_spec import group_score

    out = []
    if group_score(spec) == "max":
        out.append(
            f"routing: DeepSeek-V2 ranks expert groups by their best expert, Megatron by the sum of the top "
            f"{spec.moe_topk // spec.moe_group_topk} (topk {spec.moe_topk}, topk_group {spec.moe_group_topk})"
        )
    if spec.latent_norm_eps != spec.norm_eps:
        out.append(
            f"q/kv latent norms: DeepSeek uses eps {spec.latent_norm_eps}, Megatron layernorm_epsilon {spec.norm_eps}"
        )
    return out


def nemo_tokenizer(tokenizer_name: str):
    """NeMo's tokenizer for ours: ``byte`` -> ``ByteLevelTokenizer`` with our ids (bytes 0..255, BOS 256, EOS 257,
    PAD 258); a directory or hub id -> NeMo's ``AutoTokenizer`` over the same HF files."""
    if tokenizer_name == "nemo_byte":  # what NeMo's trainer trained on (training/nemo_data.py)
        from nemo.collections.common.tokenizers.bytelevel_tokenizers import ByteLevelTokenizer

        return ByteLevelTokenizer()
    if tokenizer_name == "byte":
        from nemo.collections.common.tokenizers.bytelevel_tokenizers import ByteLevelTokenizer

        from nemo_mla_lora.data.tokenizer import BOS, EOS, PAD

        # special tokens take the ids below vocab_size + 3 in reverse order: <pad> 258, <eos> 257, <bos> 256
        return ByteLevelTokenizer(
            special_tokens=["<pad>", "<eos>", "<bos>"], vocab_size=256, _eos_id=EOS, _pad_id=PAD, _bos_id=BOS
        )
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer

    return AutoTokenizer(pretrained_model_name=str(tokenizer_name), use_fast=True)


def write_context(directory, spec: MLASpec, dtype: torch.dtype, names: str, tokenizer_name: str) -> None:
    """``directory/context`` as NeMo writes it (``TrainerContext.io_dump``), for a single-device trainer. NeMo copies
    a tokenizer's local directory into the context whole, so a directory is first reduced to its tokenizer files
    (an HF checkpoint directory also holds the model's weights): they land in ``context/nemo_tokenizer``, where
    NeMo's own import puts them."""
    import shutil

    from nemo import lightning as nl
    from nemo.collections import llm
    from nemo.lightning.io.pl import TrainerContext

    from nemo_mla_lora.data.tokenizer import copy_tokenizer

    stage = Path(directory) / ".tokenizer_stage" / TOKENIZER_DIR
    if tokenizer_name not in ("byte", "nemo_byte") and Path(tokenizer_name).is_dir():
        stage.mkdir(parents=True)
        copy_tokenizer(tokenizer_name, stage)
        tokenizer_name = str(stage)
    config = model_config(spec, dtype, names)
    model = llm.DeepSeekModel(config, tokenizer=nemo_tokenizer(tokenizer_name))
    trainer = nl.Trainer(accelerator="cpu", devices=1, strategy=nl.MegatronStrategy())  # as NeMo's import writes
    TrainerContext(model=model, trainer=trainer, extra={}).io_dump(Path(directory) / CONTEXT, yaml_attrs=["model"])
    shutil.rmtree(stage.parent, ignore_errors=True)


def export_tokenizer(base, tokenizer: str | None, spec: MLASpec) -> str:
    """The tokenizer the context names: ``tokenizer`` if given, else the base's own HF files (an HF base's, a
    NeMo base's ``context/nemo_tokenizer``), else the byte tokenizer (our tiny models' bases)."""
    from nemo_mla_lora.data.tokenizer import VOCAB_SIZE, has_hf_tokenizer

    base = Path(base)
    if tokenizer:
        return str(tokenizer)
    for candidate in (base, base / CONTEXT / TOKENIZER_DIR):
        if has_hf_tokenizer(candidate):
            return str(candidate)
    if (base / "config.json").is_file() or is_nemo_checkpoint(base) or spec.vocab_size < VOCAB_SIZE:
        raise ValueError(
            f"format=nemo: {base} has no tokenizer files for the NeMo context; pass tokenizer=<HF "
            f"tokenizer directory or id>"
        )
    return "byte"
