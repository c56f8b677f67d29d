"""Python's garbage collector under the trainer's control: NeMo's ``GarbageCollectionCallback`` (automatic collection
off, a full collection every ``gc_interval`` training and validation steps, on every rank at the same step), held to
the fit it belongs to.

A Megatron process holds millions of Python objects; a full automatic collection lands in whichever step allocates
past the collector's threshold, as a pause in a step that is host-bound as often as GPU-bound, and on each rank at a
different step. NeMo's DeepSeek-V3 recipe with ``performance_mode=True`` collects every 60 steps instead. NeMo's
callback switches the collector off when it is constructed and never back on; here it is off from the fit's ``setup``
to its ``teardown`` only, so that the recipe's export and verify after training run with the collector as the
process had it.
"""

import gc

from nemo.lightning.pytorch.callbacks.garbage_collection import GarbageCollectionCallback


class FitScopedGC(GarbageCollectionCallback):
    """NeMo's ``GarbageCollectionCallback`` with the automatic collector off during the fit only.

    Args:
        interval: steps between full collections, in training and in validation alike.
    """

    def __init__(self, interval: int):
        was_enabled = gc.isenabled()
        super().__init__(gc_interval_train=interval, gc_interval_val=interval)  # switches the collector off
        if was_enabled:
            gc.enable()  # off from setup on, not from construction
        self._restore = was_enabled

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._restore = gc.isenabled()
        gc.collect()
        gc.disable()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._restore:
            gc.enable()


def gc_callbacks(trainer_cfg) -> list:
    """``[FitScopedGC(trainer_cfg.gc_interval)]``, or ``[]`` where ``gc_interval`` is 0 (Python's own collector).

    Args:
        trainer_cfg: the run's ``trainer`` config (``TrainerConfig``).
    """
    interval = trainer_cfg.gc_interval
    return [FitScopedGC(interval)] if interval > 0 else []
