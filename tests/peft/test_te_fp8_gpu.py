"""On a GPU with Transformer Engine: LoRA over a frozen base held and computed in FP8 (``model.fp8``), against the
same LoRA over the bf16 base.

A DeepSeek-V3-family model with FP8-friendly widths (every GEMM dimension a multiple of 16) is written as an HF
directory, streamed by ``hf_load`` into Megatron's TE model twice: bf16, and with TE's current-scaling FP8 recipe
and ``fp8_param`` (the frozen linears' weights are TE quantized tensors: the load goes through one bf16 copy per
parameter). Same adapters (B != 0) on both. Checked: the FP8 model's linears really hold FP8; logits and adapter
gradients within FP8's precision of the bf16 model's; ten AdamW steps on the adapters give the same loss curve within
the same kind of bound. Measured differences go to ``$TE_GPU_RECORD`` (bench/README quotes them). Skipped on CPU."""

import json
from pathlib import Path

import pytest
import torch
from conftest import batch
from support.bench import bench_module
from test_te_gpu import _te_and_cuda, record

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _te_and_cuda(), reason="needs CUDA and Transformer Engine")]

ROOT = Path(__file__).resolve().parents[2]
FP8_FRIENDLY = dict(
    hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=3, first_k_dense_replace=1,
    n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64,
    qk_rope_head_dim=64, v_head_dim=64, vocab_size=512, max_position_embeddings=512, rope_scaling=None,
)  # fmt: skip
# Measured on one H100 (2026-12-07, tensorwise; seeded: two runs gave the same figures): the 10-step loss curves
# agree within 0.34% (LOSS_BOUND 2%). The largest single-element differences are not a precision measure here: E4M3
# moves the router's scores enough to change a token's top-2 experts, and such a token's output moves by whole
# expert outputs (max-element logits 0.42, worst adapter gradient 1.86 of its largest element). The bounds are on
# norms (||fp8 - bf16|| / ||bf16||, over the logits and over all adapter gradients together): measured 0.196
# (logits) and 0.199 (adapter gradients), bounded at 1.5x that.
LOGITS_BOUND, GRAD_BOUND, LOSS_BOUND = 0.3, 0.3, 0.02


def _norm_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def _hf_dir(tmp_path: Path) -> Path:
    real_size = bench_module("real_size")
    raw = json.loads((ROOT / "nemo_mla_lora" / "models" / "configs" / "deepseek_v3.json").read_text())
    raw.update(FP8_FRIENDLY)
    raw.pop("quantization_config", None)
    config, tokenizer = tmp_path / "config.json", tmp_path / "tokenizer"
    config.write_text(json.dumps(raw))
    tokenizer.mkdir()
    out = tmp_path / "base"
    real_size.main(["write", "--out", str(out), "--tokenizer", str(tokenizer), "--config", str(config)])
    return out


def _model(directory: Path, fp8: bool):
    from nemo_mla_lora.arch.hf_config import spec_from_hf
    from nemo_mla_lora.models.from_spec import config_from_spec
    from nemo_mla_lora.models.layer_spec import te_mla_block_spec
    from nemo_mla_lora.models.tiny import build_model
    from nemo_mla_lora.peft import MLALoRA
    from nemo_mla_lora.peft.state import randomize_b
    from nemo_mla_lora.training.hf_load import is_quantized, load_hf_checkpoint

    spec = spec_from_hf(json.loads((directory / "config.json").read_text()))
    extra = dict(fp8="hybrid", fp8_recipe="tensorwise", fp8_param=True) if fp8 else {}
    config = config_from_spec(
        spec, torch.bfloat16, transformer_layer_spec=te_mla_block_spec, moe_grouped_gemm=True, **extra
    )
    torch.manual_seed(0)
    model = build_model(config).cuda()
    load_hf_checkpoint([model], directory)
    quantized = [n for n, p in model.named_parameters() if is_quantized(p)]
    model = MLALoRA(placement="all_linear", dim=8, alpha=16)(model)
    randomize_b(model, std=0.02, seed=3)
    return model, quantized


def _adapter_params(model) -> dict:
    return {n: p for n, p in model.named_parameters() if ".adapter." in n}


def _loss(model, tokens, positions, mask):
    logits = model(tokens, positions, mask)  # [b, s, vocab]
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


def test_lora_over_an_fp8_base_follows_the_bf16_base(mcore, tmp_path):
    directory = _hf_dir(tmp_path)
    tokens, positions, mask = (t.cuda() for t in batch(seq=64, size=2, vocab=512))
    runs = {}
    for kind in ("bf16", "fp8"):
        model, quantized = _model(directory, fp8=kind == "fp8")
        logits = model(tokens, positions, mask)
        logits.float().square().mean().backward()
        grads = {n: p.grad.detach().float().clone() for n, p in _adapter_params(model).items()}
        params = list(_adapter_params(model).values())
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        losses = []
        for _ in range(10):
            optimizer.zero_grad()
            loss = _loss(model, tokens, positions, mask)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        runs[kind] = dict(logits=logits.detach().float(), grads=grads, losses=losses, quantized=quantized)
        del model, optimizer
        torch.cuda.empty_cache()
    bf16, fp8 = runs["bf16"], runs["fp8"]
    assert not bf16["quantized"] and any("linear_kv_down_proj" in n for n in fp8["quantized"]), fp8["quantized"][:5]
    logits_rel = _norm_rel(fp8["logits"], bf16["logits"])
    names = sorted(bf16["grads"])
    grad_rel = _norm_rel(*(torch.cat([run["grads"][n].flatten() for n in names]) for run in (fp8, bf16)))
    moved = {n: g for n, g in bf16["grads"].items() if g.abs().max() > 0}  # an expert without tokens: none
    loss_rel = max(abs(a - b) / b for a, b in zip(fp8["losses"], bf16["losses"]))
    record(
        "fp8_base",
        recipe="tensorwise",
        quantized_parameters=len(fp8["quantized"]),
        logits_norm_rel=logits_rel,
        adapter_grads_norm_rel=grad_rel,
        logits_max_rel=((fp8["logits"] - bf16["logits"]).abs().max() / bf16["logits"].abs().max()).item(),
        worst_adapter_grad_max_rel=max(
            ((fp8["grads"][n] - g).abs().max() / g.abs().max()).item() for n, g in moved.items()
        ),
        loss_rel=loss_rel,
        losses_bf16=bf16["losses"],
        losses_fp8=fp8["losses"],
    )
    assert bf16["losses"][-1] < bf16["losses"][0] and fp8["losses"][-1] < fp8["losses"][0]
    assert logits_rel <= LOGITS_BOUND and grad_rel <= GRAD_BOUND and loss_rel <= LOSS_BOUND
