"""``MLAExportCallback``: at train end (optionally at each saved checkpoint) save the adapters, then
merge -> absorb -> write -> verify through ``export.pipeline`` (a thin wrapper over it).

Every rank joins the adapter save (dist-checkpointing gathers TP/EP shards); rank 0 runs the export
and writes the output; the others wait at a barrier.

With several ranks the export runs in a child process of rank 0 (CPU only, no process group):
Megatron's checkpoint reads and writes are collective over the default group, so run in the training
process they wait forever for ranks parked at the barrier (a TP=2 NeMo run hung at the first tensor read).
The barrier's wait is bounded by the process-group timeout (30 min by default); for longer exports set
``export.enabled=false`` and run ``python -m nemo_mla_lora.recipes.export``.

The base is read from ``base_dir`` when that is one of our base checkpoints (dist-ckpt + ``mla_spec.json``) or an
HF directory; otherwise (NeMo's trainer restoring a NeMo checkpoint, say) the frozen base weights are saved once from
the live model to ``<output_dir>/base``.
"""

import logging
import os
import subprocess
import sys
from pathlib import Path

import lightning as L

from nemo_mla_lora.checkpoints import dist_ckpt
from nemo_mla_lora.checkpoints.output_dir import MANIFEST, check_output, check_target
from nemo_mla_lora.export.manifest import read_manifest
from nemo_mla_lora.export.pipeline import export
from nemo_mla_lora.peft.mla_lora import WRAPPERS
from nemo_mla_lora.runtime import parallel

log = logging.getLogger(__name__)


def _has_adapters(module) -> bool:
    return module is not None and any(isinstance(m, WRAPPERS) for m in module.modules())


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
    def __init__(
        self,
        peft,
        spec,
        base_dir,
        output_dir,
        fmt: str = "mcore",
        fold: bool = False,
        verify="full",
        tolerance: float | None = None,
        every_checkpoint: bool = False,
        names: str | None = None,
        tokenizer: str | None = None,
        verify_layers=None,
        weight_dtype: str | None = None,
    ):
        self.peft, self.spec = peft, spec
        self.base_dir = Path(base_dir) if base_dir else None
        self.output_dir = Path(output_dir)
        self.options = {  # export()'s and export_in_child's arguments after base, adapter and output
            "fmt": fmt,
            "fold": fold,
            "verify": verify,
            "tolerance": tolerance,
            "names": names,
            "tokenizer": tokenizer,  # format=nemo's names and context tokenizer
            "verify_layers": list(verify_layers) if verify_layers else None,
            "weight_dtype": weight_dtype,  # hf: fp8_block
        }
        self.every_checkpoint = every_checkpoint
        self.result = None
        self.check_outputs()

    def check_outputs(self) -> None:
        """Before training: the outputs this callback will write (adapter, export, the saved base when
        ``base_dir`` is not readable) are refused now if they overlap the base, are not outputs of ours that
        overwrite may replace, or have another writer's lock or a dead run's leftovers beside them (rank 0; under
        torch.distributed a later rank may build its callback while rank 0 already writes)."""
        targets = [(self.output_dir / "adapter", (dist_ckpt.ADAPTER_FILE,)), (self.output_dir / "export", (MANIFEST,))]
        if not self._readable():
            targets.append((self.output_dir / "base", (dist_ckpt.SPEC_FILE,)))
        for target, replaces in targets:
            if parallel.rank() == 0:
                check_target(target, (self.base_dir,), overwrite=True, replaces=replaces)
            else:  # the lock and temp dirs beside a target are rank 0's (it writes, and shares its checks at the write)
                check_output(target, (self.base_dir,))

    def _readable(self) -> bool:
        return self.base_dir is not None and any(
            (self.base_dir / f).is_file() for f in (dist_ckpt.SPEC_FILE, "config.json")
        )

    def _base(self, model) -> Path:
        """The base export reads: ``base_dir`` if export reads it as it is (ours, or an HF directory), else (a
        NeMo checkpoint, say) the live model's frozen weights, saved once: exactly what was trained against,
        whatever layout the NeMo checkpoint has (the export reads our own nemo exports as bases, NeMo-written
        training checkpoints are not tested as bases)."""
        if not self._readable():
            log.info("saving the frozen base from the trained model to %s", self.output_dir / "base")
            self.base_dir = dist_ckpt.save_base(
                model, self.spec, self.output_dir / "base", overwrite=True, sources=(self.base_dir,)
            )
        return self.base_dir

    def run(self, pl_module, tag: str) -> dict | None:
        model = find_megatron_model(pl_module)
        self._base(model)
        adapter_dir = self.output_dir / f"adapter{tag}"
        dist_ckpt.save_adapter(model, self.peft, self.spec, adapter_dir, base_dir=self.base_dir, overwrite=True)
        info = None
        if parallel.rank() == 0:
            info = self._export(adapter_dir, self.output_dir / f"export{tag}")
            if "max_abs_logit_diff" in info.get("verify", {}):
                log.info("export %s: max |logit diff| %.3g", self.options["fmt"], info["verify"]["max_abs_logit_diff"])
        parallel.barrier()
        return {"adapter": str(adapter_dir), "export": str(self.output_dir / f"export{tag}"), "manifest": info}

    def _export(self, adapter_dir: Path, output: Path) -> dict:
        if parallel.world_size() == 1:
            return export(self.base_dir, adapter_dir, output, overwrite=True, **self.options)
        return export_in_child(self.base_dir, adapter_dir, output, **self.options)

    def on_train_end(self, trainer, pl_module):
        self.result = self.run(pl_module, "")

    def on_save_checkpoint(self, trainer, pl_module, ckpt):
        if self.every_checkpoint:
            self.run(pl_module, f"_step{trainer.global_step}")


_LAUNCHER_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
)


def export_in_child(
    base,
    adapter,
    output,
    fmt: str,
    fold: bool,
    verify,
    tolerance,
    names=None,
    tokenizer=None,
    verify_layers=None,
    weight_dtype=None,
) -> dict:
    """``python -m nemo_mla_lora.recipes.export`` in a fresh single process on the CPU; returns the manifest."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV and not k.startswith("TORCHELASTIC_")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    null = lambda v: "null" if v is None else v  # noqa: E731
    args = [
        f"base={base}",
        f"adapter={adapter}",
        f"output={output}",
        f"format={fmt}",
        f"fold={str(fold).lower()}",
        f"verify={str(verify).lower()}",
        "overwrite=true",
        f"tolerance={null(tolerance)}",
        f"names={null(names)}",
        f"tokenizer={null(tokenizer)}",
        f"verify_layers={null(verify_layers)}".replace(" ", ""),
        f"weight_dtype={null(weight_dtype)}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "nemo_mla_lora.recipes.export", *args], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"export of {adapter} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return read_manifest(output)
