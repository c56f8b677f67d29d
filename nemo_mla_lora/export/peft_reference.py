"""Verify's reference side for an HF PEFT adapter: the adapter read again on its own and applied densely, as peft
defines its merge, sharing no code with the reading the merge uses (``hf_peft.py``), so that a field misread there
is not misread here the same way and the two sides differ.

The config through peft's own ``LoraConfig.from_pretrained`` (its defaults) and ``get_pattern_key``; the tensors
through ``safetensors.safe_open``, key by key; the equations of peft's ``merge`` written out per HF module, on the
base tensor as read, in the verify's compute dtype:

    linear      W' = W + s B A                          s = alpha / r  (alpha / sqrt(r) with use_rslora)
    embedding   W' = W + s (B A)^T
    DoRA        W' = m / ||W'|| * W'                     norms of rows (linear) or of columns (embedding)
    replaced    W  = the file's tensor (modules_to_save, base_layer, saved embedding layers), before the above
"""

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from nemo_mla_lora.arch import keymap

_LORA = {
    "lora_A.weight": "A",
    "lora_B.weight": "B",
    "lora_magnitude_vector": "m",
    "lora_embedding_A": "eA",
    "lora_embedding_B": "eB",
}


def open_reference(directory):
    """A ``PeftReference`` for an HF PEFT adapter directory; None for anything else (ours: verify applies its
    factors unmerged).

    Args:
        directory: the adapter directory given to the export, or None.
    """
    if directory is None or not (Path(directory) / "adapter_config.json").is_file():
        return None
    return PeftReference(directory)


class PeftReference:
    def __init__(self, directory):
        from peft import LoraConfig
        from safetensors import safe_open

        self.config = LoraConfig.from_pretrained(str(directory))
        self.file = safe_open(str(Path(directory) / "adapter_model.safetensors"), "pt")
        self.lora, self.replaced = {}, {}  # HF module -> {A, B, m, eA, eB: key}; HF tensor -> key
        for key in self.file.keys():  # noqa: SIM118  (a safetensors handle: keys(), no iteration)
            rest = key.removeprefix("base_model.model.")
            kind = next((k for suffix, k in _LORA.items() if rest.endswith("." + suffix)), None)
            if kind:
                module = rest[: -len(next(s for s, k in _LORA.items() if k == kind)) - 1]
                self.lora.setdefault(module, {})[kind] = key
            else:
                self.replaced[re.sub(r"\.(base_layer|modules_to_save\.default)\.", ".", rest)] = key
        hf_tensors = set(self.replaced) | {f"{m}.weight" for m in self.lora}
        self.touched = {keymap.to_megatron_tensor(h)[0] for h in hf_tensors}  # Megatron names it changes

    def view(self, state: dict, dtype) -> Mapping:
        """``state`` with the adapter applied: a tensor the adapter changes is computed in ``dtype`` when it is read
        (the whole tensor: an adapted embedding or output layer costs its size in ``dtype``), the others are
        handed out as read.

        Args:
            state: flat Megatron names -> a unit's base tensors as read.
            dtype: the verify's compute dtype.
        """
        return _Adapted(self, state, dtype)

    def tensor(self, name: str, base: torch.Tensor, dtype) -> torch.Tensor:
        """The adapted Megatron tensor ``name``: split into its HF tensors, each adapted, fused back.

        Args:
            name: flat Megatron name; base: its tensor as read; dtype: the compute dtype.
        """
        hf = keymap.megatron_to_hf({name: base.to(dtype)})
        return keymap.hf_to_megatron({h: self._hf(h, t, dtype) for h, t in hf.items()})[name]

    def _hf(self, name: str, base: torch.Tensor, dtype) -> torch.Tensor:
        module, _, param = name.rpartition(".")
        w = self.file.get_tensor(self.replaced[name]).to(dtype) if name in self.replaced else base
        keys = self.lora.get(module)
        if param != "weight" or not keys:
            return w
        c = self.config
        r = c.rank_pattern.get(_pattern_key(c.rank_pattern.keys(), module), c.r)
        alpha = c.alpha_pattern.get(_pattern_key(c.alpha_pattern.keys(), module), c.lora_alpha)
        s = alpha / (r**0.5 if c.use_rslora else r)
        t = {k: self.file.get_tensor(v).to(dtype) for k, v in keys.items()}
        embedding = "eA" in t
        w = w + s * (t["eB"] @ t["eA"]).T if embedding else w + s * (t["B"] @ t["A"])
        if c.use_dora:
            norm = torch.linalg.norm(w, dim=0 if embedding else 1)
            w = w * ((t["m"] / norm)[None, :] if embedding else (t["m"] / norm)[:, None])
        return w


def _pattern_key(keys, module: str) -> str:
    from peft.utils.other import get_pattern_key

    return get_pattern_key(list(keys), module)


class _Adapted(Mapping):
    def __init__(self, reference: PeftReference, state: dict, dtype):
        self.reference, self.state, self.dtype = reference, state, dtype

    def __getitem__(self, key):
        base = self.state[key]
        if key not in self.reference.touched:
            return base  # as read: verify converts what it uses (an embedding's rows, an output layer's chunks)
        return self.reference.tensor(key, base, self.dtype)

    def __iter__(self):
        return iter(self.state)

    def __len__(self):
        return len(self.state)
