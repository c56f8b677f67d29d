"""trainer=megatron from an HF directory on a GPU, through NeMo's own ``llm.finetune`` (``nemo_finetune.run``).

    python bench/hf_start_gpu.py HF_DIR OUTPUT_DIR RESULT_JSON [finetune overrides ...]

Runs the recipe's LoRA stage with the export callback and one more callback, a probe: at the first training batch
(after NeMo's PEFT transform, the move to the GPU and the precision plugin's conversion) it compares every base
tensor of the trained model with the HF directory as ``HFBase`` reads it (in the model's dtype), and records the
step it starts at and the adapters' B norm (0 on a fresh run, > 0 when the adapters came back from a checkpoint).
Run it twice with the same OUTPUT_DIR and a larger ``trainer.max_steps`` the second time to check a resumed run:
NeMo reads the base again from the path the adapter checkpoints record (the HF directory); the loader keeps it.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch


class BaseProbe(pl.Callback):
    def __init__(self, directory, result: Path):
        self.directory, self.result, self.done = directory, result, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        from nemo_mla_lora.callbacks.export import find_megatron_model
        from nemo_mla_lora.checkpoints.sources import HFBase
        from nemo_mla_lora.peft.state import base_state_dict, lora_b_parameters

        if self.done:
            return
        self.done = True
        model = find_megatron_model(pl_module)
        state = base_state_dict(model)
        reference = HFBase(self.directory).load(sorted(state))
        diffs = {n: (t.float() - reference[n].to(t.device, t.dtype).float()).abs().max().item()
                 for n, t in state.items()}
        b_norm = sum(float(b.float().norm()) for m in model.modules() if hasattr(m, "adapter")
                     for b in lora_b_parameters(m.adapter))
        record = {"global_step": trainer.global_step, "base_tensors": len(state), "max_abs_diff": max(diffs.values()),
                  "worst": max(diffs, key=diffs.get), "dtype": str(next(iter(state.values())).dtype),
                  "device": str(next(iter(state.values())).device), "adapter_b_norm": b_norm}
        print("PROBE", json.dumps(record), flush=True)
        if trainer.global_rank == 0:
            self.result.write_text(json.dumps(record, indent=2))


def main(argv):
    from nemo_mla_lora.config.compose import compose
    from nemo_mla_lora.models.architecture import resolve
    from nemo_mla_lora.recipes import finetune
    from nemo_mla_lora.training import nemo_finetune

    directory, out, result = argv[0], Path(argv[1]), Path(argv[2])
    cfg = compose("finetune", [f"model.checkpoint={directory}", "trainer=megatron", f"output_dir={out}", *argv[3:]])
    peft = finetune.make_peft(cfg)
    export = finetune.export_callback(cfg, peft, resolve(cfg.model), cfg.model.checkpoint, out)
    stages = nemo_finetune.run(cfg, peft, [export, BaseProbe(directory, result)])
    manifest = (export.result or {}).get("manifest") or {}
    print("RESULT", json.dumps({**stages, "export": (export.result or {}).get("export"),
                                "verify": manifest.get("verify"), "source": manifest.get("source")}), flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main(sys.argv[1:])
