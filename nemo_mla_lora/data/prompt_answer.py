"""Prompt/answer records -> token batches with the loss on the answer only.

Accepted records (JSONL, one per line): ``{"prompt": ..., "answer": ...}``, or NeMo's SQuAD-style
``{"input": ..., "output": ...}`` (what NeMo's SQuAD data module writes), or raw SQuAD
``{"context", "question", "answers": {"text": [...]}}``. Packing concatenates examples into one
sequence (loss mask still answer-only) to fill ``seq_length``.
"""

import json
from pathlib import Path

import torch

from nemo_mla_lora.data import tokenizer as tok


def normalise(record: dict) -> tuple[str, str]:
    if "prompt" in record and "answer" in record:
        return record["prompt"], record["answer"]
    if "input" in record and "output" in record:
        return record["input"], " " + record["output"].lstrip()
    if "question" in record and "answers" in record:
        answer = record["answers"]["text"][0] if isinstance(record["answers"], dict) else record["answers"][0]
        return f"Context: {record.get('context', '')} Question: {record['question']} Answer:", f" {answer}"
    raise ValueError(f"record has neither prompt/answer, input/output nor SQuAD fields: {sorted(record)}")


def read_jsonl(path) -> list[tuple[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {path} not found")
    with open(path) as f:
        return [normalise(json.loads(line)) for line in f if line.strip()]


def encode_example(prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """tokens and loss mask (1 on answer tokens and EOS)."""
    p, a = [tok.BOS] + tok.encode(prompt), tok.encode(answer) + [tok.EOS]
    return p + a, [0] * len(p) + [1] * len(a)


def to_sequences(examples, seq_length: int, packed: bool = False) -> list[tuple[list[int], list[int]]]:
    """Fixed-length (seq_length + 1) token/mask rows, padded; packed rows hold several examples."""
    rows, cur_t, cur_m = [], [], []
    for prompt, answer in examples:
        t, m = encode_example(prompt, answer)
        t, m = t[: seq_length + 1], m[: seq_length + 1]
        if not packed or len(cur_t) + len(t) > seq_length + 1:
            if cur_t:
                rows.append((cur_t, cur_m))
            cur_t, cur_m = [], []
        cur_t, cur_m = cur_t + t, cur_m + m
    if cur_t:
        rows.append((cur_t, cur_m))
    width = seq_length + 1
    return [(t + [tok.PAD] * (width - len(t)), m + [0] * (width - len(m))) for t, m in rows]


class PromptAnswerDataset(torch.utils.data.Dataset):
    """Items: tokens [s], labels [s] (next tokens), loss_mask [s]."""

    def __init__(self, path, seq_length: int, packed: bool = False, limit: int | None = None):
        examples = read_jsonl(path)[:limit]
        self.rows = to_sequences(examples, seq_length, packed)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        t, m = self.rows[i]
        t, m = torch.tensor(t), torch.tensor(m, dtype=torch.float32)
        return {"tokens": t[:-1], "labels": t[1:], "loss_mask": m[1:]}


def make_loader(path, seq_length: int, packed: bool, batch_size: int, shuffle: bool, seed: int):
    """A DataLoader over ``path`` (``pkg://`` names resolved); shuffled training order fixed by ``seed``."""
    from nemo_mla_lora.data import resolve

    ds = PromptAnswerDataset(resolve(path), seq_length, packed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle,
                                       generator=torch.Generator().manual_seed(seed), drop_last=shuffle)
