"""``verify``: the export's outputs against the unmerged fine-tuned model, on fixed prompts.

Absorbed exports run through the reference latent-cache forward (prefill half the prompt, then decode
token by token, caching only c_kv + k_rope); ``mcore``/``hf`` exports through the reference forward.
The unmerged model is the base weights plus the LoRA factors applied as x A^T B^T (reference forward).
"""

import torch

from nemo_mla_lora.reference import latent
from nemo_mla_lora.reference.model import forward

DEFAULT_TOLERANCE = {"float32": 1e-4, "float64": 1e-8, "bfloat16": 0.15, "float16": 0.05}


def fixed_prompts(vocab_size: int, count: int = 2, length: int = 16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(20261127)
    return torch.randint(0, vocab_size, (count, length), generator=gen)


@torch.no_grad()
def compare(export_state: dict, base_state: dict, adapters: dict, spec, absorbed: bool,
            tolerance: float | None = None, dtype: str = "float32") -> dict:
    """Max/mean abs logit difference (fp32 compute) and whether it is within tolerance."""
    up = {k: v.float() for k, v in export_state.items()}
    base = {k: v.float() for k, v in base_state.items()}
    factors = {m: (a.float(), b.float(), s) for m, (a, b, s) in adapters.items()}
    tokens = fixed_prompts(spec.vocab_size)
    reference = forward(tokens, base, spec, factors)
    if absorbed:
        logits, cache = latent.generate_logits(tokens, up, spec, prefill=tokens.shape[1] // 2)
        cached = cache.values_per_token()
    else:
        logits, cached = forward(tokens, up, spec), None
    diff = (logits - reference).abs()
    tol = DEFAULT_TOLERANCE.get(dtype, 1e-4) if tolerance is None else tolerance
    return {"max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
            "tolerance": tol, "passed": bool(diff.max().item() <= tol), "prompts": list(tokens.shape),
            "cached_values_per_token": cached}
