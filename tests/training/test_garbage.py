"""The trainer's garbage collection (``training/garbage.py``): NeMo's ``GarbageCollectionCallback`` in a real
Lightning fit, the automatic collector off during the fit only, a full collection every ``gc_interval`` steps."""

import gc

import lightning.pytorch as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from nemo_mla_lora.config.compose import compose
from nemo_mla_lora.recipes.finetune import make_peft
from nemo_mla_lora.training import nemo_finetune
from nemo_mla_lora.training.garbage import FitScopedGC, gc_callbacks


class _Tiny(L.LightningModule):
    """One linear; records whether the automatic collector is on in each training step."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        self.enabled_in_steps = []

    def training_step(self, batch, _):
        self.enabled_in_steps.append(gc.isenabled())
        return self.lin(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture
def collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_the_collector_is_off_during_the_fit_only_and_collects_every_interval(tmp_path, monkeypatch, collector_on):
    callback = FitScopedGC(interval=3)
    assert gc.isenabled()  # NeMo's constructor switches it off; here the fit does
    collections = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append(a) or real_collect(*a))
    model = _Tiny()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=7,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    data = DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=2)
    trainer.fit(model, data)
    assert model.enabled_in_steps == [False] * 7
    assert len(collections) == 1 + 2  # one at setup, then after global steps 3 and 6
    assert gc.isenabled()  # given back for what the recipe runs after training (export, verify)


def test_gc_interval_zero_leaves_python_s_collector(collector_on):
    cfg = compose("finetune", ["trainer.gc_interval=0"])
    assert gc_callbacks(cfg.trainer) == []
    (callback,) = gc_callbacks(compose("finetune", ["trainer.gc_interval=60"]).trainer)
    assert (callback.gc_interval_train, callback.gc_interval_val) == (60, 60) and gc.isenabled()


def test_llm_finetune_gets_the_callback(tmp_path, monkeypatch, collector_on):
    monkeypatch.setattr(
        nemo_finetune, "trainer", lambda cfg, steps, callbacks: {"steps": steps, "callbacks": callbacks}
    )
    overrides = ["model=deepseek_v3_small", "trainer=megatron", "data=cpu", "data.tokenizer=byte"]
    cfg = compose("finetune", overrides + ["trainer.gc_interval=60", f"output_dir={tmp_path}"])
    callbacks = nemo_finetune.build(cfg, make_peft(cfg), stage="lora", restore="/ckpt/base")["trainer"]["callbacks"]
    assert [c.gc_interval_train for c in callbacks if isinstance(c, FitScopedGC)] == [60]
