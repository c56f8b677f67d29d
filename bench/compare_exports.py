"""Compare two dist-checkpoint exports (mcore or absorbed) tensor by tensor (the export the callback wrote under TP=2 or EP=2
against a one-process export of the same saved base and adapter).

    python bench/compare_exports.py DIR_A DIR_B --out result.json

Prints and writes the number of tensors, how many are bit-identical, and the largest absolute difference;
exits 1 unless the two hold the same tensor names and every tensor is identical."""

import argparse
import json
import sys
from pathlib import Path

import torch

from nemo_mla_lora.runtime import parallel
from nemo_mla_lora.export.pipeline import read_export


def compare(dir_a, dir_b, fmt: str | None = None) -> dict:
    fmt = fmt or json.loads((Path(dir_a) / "manifest.json").read_text())["format"]
    a, b = read_export(dir_a, fmt), read_export(dir_b, fmt)
    only = sorted(set(a) ^ set(b))
    diffs = {n: (a[n].double() - b[n].double()).abs().max().item() for n in sorted(set(a) & set(b))}
    worst = max(diffs, key=diffs.get) if diffs else None
    return {"tensors": len(diffs), "identical": sum(torch.equal(a[n], b[n]) for n in diffs),
            "names_in_one_only": only, "max_abs_diff": diffs.get(worst, 0.0), "worst_tensor": worst}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir_a")
    p.add_argument("dir_b")
    p.add_argument("--format", default=None, help="absorbed | mcore | hf (default: dir_a's manifest)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    with parallel.megatron_session():  # dist-checkpoint reads need a (one-process) group
        result = compare(args.dir_a, args.dir_b, args.format)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if not result["names_in_one_only"] and result["identical"] == result["tensors"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
