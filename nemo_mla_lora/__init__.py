"""nemo_mla_lora: MLA-aware LoRA adapters, recipes and absorbed-checkpoint export for NeMo.

Importing the package registers ``MLALoRA`` with NeMo as ``PEFT_STR2CLS["mla_lora"]``: at once when NeMo's
``nemo.collections.llm.peft`` is already imported, else the moment it is (importing NeMo costs about
0.6 GB of memory and seconds, which an export of a checkpoint does not need).
"""

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"
_NEMO_PEFT = "nemo.collections.llm.peft"


def _register(nemo_peft) -> None:
    """Also called at the end of ``peft/mla_lora.py``, for when that module is what imported NeMo."""
    partial = sys.modules.get("nemo_mla_lora.peft.mla_lora")
    if partial is not None and not hasattr(partial, "MLALoRA"):
        return  # mla_lora is importing NeMo: it registers itself when it is done
    from nemo_mla_lora.peft.mla_lora import MLALoRA

    nemo_peft.PEFT_STR2CLS.setdefault("mla_lora", MLALoRA)
    nemo_peft.PEFT_STR2CLS.setdefault("MLALoRA", MLALoRA)


_AFTER_NEMO_PEFT = [_register]  # run, in order, on NeMo's PEFT module once it is imported


def when_nemo_peft_imported(callback) -> None:
    """``callback(nemo.collections.llm.peft)`` now if NeMo's PEFT module is imported, else right after it is."""
    if _NEMO_PEFT in sys.modules and hasattr(sys.modules[_NEMO_PEFT], "PEFT_STR2CLS"):
        callback(sys.modules[_NEMO_PEFT])
    else:
        _AFTER_NEMO_PEFT.append(callback)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of NeMo's PEFT module so that the callbacks run right after it."""

    def find_spec(self, name, path, target=None):
        if name != _NEMO_PEFT:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            for callback in _AFTER_NEMO_PEFT:
                callback(module)

        spec.loader.exec_module = exec_module
        return spec


if _NEMO_PEFT in sys.modules:
    _register(sys.modules[_NEMO_PEFT])
elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterOnImport())
