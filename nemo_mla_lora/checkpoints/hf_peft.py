"""HF PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors`` as peft's ``save_pretrained``
writes them) on a DeepSeek base, read completely: every config field is honoured as peft honours it or refused
with its name, every tensor of the file is used or refused with its name, and every shape is checked against the
base's before anything is written. What peft does (0.21: ``LoraConfig``, ``check_target_module_exists``,
``get_pattern_key``, ``lora.Linear`` / ``lora.Embedding`` / DoRA ``merge``, ``set_peft_model_state_dict``):

- targets: ``target_modules`` as a list (a module whose name equals an entry or ends with "." + entry), a regex
  (``re.fullmatch``) or "all-linear" (every linear but lm_head); ``exclude_modules`` likewise; ``layers_to_transform``
  / ``layers_pattern`` (list targets only; the first numbered name part is the layer); never a module inside a
  ``modules_to_save`` entry;
- per module r and alpha: the first ``rank_pattern`` / ``alpha_pattern`` key whose regex matches the end of the
  module's name after a dot, else ``r`` / ``lora_alpha`` (peft's defaults 8 and 8); scale alpha / r, or
  alpha / sqrt(r) with ``use_rslora``;
- linear: W + s B A; embedding (``lora_embedding_A`` [r, vocab], ``lora_embedding_B`` [hidden, r]): W + s (B A)^T;
- ``use_dora`` (``lora_magnitude_vector``): m / ||W + s B A|| * (W + s B A), norms of rows (linear) or of columns
  (embedding), as peft's merge computes them;
- tensors that take the base's place, before the LoRA delta: a ``modules_to_save`` module's (saved under its own
  names; peft wraps a module whose name ends with an entry), a target's ``base_layer`` and the embedding layers
  peft saves with ``save_embedding_layers``;
- a target with no tensors in the file keeps peft's initial B = 0 (no change) where ``init_lora_weights`` makes B
  zero; otherwise it is refused.

Megatron fuses gate_proj and up_proj into ``linear_fc1``: their adapters become one factor pair (A = [A_gate; A_up],
B = blockdiag(B_gate, B_up), scales folded into B where they differ), DoRA's magnitudes and replacements go to their
rows. Modules with DoRA or replacements are handed out as ``merge.AdapterEntry``, the rest as (A, B, scale).
"""

import logging
import math
import re
from pathlib import Path

import torch

from nemo_mla_lora.arch import keymap
from nemo_mla_lora.arch.mla_spec import MLASpec
from nemo_mla_lora.checkpoints.errors import CheckpointError
from nemo_mla_lora.checkpoints.hf_peft_config import ZERO_B_INITS, AdapterRefused, pattern_value, read_config, targeted
from nemo_mla_lora.peft.merge import AdapterEntry

log = logging.getLogger(__name__)
PREFIX = "base_model.model."
EMBEDDING, OUTPUT = "model.embed_tokens", "lm_head"


def hf_layout(spec: MLASpec) -> dict:
    """HF tensor name -> shape of every tensor a model of ``spec`` has.

    Args:
        spec: the base's architecture.
    """
    from nemo_mla_lora.checkpoints.sources import expected_shapes

    meta = {n: torch.empty(s, device="meta") for n, s in expected_shapes(spec).items()}
    return {h: tuple(t.shape) for h, t in keymap.megatron_to_hf(meta).items()}


_LORA_KEYS = [
    ("A", r"\.lora_A\.weight"),
    ("B", r"\.lora_B\.weight"),
    ("bias", r"\.lora_B\.bias"),
    ("magnitude", r"\.lora_magnitude_vector"),
    ("emb_A", r"\.lora_embedding_A"),
    ("emb_B", r"\.lora_embedding_B"),
]


def classify(key: str) -> tuple[str, str]:
    """(kind, HF module or tensor name) of a file key: a LoRA kind with its module, or a replacement
    ('base_layer' | 'modules_to_save' | 'saved') with the base tensor it replaces, or ('unknown', key).

    Args:
        key: a tensor name of ``adapter_model.safetensors``.
    """
    if not key.startswith(PREFIX):
        return "unknown", key
    rest = key[len(PREFIX) :]
    for kind, suffix in _LORA_KEYS:
        m = re.fullmatch(rf"(.+){suffix}", rest)
        if m:
            return kind, m.group(1)
    m = re.fullmatch(r"(.+)\.base_layer\.([^.]+)", rest)
    if m:
        return "base_layer", f"{m.group(1)}.{m.group(2)}"
    m = re.fullmatch(r"(.+)\.modules_to_save\.default\.(.+)", rest)
    if m:
        return "modules_to_save", f"{m.group(1)}.{m.group(2)}"
    return "saved", rest


class HFPeftAdapter:
    """An HF PEFT LoRA directory on a DeepSeek model of ``spec`` (module docstring). ``factors(modules)`` reads the
    tensors of the Megatron modules asked for (a rank-16 adapter on every expert of DeepSeek-V3 is ~5 B
    parameters); everything else is checked from the config and the file's header when it is opened."""

    def __init__(self, directory, spec: MLASpec):
        from nemo_mla_lora.checkpoints.safetensors_io import SafetensorsFile

        self.directory, self.spec = Path(directory), spec
        config_path, weights = self.directory / "adapter_config.json", self.directory / "adapter_model.safetensors"
        if not (config_path.is_file() and weights.is_file()):
            raise CheckpointError(f"{directory}: expected adapter_config.json + adapter_model.safetensors (HF PEFT)")
        self.config, self.file, self.where = read_config(config_path), SafetensorsFile(weights), weights
        self.layout = hf_layout(spec)
        linears = {
            h.rsplit(".", 1)[0]
            for h, s in self.layout.items()
            if h.endswith(".weight") and len(s) == 2 and not h.endswith(".mlp.gate.weight")
        } - {EMBEDDING}
        self.linears = linears | {OUTPUT}  # a tied model's lm_head holds no tensor of its own
        self.lora, self.replaced = self._read_keys()
        self.targets = self._targets()
        self._check_lora()
        self._check_replacements()
        self.plan = self._plan()
        self.modules = sorted(self.plan)
        self.hf_ranks = {x: self._rank(x) for x in self.lora}
        self.hf_scales = {x: self._scale(x) for x in self.lora}
        self.scales = {m: self._module_scale(m) for m in self.modules}
        self.unwritable = self._unwritable()

    def _fail(self, message: str):
        raise AdapterRefused(f"{self.where}: {message}")

    def _read_keys(self) -> tuple[dict, dict]:
        lora, replaced = {}, {}
        for key in self.file.keys():  # noqa: SIM118  (a safetensors handle: keys(), no iteration)
            kind, name = classify(key)
            if kind == "unknown":
                self._fail(f"tensor {key} is not one peft's LoRA saves or loads (no '{PREFIX}' prefix)")
            if kind in ("base_layer", "modules_to_save", "saved"):
                if name in replaced:
                    self._fail(f"{key} and {replaced[name][1]} both replace the base's {name}")
                replaced[name] = (kind, key)
            else:
                lora.setdefault(name, {})[kind] = key
        return lora, replaced

    def _targets(self) -> set:
        config = self.config
        if isinstance(config["target_modules"], str) and config["target_modules"].lower() == "all-linear":
            config = dict(config, target_modules=sorted(self.linears - {OUTPUT}))
        modules = {h.rsplit(".", i)[0] for h in self.layout for i in range(1, h.count(".") + 1)} | {OUTPUT}
        found = {m for m in modules if targeted(config, m)}
        other = sorted(found - self.linears - {EMBEDDING})
        if other:
            self._fail(
                f"target_modules matches {other[:4]}: peft puts LoRA on linear and embedding layers only "
                f"(it refuses these), so this adapter was not made for this base"
            )
        if not found:
            self._fail(f"target_modules={self.config['target_modules']!r} matches no module of the base")
        return found

    def _rank(self, module: str) -> int:
        return pattern_value(self.config["rank_pattern"], module, self.config["r"])

    def _scale(self, module: str) -> float:
        r, alpha = self._rank(module), pattern_value(self.config["alpha_pattern"], module, self.config["lora_alpha"])
        return alpha / (math.sqrt(r) if self.config["use_rslora"] else r)

    def _check_lora(self) -> None:
        stray = sorted(set(self.lora) - self.targets)
        if stray:
            self._fail(
                f"LoRA tensors for {stray[:4]}, which adapter_config.json does not target (target_modules, "
                f"exclude_modules, layers_to_transform, modules_to_save) or the base does not have: e.g. "
                f"{next(iter(self.lora[stray[0]].values()))}"
            )
        if self.spec.tie_word_embeddings:
            tied = sorted(self.targets & {EMBEDDING, OUTPUT}) + sorted(
                n for n in self.replaced if n.rsplit(".", 1)[0] in (EMBEDDING, OUTPUT)
            )
            if tied:
                self._fail(
                    f"the base ties embed_tokens and lm_head (tie_word_embeddings) and the adapter changes "
                    f"{tied}: peft's merge_and_unload then either unties them or changes both through the "
                    f"shared weight, unlike its unmerged model; a tied export cannot hold it"
                )
        missing = []
        for module in sorted(self.targets):
            keys = self.lora.get(module, {})
            if self.config["lora_bias"] or "bias" in keys:
                self._fail(
                    f"lora_bias: {module} ({keymap.to_megatron_module(module)[0]}) has no bias in the base "
                    f"to add the LoRA bias to (peft's merge refuses it too)"
                )
            if not keys:
                missing.append(module)
                continue
            self._check_module(module, keys)
        if missing and self.config["init_lora_weights"] not in ZERO_B_INITS:
            self._fail(
                f"targets {missing[:4]} have no tensors in the file and init_lora_weights="
                f"{self.config['init_lora_weights']!r} does not start B at zero"
            )
        if missing:
            log.info(
                "HF PEFT adapter: %d targets without tensors keep B = 0 (no change), e.g. %s", len(missing), missing[0]
            )

    def _check_module(self, module: str, keys: dict) -> None:
        r, dora = self._rank(module), self.config["use_dora"]
        if module == EMBEDDING:
            vocab, hidden = self.layout[f"{EMBEDDING}.weight"]
            expected = {"emb_A": (r, vocab), "emb_B": (hidden, r)} | ({"magnitude": (hidden,)} if dora else {})
        else:
            out_f, in_f = self.layout[f"{module}.weight"]
            expected = {"A": (r, in_f), "B": (out_f, r)} | ({"magnitude": (out_f,)} if dora else {})
        if set(keys) != set(expected):
            names = {
                "A": "lora_A",
                "B": "lora_B",
                "emb_A": "lora_embedding_A",
                "emb_B": "lora_embedding_B",
                "magnitude": "lora_magnitude_vector (use_dora)",
            }
            self._fail(
                f"{module}: the file has {sorted(names[k] for k in keys)}, expected "
                f"{sorted(names[k] for k in expected)} (use_dora={dora})"
            )
        for kind, shape in expected.items():
            if tuple(self.file.shape(keys[kind])) != shape:
                self._fail(
                    f"{module} ({keymap.to_megatron_module(module)[0]}): {keys[kind]} is "
                    f"{tuple(self.file.shape(keys[kind]))}, expected {shape} (r={r} from adapter_config.json, "
                    f"dimensions of the base)"
                )

    def _check_replacements(self) -> None:
        saves = self.config["modules_to_save"] or []
        for name, (kind, key) in self.replaced.items():
            module = name.rsplit(".", 1)[0]
            if name not in self.layout:
                self._fail(f"tensor {key} is neither a LoRA tensor peft saves nor one of the base's ({name})")
            if tuple(self.file.shape(key)) != self.layout[name]:
                self._fail(f"{key} is {tuple(self.file.shape(key))}, the base's {name} is {self.layout[name]}")
            wrapped = any(p.endswith(e) for e in saves for p in _prefixes(name))
            if kind == "base_layer" and module not in self.targets:
                self._fail(f"{key}: a base_layer tensor of {module}, which is not a LoRA target")
            if kind != "base_layer" and module in self.targets:
                self._fail(
                    f"{key}: {module} is a LoRA target, whose base weight peft saves as base_layer (peft "
                    f"would not load this tensor)"
                )
            if kind != "base_layer" and not wrapped and module not in (EMBEDDING, OUTPUT):
                self._fail(
                    f"tensor {key} is not explained by adapter_config.json: {name} is in no modules_to_save "
                    f"module (modules_to_save={saves}) and is not an embedding layer"
                )
        wrappers = {p for h in self.layout for p in _prefixes(h) if any(p.endswith(e) for e in saves)}
        outermost = {w for w in wrappers if not any(w.startswith(o + ".") for o in wrappers)}
        for w in sorted(outermost):
            lacking = sorted(h for h in self.layout if h.startswith(w + ".") and h not in self.replaced)
            if lacking:
                self._fail(f"modules_to_save wraps {w} but the file lacks {lacking[:3]} (peft's load needs them)")

    def _plan(self) -> dict:
        """Megatron module -> {'lora': {part: HF module}, 'replace': [(param, part, HF tensor)]}."""
        plan = {}
        for module in self.lora:
            mc, part = keymap.to_megatron_module(module)
            plan.setdefault(mc, {"lora": {}, "replace": []})["lora"][part] = module
        for name in self.replaced:
            tensor, part = keymap.to_megatron_tensor(name)
            mc, param = tensor.rsplit(".", 1)
            plan.setdefault(mc, {"lora": {}, "replace": []})["replace"].append((param, part, name))
        return plan

    def _module_scale(self, module: str):
        scales = {p or "all": self.hf_scales[x] for p, x in self.plan[module]["lora"].items()}
        return None if not scales else (next(iter(scales.values())) if len(set(scales.values())) == 1 else scales)

    def _unwritable(self) -> dict:
        """What format=hf_peft (plain LoRA on linears, one r and lora_alpha) cannot write: field -> modules."""
        out = {}
        if self.config["use_dora"]:
            out["use_dora"] = sorted(self.lora)
        if EMBEDDING in self.lora:
            out["LoRA on embed_tokens (lora_embedding_A/B)"] = [EMBEDDING]
        if self.replaced:
            out["modules_to_save / saved base weights"] = sorted(self.replaced)
        fused = sorted(m for m, p in self.plan.items() if {"gate", "up"} <= set(p["lora"]))
        if fused:  # write_hf_peft gives gate and up linear_fc1's one A (rank 2r) and B's halves
            out["gate_proj + up_proj LoRA (one linear_fc1 of rank 2r; hf_peft writes one r)"] = fused
        return out

    def factors(self, modules) -> dict:
        """Megatron module -> (A [r, in], B [out, r] full height, scale), or ``AdapterEntry`` where DoRA or
        replaced tensors take part, for those of ``modules`` the adapter changes.

        Args:
            modules: Megatron module names (a unit's).
        """
        return {m: self._entry(m) for m in modules if m in self.plan}

    def _entry(self, module: str):
        plan, features, replace = self.plan[module], [], {}
        lora = {p: self._lora_tensors(x) for p, x in plan["lora"].items()}
        for param, part, name in plan["replace"]:
            value = self.file.read(self.replaced[name][1])
            rows = None if part is None else _rows(part, value.shape[0])
            replace.setdefault(param, []).append((rows, value))
            features.append(f"{self.replaced[name][0]} {name}")
        if not lora:
            return AdapterEntry(module, replace=replace, features=tuple(features))
        a, b, scale, magnitude, dora_rows = _fuse(lora)
        if magnitude is not None:
            features.insert(0, "use_dora")
        if magnitude is None and not replace:
            return a, b, scale
        norm_dim = 0 if plan["lora"].get(None) == EMBEDDING else 1
        return AdapterEntry(module, a, b, scale, magnitude, norm_dim, dora_rows, replace, tuple(features))

    def _lora_tensors(self, hf_module: str) -> tuple:
        """(A [r, in], B [out, r], scale, magnitude | None) of one HF module, as a linear's factors (an
        embedding's delta (B_e A_e)^T is the linear delta with A = B_e^T, B = A_e^T)."""
        keys = {k: self.file.read(v).float() for k, v in self.lora[hf_module].items()}
        if hf_module == EMBEDDING:
            return (
                keys["emb_B"].T.contiguous(),
                keys["emb_A"].T.contiguous(),
                self.hf_scales[hf_module],
                keys.get("magnitude"),
            )
        return keys["A"], keys["B"], self.hf_scales[hf_module], keys.get("magnitude")


def _prefixes(name: str) -> list[str]:
    """Every module that holds the tensor ``name`` (its own and their parents)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _rows(part: str, rows: int) -> tuple[int, int]:
    return (0, rows) if part == "gate" else (rows, 2 * rows)


def _fuse(lora: dict) -> tuple:
    """{part: (A, B, scale, magnitude)} -> (A, B full height, scale, magnitude, dora_rows) of the Megatron module:
    one part as it is, gate/up as A = [A_gate; A_up], B = blockdiag (the same delta), scales folded into B where
    they differ."""
    if None in lora:
        a, b, scale, magnitude = lora[None]
        return a, b, scale, magnitude, None
    width = next(iter(lora.values()))[1].shape[0]
    present = [p for p in ("gate", "up") if p in lora]
    scales = {lora[p][2] for p in present}
    fold = len(scales) > 1
    a = torch.cat([lora[p][0] for p in present])
    b = a.new_zeros(2 * width, a.shape[0])
    magnitude, dora_rows, col = None, torch.zeros(2 * width, dtype=torch.bool), 0
    for p in present:
        pa, pb, ps, pm = lora[p]
        start, stop = _rows(p, width)
        b[start:stop, col : col + pa.shape[0]] = pb * ps if fold else pb
        col += pa.shape[0]
        if pm is not None:
            magnitude = a.new_zeros(2 * width) if magnitude is None else magnitude
            magnitude[start:stop], dora_rows[start:stop] = pm.float(), True
    return a, b, 1.0 if fold else scales.pop(), magnitude, None if bool(dora_rows.all()) else dora_rows
