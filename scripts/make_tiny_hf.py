"""Tiny HF checkpoints of every DeepSeek-family variant, made with transformers' own classes (random weights).

    python scripts/make_tiny_hf.py OUT_DIR [VARIANT ...]      # default: all of VARIANTS

Each OUT_DIR/<variant>/ holds what a real checkpoint holds: config.json, model.safetensors
(``save_pretrained``) and a tokenizer (byte-level: 256 bytes, then <s> </s> <pad>; ``PreTrainedTokenizerFast``).
Norm weights and V3's ``e_score_correction_bias`` are randomised so that a misread one shows in the logits.
Dimensions are small and distinct (hidden 64, 4 heads, kv_lora_rank 32, nope 16, rope 8, v 24).
"""

import sys
from pathlib import Path

import torch

COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=24,
    vocab_size=262,
    first_k_dense_replace=1,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=258,
    tie_word_embeddings=False,
)
YARN = {
    "type": "yarn",
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}

# name -> (model_type, config fields beyond COMMON). Covers V2 softmax greedy and group-limited, V3 noaux_tc,
# plain RoPE and YaRN (mscale = and != mscale_all_dim), with and without q compression, tied embeddings.
VARIANTS = {
    "v2_lite_greedy_yarn_noq": (
        "deepseek_v2",
        dict(
            q_lora_rank=None,
            n_routed_experts=6,
            n_shared_experts=2,
            num_experts_per_tok=2,
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
            rope_scaling=YARN,
        ),
    ),
    "v2_group_limited_rope_q": (
        "deepseek_v2",
        dict(
            q_lora_rank=48,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=4,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            norm_topk_prob=False,
            routed_scaling_factor=16.0,
            rope_scaling=None,
            rope_theta=20000.0,
        ),
    ),
    "v3_noaux_yarn_q": (
        "deepseek_v3",
        dict(
            q_lora_rank=48,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            rope_scaling=dict(YARN, mscale=1.0, mscale_all_dim=0.8),
        ),
    ),
    "v3_noaux_rope_noq": (
        "deepseek_v3",
        dict(
            q_lora_rank=None,
            n_routed_experts=6,
            n_shared_experts=2,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.446,
            rope_scaling=None,
            rope_theta=50000.0,
            rms_norm_eps=1e-5,
        ),
    ),
    "v3_tied_yarn_q": (
        "deepseek_v3",
        dict(
            q_lora_rank=40,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=1.0,
            rope_scaling=YARN,
            tie_word_embeddings=True,
        ),
    ),
}


def hf_config(variant: str):
    from transformers import DeepseekV2Config, DeepseekV3Config

    model_type, fields = VARIANTS[variant]
    cls = DeepseekV2Config if model_type == "deepseek_v2" else DeepseekV3Config
    config = cls(**dict(COMMON, **fields))
    if model_type == "deepseek_v2":  # transformers' V2 config does not store it; DeepSeek's config.json does
        config.scoring_func = "softmax"
    return config


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])  # ids 256, 257, 258
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 256)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@torch.no_grad()
def make(variant: str, directory, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = hf_config(variant)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.2 * torch.randn_like(p))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.05 * torch.randn_like(b))
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer = byte_tokenizer()
    assert tokenizer.bos_token_id == config.bos_token_id and tokenizer.eos_token_id == config.eos_token_id
    tokenizer.save_pretrained(directory)
    return directory


def main(argv):
    if not argv:
        sys.exit(__doc__)
    out, names = Path(argv[0]), argv[1:] or list(VARIANTS)
    for name in names:
        print(make(name, out / name))


if __name__ == "__main__":
    main(sys.argv[1:])
