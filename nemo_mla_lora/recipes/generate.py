"""Generate from an absorbed export with the latent KV cache (greedy by default).

    python -m nemo_mla_lora.recipes.generate checkpoint=runs/finetune/export "prompt='upper: abc ='" \\
        [max_new_tokens=32] [temperature=0.7 top_k=50 seed=1] [prompt_file=prompts.txt] [dump_logits=out.pt]
    # an absorbed base (export adapter=null) serving unmerged adapters:
    python -m nemo_mla_lora.recipes.generate checkpoint=runs/base_absorbed +adapters.upper=runs/finetune/adapter \
        adapter=upper "prompt='upper: abc ='"

All prompts run as one batch (right-padded; each row decodes at its own positions). Prints each completion
and the latent cache it allocated (bytes per token). ``dump_logits`` saves, per prompt, its tokens + the
generated ones, the logits at every prompt position and every step's logits (``torch.save``) for comparison
with another engine; ``prompt_ids_file`` (JSON list of id lists) feeds token ids made elsewhere. The tokenizer
is ``tokenizer=...``, else the export's own files (copied from an HF base), else bytes (the tiny models).
"""

import json
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from nemo_mla_lora.checkpoint import read_spec
from nemo_mla_lora.config.schema import check_known_keys, register
from nemo_mla_lora.data import tokenizer
from nemo_mla_lora.data.tokenizer import prompt_ids
from nemo_mla_lora.inference.engine import DTYPES

register()
log = logging.getLogger("nemo_mla_lora.generate")


def prompts(cfg, tok) -> tuple[list[str], list[list[int]]]:
    """(texts to print, token ids per prompt) from exactly one of prompt, prompt_file (a line each) or
    prompt_ids_file (JSON: a list of id lists, as another engine's tokenizer made them)."""
    given = [k for k in ("prompt", "prompt_file", "prompt_ids_file") if cfg.get(k) is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of prompt=..., prompt_file=... or prompt_ids_file=...; got {given or 'none'}")
    if cfg.prompt_ids_file:
        ids = json.loads(Path(cfg.prompt_ids_file).read_text())
        if not (isinstance(ids, list) and ids and all(isinstance(r, list) and r and all(isinstance(i, int) for i in r)
                                                      for r in ids)):
            raise ValueError(f"{cfg.prompt_ids_file}: expected a JSON list of non-empty lists of token ids")
        return [tok.decode(r) for r in ids], ids
    texts = [cfg.prompt] if cfg.prompt is not None else [x for x in Path(cfg.prompt_file).read_text().splitlines()
                                                         if x.strip()]
    if not texts:
        raise ValueError(f"{cfg.prompt_file} holds no prompt")
    return texts, [prompt_ids(tok, t) for t in texts]


def check_request(cfg, ids: list[list[int]], spec) -> None:
    """Serving inputs against the model, before any weights are read."""
    errors = []
    if cfg.max_new_tokens < 1:
        errors.append(f"max_new_tokens={cfg.max_new_tokens}; expected >= 1")
    if cfg.temperature < 0:
        errors.append(f"temperature={cfg.temperature}; expected >= 0 (0 = greedy)")
    if cfg.top_k is not None and cfg.top_k < 1:
        errors.append(f"top_k={cfg.top_k}; expected >= 1 or null")
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        errors.append(f"dtype={cfg.dtype!r}; expected one of {sorted(DTYPES)} or null (the export's)")
    empty = [i for i, r in enumerate(ids) if not r]
    if empty:
        errors.append(f"prompts {empty} have no tokens (an empty prompt and a tokenizer without BOS)")
    longest = max(len(r) for r in ids)
    if longest + cfg.max_new_tokens > spec.max_positions:
        errors.append(f"longest prompt {longest} + max_new_tokens {cfg.max_new_tokens} exceeds the model's "
                      f"max_position_embeddings {spec.max_positions}")
    bad = sorted({i for r in ids for i in r if not 0 <= i < spec.vocab_size})
    if bad:
        errors.append(f"token ids {bad[:5]} outside the model's vocabulary [0, {spec.vocab_size})")
    if errors:
        raise ValueError("invalid request:\n  - " + "\n  - ".join(errors))


def right_padded(rows: list, pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> [b, max length] right-padded with ``pad``, and the lengths [b]."""
    lengths = torch.tensor([len(r) for r in rows], device=device)
    out = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r)
    return out, lengths


@hydra.main(config_path="pkg://nemo_mla_lora.conf", config_name="generate", version_base=None)
def main(cfg: DictConfig) -> None:
    from nemo_mla_lora import parallel
    from nemo_mla_lora.inference.engine import AbsorbedMLAEngine
    from nemo_mla_lora.inference.generate import generate

    check_known_keys(cfg)
    tok = tokenizer.load(tokenizer.for_run(cfg.tokenizer, cfg.checkpoint))
    texts, ids = prompts(cfg, tok)
    check_request(cfg, ids, read_spec(cfg.checkpoint))
    stop, pad = tok.eos, tok.pad
    parallel.init_megatron()
    engine = AbsorbedMLAEngine.load(cfg.checkpoint, cfg.dtype, cfg.device, cfg.attention, cfg.verify_checksums)
    bank, adapter_ids = None, None
    if cfg.adapters or cfg.adapter:
        from nemo_mla_lora.inference.adapters import AdapterBank

        dtype = next(engine.model.parameters()).dtype
        bank = AdapterBank.load(engine.spec, dict(cfg.adapters), cfg.device, dtype)
        adapter_ids = bank.ids([cfg.adapter] * len(texts))
    prompt, lengths = right_padded(ids, pad, cfg.device)  # one batch, ragged rows
    prefill = []
    tokens, logits, cache = generate(engine, prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.seed,
                                     stop_token=stop, bank=bank, adapter_ids=adapter_ids, prompt_lengths=lengths,
                                     prompt_logits=prefill)
    new = tokens[:, prompt.shape[1]:].tolist()
    for i, text in enumerate(texts):
        row = new[i][:new[i].index(stop) + 1] if stop in new[i] else new[i]  # up to this row's stop token
        print(f"{text}{tok.decode(row)}")
        new[i] = row
    log.info("%d prompts in one batch; latent cache %d bytes per token (%d layers)", len(texts),
             cache.bytes_per_token(), engine.spec.num_layers)
    if cfg.dump_logits:
        torch.save([{"prompt": t, "tokens": torch.tensor(ids[i] + new[i]),
                     "prompt_logits": prefill[0][i, :len(ids[i])].cpu(), "logits": logits[i, :len(new[i])].cpu()}
                    for i, t in enumerate(texts)], cfg.dump_logits)
        print(f"logits: {cfg.dump_logits}")


if __name__ == "__main__":
    main()
