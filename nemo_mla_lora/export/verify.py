"""``verify``: the export's outputs against the unmerged fine-tuned model, on fixed prompts.

Absorbed exports run through the reference latent-cache forward (prefill half the prompt, then decode
token by token, caching only c_kv + k_rope); ``mcore``/``hf`` exports through the reference forward.
Layer by layer: one layer of each model is in memory at a time.
The unmerged model is the base weights plus the LoRA factors applied as x A^T B^T (reference forward).
Both runs use the unmerged run's expert choices: with saturated router scores a 1e-16 change can flip a
top-k tie (measured: 1.3e-5 logit difference in float64 on a trained tiny model), which says nothing
about the merge; the gate weights are still recomputed from each run's own scores.
"""

import torch

from nemo_mla_lora.export.absorb import K_UP, absorb_layer
from nemo_mla_lora.reference import latent
from nemo_mla_lora.reference.model import decoder_layer, output_weight, rms_norm, rope_cos_sin

# Relative to the largest |logit| of the reference (at least 1): max |diff| <= tolerance * scale.
# fp32: the merged weights' own rounding (~1e-8 per linear) reaches ~3e-5 x max|logit| on the trained tiny
# model (measured 1.6e-4 at max|logit| 3.8), so 1e-4 leaves ~3x room; a wrong merge misses by orders.
DEFAULT_TOLERANCE = {"float32": 1e-4, "float64": 1e-10, "bfloat16": 2e-2, "float16": 5e-3}


def prefix(layer: int) -> str:
    return f"decoder.layers.{layer}.self_attention"


def fixed_prompts(vocab_size: int, count: int = 2, length: int = 16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(20261127)
    return torch.randint(0, vocab_size, (count, length), generator=gen)


def _float(tensors: dict) -> dict:
    return {k: v.float() for k, v in tensors.items()}


@torch.no_grad()
def compare_streaming(load_export, load_base, load_factors, spec, absorbed: bool,
                      tolerance: float | None = None, dtype: str = "float32") -> dict:
    """Max/mean abs logit difference (fp32 compute) and whether it is within tolerance (relative to the
    reference's largest |logit|). ``load_*(group)`` return one group's tensors ('pre', 0..L-1, 'post'),
    so memory holds one layer of each model (plus the prompts' activations), never the whole model."""
    tokens = fixed_prompts(spec.vocab_size)
    s = tokens.shape[1]
    cos, sin = rope_cos_sin(spec, torch.arange(s), torch.float32)
    pre_ref, pre_exp = _float(load_base("pre")), _float(load_export("pre"))
    x_ref = pre_ref["embedding.word_embeddings.weight"][tokens]
    x_exp = pre_exp["embedding.word_embeddings.weight"][tokens]
    cached = 0
    for layer in range(spec.num_layers):
        routing = {}
        factors = {m: (a.float(), b.float(), sc) for m, (a, b, sc) in load_factors(layer).items()}
        x_ref = decoder_layer(x_ref, _float(load_base(layer)), factors, layer, spec, cos, sin, routing=routing)
        exported = _float(load_export(layer))
        if absorbed and f"{prefix(layer)}.{K_UP}" not in exported:  # standard layout: absorbed as engines load it
            exported = absorb_layer(exported, prefix(layer), spec)
        if absorbed:
            x_exp, cache = latent.layer_prefill_decode(x_exp, exported, layer, spec, s // 2, routing)
            cached += cache.values_per_token()
        else:
            x_exp = decoder_layer(x_exp, exported, None, layer, spec, cos, sin, routing=routing)
    post_ref, post_exp = {**pre_ref, **_float(load_base("post"))}, {**pre_exp, **_float(load_export("post"))}
    reference = rms_norm(x_ref, post_ref["decoder.final_layernorm.weight"], spec.norm_eps) @ output_weight(post_ref, spec).T
    logits = rms_norm(x_exp, post_exp["decoder.final_layernorm.weight"], spec.norm_eps) @ output_weight(post_exp, spec).T
    return _report(logits, reference, tokens, tolerance, dtype, cached if absorbed else None)


def _report(logits, reference, tokens, tolerance, dtype, cached) -> dict:
    diff = (logits - reference).abs()
    tol = DEFAULT_TOLERANCE.get(dtype, 1e-4) if tolerance is None else tolerance
    scale = max(1.0, reference.abs().max().item())
    return {"max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
            "max_abs_logit": scale, "tolerance": tol, "bound": tol * scale,
            "passed": bool(diff.max().item() <= tol * scale), "prompts": list(tokens.shape),
            "cached_values_per_token": cached}
