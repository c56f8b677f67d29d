"""The CPU side of bench/mcore019_check.py: what Megatron-Core 0.19 must reproduce from our default export.

    python bench/mcore019_expected.py RUN_DIR OUT.pt      # RUN_DIR: a finetune run (base/, adapter/, export/)

Writes {tokens [2, 12], unmerged_logits (the plain-torch reference forward of base + adapter, unmerged, fp32),
prompts (token ids), greedy (recipes.generate's engine on the export: latent cache, greedy, up to EOS)}.
"""

import sys
from pathlib import Path

import torch


def main(run_dir, out):
    from nemo_mla_lora.runtime import parallel
    from nemo_mla_lora.data import tokenizer as tok
    from nemo_mla_lora.checkpoints.sources import open_adapter, open_base
    from nemo_mla_lora.inference.engine import AbsorbedMLAEngine
    from nemo_mla_lora.inference.generate import generate
    from nemo_mla_lora.reference.model import forward

    parallel.init_megatron()
    run = Path(run_dir)
    base = open_base(run / "base")
    adapter = open_adapter(run / "adapter", base.spec)
    state = {k: v.float() for k, v in base.load(base.names).items()}
    factors = {m: (a.float(), b.float(), s) for m, (a, b, s) in adapter.factors(adapter.modules).items()}
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        unmerged = forward(tokens, state, base.spec, adapters=factors)
    prompts = [[tok.BOS] + tok.encode(t) for t in ("upper: abc =", "upper: hello =")]
    engine = AbsorbedMLAEngine.load(run / "export")
    greedy = []
    for p in prompts:  # one at a time: no padding questions on either side
        ids, _, _ = generate(engine, torch.tensor([p]), max_new_tokens=8)
        new = ids[0, len(p):].tolist()
        greedy.append(new[:new.index(tok.EOS) + 1] if tok.EOS in new else new)
    torch.save({"tokens": tokens, "unmerged_logits": unmerged, "prompts": prompts, "greedy": greedy}, out)
    print({"greedy": greedy, "max_abs_logit": unmerged.abs().max().item()})
    parallel.destroy()


if __name__ == "__main__":
    main(*sys.argv[1:3])
