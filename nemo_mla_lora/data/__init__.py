"""Embedded tiny datasets, a byte tokenizer, and JSONL / SQuAD prompt-answer loading."""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
