"""Megatron-Core's own local spec, through ``models.megatron_release``, loads our ``mcore`` export of a real HF
checkpoint at default strictness and gives transformers' logits (with and without q compression).

On Megatron-Core 0.15 (this machine) the spec needs only the core-attention fix; on 0.19 (the GPU machine,
``bench/real_size_check.py``) it also needs the q-side fix for models without q compression.
"""

import pytest
import torch
from support.hf import MAKER, hf_model, prompt_tokens

from nemo_mla_lora.checkpoints import dist_ckpt
from nemo_mla_lora.export.pipeline import export
from nemo_mla_lora.models import megatron_release
from nemo_mla_lora.models.from_spec import CPU_SAFE, config_from_spec

VARIANTS = ["v2_lite_greedy_yarn_noq", "v3_noaux_yarn_q"]  # latent norm eps = rms_norm_eps in both (1e-6)


def stock_model(spec):
    from megatron.core.models.gpt import GPTModel

    config = config_from_spec(spec, torch.float32, **CPU_SAFE)
    block = megatron_release.mla_decoder_block_spec(config, use_transformer_engine=False)
    model = GPTModel(
        config,
        transformer_layer_spec=block,
        vocab_size=spec.vocab_size,
        max_sequence_length=spec.max_positions,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
    )
    return model.eval(), block


@pytest.mark.parametrize("variant", VARIANTS)
def test_stock_local_spec_loads_the_export_and_matches_transformers(mcore, tmp_path, variant):
    from megatron.core import dist_checkpointing

    hf_dir = MAKER.make(variant, tmp_path / variant)
    out = tmp_path / "mcore"
    export(hf_dir, None, out, fmt="mcore", names="local", progress=False)
    spec = dist_ckpt.read_spec(out)
    model, block = stock_model(spec)
    attention = block.layer_specs[0].submodules.self_attention
    assert megatron_release.core_attention_takes_mla_channels(attention.submodules.core_attention)
    assert megatron_release.needs_q_proj_fix(model.config) == (
        megatron_release.release_fuses_q_norm() and spec.q_lora_rank is None
    )
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(out)))  # default strictness
    tokens = prompt_tokens(spec.vocab_size)
    b, s = tokens.shape
    mask = torch.ones(1, 1, s, s, dtype=torch.bool).triu(1)
    with torch.no_grad():
        ours = model(tokens, torch.arange(s).expand(b, s), mask)
        reference = hf_model(hf_dir)(tokens).logits
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)


def test_q_side_fix_is_idle_where_the_release_builds_deepseeks_q(mcore):
    """A model with q compression never gets the q-side swap; without it, only a release with the resolver."""
    from types import SimpleNamespace

    with_q = SimpleNamespace(q_lora_rank=48, qk_layernorm=True)
    without_q = SimpleNamespace(q_lora_rank=None, qk_layernorm=True)
    assert not megatron_release.needs_q_proj_fix(with_q)
    assert megatron_release.needs_q_proj_fix(without_q) == megatron_release.release_fuses_q_norm()
