"""Prompt/answer records -> token batches with the loss on the answer only.

Accepted records (JSONL, one per line): ``{"prompt": ..., "answer": ...}``, or NeMo's SQuAD-style
``{"input": ..., "output": ...}`` (what NeMo's SQuAD data module writes), or raw SQuAD
``{"context", "question", "answers": {"text": [...]}}``. Packing concatenates examples into one
sequence (loss mask still answer-only) to fill ``seq_length``.
"""

import json
import logging
from pathlib import Path

import torch

from nemo_mla_lora.data.tokenizer import ByteTokenizer, prompt_ids

log = logging.getLogger(__name__)


def normalise(record: dict) -> tuple[str, str]:
    if "prompt" in record and "answer" in record:
        return record["prompt"], record["answer"]
    if "input" in record and "output" in record:
        return record["input"], " " + record["output"].lstrip()
    if "question" in record and "answers" in record:
        answer = record["answers"]["text"][0] if isinstance(record["answers"], dict) else record["answers"][0]
        return f"Context: {record.get('context', '')} Question: {record['question']} Answer:", f" {answer}"
    raise ValueError(f"record has neither prompt/answer, input/output nor SQuAD fields: {sorted(record)}")


class DataError(ValueError):
    """A dataset that cannot be used, with the file and line."""


def read_jsonl(path) -> list[tuple[str, str]]:
    """(prompt, answer) per non-blank line; any bad record, or none at all, raises ``DataError`` naming file:line."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.jsonl"))[:5]
        raise DataError(
            f"dataset {path} is a directory; expected a JSONL file (one prompt/answer record per line)"
            + (f", e.g. one of {inside} inside it" if inside else "")
        )
    if not path.is_file():
        raise FileNotFoundError(f"dataset {path} not found")
    out = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
                if line.strip():
                    out.append(normalise(json.loads(line)))
            except (UnicodeDecodeError, json.JSONDecodeError, ValueError, KeyError, TypeError, IndexError) as err:
                raise DataError(f"{path}:{number}: {type(err).__name__}: {err}") from None
    if not out:
        raise DataError(f"{path}: no records (the file is empty or blank)")
    return out


def encode_example(tok, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """tokens and loss mask (1 on answer tokens and EOS)."""
    p, a = prompt_ids(tok, prompt), tok.encode(answer) + [tok.eos]
    return p + a, [0] * len(p) + [1] * len(a)


def to_sequences(examples, seq_length: int, packed: bool = False, tok=None) -> list[tuple[list[int], list[int]]]:
    """Fixed-length (seq_length + 1) token/mask rows, padded; packed rows hold several examples."""
    tok = tok or ByteTokenizer()
    return pack([encode_example(tok, p, a) for p, a in examples], seq_length, packed, tok.pad)


def pack(encoded, seq_length: int, packed: bool, pad: int) -> list[tuple[list[int], list[int]]]:
    """``encode_example`` outputs cut to seq_length + 1 tokens (the end goes: the answer first), then padded
    rows of seq_length + 1; packed rows hold several examples."""
    rows, cur_t, cur_m = [], [], []
    for t, m in encoded:
        t, m = t[: seq_length + 1], m[: seq_length + 1]
        if not packed or len(cur_t) + len(t) > seq_length + 1:
            if cur_t:
                rows.append((cur_t, cur_m))
            cur_t, cur_m = [], []
        cur_t, cur_m = cur_t + t, cur_m + m
    if cur_t:
        rows.append((cur_t, cur_m))
    width = seq_length + 1
    return [(t + [pad] * (width - len(t)), m + [0] * (width - len(m))) for t, m in rows]


def check_answers(where, encoded, seq_length: int, key: str = "data.seq_length") -> None:
    """Refuse a set in which every example loses its whole answer to ``seq_length`` (the loss would be 0:
    nothing trains, the held-out loss reads 0); warn with the count when only some do.

    Args:
        where: the data file, named in the messages.
        encoded: ``encode_example`` outputs (tokens, loss mask) of the set, uncut.
        seq_length: tokens per training sequence (a row holds seq_length + 1: inputs and shifted labels).
        key: the config field that sets ``seq_length``, named in the messages.
    """
    kept = [sum(m[1 : seq_length + 1]) for _, m in encoded]  # answer tokens that stay labels after the cut
    lost = sum(k == 0 for k in kept)
    if not lost:
        return
    prompts = [len(m) - sum(m) for _, m in encoded]
    longest = max(prompts)
    if lost == len(encoded):
        raise DataError(
            f"{where}: all {lost} examples lose their answer to {key}={seq_length} (the longest prompt "
            f"is {longest} tokens, the shortest {min(prompts)}): no answer token is left to compute a "
            f"loss on; raise {key} or shorten the prompts"
        )
    log.warning(
        "%s: %d of %d examples lose their answer to %s=%d (the longest prompt is %d tokens); they add "
        "nothing to the loss",
        where,
        lost,
        len(encoded),
        key,
        seq_length,
        longest,
    )


class PromptAnswerDataset(torch.utils.data.Dataset):
    """Items: tokens [s], labels [s] (next tokens), loss_mask [s]."""

    def __init__(self, path, seq_length: int, packed: bool = False, limit: int | None = None, tok=None):
        tok = tok or ByteTokenizer()
        encoded = [encode_example(tok, p, a) for p, a in read_jsonl(path)[:limit]]
        check_answers(path, encoded, seq_length)
        self.rows = pack(encoded, seq_length, packed, tok.pad)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        t, m = self.rows[i]
        t, m = torch.tensor(t), torch.tensor(m, dtype=torch.float32)
        return {"tokens": t[:-1], "labels": t[1:], "loss_mask": m[1:]}


class StepSampler(torch.utils.data.Sampler):
    """Indices for training steps ``start_step`` .. ``steps - 1`` (``batch_size`` each): pass p through the
    data is the permutation seeded by (seed, p), so step k's batch is the same whether or not the run was
    interrupted before it (a resumed run starts where its checkpoint stopped, not at the data's beginning)."""

    def __init__(self, size: int, batch_size: int, steps: int, seed: int, start_step: int = 0):
        self.size, self.batch_size, self.steps, self.seed, self.start = size, batch_size, steps, seed, start_step
        self.per_pass = size // batch_size  # batches per pass (drop_last)

    def __len__(self):
        # The whole run's length, also when resuming: Lightning restores the batch index within the epoch
        # (start_step) and ends the epoch at len(loader) batches; iteration itself begins at start_step.
        return self.steps * self.batch_size

    def __iter__(self):
        for step in range(self.start, self.steps):
            p, b = divmod(step, self.per_pass)
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100003 + p))
            yield from order[b * self.batch_size : (b + 1) * self.batch_size].tolist()


def make_loader(
    path,
    seq_length: int,
    packed: bool,
    batch_size: int,
    shuffle: bool,
    seed: int,
    tok=None,
    steps: int | None = None,
    start_step: int = 0,
):
    """A DataLoader over ``path`` (``pkg://`` names resolved) tokenized by ``tok`` (default: bytes); shuffled
    training order fixed by ``seed``; with ``steps``, exactly the batches of steps ``start_step``..``steps-1``
    (``StepSampler``). A training set smaller than one batch is refused (nothing would train)."""
    from nemo_mla_lora.data import resolve

    ds = PromptAnswerDataset(resolve(path), seq_length, packed, tok=tok)
    if shuffle and len(ds) < batch_size:
        raise DataError(f"{path}: {len(ds)} sequences, fewer than one batch of {batch_size} (batches drop the rest)")
    if shuffle and steps:
        return torch.utils.data.DataLoader(
            ds, batch_size=batch_size, drop_last=True, sampler=StepSampler(len(ds), batch_size, steps, seed, start_step)
        )
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed), drop_last=shuffle
    )
