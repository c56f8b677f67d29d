"""Where export reads from: base weights and adapters, ours or HF's, one layer group at a time.

Every source hands out flat Megatron names (``dist_ckpt`` conventions) and LoRA factors as
module -> (A [r, in], B [out, r] full height, scale).
"""

import json
import re
from pathlib import Path

import torch

from nemo_mla_lora.arch import keymap
from nemo_mla_lora.arch.hf_config import spec_from_hf
from nemo_mla_lora.arch.mla_spec import MLASpec
from nemo_mla_lora.checkpoints import kind
from nemo_mla_lora.checkpoints.checksums import check_checksums
from nemo_mla_lora.checkpoints.dist_ckpt import ADAPTER_FILE, read_spec
from nemo_mla_lora.checkpoints.dist_reader import CheckpointReader
from nemo_mla_lora.checkpoints.errors import CheckpointError
from nemo_mla_lora.peft.merge import expand_rows
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
        self.directory = Path(directory)
        if nemo:
            self.reader = CheckpointReader(self.directory / kind.WEIGHTS, prefix=kind.PREFIX)
            self.spec = kind.checkpoint_spec(directory)
        else:
            self.reader = CheckpointReader(directory)
            self.spec = read_spec(directory)
        self.names = [n for n in self.reader.names() if ".adapter." not in n]

    def load(self, names) -> dict:
        return self.reader.load(names)

    def layout(self) -> dict:
        return {n: (self.reader.dtype(n), tuple(self.reader.flat[n][2])) for n in self.names}

    def shapes(self) -> dict:
        return {n: tuple(self.reader.flat[n][2]) for n in self.names}

    def content_hash(self) -> str:
        """A second read of the base: a dist-checkpoint is read through Megatron's loader, not hashed on the way."""
        from nemo_mla_lora.checkpoints.safetensors_io import file_hash

        return file_hash(self.directory)


def dequantize_fp8(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    dtype=torch.bfloat16,
    out: torch.Tensor | None = None,
    name: str = "weight",
    origin: tuple = (0, 0),
    full_shape: tuple | None = None,
) -> torch.Tensor:
    """DeepSeek-V3 FP8 weight [out, in] with 128x128 block scales [ceil(out/128), ceil(in/128)], one block row
    at a time (memory: the result plus one [128, in] fp32 block). ``origin``, ``full_shape``: ``weight`` is the
    slice at (row, column) ``origin`` of a ``full_shape`` weight whose scales ``scale_inv`` are (a tensor-parallel
    shard; block boundaries need not fall on the slice's)."""
    out_f, in_f = weight.shape
    full = tuple(full_shape or weight.shape)
    blocks = (-(-full[0] // FP8_BLOCK), -(-full[1] // FP8_BLOCK))
    if tuple(scale_inv.shape) != blocks:
        raise CheckpointError(
            f"{name}: weight_scale_inv is {tuple(scale_inv.shape)}, expected {blocks} for "
            f"{FP8_BLOCK}x{FP8_BLOCK} blocks of a {full} weight"
        )
    (r0, c0), device = origin, weight.device
    out = torch.empty(out_f, in_f, dtype=dtype, device=device) if out is None else out
    block_of_col = torch.arange(c0, c0 + in_f, device=device) // FP8_BLOCK  # [in]
    for i in range(r0 // FP8_BLOCK, -(-(r0 + out_f) // FP8_BLOCK)):
        rows = slice(max(i * FP8_BLOCK, r0) - r0, min((i + 1) * FP8_BLOCK, r0 + out_f) - r0)
        col_scale = scale_inv[i].to(device).float()[block_of_col]  # [in]
        out[rows] = (weight[rows].float() * col_scale).to(dtype)
    return out


class HFBase:
    """An HF DeepSeek-V3-format directory: config.json + safetensors (sharded with an index, or one file);
    bf16/fp32 tensors are read as stored; FP8 e4m3 weights with ``weight_scale_inv`` 128x128 block scales
    are dequantized to ``dtype`` on read. Tensors are read with positioned I/O (``safetensors_io``), each
    hashed while in memory: ``content_hash`` then needs no second read of what was loaded."""

    def __init__(self, directory, dtype=torch.bfloat16, checksums: dict | None = None):
        from nemo_mla_lora.checkpoints.safetensors_io import SafetensorsFile, read_shards

        self.directory, self.dtype, self.checksums = Path(directory), dtype, checksums
        config = self.directory / "config.json"
        if not config.is_file():
            raise CheckpointError(f"{directory}: no config.json (not an HF checkpoint)")
        self.config = json.loads(config.read_text())  # the source's own, kept by the hf export
        self.spec = spec_from_hf(self.config, str(config))
        index = self.directory / "model.safetensors.index.json"
        weight_map, shards = read_shards(self.directory)  # every shard inside the directory
        self.opened = {f: SafetensorsFile(self.directory / f) for f in shards}  # headers only
        self.files = {k: f for f, st in self.opened.items() for k in st}
        if weight_map:
            wrong = sorted(k for k, f in weight_map.items() if self.files.get(k) != f)
            if wrong:
                raise CheckpointError(
                    f"{index}: {len(wrong)} tensors are not in the shard the index names: {wrong[:3]}"
                )
        # MTP layers (DeepSeek-V3's layer 61) are beyond num_hidden_layers and not part of the model.
        self.hf_names = sorted(
            k
            for k in self.files
            if not k.endswith("weight_scale_inv")
            and "rotary_emb" not in k
            and (_hf_layer(k) or 0) < self.spec.num_layers
        )
        self.parts = {}  # flat Megatron name -> its HF tensors ([gate, up] for a fused linear_fc1)
        for h in self.hf_names:
            self.parts.setdefault(_megatron_name(h), []).append(h)
        for hs in self.parts.values():
            if len(hs) == 2:
                hs.sort(key=lambda h: 0 if ".gate_proj." in h else 1)
        self.names = sorted(self.parts)

    def _dtype_read(self, hf_name: str) -> torch.dtype:
        dtype = self.opened[self.files[hf_name]].dtype(hf_name)
        return self.dtype if dtype == torch.float8_e4m3fn else dtype

    def layout(self) -> dict:
        """Flat Megatron name -> (dtype as read, shape), from the headers (no tensor read)."""
        return {n: self.layout_of(n) for n in self.parts}

    def shapes(self) -> dict:
        """Flat Megatron name -> shape (gate/up rows summed)."""
        return {n: shape for n, (_, shape) in self.layout().items()}

    def load(self, names) -> dict:
        out = {}
        for n in names:
            hs = self.parts[n]
            if len(hs) == 1:
                out[n] = self._read(hs[0])
                continue
            dtype, shape = self.layout_of(n)
            fused, row = torch.empty(shape, dtype=dtype), 0  # gate and up read into its two halves
            for h in hs:
                rows = self.opened[self.files[h]].shape(h)[0]
                self._read(h, fused[row : row + rows])
                row += rows
            out[n] = fused
        return out

    def layout_of(self, name: str) -> tuple:
        hs = self.parts[name]
        shapes = [self.opened[self.files[h]].shape(h) for h in hs]
        return self._dtype_read(hs[0]), (sum(s[0] for s in shapes), *shapes[0][1:])

    def _read(self, hf_name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        st = self.opened[self.files[hf_name]]
        fp8 = st.dtype(hf_name) == torch.float8_e4m3fn
        t = st.read(hf_name, None if fp8 else out)
        check_checksums({hf_name: t}, self.checksums, st.path)
        if not fp8:
            return t
        scale_name = self.scale_name(hf_name)
        scale = self.opened[self.files[scale_name]].read(scale_name)
        return dequantize_fp8(t, scale, self.dtype, out, hf_name)

    def scale_name(self, hf_name: str) -> str:
        """The ``weight_scale_inv`` tensor of the FP8 weight ``hf_name`` (an error naming both when it is missing)."""
        scale_name = hf_name.replace(".weight", ".weight_scale_inv")
        if scale_name not in self.files:
            raise CheckpointError(f"{hf_name} is FP8 but {scale_name} is missing")
        return scale_name

    def content_hash(self) -> str:
        """``checkpoint.file_hash`` of the directory, from the digests taken while reading."""
        from nemo_mla_lora.checkpoints.safetensors_io import directory_hash

        return directory_hash(self.directory, self.opened)


def _hf_layer(name: str):
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _megatron_name(hf_name: str) -> str:
    module, _, param = hf_name.rpartition(".")
    mc, _ = keymap.to_megatron_module(module)
    return f"{mc}.{ {'e_score_correction_bias': 'expert_bias'}.get(param, param) }"


def open_base(directory, dtype=torch.bfloat16):
    """An HF checkpoint, one of ours or a NeMo 2 checkpoint (``checkpoints.kind.checkpoint_kind``)."""
    found = kind.checkpoint_kind(directory)
    if found == "hf":
        return HFBase(directory, dtype)
    return MegatronBase(directory, nemo=found == "nemo")


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
        self.scales = dict.fromkeys(self.modules, self.info["scale"])

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
                    raise CheckpointError(
                        f"{m}: B has {b.shape[0]} rows, part {self.info['parts'][leaf]!r} has {int(mask.sum())}"
                    )
                b = expand_rows(b, mask.nonzero().flatten(), mask.numel())
            out[m] = (a, b, self.scales[m])
        return out


class NoAdapter:
    """The base alone: an export of it serves many unmerged adapters (``inference/adapters.py``)."""

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
            diff = {k: (v, getattr(spec, k)) for k, v in adapter.spec.to_dict().items() if spec.to_dict().get(k) != v}
            raise CheckpointError(f"adapter {directory} was trained on another model: (adapter, base) differ in {diff}")
        return adapter
    if (directory / "adapter_config.json").is_file():
        from nemo_mla_lora.checkpoints.hf_peft import HFPeftAdapter

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
        out.update(
            {
                f"{p}.input_layernorm.weight": (h,),
                f"{p}.pre_mlp_layernorm.weight": (h,),
                f"{a}.linear_kv_down_proj.weight": (c + dr, h),
                f"{a}.kv_layernorm.weight": (c,),
                f"{a}.linear_kv_up_proj.weight": (heads * (dn + dv), c),
                f"{a}.linear_proj.weight": (h, heads * dv),
            }
        )
        if rq is None:
            out[f"{a}.linear_q_proj.weight"] = (heads * (dn + dr), h)
        else:
            out.update(
                {
                    f"{a}.linear_q_down_proj.weight": (rq, h),
                    f"{a}.q_layernorm.weight": (rq,),
                    f"{a}.linear_q_up_proj.weight": (heads * (dn + dr), rq),
                }
            )
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
        problems.append(
            f"{len(unknown)} the config has no place for: {unknown[:6]}{' ...' if len(unknown) > 6 else ''}"
        )
    if wrong:
        problems.append(
            "shapes (expected, found): " + ", ".join(f"{n} {e} vs {f}" for n, (e, f) in list(wrong.items())[:6])
        )
    if problems:
        raise CheckpointError(f"base {where} does not match its own config: " + "; ".join(problems))
