"""Merge an adapter into its base and write an export (``mcore`` by default), then verify it.

    python -m nemo_mla_lora.recipes.export base=runs/finetune/base adapter=runs/finetune/adapter \\
        output=runs/finetune/export_hf format=hf [verify=full|sample|none] [verify_layers=[0,26]] [fold=false] \\
        [overwrite=false]
    ... format=nemo [names=te|local] [tokenizer=DIR]   # a NeMo 2 checkpoint for llm.generate / export_ckpt
    ... format=hf weight_dtype=fp8_block   # linear weights in DeepSeek-V3's FP8 with 128x128 block scales

``base``: our Megatron dist-ckpt (+ mla_spec.json), an HF DeepSeek directory (bf16 or FP8) or a NeMo 2 checkpoint;
``adapter``: an MLALoRA adapter checkpoint or an HF PEFT directory; ``adapter=null`` exports the base alone
(a merged base that ``recipes.generate adapters=...`` serves with several unmerged adapters).
``overwrite=true`` replaces only a previous export (its ``manifest.json``) or an empty directory; an output that
is a source, holds one, is another writer's (``.NAME.lock`` beside it) or has a dead run's leftovers beside it is
refused before any work, with a one-line error (exit 1). The export runs on the host alone: the process hides
the GPUs from itself (``keep_off_gpus``).
"""

import json
import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from nemo_mla_lora.config.schema import register
from nemo_mla_lora.config.validate import FORMATS, check_known_keys
from nemo_mla_lora.runtime.processes import process_age

register()
log = logging.getLogger("nemo_mla_lora.export")


def keep_off_gpus() -> bool:
    """Hide the GPUs from this process (``CUDA_VISIBLE_DEVICES=""``) before anything initialises CUDA: the export
    reads, merges, writes and verifies on the host, so a CUDA context and NCCL (host memory for the CUDA libraries
    and the context, and seconds of start-up) buy it nothing, and a job training on the same GPUs is left alone.
    Returns whether the GPUs are hidden (False where CUDA was initialised earlier in the process)."""
    import torch

    if torch.cuda.is_initialized():
        return False
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return not torch.cuda.is_available()


@hydra.main(config_path="pkg://nemo_mla_lora.conf", config_name="export", version_base=None)
def main(cfg: DictConfig) -> None:
    started = {"main": process_age()}  # the interpreter, Hydra and the config: process age at this line
    keep_off_gpus()
    check_known_keys(cfg)
    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format!r}; expected one of {FORMATS}")
    from nemo_mla_lora.checkpoints.errors import CheckpointError
    from nemo_mla_lora.checkpoints.output_dir import MANIFEST, check_target

    sources = (cfg.base, cfg.adapter, cfg.tokenizer if cfg.tokenizer and Path(cfg.tokenizer).exists() else None)
    try:  # the output first, before Megatron starts: one that must not be written is refused at once
        check_target(cfg.output, sources, cfg.overwrite, replaces=(MANIFEST,))
        info = _run(cfg, started)
    except (CheckpointError, ValueError, OSError) as err:  # ours name the file / field / path: one line
        sys.exit(f"error: {type(err).__name__}: {err}")
    report = {k: info[k] for k in ("format", "kv_cache", "verify", "fp8", "timing", "warnings") if k in info}
    report["started"] = started  # process age at main() and once Megatron is up; the manifest has before_export
    print(json.dumps(report, indent=2))
    print(f"wrote {cfg.output}")


def _run(cfg: DictConfig, started: dict) -> dict:
    from nemo_mla_lora.export.pipeline import export
    from nemo_mla_lora.runtime import parallel

    started["imports"] = process_age()  # the export's modules with torch, their readers and writers
    parallel.init_megatron(marks=started)  # megatron_import, process_group (gloo), parallel_state
    started["megatron"] = process_age()  # all of Megatron's set-up done
    return export(
        cfg.base,
        cfg.adapter,
        cfg.output,
        fmt=cfg.format,
        fold=cfg.fold,
        overwrite=cfg.overwrite,
        verify=cfg.verify,
        tolerance=cfg.tolerance,
        names=cfg.names,
        tokenizer=cfg.tokenizer,
        verify_layers=cfg.verify_layers,
        budget=cfg.budget_mb << 20,
        weight_dtype=cfg.weight_dtype,
    )


if __name__ == "__main__":
    main()
