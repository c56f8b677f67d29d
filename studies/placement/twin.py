"""A standard-attention twin of an MLA model, for the placement study's baseline.

Everything but the attention is the MLA model's own config (layers, hidden size, heads, the dense MLP and
MoE blocks, router, norms, vocabulary, init): every ``GPTConfig`` field is copied from the MLA model's NeMo
config. The attention is Megatron's standard ``SelfAttention`` (``linear_qkv`` + ``linear_proj``, rotary
positions on the whole head) with the head dim chosen so that its weights match the MLA attention's:

    MLA:   h*q_lora + q_lora*H*(dn+dr) + h*(c+dr) + c*H*(dn+dv) + H*dv*h + q_lora + c
    twin:  h*3*H*d + H*d*h = 4*h*H*d            ->  d = MLA / (4*h*H), rounded to an even number (rotary)

(h hidden, H heads, c kv_lora_rank, dn/dr qk_nope/qk_rope_head_dim, dv v_head_dim; without q compression
the q term is h*H*(dn+dr)). Same data and step budget in the study make the LoRA learning-rate comparison
between the two attention kinds a matched one.
"""

import dataclasses

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

# Fields of the MLA config that do not carry over: the layer spec and what only MLA reads or sets.
NOT_COPIED = {"transformer_layer_spec", "multi_latent_attention", "kv_channels", "qk_layernorm", "num_query_groups"}


def mla_attention_params(config) -> int:
    """Weights of one MLA attention block (linears and the two latent norms)."""
    h, heads = config.hidden_size, config.num_attention_heads
    dn, dr, dv, c = config.qk_head_dim, config.qk_pos_emb_head_dim, config.v_head_dim, config.kv_lora_rank
    q_lora = config.q_lora_rank
    q = h * q_lora + q_lora * heads * (dn + dr) + q_lora if q_lora else h * heads * (dn + dr)
    return q + h * (c + dr) + c * heads * (dn + dv) + heads * dv * h + c


def twin_head_dim(config) -> int:
    """The even standard-attention head dim whose 4*h*H*d weights come closest to the MLA block's."""
    per_dim = 4 * config.hidden_size * config.num_attention_heads
    return max(2, 2 * round(mla_attention_params(config) / per_dim / 2))


def local_block_spec(config, vp_stage=None):
    """Megatron's TE-free decoder block spec (dense/MoE layers per ``moe_layer_freq``)."""
    return get_gpt_decoder_block_spec(config, use_transformer_engine=False, vp_stage=vp_stage)


def standard_attention_twin(mla_config):
    """A NeMo ``GPTConfig`` equal to ``mla_config`` except for standard (multi-head) attention."""
    from nemo.collections.llm import GPTConfig

    names = {f.name for f in dataclasses.fields(GPTConfig) if f.init} - NOT_COPIED
    args = {n: getattr(mla_config, n) for n in names if hasattr(mla_config, n)}
    return GPTConfig(
        **args,
        multi_latent_attention=False,
        kv_channels=twin_head_dim(mla_config),
        num_query_groups=mla_config.num_attention_heads,
        qk_layernorm=False,
        transformer_layer_spec=local_block_spec,
    )
