"""Generation on the absorbed engine: one prefill, then one token per step; greedy or sampled."""

import torch


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """logits [b, vocab] -> token ids [b]: argmax at temperature 0, else a sample (top-k if given)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [b, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    engine,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    stop_token: int | None = None,
    bank=None,
    adapter_ids=None,
    prompt_lengths: torch.Tensor | None = None,
    prompt_logits: list | None = None,
):
    """prompt [b, s0] (right-padded when ``prompt_lengths`` [b] is given) -> (tokens [b, s0 + n]: the padded
    prompt then the generated tokens, step logits [b, n, vocab], cache). Stops early when every row has
    produced ``stop_token``. ``bank``/``adapter_ids``: one unmerged adapter per row. ``prompt_logits``: a list
    that receives the prefill's logits [b, s0, vocab] (every prompt position, for comparisons)."""
    b, s0 = prompt.shape
    lengths = prompt_lengths if prompt_lengths is not None else torch.full((b,), s0, device=prompt.device)
    cache = engine.new_cache(b, s0 + max_new_tokens)
    generator = torch.Generator(device=prompt.device).manual_seed(seed)
    logits = engine.forward(prompt, cache, bank, adapter_ids, valid=lengths)  # [b, s0, vocab]
    if prompt_logits is not None:
        prompt_logits.append(logits)
    logits = logits[torch.arange(b, device=prompt.device), lengths - 1]  # [b, vocab]: each row's last real token
    tokens, steps = [prompt], []
    done = torch.zeros(b, dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        steps.append(logits)
        token = next_token(logits, temperature, top_k, generator)  # [b]
        tokens.append(token[:, None])
        if len(steps) == max_new_tokens:
            break
        if stop_token is not None:  # the only per-step device sync, and only when there is a stop token
            done |= token == stop_token
            if bool(done.all()):
                break
        logits = engine.forward(token[:, None], cache, bank, adapter_ids)[:, -1]
    return torch.cat(tokens, dim=1), torch.stack(steps, dim=1), cache
