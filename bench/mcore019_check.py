"""Current Megatron-Core (0.19.x) takes our default export as it is: run on the GPU machine, no NeMo (the consumer
builds its own model from the checkpoint's mla_spec.json; of this package it imports only
``nemo_mla_lora.models.megatron_release``, the spec correction for the installed release, which imports nothing else).

    python3 bench/mcore019_check.py EXPORT_DIR EXPECTED.pt OUT.json

1. Megatron's GPTModel with MLA + MoE from its own local layer spec through ``megatron_release.mla_decoder_block_spec``
   (its DotProductAttention given the k_channels/v_channels MLA passes: 0.19's local spec cannot be built without
   it; models without q compression: no q norm).
2. ``dist_checkpointing.load(model.sharded_state_dict(), EXPORT_DIR)`` with default strictness.
3. Logits on EXPECTED's tokens against the unmerged fine-tuned model's (computed on the CPU machine from
   base + adapter by bench/mcore019_expected.py).
4. Greedy generation with Megatron's own ``StaticInferenceEngine(legacy=True)`` against EXPECTED's tokens
   from ``recipes.generate`` (our latent-cache engine).
"""

import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F


def build_model(spec: dict, use_te: bool = False, dtype=torch.float32, block_spec=None):
    """Megatron's GPTModel for ``spec`` (mla_spec.json) on its own layer spec (TE or local), corrected for the
    installed release by ``megatron_release`` (``block_spec(config, use_transformer_engine)`` builds another); on
    the GPU, in eval mode."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from nemo_mla_lora.models.megatron_release import mla_decoder_block_spec

    s = spec
    moe = s["num_experts"] > 0
    config = MLATransformerConfig(
        num_layers=s["num_layers"], hidden_size=s["hidden_size"], num_attention_heads=s["num_heads"],
        ffn_hidden_size=s["ffn_hidden_size"], q_lora_rank=s["q_lora_rank"], kv_lora_rank=s["kv_lora_rank"],
        qk_head_dim=s["qk_nope_head_dim"], qk_pos_emb_head_dim=s["qk_rope_head_dim"], v_head_dim=s["v_head_dim"],
        rope_type=s["rope_type"], rotary_base=s["rope_base"], rotary_scaling_factor=s["rope_factor"],
        original_max_position_embeddings=s["rope_original_max_positions"], beta_fast=s["rope_beta_fast"],
        beta_slow=s["rope_beta_slow"], mscale=s["rope_mscale"], mscale_all_dim=s["rope_mscale_all_dim"],
        normalization="RMSNorm", layernorm_epsilon=s["norm_eps"], gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, qk_layernorm=True, multi_latent_attention=True, hidden_dropout=0.0,
        attention_dropout=0.0, params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=False,
        attention_softmax_in_fp32=True,
        apply_rope_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False, num_moe_experts=s["num_experts"] or None,
        moe_ffn_hidden_size=s["moe_ffn_hidden_size"] if moe else None,
        moe_shared_expert_intermediate_size=s["shared_expert_ffn_hidden_size"] or None,
        moe_router_topk=s["moe_topk"] if moe else 2,
        moe_router_num_groups=s["moe_num_groups"] if moe and s["moe_num_groups"] > 1 else None,
        moe_router_group_topk=s["moe_group_topk"] if moe and s["moe_num_groups"] > 1 else None,
        moe_router_topk_scaling_factor=s["moe_scaling_factor"] if moe else None,
        moe_router_score_function=s.get("moe_score_function", "sigmoid"),
        moe_router_enable_expert_bias=moe and s.get("moe_topk_method", "noaux_tc") == "noaux_tc",
        moe_router_pre_softmax=s.get("moe_score_function") == "softmax", moe_router_dtype="fp32",
        moe_layer_freq=list(s["moe_layer_pattern"]) if moe else 1, moe_grouped_gemm=use_te and moe,
        moe_token_dispatcher_type="allgather", moe_aux_loss_coeff=0.0, moe_permute_fusion=False,
        moe_shared_expert_overlap=False,
    )
    block = (block_spec or mla_decoder_block_spec)(config, use_transformer_engine=use_te)
    positions = s.get("max_position_embeddings") or s["rope_original_max_positions"]
    model = GPTModel(config, transformer_layer_spec=block, vocab_size=s["vocab_size"],
                     max_sequence_length=positions, position_embedding_type="rope",
                     share_embeddings_and_output_weights=s.get("tie_word_embeddings", False))
    return model.cuda().eval()


class ByteTokenizer:  # the tiny model's: ids 0..255 bytes, 256 BOS, 257 EOS
    bos, eod, vocab_size = 256, 257, 259

    def tokenize(self, text):
        return list(text.encode())

    def detokenize(self, ids, **kwargs):
        return bytes(int(i) for i in ids if int(i) < 256).decode(errors="replace")

    def offsets(self, ids, text):
        return list(range(len(ids)))


def engine_greedy(model, prompt_ids, steps):
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.inference.engines import StaticInferenceEngine
    from megatron.core.inference.inference_request import InferenceRequest
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
    from megatron.core.inference.sampling_params import SamplingParams
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController)

    context = StaticInferenceContext(max_batch_size=len(prompt_ids), max_sequence_length=64)
    controller = TextGenerationController(GPTInferenceWrapper(model, context), ByteTokenizer())
    engine = StaticInferenceEngine(controller, max_batch_size=len(prompt_ids), legacy=True)
    params = SamplingParams(temperature=1.0, top_k=1, num_tokens_to_generate=steps, return_log_probs=False)
    tok = ByteTokenizer()
    requests = [InferenceRequest(request_id=str(i), prompt=tok.detokenize(p), prompt_tokens=list(p),
                                 sampling_params=params) for i, p in enumerate(prompt_ids)]
    done = engine.generate(inference_requests=requests)
    return [[int(t) for t in r.generated_tokens] for r in done]


def init_one_gpu(port: int) -> None:
    """One process on GPU 0: torch.distributed (NCCL) and Megatron's model-parallel groups of size 1, seeded."""
    from megatron.core import parallel_state, tensor_parallel

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1)


@torch.no_grad()
def model_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """The model's logits [b, s, vocab] (float32, on the CPU) for ``tokens`` [b, s] run on its GPU, causal."""
    b, s = tokens.shape
    tokens = tokens.cuda()
    mask = torch.ones(1, 1, s, s, dtype=torch.bool, device="cuda").triu(1)  # True = masked, Megatron's convention
    return model(tokens, torch.arange(s, device="cuda").expand(b, s), mask).float().cpu()


def main(export_dir, expected_path, out_path):
    import megatron.core
    from megatron.core import dist_checkpointing

    init_one_gpu(29517)
    report = {"megatron_core": megatron.core.__version__, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0), "export": export_dir}
    spec = json.load(open(os.path.join(export_dir, "mla_spec.json")))
    expected = torch.load(expected_path, weights_only=True)
    model = build_model(spec)
    loaded = dist_checkpointing.load(model.sharded_state_dict(), export_dir)  # default strictness
    model.load_state_dict(loaded)
    report["default_strictness_load"] = "ok"
    logits = model_logits(model, expected["tokens"])
    diff = (logits - expected["unmerged_logits"]).abs()
    report.update(max_abs_logit_diff_vs_unmerged=diff.max().item(),
                  max_abs_logit=expected["unmerged_logits"].abs().max().item(),
                  argmax_equal=bool(torch.equal(logits.argmax(-1), expected["unmerged_logits"].argmax(-1))))
    try:
        ours = [[t for t in g if t != ByteTokenizer.eod] for g in expected["greedy"]]  # Megatron leaves EOS out
        generated = engine_greedy(model, expected["prompts"], max(len(g) for g in expected["greedy"]))
        report["static_engine_tokens"] = generated
        report["recipes_generate_tokens_before_eos"] = ours
        report["greedy_tokens_equal"] = generated == ours
    except Exception:
        report["static_engine_error"] = traceback.format_exc()[-3000:]
    json.dump(report, open(out_path, "w"), indent=2)
    print(json.dumps({k: v for k, v in report.items() if k != "static_engine_error"}, indent=2))
    if "static_engine_error" in report:
        print(report["static_engine_error"])


if __name__ == "__main__":
    main(*sys.argv[1:4])
