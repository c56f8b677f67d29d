"""Regenerate the embedded tiny datasets (deterministic). Run: .venv/bin/python scripts/make_tiny_data.py

- base_copy.jsonl: the generic task the tiny base model is first trained on: "copy: word = word".
- upper_*.jsonl:   the fine-tuning task the base never saw: "upper: word = WORD" (train / held-out).
- reverse_*.jsonl: the placement study's task: "reverse: word = drow" (known tokens, new attention pattern).
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "nemo_mla_lora" / "data"


def words(rng, n):
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 7))) for _ in range(n)]


def write(name, records):
    with open(OUT / name, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def main():
    rng = random.Random(1234)
    write("base_copy.jsonl", [{"prompt": f"copy: {w} =", "answer": f" {w}"} for w in words(rng, 2000)])
    upper = [{"prompt": f"upper: {w} =", "answer": f" {w.upper()}"} for w in words(rng, 1200)]
    write("upper_train.jsonl", upper[:1000])
    write("upper_validation.jsonl", upper[1000:])
    reverse = [{"prompt": f"reverse: {w} =", "answer": f" {w[::-1]}"} for w in words(rng, 1200)]
    write("reverse_train.jsonl", reverse[:1000])
    write("reverse_validation.jsonl", reverse[1000:])


if __name__ == "__main__":
    main()
