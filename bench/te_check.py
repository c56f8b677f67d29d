"""On the GPU machine: one saved base + MLALoRA adapter in a Transformer Engine model and in the TE-free one.

    python3 bench/te_check.py RUN_DIR --out te_logits.json [--specs te local]

``RUN_DIR`` holds ``base/`` and ``adapter/`` as a finetune run saves them (here: the run trained on the TE spec,
routed experts as TE grouped GEMMs). For each layer spec it builds the model from the base's ``mla_spec.json``
(``te``: Megatron's TE spec with grouped-GEMM experts, as NeMo builds it; ``local``: nemo_mla_lora's TE-free
spec with ``SequentialMLP`` experts), wraps it with the adapter's own MLALoRA settings, loads the base and the
adapter with Megatron's ``dist_checkpointing.load`` at default strictness, and runs the same tokens. Writes
the logits' max abs difference against the first spec and whether it is within the bf16 bound (2e-2 of the
largest |logit|). Without TE, ``--specs local local`` runs the same code path on CPU in float32.
"""

import argparse
import json
import sys
from pathlib import Path

import torch


def build(spec, kind: str, dtype):
    from nemo_mla_lora.models.from_spec import config_from_spec
    from nemo_mla_lora.models.layer_spec import local_mla_block_spec, te_mla_block_spec
    from nemo_mla_lora.models.from_spec import CPU_SAFE
    from nemo_mla_lora.models.tiny import build_model

    if kind == "te":
        config = config_from_spec(spec, dtype, transformer_layer_spec=te_mla_block_spec, moe_grouped_gemm=True)
    else:
        config = config_from_spec(spec, dtype, **CPU_SAFE, transformer_layer_spec=local_mla_block_spec)
    return build_model(config)


def load(model, run: Path, spec) -> None:
    """Base tensors from ``run/base``, adapter tensors from ``run/adapter``, each at default strictness. A base
    saved from a TE model has TE names (``linear_q_up_proj.layer_norm_weight``, ...): a local-spec model asks for
    its norms under those names (``keymap.to_te_name``), as a user loading it would."""
    from megatron.core import dist_checkpointing

    from nemo_mla_lora.arch import keymap
    from nemo_mla_lora.checkpoints.dist_ckpt import dense_layers, load_weights

    sharded = model.sharded_state_dict()
    adapter = {k: v for k, v in sharded.items() if ".adapter." in getattr(v, "key", k)}
    base = {k: v for k, v in sharded.items() if k not in adapter}
    saved = dist_checkpointing.load_tensors_metadata(str(run / "base"))
    if any(k.endswith("layer_norm_weight") for k in saved):
        dense = dense_layers(spec)
        for v in base.values():
            if hasattr(v, "key") and v.key not in saved:
                v.key = keymap.to_te_name(v.key, dense)
    state = dist_checkpointing.load(base, str(run / "base"))
    state.update(dist_checkpointing.load(adapter, str(run / "adapter")))
    load_weights(model, state, f"{run} (base + adapter)")  # only _extra_state may be absent


@torch.no_grad()
def logits(run: Path, kind: str, tokens: torch.Tensor, device, dtype) -> tuple[torch.Tensor, dict, tuple]:
    from nemo_mla_lora.checkpoints.dist_ckpt import read_spec
    from nemo_mla_lora.peft import MLALoRA
    from nemo_mla_lora.peft.state import adapter_modules, lora_b_parameters

    info = json.loads((run / "adapter" / "adapter.json").read_text())
    peft = MLALoRA(placement=info["placement"], target_modules=info["target_modules"] or [], dim=info["dim"],
                   alpha=info["alpha"], parts=info["parts"])
    spec = read_spec(run / "base")
    model = peft(build(spec, kind, dtype).to(device)).eval()
    load(model, run, spec)
    kinds = sorted({type(m).__name__ for m in model.modules() if any(w in type(m).__name__ for w in ("Linear", "MLP"))})
    b_norm = sum(b.float().abs().sum().item() for m in adapter_modules(model).values()
                 for b in lora_b_parameters(m.adapter))
    b, s = tokens.shape
    positions = torch.arange(s, device=device).expand(b, s)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool, device=device), 1)
    info = {"modules": kinds, "adapter_b_abs_sum": b_norm}
    return model(tokens, positions, mask).float().cpu(), info, (model, peft, spec)


def export_again(loaded, run: Path, work: Path) -> dict:
    """The local-spec model's base and adapters saved as a local-spec run saves them (local names), exported
    (``format=mcore``), against the export the TE run's callback wrote: tensor for tensor."""
    sys.path.insert(0, str(Path(__file__).parent))
    from compare_exports import compare

    from nemo_mla_lora.checkpoints import dist_ckpt
    from nemo_mla_lora.export.pipeline import export

    model, peft, spec = loaded
    dist_ckpt.save_base(model, spec, work / "base")  # a folder that exists is refused, never replaced
    dist_ckpt.save_adapter(model, peft, spec, work / "adapter", base_dir=work / "base")
    fmt = json.loads((run / "export" / "manifest.json").read_text())["format"]
    export(work / "base", work / "adapter", work / "export", fmt=fmt, verify="none", progress=False)
    return compare(run / "export", work / "export", fmt)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--out", required=True)
    ap.add_argument("--specs", nargs="+", default=["te", "local"])
    ap.add_argument("--export-local", help="a new work folder: save the local-spec model, export it, compare with "
                    "RUN_DIR/export (the TE run's callback export)")
    args = ap.parse_args(argv)
    from nemo_mla_lora.runtime import parallel

    parallel.init_megatron()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    run = Path(args.run)
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0)).to(device)
    result, first = {"dtype": str(dtype), "specs": {}}, None
    for kind in args.specs:
        out, info, loaded = logits(run, kind, tokens, device, dtype)
        if kind == "local" and args.export_local and "local_export_vs_callback_export" not in result:
            result["local_export_vs_callback_export"] = export_again(loaded, run, Path(args.export_local))
            print(json.dumps({k: result[k] for k in ("local_export_vs_callback_export",)}), flush=True)
        first = out if first is None else first
        diff, scale = (out - first).abs().max().item(), max(1.0, first.abs().max().item())
        result["specs"][kind] = dict(info, max_abs_logit_diff_vs_first=diff, bound=2e-2 * scale,
                                     within=diff <= 2e-2 * scale)
        print(json.dumps({kind: result["specs"][kind]}), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    same = result.get("local_export_vs_callback_export")
    identical = same is None or (not same["names_in_one_only"] and same["identical"] == same["tensors"] > 0)
    return 0 if identical and all(v["within"] for v in result["specs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
