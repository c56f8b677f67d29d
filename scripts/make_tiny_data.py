"""Regenerate the embedded tiny datasets (deterministic). Run: .venv/bin/python scripts/make_tiny_data.py

- base_copy.jsonl: the generic task the tiny base model is first trained on: "copy: word = word".
- upper_*.jsonl:   the fine-tuning task the base never saw: "upper: word = WORD" (train / held-out).
- reverse_*.jsonl: the placement study's task: "reverse: word = drow" (known tokens, new attention pattern),
  written to studies/placement/data/ (the study lives outside the package).
"""

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "nemo_mla_lora" / "data"
STUDY_OUT = ROOT / "studies" / "placement" / "data"


def words(rng, n):
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 7))) for _ in range(n)]


def write(name, records, out=OUT):
    with open(out / name, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def main():
    rng = random.Random(1234)
    write("base_copy.jsonl", [{"prompt": f"copy: {w} =", "answer": f" {w}"} for w in words(rng, 2000)])
    upper = [{"prompt": f"upper: {w} =", "answer": f" {w.upper()}"} for w in words(rng, 1200)]
    write("upper_train.jsonl", upper[:1000])
    write("upper_validation.jsonl", upper[1000:])
    reverse = [{"prompt": f"reverse: {w} =", "answer": f" {w[::-1]}"} for w in words(rng, 1200)]
    write("reverse_train.jsonl", reverse[:1000], STUDY_OUT)
    write("reverse_validation.jsonl", reverse[1000:], STUDY_OUT)


if __name__ == "__main__":
    main()
