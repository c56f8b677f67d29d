"""On the GPU machine, with NeMo 2.7.3 + megatron-core 0.15.3 (the carried wheels) and Transformer Engine
(built there, ``scripts/gpu/te``): do NeMo's and Megatron's own loaders and engines take our exports as they are?

    python3 bench/nemo_engines_check.py nemo ROOT/nemo_te OUT/nemo_te.json [--mcore ROOT/mcore_te]
    python3 bench/nemo_engines_check.py nemo ROOT/nemo_local OUT/nemo_local.json

``nemo DIR``: NeMo's ``llm.generate`` on the ``nemo`` export (``io.load_context`` builds the model its context names:
the TE layer spec for ``names=te``; ``MegatronStrategy`` restores the weights with NeMo's default strictness), greedy,
prompts without BOS (2.7.3's add_BOS adds none); its tokens and their log-probs against ``ROOT/expected.pt`` (``recipes.generate`` on the same
export, CPU). ``--mcore DIR``: Megatron's ``dist_checkpointing.load(model.sharded_state_dict(), DIR)`` with default
strictness into the TE-spec ``GPTModel`` the context configures, then its prompt logits against the expected ones;
the TE model's sharded keys are recorded (what a TE consumer asks for). None of nemo_mla_lora is imported for the
``te`` checks; the ``local`` context names nemo_mla_lora's layer spec, which NeMo imports.
"""

import argparse
import json
import time
from pathlib import Path

import torch

EOS = 257  # the tiny models' byte tokenizer (NeMo's ByteLevelTokenizer as the nemo export's context maps it)


def nemo_generate(export_dir: Path, expected: list, new_tokens: int) -> dict:
    from megatron.core.inference.common_inference_params import CommonInferenceParams
    from nemo import lightning as nl
    from nemo.collections import llm

    strategy = nl.MegatronStrategy(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                   setup_optimizers=False, store_optimizer_states=False)
    trainer = nl.Trainer(accelerator="gpu", devices=1, strategy=strategy)
    params = CommonInferenceParams(top_k=1, num_tokens_to_generate=new_tokens, return_log_probs=True)
    results = llm.generate(path=str(export_dir), trainer=trainer, prompts=[e["prompt"] for e in expected],
                           params_dtype=torch.float32, add_BOS=False, inference_params=params,
                           enable_flash_decode=False)
    rows = []
    for e, r in zip(expected, results):
        prompt_len = e["prompt_logits"].shape[0]
        ours = e["tokens"][prompt_len:].tolist()
        if ours and ours[-1] == EOS:  # Megatron's engine stops at the tokenizer's EOS and does not return it
            ours = ours[:-1]
        theirs = [int(t) for t in r.generated_tokens.tolist()][: len(ours)]
        logp = torch.log_softmax(e["logits"].double(), -1)
        ours_logp = [float(logp[i, t]) for i, t in enumerate(ours)]
        theirs_logp = [float(x) for x in (r.generated_log_probs or [])][: len(ours)]
        rows.append({"prompt": e["prompt"], "prompt_tokens": [int(t) for t in r.prompt_tokens],
                     "expected_prompt_tokens": e["tokens"][:prompt_len].tolist(), "nemo_tokens": theirs,
                     "expected_tokens": ours, "tokens_equal": theirs == ours,
                     "max_abs_logprob_diff": max((abs(a - b) for a, b in zip(ours_logp, theirs_logp)), default=None),
                     "text": r.generated_text})
    return {"rows": rows, "all_tokens_equal": all(r["tokens_equal"] for r in rows),
            "prompts_equal": all(r["prompt_tokens"] == r["expected_prompt_tokens"] for r in rows)}


def mcore_load(context_dir: Path, mcore_dir: Path, expected: list) -> dict:
    """The TE-spec GPTModel NeMo's context configures (parallel state is up after llm.generate), loaded by
    Megatron's own dist_checkpointing.load with default strictness from the names=te mcore export."""
    from megatron.core import dist_checkpointing
    from nemo.lightning import io

    model_io = io.load_context(context_dir, subpath="model")
    model = model_io.config.configure_model(model_io.tokenizer).cuda().eval()
    sharded = model.sharded_state_dict()
    keys = {k: type(v).__name__ for k, v in sorted(sharded.items())}
    model.load_state_dict(dist_checkpointing.load(sharded, str(mcore_dir)))  # default strictness
    worst, scale = 0.0, 0.0
    for e in expected:
        ids = e["tokens"][: e["prompt_logits"].shape[0]][None].cuda()
        s = ids.shape[1]
        with torch.no_grad():
            logits = model(ids, torch.arange(s, device="cuda")[None], None).float().cpu()[0]
        worst = max(worst, float((logits - e["prompt_logits"]).abs().max()))
        scale = max(scale, float(e["prompt_logits"].abs().max()))
    kinds = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith(("megatron.core.ext",
                                                                                               "transformer_engine"))})
    return {"loaded_with_default_strictness": True, "max_abs_prompt_logit_diff": worst, "max_abs_logit": scale,
            "te_module_kinds": kinds, "sharded_keys": keys}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["nemo"])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--mcore", type=Path)
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()
    expected = torch.load(args.export_dir.parent / "expected.pt", weights_only=True)
    report, t0 = {"export": str(args.export_dir)}, time.time()
    try:
        report["llm_generate"] = nemo_generate(args.export_dir, expected, args.new_tokens)
        if args.mcore:
            report["mcore_te_load"] = mcore_load(args.export_dir / "context", args.mcore, expected)
    except Exception as err:  # the report says what failed; the exit code too
        import traceback

        report["error"] = traceback.format_exc()[-6000:]
        print(report["error"])
    report["wall_s"] = round(time.time() - t0, 1)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "mcore_te_load"}, indent=1)[:4000])
    if "mcore_te_load" in report:
        print({k: v for k, v in report["mcore_te_load"].items() if k != "sharded_keys"})
    raise SystemExit(1 if "error" in report else 0)


if __name__ == "__main__":
    main()
