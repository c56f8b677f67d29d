"""``MLAExportCallback``: at train end (optionally at each saved checkpoint) save the adapters, then
merge -> absorb -> write -> verify through ``export.pipeline`` (a thin wrapper over it).

Every rank joins the adapter save (dist-checkpointing gathers TP/EP shards); rank 0 runs the export
and writes the output; the others wait at a barrier. The base is read from ``base_dir`` when that is
one of our base checkpoints (dist-ckpt + ``mla_spec.json``); otherwise (NeMo's trainer restoring a NeMo
checkpoint, say) the frozen base weights are saved once from the live model to ``<output_dir>/base``.
"""

import logging
from pathlib import Path

import lightning as L

from nemo_mla_lora import checkpoint
from nemo_mla_lora.export.pipeline import export
from nemo_mla_lora.peft.mla_lora import MLALoRALinear

log = logging.getLogger(__name__)


def _has_adapters(module) -> bool:
    return module is not None and any(isinstance(m, MLALoRALinear) for m in module.modules())


def find_megatron_model(pl_module):
    """The Megatron-Core model holding the MLALoRA wrappers: ours is ``pl_module.model``; NeMo's is
    ``pl_module.module`` inside its DDP / Float16Module wrappers (each has ``.module``), unwrapped."""
    for candidate in (getattr(pl_module, "module", None), getattr(pl_module, "model", None), pl_module):
        if _has_adapters(candidate):
            while _has_adapters(getattr(candidate, "module", None)):
                candidate = candidate.module
            return candidate
    raise RuntimeError("MLAExportCallback: the trained module has no MLALoRA adapters")


class MLAExportCallback(L.Callback):
    def __init__(self, peft, spec, base_dir, output_dir, fmt: str = "absorbed", fold: bool = False,
                 verify: bool = True, tolerance: float | None = None, every_checkpoint: bool = False):
        self.peft, self.spec = peft, spec
        self.base_dir = Path(base_dir) if base_dir else None
        self.output_dir = Path(output_dir)
        self.fmt, self.fold, self.verify, self.tolerance = fmt, fold, verify, tolerance
        self.every_checkpoint = every_checkpoint
        self.result = None

    def _base(self, model) -> Path:
        """Our base checkpoint: ``base_dir`` if it is one, else the live model's frozen weights, saved once."""
        if self.base_dir is None or not (self.base_dir / checkpoint.SPEC_FILE).is_file():
            log.info("saving the frozen base from the trained model to %s", self.output_dir / "base")
            self.base_dir = checkpoint.save_base(model, self.spec, self.output_dir / "base", overwrite=True)
        return self.base_dir

    def run(self, pl_module, tag: str) -> dict | None:
        model = find_megatron_model(pl_module)
        self._base(model)
        adapter_dir = self.output_dir / f"adapter{tag}"
        checkpoint.save_adapter(model, self.peft, self.spec, adapter_dir, base_dir=self.base_dir, overwrite=True)
        info = None
        if checkpoint.rank() == 0:
            info = export(self.base_dir, adapter_dir, self.output_dir / f"export{tag}", fmt=self.fmt,
                          fold=self.fold, overwrite=True, verify=self.verify, tolerance=self.tolerance)
            if "verify" in info:
                log.info("export %s: max |logit diff| %.3g", self.fmt, info["verify"]["max_abs_logit_diff"])
        checkpoint.barrier()
        return {"adapter": str(adapter_dir), "export": str(self.output_dir / f"export{tag}"), "manifest": info}

    def on_train_end(self, trainer, pl_module):
        self.result = self.run(pl_module, "")

    def on_save_checkpoint(self, trainer, pl_module, ckpt):
        if self.every_checkpoint:
            self.run(pl_module, f"_step{trainer.global_step}")
