"""The JSON manifest of an export: what it is, where it came from, and what its KV cache costs."""

from nemo_mla_lora.checkpoint import CHECKSUM

FORMAT_VERSION = 2  # 2: tensor_checksums are xxh3_128 (checkpoint.tensor_checksum); 1: sha256
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def kv_cache_report(spec, dtype: str) -> dict:
    """Values and bytes per token: latent cache (c_kv + shared rope key) vs materialized K and V."""
    per_layer = spec.kv_cache_values_per_token_per_layer()
    nbytes = DTYPE_BYTES[dtype]
    return {
        "dtype": dtype,
        "values_per_token_per_layer": per_layer,
        "bytes_per_token_per_layer": {k: v * nbytes for k, v in per_layer.items()},
        "bytes_per_token": {k: v * nbytes * spec.num_layers for k, v in per_layer.items()},
        "materialized_over_latent": per_layer["materialized"] / per_layer["latent"],
    }


# Who reads each format, and how (checked: tests/test_export.py, tests/test_hf_checkpoints.py, bench/README.md).
CONSUMERS = {
    "mcore": "Megatron-Core's GPTModel with MLASelfAttention: dist_checkpointing.load(model.sharded_state_dict(), "
             "dir) with default strictness; names=te: the Transformer Engine layer spec (0.15.3 on an H200), "
             "names=local: the TE-free spec (0.15.3 on CPU, 0.19.2 on an H200), see bench/README.md; Megatron's "
             "dynamic inference engine absorbs it at load with cache_mla_latents=True (needs Transformer Engine "
             "and FlashMLA); nemo_mla_lora.recipes.generate absorbs it at load (latent cache)",
    "nemo": "NeMo 2 (2.7.3 tested): llm.generate (io.load_context + MegatronStrategy restore, "
            "default strictness; H200), llm.export_ckpt(path, target='hf') (HFDeepSeekExporter), llm.finetune "
            "resume=AutoResume(restore_config=RestoreConfig(path=...)) (the same restore); names=te: the TE layer "
            "spec NeMo's DeepSeek configs build where Transformer Engine is installed (NeMo's containers); names=local: nemo_mla_lora's TE-free layer spec named in the "
            "context; nemo_mla_lora.recipes.generate absorbs it at load (latent cache)",
    "absorbed": "Megatron-Core 0.17-0.18 AbsorbedMLASelfAttention (split linear_k_up_proj / linear_v_up_proj); "
                "not megatron-core >= 0.19, whose module holds one linear_kv_up_proj again; "
                "nemo_mla_lora.recipes.generate (latent cache)",
    "hf": "transformers AutoModelForCausalLM, vLLM, SGLang: the source's config.json with torch_dtype = the "
          "written dtype; nemo_mla_lora.recipes.generate absorbs it at load",
    "hf_peft": "peft PeftModel.from_pretrained over the HF base (vLLM drops a kv_b_proj LoRA in its absorbed path)",
}


def build(fmt: str, spec, dtype: str, scales: dict, checksums: dict, fold: dict | None = None) -> dict:
    """The manifest without its ``source`` (added by the pipeline) and ``verify`` (added after verifying)."""
    return {
        "format": fmt,
        "format_version": FORMAT_VERSION,
        "mla": spec.to_dict(),
        "latent_cache": fmt != "hf_peft",  # served with a c_kv + k_rope cache by the consumers in loaded_by
        "kv_cache": kv_cache_report(spec, dtype),
        "merge_scales": scales,
        "dtype": dtype,
        "folded": fold,
        "tensor_checksums": checksums,
        "checksum": CHECKSUM,
        "loaded_by": CONSUMERS[fmt],
    }
