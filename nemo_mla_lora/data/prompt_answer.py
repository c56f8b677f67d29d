"""Prompt/answer records -> token batches with the loss on the answer only.

Accepted records (JSONL, one per line): ``{"prompt": ..., "answer": ...}``, or NeMo's SQuAD-style
``{"input": ..., "output": ...}`` (what NeMo's SQuAD data module writes), or raw SQuAD
``{"context", "question", "answers": {"text": [...]}}``. Packing concatenates examples into one
sequence (loss mask still answer-only) to fill ``seq_length``.
"""

import json
from pathlib import Path

import torch

from nemo_mla_lora.data.tokenizer import ByteTokenizer, prompt_ids


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
    rows, cur_t, cur_m = [], [], []
    for prompt, answer in examples:
        t, m = encode_example(tok, prompt, answer)
        t, m = t[: seq_length + 1], m[: seq_length + 1]
        if not packed or len(cur_t) + len(t) > seq_length + 1:
            if cur_t:
                rows.append((cur_t, cur_m))
            cur_t, cur_m = [], []
        cur_t, cur_m = cur_t + t, cur_m + m
    if cur_t:
        rows.append((cur_t, cur_m))
    width = seq_length + 1
    return [(t + [tok.pad] * (width - len(t)), m + [0] * (width - len(m))) for t, m in rows]


class PromptAnswerDataset(torch.utils.data.Dataset):
    """Items: tokens [s], labels [s] (next tokens), loss_mask [s]."""

    def __init__(self, path, seq_length: int, packed: bool = False, limit: int | None = None, tok=None):
        examples = read_jsonl(path)[:limit]
        self.rows = to_sequences(examples, seq_length, packed, tok)

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
            yield from order[b * self.batch_size:(b + 1) * self.batch_size].tolist()


def make_loader(path, seq_length: int, packed: bool, batch_size: int, shuffle: bool, seed: int, tok=None,
                steps: int | None = None, start_step: int = 0):
    """A DataLoader over ``path`` (``pkg://`` names resolved) tokenized by ``tok`` (default: bytes); shuffled
    training order fixed by ``seed``; with ``steps``, exactly the batches of steps ``start_step``..``steps-1``
    (``StepSampler``). A training set smaller than one batch is refused (nothing would train)."""
    from nemo_mla_lora.data import resolve

    ds = PromptAnswerDataset(resolve(path), seq_length, packed, tok=tok)
    if shuffle and len(ds) < batch_size:
        raise DataError(f"{path}: {len(ds)} sequences, fewer than one batch of {batch_size} (batches drop the rest)")
    if shuffle and steps:
        return torch.utils.data.DataLoader(ds, batch_size=batch_size, drop_last=True,
                                           sampler=StepSampler(len(ds), batch_size, steps, seed, start_step))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle,
                                       generator=torch.Generator().manual_seed(seed), drop_last=shuffle)
