"""``verify``: the export's outputs against the unmerged fine-tuned model, on fixed prompts.

Absorbed exports run through the reference latent-cache forward (prefill half the prompt, then decode
token by token, caching only c_kv + k_rope); ``mcore``/``hf`` exports through the reference forward.
The unmerged model is the base weights plus the LoRA factors applied as x A^T B^T (reference forward).
Both runs use the unmerged run's expert choices: with saturated router scores a 1e-16 change can flip a
top-k tie (measured: 1.3e-5 logit difference in float64 on a trained tiny model), which says nothing
about the merge; the gate weights are still recomputed from each run's own scores.
"""

import torch

from nemo_mla_lora.reference import latent
from nemo_mla_lora.reference.model import forward

# Relative to the largest |logit| of the reference (at least 1): max |diff| <= tolerance * scale.
# fp32: the merged weights' own rounding (~1e-8 per linear) reaches ~3e-5 x max|logit| on the trained tiny
# model (measured 1.6e-4 at max|logit| 3.8), so 1e-4 leaves ~3x room; a wrong merge misses by orders.
DEFAULT_TOLERANCE = {"float32": 1e-4, "float64": 1e-10, "bfloat16": 2e-2, "float16": 5e-3}


def fixed_prompts(vocab_size: int, count: int = 2, length: int = 16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(20261127)
    return torch.randint(0, vocab_size, (count, length), generator=gen)


@torch.no_grad()
def compare(export_state: dict, base_state: dict, adapters: dict, spec, absorbed: bool,
            tolerance: float | None = None, dtype: str = "float32") -> dict:
    """Max/mean abs logit difference (fp32 compute) and whether it is within tolerance (relative to the
    reference's largest |logit|, so the bound means the same for a fresh and a long-trained model)."""
    up = {k: v.float() for k, v in export_state.items()}
    base = {k: v.float() for k, v in base_state.items()}
    factors = {m: (a.float(), b.float(), s) for m, (a, b, s) in adapters.items()}
    tokens = fixed_prompts(spec.vocab_size)
    routing = {}  # the unmerged model's expert choices, replayed: a top-k tie cannot flip between the two
    reference = forward(tokens, base, spec, factors, routing=routing)
    if absorbed:
        logits, cache = latent.generate_logits(tokens, up, spec, prefill=tokens.shape[1] // 2, routing=routing)
        cached = cache.values_per_token()
    else:
        logits, cached = forward(tokens, up, spec, routing=routing), None
    diff = (logits - reference).abs()
    tol = DEFAULT_TOLERANCE.get(dtype, 2e-5) if tolerance is None else tolerance
    scale = max(1.0, reference.abs().max().item())
    return {"max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
            "max_abs_logit": scale, "tolerance": tol, "bound": tol * scale,
            "passed": bool(diff.max().item() <= tol * scale), "prompts": list(tokens.shape),
            "cached_values_per_token": cached}
