"""``AbsorbedMLAEngine``: a Megatron-Core GPTModel (embedding, norms, dense MLP / MoE, output layer) whose
MLA attention runs absorbed over a latent KV cache, loaded from any merged export (``absorbed`` as written;
``mcore`` / ``hf`` absorbed at load).

The decoder loop is written out (pre-norm residual blocks, as ``TransformerLayer`` computes them in
inference: no dropout): Megatron's ``GPTModel.forward`` would call ``MLASelfAttention.forward``, which
materializes per-head K and V from ``linear_kv_up_proj``; here the split W_UK / W_UV act on the latents."""

from pathlib import Path

import torch

from nemo_mla_lora.arch.absorb import K_UP, KV_UP, V_UP, absorb_layer
from nemo_mla_lora.arch.mla_spec import MLASpec
from nemo_mla_lora.checkpoints.dist_ckpt import load_weights
from nemo_mla_lora.inference.attention import NONE, absorbed_attention
from nemo_mla_lora.inference.cache import LatentKVCache
from nemo_mla_lora.inference.moe import GroupedMoE, unsupported

PREFIX = "decoder.layers.{}.self_attention."
BACKENDS = ("torch", "triton", "flashmla", "gluon")  # decode attention: einsums, our kernels, FlashMLA's (Hopper),
# our warp-specialised Gluon kernel (Hopper, 64 / 128 heads)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def served(directory, verify_checksums: bool = True) -> tuple[str, MLASpec, str]:
    """(format, MLA spec, dtype name) of what the engine serves from ``directory``, read before any weight: a
    merged export's ``manifest.json`` (``mcore``, ``absorbed``, ``nemo``, ``hf``), or an HF directory written
    elsewhere (``config.json`` + safetensors; no manifest, so no checksums: served only with
    ``verify_checksums=False``).

    Args:
        directory: the checkpoint to serve.
        verify_checksums: whether every tensor will be checked against a manifest.
    """
    from nemo_mla_lora.checkpoints.errors import CheckpointError
    from nemo_mla_lora.export.manifest import read_manifest
    from nemo_mla_lora.export.pipeline import MERGED_FORMATS

    directory = Path(directory)
    if (directory / "manifest.json").is_file():
        manifest = read_manifest(directory)  # a truncated or non-object file: one line naming it
        fmt = manifest.get("format")
        if fmt not in MERGED_FORMATS:
            raise ValueError(f"{directory}: format {fmt!r}; the engine serves merged exports {MERGED_FORMATS}")
        return fmt, MLASpec.from_dict(manifest["mla"]), manifest["dtype"]
    if (directory / "config.json").is_file():
        if verify_checksums:
            raise CheckpointError(
                f"{directory}: an HF directory without manifest.json (not written by "
                "recipes.export): no checksums to check its tensors against; pass "
                "verify_checksums=false to serve it unchecked"
            )
        from nemo_mla_lora.checkpoints.sources import HFBase

        base = HFBase(directory, dtype=torch.float32)  # headers only; FP8 weights would be dequantized to fp32
        dtype, _ = base.layout_of("embedding.word_embeddings.weight")
        return "hf", base.spec, str(dtype).removeprefix("torch.")
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint={directory}: no such directory")
    raise CheckpointError(
        f"{directory}: neither a merged export (manifest.json: recipes.export format=mcore, "
        "absorbed, nemo or hf) nor an HF directory (config.json + safetensors)"
    )


def backend_problem(backend: str, device, spec: MLASpec, dtype: torch.dtype) -> str | None:
    """Why the engine cannot decode with attention ``backend`` (None: it can), known before any weight is read: the
    name, and for the Hopper kernels the package or Triton's Gluon, the GPU, the model's dims and the cache dtype.

    Args:
        backend: one of ``BACKENDS``.
        device: where the engine runs.
        spec: the served model's MLA dims.
        dtype: the engine's (and its cache's) dtype.
    """
    if backend not in BACKENDS:
        return f"attention backend {backend!r}; expected one of {BACKENDS}"
    why = None
    if backend == "flashmla":
        from nemo_mla_lora.inference.kernels.flashmla import unavailable

        why = unavailable(device, (spec.kv_lora_rank, spec.qk_rope_head_dim))
    elif backend == "gluon":
        from nemo_mla_lora.inference.kernels.gluon_launch import device_problem

        why = device_problem(device, spec.kv_lora_rank, spec.qk_rope_head_dim, spec.num_heads)
    if why is None and backend in ("flashmla", "gluon") and dtype != torch.bfloat16:
        why = f"its decode kernel reads a bf16 cache and the engine runs in {str(dtype).removeprefix('torch.')}"
    return None if why is None else f"attention backend {backend!r}: {why}; use 'triton' (our kernels) or 'torch'"


class AbsorbedMLAEngine:
    def __init__(self, model, spec: MLASpec, k_up: list, v_up: list, backend: str = "torch"):
        p = next(model.parameters())
        if problem := backend_problem(backend, p.device, spec, p.dtype):
            raise ValueError(problem)
        self.model, self.spec, self.backend = model.eval(), spec, backend
        h, dn, dv, c = spec.num_heads, spec.qk_nope_head_dim, spec.v_head_dim, spec.kv_lora_rank
        self.w_uk = [w.view(h, dn, c) for w in k_up]  # [h, dn, c] per layer
        self.w_uv = [w.view(h, dv, c) for w in v_up]  # [h, dv, c] per layer
        # MoE layers as grouped GEMMs with no host read (``moe.py``); None: the layer's own forward
        self.moe = [None if unsupported(layer.mlp) else GroupedMoE(layer.mlp) for layer in model.decoder.layers]

    @classmethod
    def load(
        cls, export_dir, dtype: str | None = None, device="cpu", backend: str = "torch", verify_checksums: bool = True
    ) -> "AbsorbedMLAEngine":
        """Build the model from the export's MLA spec (``served``) and load its weights, each checked against
        the manifest's checksum as it is read: ``absorbed`` as written, ``mcore`` / ``nemo`` / ``hf`` (merged
        standard layout; ``hf``: an HF directory, config.json + safetensors) absorbed at load
        (``linear_kv_up_proj`` split per head into W_UK / W_UV, as Megatron's ``prepare_for_absorption`` does).

        Args:
            export_dir: a merged export (``absorbed``, ``mcore``, ``nemo`` or ``hf``, with its ``manifest.json``).
            dtype: float32 | bfloat16 | float16 | float64; None: the dtype the export stores.
            device: where the model runs.
            backend: decode attention in einsums (``torch``), our kernels (``triton``: on Hopper the Gluon kernel
                for heads in blocks of 64, eagerly from 64 head blocks, in a CUDA graph at every batch, and the TMA
                kernels elsewhere; else the portable Triton one) or FlashMLA's Hopper kernel (``flashmla``, where it
                is installed; it decodes the shapes where it is faster, from 64 heads eagerly and 128 in a CUDA
                graph, and ours the rest) or our warp-specialised Gluon kernel (``gluon``: Hopper, heads in blocks
                of 64, at every step); both bf16 only, refused with the reason before any weight is read
                (``backend_problem``).
            verify_checksums: check every tensor against the manifest as it is read.

        Returns:
            The engine, its model in eval mode with the absorbed K/V up projections beside it.
        """
        from nemo_mla_lora.export.pipeline import read_export
        from nemo_mla_lora.models.from_spec import CPU_SAFE, config_from_spec
        from nemo_mla_lora.models.layer_spec import local_mla_block_spec
        from nemo_mla_lora.models.tiny import build_model

        export_dir = Path(export_dir)
        fmt, spec, stored = served(export_dir, verify_checksums)
        if (dtype or stored) not in DTYPES:
            raise ValueError(f"{export_dir}: weights stored in {stored}; pass dtype= one of {sorted(DTYPES)}")
        dt = DTYPES[dtype or stored]
        if problem := backend_problem(backend, torch.device(device), spec, dt):  # before hours of reading at size
            raise ValueError(f"{export_dir}: {problem}")
        state = {k: v.to(dt) for k, v in read_export(export_dir, fmt, verify_checksums).items()}
        if fmt != "absorbed":
            for i in range(spec.num_layers):
                state = absorb_layer(state, PREFIX.format(i).rstrip("."), spec)
        k_up = [state.pop(PREFIX.format(i) + K_UP).to(device) for i in range(spec.num_layers)]
        v_up = [state.pop(PREFIX.format(i) + V_UP).to(device) for i in range(spec.num_layers)]
        # Megatron's local spec, Transformer Engine importable or not: the state is under its names (the reader's
        # flat Megatron names) and the engine runs its own attention, so TE's fused norms and grouped experts
        # would only rename what it loads
        config = config_from_spec(spec, dt, **CPU_SAFE, transformer_layer_spec=local_mla_block_spec)
        model = build_model(config).to(device)
        load_weights(model, state, f"{export_dir} (format {fmt}, built from its MLA spec)", absent_ok=(KV_UP,))
        return cls(model, spec, k_up, v_up, backend)

    def new_cache(self, batch: int, max_length: int, static: bool = False) -> LatentKVCache:
        """A zeroed latent cache for this model (``LatentKVCache.allocate``; ``static``: for ``GraphedDecode``)."""
        p = next(self.model.parameters())
        return LatentKVCache.allocate(self.spec, batch, max_length, p.dtype, p.device, static=static)

    @torch.no_grad()
    def forward(
        self, tokens: torch.Tensor, cache: LatentKVCache, bank=None, adapter_ids=None, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [b, s, vocab] for tokens [b, s] placed after each row's cached tokens (prefill when empty).
        ``valid`` [b]: how many of the s tokens are real per row (right padding; default all). With an
        ``AdapterBank``, row i runs with adapter ``adapter_ids[i]`` (0: none), unmerged."""
        m = self.model
        b, s = tokens.shape
        positions = cache.positions(s)
        x = m.embedding(input_ids=tokens, position_ids=positions)  # [s, b, hidden]
        mask = bank.row_mask(adapter_ids) if bank is not None else None  # [b, n*r], one for every layer
        for i, layer in enumerate(m.decoder.layers):
            corr = bank.for_layer(i, adapter_ids, mask) if bank is not None else NONE
            x = x + absorbed_attention(
                layer.input_layernorm(x), layer.self_attention, self.w_uk[i], self.w_uv[i], cache, i, corr, self.backend
            )
            mlp_out, mlp_bias = (self.moe[i] or layer.mlp)(layer.pre_mlp_layernorm(x))
            x = x + (mlp_out if mlp_bias is None else mlp_out + mlp_bias)
        if valid is None:
            cache.advance(step=s)  # every row s more: no device read
        else:
            cache.advance(cache.lengths + valid.to(cache.lengths))
        tied = m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights else None
        logits, _ = m.output_layer(m.decoder.final_layernorm(x), weight=tied)  # [s, b, vocab]
        return logits.transpose(0, 1)
