"""Embedded tiny datasets, a byte tokenizer, and JSONL / SQuAD prompt-answer loading."""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent


def resolve(spec: str) -> str:
    """``pkg://name.jsonl`` -> the embedded file's path; any other path unchanged."""
    return str(DATA_DIR / spec.removeprefix("pkg://")) if spec and spec.startswith("pkg://") else spec
