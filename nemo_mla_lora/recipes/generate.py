"""Generate from an absorbed export with the latent KV cache (greedy by default).

    python -m nemo_mla_lora.recipes.generate checkpoint=runs/finetune/export "prompt='upper: abc ='" \\
        [max_new_tokens=32] [temperature=0.7 top_k=50 seed=1] [prompt_file=prompts.txt] [dump_logits=out.pt]
    # an absorbed base (export adapter=null) serving unmerged adapters:
    python -m nemo_mla_lora.recipes.generate checkpoint=runs/base_absorbed +adapters.upper=runs/finetune/adapter \
        adapter=upper "prompt='upper: abc ='"

All prompts run as one batch (right-padded; each row decodes at its own positions). Prints each completion
and the latent cache it allocated (bytes per token). ``dump_logits`` saves, per prompt, its tokens + the
generated ones and every step's logits (``torch.save``) for comparison with another model.
"""

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from nemo_mla_lora.config.schema import register

register()
log = logging.getLogger("nemo_mla_lora.generate")


def prompts(cfg) -> list[str]:
    if bool(cfg.prompt) == bool(cfg.prompt_file):
        raise ValueError("give exactly one of prompt=... or prompt_file=...")
    if cfg.prompt:
        return [cfg.prompt]
    lines = [x for x in Path(cfg.prompt_file).read_text().splitlines() if x.strip()]
    if not lines:
        raise ValueError(f"{cfg.prompt_file} holds no prompt")
    return lines


def tokenizer(name: str):
    """(encode: str -> ids with BOS, decode: ids -> str, stop id, pad id)."""
    if name == "byte":
        from nemo_mla_lora.data import tokenizer as tok

        return (lambda text: [tok.BOS] + tok.encode(text)), tok.decode, tok.EOS, tok.PAD
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(name)
    pad = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
    return (lambda text: hf(text)["input_ids"]), (lambda ids: hf.decode(ids, skip_special_tokens=True)), \
        hf.eos_token_id, pad


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

    texts = prompts(cfg)
    encode, decode, stop, pad = tokenizer(cfg.tokenizer)
    parallel.init_megatron()
    engine = AbsorbedMLAEngine.load(cfg.checkpoint, cfg.dtype, cfg.device, cfg.attention)
    bank, ids = None, None
    if cfg.adapters or cfg.adapter:
        from nemo_mla_lora.inference.adapters import AdapterBank

        dtype = next(engine.model.parameters()).dtype
        bank = AdapterBank.load(engine.spec, dict(cfg.adapters), cfg.device, dtype)
        ids = bank.ids([cfg.adapter] * len(texts))
    prompt, lengths = right_padded([encode(t) for t in texts], pad, cfg.device)  # one batch, ragged rows
    tokens, logits, cache = generate(engine, prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.seed,
                                     stop_token=stop, bank=bank, adapter_ids=ids, prompt_lengths=lengths)
    new = tokens[:, prompt.shape[1]:].tolist()
    for i, text in enumerate(texts):
        row = new[i][:new[i].index(stop) + 1] if stop in new[i] else new[i]  # up to this row's stop token
        print(f"{text}{decode(row)}")
        new[i] = row
    log.info("%d prompts in one batch; latent cache %d bytes per token (%d layers)", len(texts),
             cache.bytes_per_token(), engine.spec.num_layers)
    if cfg.dump_logits:
        torch.save([{"prompt": t, "tokens": torch.tensor(encode(t) + new[i]), "logits": logits[i, :len(new[i])].cpu()}
                    for i, t in enumerate(texts)], cfg.dump_logits)
        print(f"logits: {cfg.dump_logits}")


if __name__ == "__main__":
    main()
