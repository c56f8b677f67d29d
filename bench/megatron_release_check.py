"""Megatron-Core's own specs, through ``models.megatron_release``, load our ``mcore`` exports on the installed release.

    python3 bench/megatron_release_check.py DIR OUT.json   # DIR: <variant>_{te,local}/ + <variant>_expected.pt

For every export in DIR (``mcore`` of a tiny HF checkpoint, TE or local names) and its variant's transformers logits
(fp32): Megatron's GPTModel on its own layer spec of the same kind, (a) as the installed release builds it
(``get_gpt_decoder_block_spec``; the local spec given only the core attention every release up to 0.19 needs) and
(b) through ``megatron_release.mla_decoder_block_spec``; each loaded with ``dist_checkpointing.load`` at default
strictness, logits compared with transformers'. On 0.19 a model without q compression fails (a) and passes (b).
Runs on the GPU machine, with Transformer Engine for the TE exports; no NeMo.
"""

import json
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def stock_block(config, use_transformer_engine: bool):
    """The installed release's own spec, unfixed (the local spec given only the core attention every release up
    to 0.19 needs to build at all)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from nemo_mla_lora.models.megatron_release import fix_core_attention

    block = get_gpt_decoder_block_spec(config, use_transformer_engine=use_transformer_engine)
    return block if use_transformer_engine else fix_core_attention(block)


def check(export: Path, expected: dict, use_te: bool, stock: bool) -> dict:
    import mcore019_check
    from megatron.core import dist_checkpointing

    spec = json.loads((export / "mla_spec.json").read_text())
    row = {"export": export.name, "spec": "te" if use_te else "local", "build": "stock" if stock else "fixed"}
    try:
        model = mcore019_check.build_model(spec, use_te=use_te, block_spec=stock_block if stock else None)
        attention = model.decoder.layers[0].self_attention
        row.update(attention=type(attention).__name__,
                   q_proj=type(getattr(attention, "linear_q_proj", None)).__name__)
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(export)))
        logits = mcore019_check.model_logits(model, expected["tokens"])
        diff = (logits - expected["unmerged_logits"]).abs().max().item()
        row.update(loaded=True, max_abs_diff_vs_transformers=diff, within=diff <= 1e-4)
    except Exception as e:  # the stock build is expected to fail on some releases: record how
        row.update(loaded=False, error=f"{type(e).__name__}: {str(e)[:300]}", trace=traceback.format_exc()[-1500:])
    return row


def main(directory: str, out: str) -> int:
    import megatron.core
    from mcore019_check import init_one_gpu

    init_one_gpu(29531)
    try:
        import transformer_engine  # noqa: F401

        te = True
    except ImportError:
        te = False
    rows = []
    for export in sorted(p for p in Path(directory).iterdir() if p.is_dir()):
        use_te = export.name.endswith("_te")
        if use_te and not te:
            continue
        expected = torch.load(Path(directory) / (export.name.rsplit("_", 1)[0] + "_expected.pt"), weights_only=True)
        for stock in (True, False):
            rows.append(check(export, expected, use_te, stock))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "trace"}), flush=True)
    report = {"megatron_core": megatron.core.__version__, "card": torch.cuda.get_device_name(0),
              "transformer_engine": te, "rows": rows}
    Path(out).write_text(json.dumps(report, indent=1))
    return 0 if all(r.get("within") for r in rows if r["build"] == "fixed") else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
