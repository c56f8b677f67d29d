"""The real-size export in Megatron-Core's own TE-spec model: loaded at default strictness, logits against the
unmerged fine-tuned model, with NeMo's megatron-core 0.15.3 and with 0.19.2.

    python3 bench/real_size_check.py expected --base HF_DIR --adapter ADAPTER_DIR --out expected.pt   # NeMo's stack
    python3 bench/real_size_check.py load --export EXPORT_DIR --expected expected.pt --out load.json    # any release

``expected``: the model as ``trainer=megatron`` builds it (``bench/real_size.py``), the HF base streamed in by the
trainer's loader, MLALoRA from the adapter's own ``adapter.json`` with the adapter loaded through
``dist_checkpointing``: the unmerged fine-tuned model; its logits (bf16) on fixed random tokens.
Without ``--adapter``: the base alone, for the floor (below).
``load``: Megatron's GPTModel on its own TE spec (``megatron_release.mla_decoder_block_spec``, grouped-GEMM experts)
from the export's ``mla_spec.json``; ``dist_checkpointing.load(model.sharded_state_dict(), EXPORT_DIR)`` with default
strictness; logits on the same tokens. Bound: 2e-2 of the largest |logit| (bf16 on both sides, different kernels),
or with ``--floor`` twice the difference the two stacks show on the base alone (an ``adapter=null`` export against
``expected`` without an adapter). In bf16 with random weights the routers see near-ties, so a token may reach other
experts in one stack than in the other; the floor measures what that and the kernels alone move, with no merge.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TOKENS = (2, 64)
BOUND_REL = 2e-2  # of the largest |logit|: bf16 on both sides, different kernels


def bound_rel(floor: float | None) -> float:
    """The logits bound relative to the largest |logit|: 2e-2, or twice the floor (the base alone) where larger."""
    return BOUND_REL if floor is None else max(BOUND_REL, 2 * floor)


def fixed_tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, TOKENS, generator=torch.Generator().manual_seed(11))


@torch.no_grad()
def expected(args) -> dict:
    from megatron.core import dist_checkpointing

    sys.path.insert(0, str(HERE))
    from mcore019_check import model_logits
    from real_size import build_trainer_model

    from nemo_mla_lora.peft import MLALoRA

    model, spec, _, _ = build_trainer_model(args.base, args.seq)
    state = {}
    if args.adapter:  # without one: the base alone (the floor: the two stacks' difference on the same weights)
        info = json.loads((Path(args.adapter) / "adapter.json").read_text())
        peft = MLALoRA(placement=info["placement"], target_modules=info["target_modules"] or [], dim=info["dim"],
                       alpha=info["alpha"], parts=info["parts"])
        model = peft(model)
        sharded = {k: v for k, v in model.sharded_state_dict().items() if ".adapter." in getattr(v, "key", k)}
        state = dist_checkpointing.load(sharded, str(args.adapter))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or not state:
            raise RuntimeError(f"adapter {args.adapter}: {len(state)} tensors, unexpected {unexpected[:5]}")
    model = model.eval()
    tokens = fixed_tokens(spec.vocab_size)
    logits = model_logits(model, tokens)
    torch.save({"tokens": tokens, "unmerged_logits": logits, "adapter_tensors": len(state)}, args.out)
    report = {"adapter_tensors": len(state), "max_abs_logit": logits.abs().max().item()}
    print(json.dumps(report))
    return report


def fit_nvrx_to_megatron() -> str | None:
    """Make nvidia-resiliency-ext fit the Megatron on the path, before Megatron is imported. megatron-core 0.19.2's
    ``has_nvrx_async_support`` asserts nvrx >= 0.6.0 wherever nvrx imports, and reads
    ``nvidia_resiliency_ext.__version__``, which 0.4.1 (NeMo 2.7.3's pin, a namespace package) lacks: where the
    installed nvrx is older than the Megatron needs, it is hidden (its import fails, as where it is not
    installed, and Megatron goes without it); otherwise ``__version__`` is set from the metadata where missing.
    Returns what was done (None: nothing)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        installed = version("nvidia-resiliency-ext")
    except PackageNotFoundError:
        return None
    if Version(version("megatron-core")) >= Version("0.19") and Version(installed) < Version("0.6.0"):
        sys.modules["nvidia_resiliency_ext"] = None  # import raises ImportError
        return f"hidden: {installed} < 0.6.0"
    import nvidia_resiliency_ext as nvrx

    if hasattr(nvrx, "__version__"):
        return None
    nvrx.__version__ = installed
    return installed


@torch.no_grad()
def load(args) -> dict:
    nvrx_set = fit_nvrx_to_megatron()
    import megatron.core
    from megatron.core import dist_checkpointing

    sys.path.insert(0, str(HERE))
    from mcore019_check import build_model, init_one_gpu, model_logits

    init_one_gpu(29523)
    spec = json.loads((Path(args.export) / "mla_spec.json").read_text())
    want = torch.load(args.expected, weights_only=True)
    report = {"megatron_core": megatron.core.__version__, "card": torch.cuda.get_device_name(0),
              "export": args.export, "loaded": False, "nvrx_version_set": nvrx_set}
    start = time.perf_counter()
    model = build_model(spec, use_te=True, dtype=torch.bfloat16)
    report["build_seconds"] = round(time.perf_counter() - start, 1)
    print(f"model built in {report['build_seconds']} s; loading {args.export}", flush=True)
    report["attention"] = type(model.decoder.layers[0].self_attention).__name__
    report["q_proj"] = type(getattr(model.decoder.layers[0].self_attention, "linear_q_proj", None)).__name__
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), args.export))  # default strictness
    report.update(loaded=True, load_seconds=round(time.perf_counter() - start, 1))
    logits = model_logits(model, want["tokens"])
    reference = want["unmerged_logits"]
    diff, scale = (logits - reference).abs().max().item(), reference.abs().max().item()
    # --floor: the same comparison on the base alone: what the two stacks differ by without any merge
    floor = json.loads(Path(args.floor).read_text())["max_rel"] if args.floor else None
    bound = bound_rel(floor)
    report.update(max_abs_diff=diff, max_abs_logit=scale, max_rel=diff / scale, floor_rel=floor, bound_rel=bound,
                  within=diff <= bound * scale, mean_abs_diff=(logits - reference).abs().mean().item(),
                  argmax_agreement=(logits.argmax(-1) == reference.argmax(-1)).float().mean().item())
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("expected")
    e.add_argument("--base", required=True)
    e.add_argument("--adapter", help="our adapter checkpoint; without it, the base alone")
    e.add_argument("--out", required=True)
    e.add_argument("--seq", type=int, default=4096)
    ld = sub.add_parser("load")
    ld.add_argument("--export", required=True)
    ld.add_argument("--expected", required=True)
    ld.add_argument("--out", required=True)
    ld.add_argument("--floor", help="the load report of the base alone: the bound becomes max(2e-2, 2 x its max_rel)")
    args = p.parse_args(argv)
    if args.cmd == "expected":
        expected(args)
        return 0
    return 0 if load(args)["within"] else 1


if __name__ == "__main__":
    sys.exit(main())
