"""Generate from a merged export (``absorbed``; ``mcore``, ``nemo``, ``hf`` absorbed at load) or an HF directory
with the latent KV cache (greedy by default).

    python -m nemo_mla_lora.recipes.generate checkpoint=runs/finetune/export "prompt='upper: abc ='" \\
        [max_new_tokens=32] [temperature=0.7 top_k=50 seed=1] [prompt_file=prompts.txt] [dump_logits=out.pt]
    # a served base (export adapter=null) with unmerged adapters:
    python -m nemo_mla_lora.recipes.generate checkpoint=runs/base_absorbed +adapters.upper=runs/finetune/adapter \
        adapter=upper "prompt='upper: abc ='"

All prompts run as one batch (right-padded; each row decodes at its own positions). Prints each completion
and the latent cache it allocated (bytes per token). ``dump_logits`` saves, per prompt, its tokens + the
generated ones, the logits at every prompt position and every step's logits (``torch.save``) for comparison
with another engine; ``prompt_ids_file`` (JSON list of id lists) feeds token ids made elsewhere. The tokenizer
is ``tokenizer=...``, else the export's own files (copied from an HF base), else bytes (the tiny models). An
HF directory that no export wrote has no manifest to check its tensors against: ``verify_checksums=false``.
The request is checked before any weight is read (``check_request``).
"""

import json
import logging
import math
import os
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from nemo_mla_lora.config.schema import register
from nemo_mla_lora.config.validate import check_known_keys
from nemo_mla_lora.data import tokenizer
from nemo_mla_lora.data.tokenizer import prompt_ids
from nemo_mla_lora.inference.engine import DTYPES, served

register()
log = logging.getLogger("nemo_mla_lora.generate")


def prompts(cfg, tok) -> tuple[list[str], list[list[int]]]:
    """(texts to print, token ids per prompt) from exactly one of prompt, prompt_file (a line each) or
    prompt_ids_file (JSON: a list of id lists, as another engine's tokenizer made them)."""
    given = [k for k in ("prompt", "prompt_file", "prompt_ids_file") if cfg.get(k) is not None]
    if len(given) != 1:
        raise ValueError(
            f"give exactly one of prompt=..., prompt_file=... or prompt_ids_file=...; got {given or 'none'}"
        )
    if cfg.prompt_ids_file:
        ids = json.loads(Path(cfg.prompt_ids_file).read_text())
        if not (isinstance(ids, list) and ids and all(isinstance(r, list) and r for r in ids)):
            raise ValueError(f"{cfg.prompt_ids_file}: expected a JSON list of non-empty lists of token ids")
        wrong = non_integer_ids(ids)
        if wrong:
            raise ValueError(f"{cfg.prompt_ids_file}: token ids must be integers; {wrong}")
        return [tok.decode(r) for r in ids], ids
    texts = (
        [cfg.prompt]
        if cfg.prompt is not None
        else [x for x in Path(cfg.prompt_file).read_text().splitlines() if x.strip()]
    )
    if not texts:
        raise ValueError(f"{cfg.prompt_file} holds no prompt")
    return texts, [prompt_ids(tok, t) for t in texts]


def non_integer_ids(ids) -> str:
    """The first few entries of ``ids`` (lists of token ids) that are not integers (JSON true/false and 1.0
    included), as ``[row][position]=value``; empty when all are integers."""
    wrong = [
        f"[{r}][{j}]={v!r}"
        for r, row in enumerate(ids)
        for j, v in enumerate(row)
        if isinstance(v, bool) or not isinstance(v, int)
    ]
    return ", ".join(wrong[:5]) + (f" ({len(wrong)} in all)" if len(wrong) > 5 else "")


def dump_errors(cfg) -> list[str]:
    """``dump_logits`` checked before generating: its folder exists, it is not a directory, and it overwrites
    none of the inputs (the checkpoint or an adapter directory, anything inside them, a prompt file)."""
    if not cfg.get("dump_logits"):
        return []
    path, given = Path(cfg.dump_logits).resolve(), cfg.dump_logits
    errors = []
    if not path.parent.is_dir():
        errors.append(f"dump_logits={given}: its folder {path.parent} does not exist")
    elif path.is_dir():
        errors.append(f"dump_logits={given} is a directory; expected a file path")
    adapters = cfg.get("adapters") or {}
    inputs = [("checkpoint", cfg.get("checkpoint"))] + [(f"adapters.{k}", v) for k, v in adapters.items()]
    for key, source in inputs:
        if source and (path == Path(source).resolve() or Path(source).resolve() in path.parents):
            errors.append(
                f"dump_logits={given} is inside {key}={source}; it would write into it: name a file elsewhere"
            )
    for key in ("prompt_file", "prompt_ids_file"):
        if cfg.get(key) and Path(cfg.get(key)).resolve() == path:
            errors.append(f"dump_logits={given} is {key}; it would overwrite it")
    return errors


def check_request(cfg, ids: list[list[int]], spec) -> None:
    """Serving inputs against the model, before any weights are read.

    Args:
        cfg: the generate config (max_new_tokens, temperature, top_k, dtype; dump_logits and the inputs it
            must not overwrite when set).
        ids: token ids per prompt.
        spec: the served model's ``MLASpec``.
    """
    errors = []
    if cfg.max_new_tokens < 1:
        errors.append(f"max_new_tokens={cfg.max_new_tokens}; expected >= 1")
    if not (math.isfinite(cfg.temperature) and cfg.temperature >= 0):
        errors.append(f"temperature={cfg.temperature}; expected a finite number >= 0 (0 = greedy)")
    if cfg.top_k is not None and not 1 <= cfg.top_k <= spec.vocab_size:
        errors.append(f"top_k={cfg.top_k}; expected 1..{spec.vocab_size} (the model's vocab_size) or null")
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        errors.append(f"dtype={cfg.dtype!r}; expected one of {sorted(DTYPES)} or null (the export's)")
    empty = [i for i, r in enumerate(ids) if not r]
    if empty:
        errors.append(f"prompts {empty} have no tokens (an empty prompt and a tokenizer without BOS)")
    longest = max(len(r) for r in ids)
    if longest + cfg.max_new_tokens > spec.max_positions:
        errors.append(
            f"longest prompt {longest} + max_new_tokens {cfg.max_new_tokens} exceeds the model's "
            f"max_position_embeddings {spec.max_positions}"
        )
    wrong = non_integer_ids(ids)
    if wrong:
        errors.append(f"token ids must be integers; {wrong}")
    bad = sorted(
        {i for r in ids for i in r if not isinstance(i, bool) and isinstance(i, int) and not 0 <= i < spec.vocab_size}
    )
    if bad:
        errors.append(f"token ids {bad[:5]} outside the model's vocabulary [0, {spec.vocab_size})")
    errors += dump_errors(cfg)
    if errors:
        raise ValueError("invalid request:\n  - " + "\n  - ".join(errors))


def right_padded(rows: list, pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> [b, max length] right-padded with ``pad``, and the lengths [b]."""
    lengths = torch.tensor([len(r) for r in rows], device=device)
    out = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out, lengths


def save_whole(obj, path: Path) -> None:
    """``torch.save`` to a sibling temp file renamed over ``path``: a failed write leaves no half file."""
    tmp = path.parent / f".{path.name}.partial"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(cfg, rows: int):
    """(engine, adapter bank or None, adapter id per row or None) for ``cfg`` (Megatron's groups set up first
    when nobody has)."""
    from megatron.core import parallel_state

    from nemo_mla_lora.inference.engine import AbsorbedMLAEngine
    from nemo_mla_lora.runtime import parallel

    if not parallel_state.model_parallel_is_initialized():
        parallel.init_megatron()
    engine = AbsorbedMLAEngine.load(cfg.checkpoint, cfg.dtype, cfg.device, cfg.attention, cfg.verify_checksums)
    if not (cfg.adapters or cfg.adapter):
        return engine, None, None
    from nemo_mla_lora.inference.adapters import AdapterBank

    dtype = next(engine.model.parameters()).dtype
    bank = AdapterBank.load(engine.spec, dict(cfg.adapters), cfg.device, dtype)
    return engine, bank, bank.ids([cfg.adapter] * rows)


def run(cfg) -> list[dict]:
    """The request checked (config keys, the checkpoint's spec, tokenizer, prompts, ``check_request``) before any
    weight is read, then one batch generated; prints each completion and returns a record per prompt (its
    text, prompt + generated ``tokens``, ``prompt_logits`` at every prompt position, each step's ``logits``),
    saved to ``dump_logits`` when set.

    Args:
        cfg: the composed ``generate`` config.
    """
    from nemo_mla_lora.inference.generate import generate

    check_known_keys(cfg)
    _, spec, _ = served(cfg.checkpoint, cfg.verify_checksums)  # manifest.json or config.json: no weights read
    tok = tokenizer.load(tokenizer.for_run(cfg.tokenizer, cfg.checkpoint, key="tokenizer"))
    texts, ids = prompts(cfg, tok)
    check_request(cfg, ids, spec)
    stop, pad = tok.eos, tok.pad
    engine, bank, adapter_ids = load(cfg, len(texts))
    prompt, lengths = right_padded(ids, pad, cfg.device)  # one batch, ragged rows
    prefill = []
    tokens, logits, cache = generate(
        engine,
        prompt,
        cfg.max_new_tokens,
        cfg.temperature,
        cfg.top_k,
        cfg.seed,
        stop_token=stop,
        bank=bank,
        adapter_ids=adapter_ids,
        prompt_lengths=lengths,
        prompt_logits=prefill,
    )
    records = _records(texts, ids, tokens[:, prompt.shape[1] :].tolist(), prefill[0], logits, tok)
    log.info(
        "%d prompts in one batch; latent cache %d bytes per token (%d layers)",
        len(texts),
        cache.bytes_per_token(),
        engine.spec.num_layers,
    )
    if cfg.dump_logits:
        save_whole(records, Path(cfg.dump_logits))
        print(f"logits: {cfg.dump_logits}")
    return records


def _records(texts, ids, new, prompt_logits, logits, tok) -> list[dict]:
    """Each prompt's completion printed and recorded: its generated tokens up to its stop token, prompt + those
    ``tokens``, the ``prompt_logits`` at its own positions [len(prompt), vocab], each step's ``logits``."""
    records = []
    for i, text in enumerate(texts):
        row = new[i][: new[i].index(tok.eos) + 1] if tok.eos in new[i] else new[i]  # up to this row's stop token
        print(f"{text}{tok.decode(row)}")
        records.append(
            {
                "prompt": text,
                "tokens": torch.tensor(ids[i] + row),
                "prompt_logits": prompt_logits[i, : len(ids[i])].cpu(),
                "logits": logits[i, : len(row)].cpu(),
            }
        )
    return records


@hydra.main(config_path="pkg://nemo_mla_lora.conf", config_name="generate", version_base=None)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
