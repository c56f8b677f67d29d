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

The vocabulary-sized tensors (embedding, output layer) are adapted by rows as verify reads them (the prompts' rows
of the embedding, blocks of the output layer's rows): row i of W' needs row i of W and of B (of (B A)^T for the
embedding) only, so they are never whole in the compute dtype; where a row needs more (DoRA on the embedding
normalises columns) the tensor is adapted whole. A tensor the adapter file holds itself (peft saves the embedding and
lm_head beside their LoRA) is read by rows from it.
"""

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from nemo_mla_lora.arch import keymap

ROWS = {"output_layer.weight": "lm_head.weight", "embedding.word_embeddings.weight": "model.embed_tokens.weight"}
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
        (the embedding and output layer by the rows read, where ``by_rows``; any other whole), the others are
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
        s, t = self._factors(module, dtype)
        embedding = "eA" in t
        w = w + s * (t["eB"] @ t["eA"]).T if embedding else w + s * (t["B"] @ t["A"])
        if self.config.use_dora:
            norm = torch.linalg.norm(w, dim=0 if embedding else 1)
            w = w * ((t["m"] / norm)[None, :] if embedding else (t["m"] / norm)[:, None])
        return w

    def _factors(self, module: str, dtype) -> tuple[float, dict]:
        """(s, {A, B, m, eA, eB: tensor in ``dtype``}) of an adapted HF module."""
        c = self.config
        r = c.rank_pattern.get(_pattern_key(c.rank_pattern.keys(), module), c.r)
        alpha = c.alpha_pattern.get(_pattern_key(c.alpha_pattern.keys(), module), c.lora_alpha)
        factors = {k: self.file.get_tensor(v).to(dtype) for k, v in self.lora[module].items()}
        return alpha / (r**0.5 if c.use_rslora else r), factors

    def by_rows(self, name: str) -> bool:
        """Whether the HF tensor ``name``'s adapted rows can be computed from its own rows (``rows``)."""
        keys = self.lora.get(name.rpartition(".")[0], {})
        return not ("eA" in keys and self.config.use_dora)

    def rows(self, name: str, base: torch.Tensor, index, dtype, factors=None) -> torch.Tensor:
        """Rows ``index`` (a slice or an index tensor) of the adapted HF tensor ``name`` whose base is ``base``,
        in ``dtype`` (``by_rows`` says where this is exact).

        Args:
            name: the HF tensor (``lm_head.weight``, ``model.embed_tokens.weight``); base: its tensor as read.
            index: the rows, as for ``base[index]`` (a slice, or an index tensor of any shape).
            dtype: the compute dtype.
            factors: the module's ``_factors`` in ``dtype`` where already read (a reader of many row blocks reads
                them once); None: read here.
        """
        w = (self._replaced_rows(name, index) if name in self.replaced else base[index]).to(dtype)  # [n, in]
        module = name.rpartition(".")[0]
        if module not in self.lora:
            return w
        s, t = factors or self._factors(module, dtype)
        if "eA" in t:  # W' rows = W rows + s (eA^T)[rows] eB^T: eA [r, vocab], eB [hidden, r]
            return w + s * t["eA"].T[index] @ t["eB"].T
        w = w + s * t["B"][index] @ t["A"]  # B [vocab, r], A [r, in]
        if self.config.use_dora:  # a linear's norms are of its rows
            w = w * (t["m"][index] / torch.linalg.norm(w, dim=-1))[..., None]
        return w

    def _replaced_rows(self, name: str, index) -> torch.Tensor:
        """Rows ``index`` of the file's own tensor for ``name`` (peft saves the embedding and lm_head beside their
        LoRA), read row block by row block."""
        rows = self.file.get_slice(self.replaced[name])
        if isinstance(index, slice):
            return rows[index]
        index = torch.as_tensor(index)  # e.g. the prompts' tokens [b, s]
        return torch.cat([rows[i : i + 1] for i in index.reshape(-1).tolist()]).view(*index.shape, -1)


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
        if key in ROWS and self.reference.by_rows(ROWS[key]):
            return _AdaptedRows(self.reference, ROWS[key], base, self.dtype)
        return self.reference.tensor(key, base, self.dtype)

    def __iter__(self):
        return iter(self.state)

    def __len__(self):
        return len(self.state)


class _AdaptedRows:
    """A vocabulary-sized tensor the adapter changes, as verify reads it: ``shape``, and rows by ``[index]``
    (``PeftReference.rows``), each block adapted when it is read."""

    def __init__(self, reference: PeftReference, name: str, base: torch.Tensor, dtype):
        self.reference, self.name, self.base, self.dtype = reference, name, base, dtype
        self.shape = base.shape
        module = name.rpartition(".")[0]  # its A and B (B [vocab, r]) read once, not per block of rows
        self.factors = reference._factors(module, dtype) if module in reference.lora else None

    def __getitem__(self, index) -> torch.Tensor:
        return self.reference.rows(self.name, self.base, index, self.dtype, self.factors)
