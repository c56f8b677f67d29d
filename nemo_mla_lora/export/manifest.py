"""The JSON manifest of an export: what it is, where it came from, and what its KV cache costs."""

FORMAT_VERSION = 1
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


def build(fmt: str, spec, dtype: str, scales: dict, checksums: dict, fold: dict | None = None) -> dict:
    """The manifest without its ``source`` (added by the pipeline) and ``verify`` (added after verifying)."""
    return {
        "format": fmt,
        "format_version": FORMAT_VERSION,
        "mla": spec.to_dict(),
        "latent_cache": fmt == "absorbed",
        "kv_cache": kv_cache_report(spec, dtype),
        "merge_scales": scales,
        "dtype": dtype,
        "folded": fold,
        "tensor_checksums": checksums,
    }
