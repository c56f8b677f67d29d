"""Where export reads from: base weights and adapters, ours or HF's, one layer group at a time.

Every source hands out flat Megatron names (``checkpoint`` conventions) and LoRA factors as
module -> (A [r, in], B [out, r] full height, scale).
"""

import json
import re
from pathlib import Path

import torch

from nemo_mla_lora import keymap
from nemo_mla_lora.checkpoint import ADAPTER_FILE, CheckpointError, CheckpointReader, check_checksums, read_spec
from nemo_mla_lora.export.merge import expand_rows
from nemo_mla_lora.hf_config import spec_from_hf
from nemo_mla_lora.mla_spec import MLASpec
from nemo_mla_lora.peft.parts import row_mask

FP8_BLOCK = 128


def layer_of(name: str) -> int | None:
    m = re.match(r"(?:.*\.)?decoder\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def groups(names) -> dict:
    """'pre' (embedding), 0..L-1 (decoder layers), 'post' (final norm, output layer) -> names."""
    out = {}
    for n in names:
        layer = layer_of(n)
        key = layer if layer is not None else ("pre" if n.startswith("embedding") else "post")
        out.setdefault(key, []).append(n)
    return out


class MegatronBase:
    """Our base checkpoint (dist-ckpt + mla_spec.json), or a NeMo 2 checkpoint (``nemo=True``: the dist-ckpt in
    ``weights/`` under ``module.`` keys, local or TE-spec names; the architecture from ``context/model.yaml``,
    read as data)."""

    def __init__(self, directory, nemo: bool = False):
        from nemo_mla_lora.export import nemo_format
        from nemo_mla_lora.models.architecture import checkpoint_spec

        self.directory = Path(directory)
        if nemo:
            self.reader = CheckpointReader(self.directory / nemo_format.WEIGHTS, prefix=nemo_format.PREFIX)
            self.spec = checkpoint_spec(directory)
        else:
            self.reader = CheckpointReader(directory)
            self.spec = read_spec(directory)
        self.names = [n for n in self.reader.names() if ".adapter." not in n]

    def load(self, names) -> dict:
        return self.reader.load(names)

    def shapes(self) -> dict:
        return {n: tuple(self.reader.flat[n][2]) for n in self.names}


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """DeepSeek-V3 FP8 weight [out, in] with 128x128 block scales [ceil(out/128), ceil(in/128)]."""
    out_f, in_f = weight.shape
    scale = scale_inv.float().repeat_interleave(FP8_BLOCK, 0)[:out_f].repeat_interleave(FP8_BLOCK, 1)[:, :in_f]
    return (weight.float() * scale).to(dtype)


class HFBase:
    """An HF DeepSeek-V3-format directory: config.json + safetensors (sharded with an index, or one file);
    bf16/fp32 tensors are read as stored; FP8 e4m3 weights with ``weight_scale_inv`` 128x128 block scales
    are dequantized to ``dtype`` on read."""

    def __init__(self, directory, dtype=torch.bfloat16, checksums: dict | None = None):
        from safetensors import safe_open

        self.directory, self.dtype, self.checksums = Path(directory), dtype, checksums
        config = self.directory / "config.json"
        if not config.is_file():
            raise CheckpointError(f"{directory}: no config.json (not an HF checkpoint)")
        self.config = json.loads(config.read_text())  # the source's own, kept by the hf export
        self.spec = spec_from_hf(self.config, str(config))
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            self.files = json.loads(index.read_text())["weight_map"]
        else:
            single = self.directory / "model.safetensors"
            if not single.is_file():
                raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")
            with safe_open(single, "pt") as f:
                self.files = {k: single.name for k in f.keys()}
        missing = sorted({f for f in self.files.values() if not (self.directory / f).is_file()})
        if missing:
            raise CheckpointError(f"{directory}: index names missing shard files {missing}")
        # MTP layers (DeepSeek-V3's layer 61) are beyond num_hidden_layers and not part of the model.
        self.hf_names = sorted(k for k in self.files if not k.endswith("weight_scale_inv")
                               and "rotary_emb" not in k and (_hf_layer(k) or 0) < self.spec.num_layers)
        self.names = sorted({_megatron_name(h) for h in self.hf_names})

    def load(self, names) -> dict:
        names_set = set(names)
        wanted = [h for h in self.hf_names if _megatron_name(h) in names_set]
        hf = {h: self._read(h) for h in wanted}
        out = keymap.hf_to_megatron(hf)
        return {n: out[n] for n in names}

    def shapes(self) -> dict:
        """Flat Megatron name -> shape, from the safetensors headers (no tensor read); gate/up rows summed."""
        from safetensors import safe_open

        by_file, out = {}, {}
        for h in self.hf_names:
            by_file.setdefault(self.files[h], []).append(h)
        for file, names in by_file.items():
            with safe_open(self.directory / file, "pt") as f:
                for h in names:
                    shape = list(f.get_slice(h).get_shape())
                    m = _megatron_name(h)
                    if m in out and keymap.to_megatron_module(h.rpartition(".")[0])[1] is not None:
                        shape = [out[m][0] + shape[0], *shape[1:]]  # the second half of a fused linear_fc1
                    out[m] = tuple(shape)
        return out

    def _read(self, hf_name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.directory / self.files[hf_name], "pt") as f:
            t = f.get_tensor(hf_name)
            check_checksums({hf_name: t}, self.checksums, self.directory / self.files[hf_name])
            if t.dtype == torch.float8_e4m3fn:
                scale_name = hf_name.replace(".weight", ".weight_scale_inv")
                if scale_name not in self.files:
                    raise CheckpointError(f"{hf_name} is FP8 but {scale_name} is missing")
                with safe_open(self.directory / self.files[scale_name], "pt") as g:
                    return dequantize_fp8(t, g.get_tensor(scale_name), self.dtype)
        return t


def _hf_layer(name: str):
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _megatron_name(hf_name: str) -> str:
    module, _, param = hf_name.rpartition(".")
    mc, _ = keymap.to_megatron_module(module)
    return f"{mc}.{ {'e_score_correction_bias': 'expert_bias'}.get(param, param) }"


def open_base(directory, dtype=torch.bfloat16):
    """An HF checkpoint, one of ours or a NeMo 2 checkpoint (``models.architecture.checkpoint_kind``)."""
    from nemo_mla_lora.models.architecture import checkpoint_kind

    kind = checkpoint_kind(directory)
    if kind == "hf":
        return HFBase(directory, dtype)
    return MegatronBase(directory, nemo=kind == "nemo")


class MegatronAdapter:
    """Our adapter checkpoint (dist-ckpt of lora_a/lora_b + adapter.json)."""

    def __init__(self, directory):
        self.directory = Path(directory)
        info = self.directory / ADAPTER_FILE
        if not info.is_file():
            raise CheckpointError(f"{directory}: no {ADAPTER_FILE} (not an MLALoRA adapter checkpoint)")
        self.info = json.loads(info.read_text())
        self.spec = MLASpec.from_dict(self.info["mla_spec"])
        self.reader = CheckpointReader(directory)
        self.modules = sorted({n.rsplit(".adapter.", 1)[0] for n in self.reader.names()})
        self.scales = {m: self.info["scale"] for m in self.modules}

    def factors(self, modules) -> dict:
        """module -> (A, B full height, scale) for those of ``modules`` that have an adapter."""
        mine = [m for m in modules if m in self.scales]
        tensors = self.reader.load([f"{m}.adapter.{p}" for m in mine for p in ("lora_a", "lora_b")])
        out = {}
        for m in mine:
            a, b = tensors[f"{m}.adapter.lora_a"], tensors[f"{m}.adapter.lora_b"]
            if a.shape[0] != self.info["dim"]:
                raise CheckpointError(f"{m}: adapter rank {a.shape[0]} != adapter.json dim {self.info['dim']}")
            leaf = m.rsplit(".", 1)[-1]
            mask = row_mask(leaf, self.info["parts"].get(leaf), self.spec)
            if mask is not None:
                if int(mask.sum()) != b.shape[0]:
                    raise CheckpointError(f"{m}: B has {b.shape[0]} rows, part {self.info['parts'][leaf]!r} has "
                                          f"{int(mask.sum())}")
                b = expand_rows(b, mask.nonzero().flatten(), mask.numel())
            out[m] = (a, b, self.scales[m])
        return out


class HFPeftAdapter:
    """An HF PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``) on a DeepSeek
    model. gate_proj/up_proj adapters (separate A each) become one fused ``linear_fc1`` factor pair of
    rank 2r: A = [A_gate; A_up], B = blockdiag(B_gate, B_up) — the same delta, exactly."""

    def __init__(self, directory, spec: MLASpec):
        from safetensors.torch import load_file

        self.directory, self.spec = Path(directory), spec
        config = self.directory / "adapter_config.json"
        weights = self.directory / "adapter_model.safetensors"
        if not (config.is_file() and weights.is_file()):
            raise CheckpointError(f"{directory}: expected adapter_config.json + adapter_model.safetensors (HF PEFT)")
        self.info = json.loads(config.read_text())
        r, alpha = self.info["r"], self.info["lora_alpha"]
        self.scale = alpha / (r ** 0.5 if self.info.get("use_rslora") else r)
        self.tensors = load_file(weights)  # adapters are small
        self.pairs = {}  # Megatron module -> {part: (A, B)}
        for key, t in self.tensors.items():
            m = re.match(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$", key)
            if not m:
                continue
            module, part = keymap.to_megatron_module(m.group(1))
            self.pairs.setdefault(module, {}).setdefault(part, {})[m.group(2)] = t
        self.modules = sorted(self.pairs)
        self.scales = {mod: self.scale for mod in self.modules}

    def factors(self, modules) -> dict:
        out = {}
        for mod in [m for m in modules if m in self.pairs]:
            parts = self.pairs[mod]
            if None in parts:
                out[mod] = (parts[None]["A"].float(), parts[None]["B"].float(), self.scale)
                continue
            if set(parts) != {"gate", "up"}:
                raise CheckpointError(f"{mod}: HF adapter has {sorted(parts)} of gate_proj/up_proj; need both")
            a = torch.cat([parts["gate"]["A"], parts["up"]["A"]]).float()
            b = torch.block_diag(parts["gate"]["B"], parts["up"]["B"]).float()
            out[mod] = (a, b, self.scale)
        return out


class NoAdapter:
    """The base alone: an absorbed export of it serves many unmerged adapters (``inference/adapters.py``)."""

    modules: list = []
    scales: dict = {}

    def factors(self, modules) -> dict:
        return {}


def open_adapter(directory, spec: MLASpec):
    if directory is None:
        return NoAdapter()
    directory = Path(directory)
    if (directory / ADAPTER_FILE).is_file():
        adapter = MegatronAdapter(directory)
        if adapter.spec != spec:
            diff = {k: (v, getattr(spec, k)) for k, v in adapter.spec.to_dict().items()
                    if spec.to_dict().get(k) != v}
            raise CheckpointError(f"adapter {directory} was trained on another model: (adapter, base) differ in {diff}")
        return adapter
    if (directory / "adapter_config.json").is_file():
        return HFPeftAdapter(directory, spec)
    raise CheckpointError(f"{directory}: neither an MLALoRA adapter (adapter.json) nor an HF PEFT adapter")


def expected_shapes(spec: MLASpec) -> dict:
    """Every tensor a model of ``spec`` has (flat Megatron names, TP=1) -> its shape."""
    h, heads, c = spec.hidden_size, spec.num_heads, spec.kv_lora_rank
    dn, dr, dv, rq = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim, spec.q_lora_rank
    out = {"embedding.word_embeddings.weight": (spec.vocab_size, h), "decoder.final_layernorm.weight": (h,)}
    if not spec.tie_word_embeddings:
        out["output_layer.weight"] = (spec.vocab_size, h)

    def mlp(prefix, width):
        out[f"{prefix}.linear_fc1.weight"], out[f"{prefix}.linear_fc2.weight"] = (2 * width, h), (h, width)

    for layer in range(spec.num_layers):
        p = f"decoder.layers.{layer}"
        a = f"{p}.self_attention"
        out.update({f"{p}.input_layernorm.weight": (h,), f"{p}.pre_mlp_layernorm.weight": (h,),
                    f"{a}.linear_kv_down_proj.weight": (c + dr, h), f"{a}.kv_layernorm.weight": (c,),
                    f"{a}.linear_kv_up_proj.weight": (heads * (dn + dv), c), f"{a}.linear_proj.weight": (h, heads * dv)})
        if rq is None:
            out[f"{a}.linear_q_proj.weight"] = (heads * (dn + dr), h)
        else:
            out.update({f"{a}.linear_q_down_proj.weight": (rq, h), f"{a}.q_layernorm.weight": (rq,),
                        f"{a}.linear_q_up_proj.weight": (heads * (dn + dr), rq)})
        if not spec.is_moe_layer(layer):
            mlp(f"{p}.mlp", spec.ffn_hidden_size)
            continue
        out[f"{p}.mlp.router.weight"] = (spec.num_experts, h)
        if spec.moe_expert_bias:
            out[f"{p}.mlp.router.expert_bias"] = (spec.num_experts,)
        for e in range(spec.num_experts):
            mlp(f"{p}.mlp.experts.local_experts.{e}", spec.moe_ffn_hidden_size)
        if spec.shared_expert_ffn_hidden_size:
            mlp(f"{p}.mlp.shared_experts", spec.shared_expert_ffn_hidden_size)
    return out


def check_complete(source, spec: MLASpec, where) -> None:
    """Every tensor the model needs is present with its shape, and nothing unknown: else a CheckpointError
    naming the tensors (before anything is written, whatever ``verify`` says)."""
    expected, found = expected_shapes(spec), source.shapes()
    missing = sorted(set(expected) - set(found))
    unknown = sorted(set(found) - set(expected))
    wrong = {n: (expected[n], found[n]) for n in sorted(set(expected) & set(found)) if tuple(found[n]) != expected[n]}
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    if unknown:
        problems.append(f"{len(unknown)} the config has no place for: {unknown[:6]}{' ...' if len(unknown) > 6 else ''}")
    if wrong:
        problems.append("shapes (expected, found): " + ", ".join(f"{n} {e} vs {f}" for n, (e, f) in list(wrong.items())[:6]))
    if problems:
        raise CheckpointError(f"base {where} does not match its own config: " + "; ".join(problems))
