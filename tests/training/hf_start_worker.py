"""Worker for test_hf_start: one of two gloo processes that build the model as trainer=megatron builds it under
TP=2, EP=2 or PP=2 and stream an HF directory into it (``training.hf_load``)."""

import os

import torch

# (layout, directory key of the test's fixture): what each case checks is in test_hf_start
CASES = [("tp2", "v2_noq"), ("tp2", "v3_fp8"), ("ep2", "v3"), ("pp2", "v2_noq")]
LAYOUTS = {"tp2": dict(tp=2), "ep2": dict(ep=2), "pp2": dict(pp=2)}


def overrides(directory, layout: str = "") -> list[str]:
    """Config overrides for trainer=megatron on ``directory`` under ``layout`` (none: one process)."""
    kw = LAYOUTS.get(layout, {})
    out = [
        f"model.checkpoint={directory}",
        "trainer=megatron",
        f"trainer.tensor_parallel={kw.get('tp', 1)}",
        f"trainer.expert_parallel={kw.get('ep', 1)}",
        f"trainer.pipeline_parallel={kw.get('pp', 1)}",
    ]
    if kw.get("pp", 1) > 1:  # 3 layers over 2 stages: 1, then 2 (the second stage's keys start at layer 1)
        out += ["trainer.layers_in_first_pipeline_stage=1", "trainer.layers_in_last_pipeline_stage=2"]
    return out


def build(directory, layout: str = ""):
    """The Megatron-Core model exactly as trainer=megatron builds it (NeMo's ``llm.GPTModel.configure_model``)."""
    from nemo_mla_lora.config.compose import compose
    from nemo_mla_lora.training import nemo_finetune

    lightning = nemo_finetune.lightning_model(compose("finetune", overrides(directory, layout)))
    lightning.configure_model()
    return lightning.module.eval()


def logits(model, tokens):
    """Full-vocabulary logits (TP shards gathered); MoE + TP without SP refuses training mode, dropout is 0."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    s = tokens.shape[1]
    with torch.no_grad():
        out = model(tokens, torch.arange(s).expand_as(tokens), torch.ones(1, 1, s, s, dtype=torch.bool).triu(1))
    return gather_from_tensor_model_parallel_region(out)


def mismatched(report, directory) -> list[str]:
    """Pieces whose loaded values differ from the slice of the whole tensor as ``HFBase`` reads it (bit for bit)."""
    from nemo_mla_lora.checkpoints.sources import HFBase

    full = HFBase(directory).load(report.names)
    return [p.key for p in report.pieces if not torch.equal(p.target, full[p.name][p.index].to(p.target.dtype))]


def worker(rank, world, port, dirs, tokens_path, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from nemo_mla_lora.runtime import parallel
    from nemo_mla_lora.training.hf_load import load_hf_checkpoint

    tokens = torch.load(tokens_path)
    for layout, which in CASES:
        kw = LAYOUTS[layout]
        parallel.init_megatron(tp=kw.get("tp", 1), ep=kw.get("ep", 1), pp=kw.get("pp", 1))
        model = build(dirs[which], layout)
        report = load_hf_checkpoint([model], dirs[which])
        result = {
            "bytes_read": report.bytes_read,
            "mismatched": mismatched(report, dirs[which]),
            "logits": None if layout == "pp2" else logits(model, tokens),
        }  # PP: no schedule here
        torch.save(result, f"{out_dir}/{layout}_{which}_rank{rank}.pt")
    parallel.destroy()
