"""``MetricsLog``: a Lightning callback writing the trainer's scalar metrics to a JSONL file.

One line per logged training step (every ``log_every_n_steps``) and one per validation run, e.g.
``{"step": 40, "reduced_train_loss": 1.93, "lr": 9.7e-05}`` / ``{"step": 40, "val_loss": 2.01}``.
Works with NeMo's trainer (``reduced_train_loss``, ``val_loss``) and the plain CPU trainer
(``train_loss``, ``val_loss``); rank 0 writes.
"""

import json
from pathlib import Path

import lightning as L
import torch


def _scalars(metrics: dict, keep) -> dict:
    out = {}
    for name, value in metrics.items():
        if keep(name) and isinstance(value, (int, float, torch.Tensor)) and torch.as_tensor(value).numel() == 1:
            out[name] = float(value)
    return out


class MetricsLog(L.Callback):
    def __init__(self, path):
        self.path = Path(path)

    def _write(self, trainer, record: dict) -> None:
        if trainer.global_rank != 0 or not record:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": trainer.global_step, **record}) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self._write(trainer, _scalars(trainer.callback_metrics, lambda n: not n.startswith("val")))

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._write(trainer, _scalars(trainer.callback_metrics, lambda n: n.startswith("val")))


def read(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
