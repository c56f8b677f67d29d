"""Multi-adapter decode on an absorbed base: one batch whose rows use different unmerged adapters (or
none) gives, row for row, the logits of the unmerged Megatron model with that row's adapter, in prefill
and token-by-token decode (fp32, both tiny models). Adapters cover every MLA target, with different
ranks, part-selective K-only kv-up and latent-only kv-down among them; the latent cache stays
kv_lora_rank + qk_rope_head_dim values per token per layer."""

import pytest
import torch
from conftest import batch, perturb_norms_and_bias

from nemo_mla_lora.arch.mla_spec import MLASpec
from nemo_mla_lora.checkpoints import dist_ckpt
from nemo_mla_lora.export.pipeline import export
from nemo_mla_lora.inference.adapters import AdapterBank
from nemo_mla_lora.inference.engine import AbsorbedMLAEngine
from nemo_mla_lora.inference.generate import generate
from nemo_mla_lora.models.tiny import build_model, tiny_mla_config, tiny_mla_noq_config
from nemo_mla_lora.peft import MLALoRA
from nemo_mla_lora.peft.state import randomize_b

ADAPTERS = {  # name -> MLALoRA kwargs (every MLA target across the three)
    "official_r4": dict(placement="nemo_official", dim=4, alpha=8),
    "kv_parts_r2": dict(
        target_modules=["linear_kv_up_proj", "linear_kv_down_proj"],
        dim=2,
        alpha=3,
        parts={"linear_kv_up_proj": "k", "linear_kv_down_proj": "latent"},
    ),
    "proj_r6": dict(target_modules=["linear_proj", "linear_kv_up_proj"], dim=6, alpha=6),
}


def base_model(make):
    torch.manual_seed(0)
    model = build_model(make()).eval()
    perturb_norms_and_bias(model)
    return model


@pytest.fixture(scope="module", params=["q_lora", "no_q_lora"])
def served(request, mcore, tmp_path_factory):
    """An absorbed base export, three adapters on disk, and the live unmerged model of each."""
    make = tiny_mla_config if request.param == "q_lora" else tiny_mla_noq_config
    spec = MLASpec.from_megatron(make())
    root = tmp_path_factory.mktemp(f"multi_{request.param}")
    dist_ckpt.save_base(base_model(make), spec, root / "base")
    export(root / "base", None, root / "absorbed_base", fmt="absorbed", progress=False)
    live = {"none": base_model(make)}
    for seed, (name, kwargs) in enumerate(ADAPTERS.items(), start=1):
        peft = MLALoRA(**kwargs)
        model = peft(base_model(make))
        randomize_b(model, seed=seed)
        dist_ckpt.save_adapter(model, peft, spec, root / name, base_dir=root / "base")
        live[name] = model
    return dict(root=root, spec=spec, live=live)


def test_each_row_equals_the_unmerged_model_with_its_adapter(served):
    root, spec, live = served["root"], served["spec"], served["live"]
    engine = AbsorbedMLAEngine.load(root / "absorbed_base")
    bank = AdapterBank.load(spec, {n: root / n for n in ADAPTERS})
    rows = ["official_r4", "none", "kv_parts_r2", "proj_r6"]
    ids = bank.ids(rows)
    tokens, positions, mask = batch(seq=10, size=len(rows), seed=5)
    cache = engine.new_cache(batch=len(rows), max_length=10)
    steps = [engine.forward(tokens[:, :4], cache, bank, ids)]
    steps += [engine.forward(tokens[:, i : i + 1], cache, bank, ids) for i in range(4, 10)]
    logits = torch.cat(steps, dim=1)  # [b, s, vocab]
    for i, name in enumerate(rows):
        with torch.no_grad():
            expected = live[name](tokens[i : i + 1], positions[i : i + 1], mask)
        torch.testing.assert_close(logits[i : i + 1], expected, atol=2e-5, rtol=0, msg=lambda m, n=name: f"{n}\n{m}")
    assert cache.bytes_per_token() == spec.num_layers * (spec.kv_lora_rank + spec.qk_rope_head_dim) * 4


def test_adapters_change_the_logits_and_none_is_the_base(served):
    root, spec = served["root"], served["spec"]
    engine = AbsorbedMLAEngine.load(root / "absorbed_base")
    bank = AdapterBank.load(spec, {n: root / n for n in ADAPTERS})
    tokens = batch(seq=6, size=1)[0].expand(4, 6)
    names = ["none", *ADAPTERS]
    out = engine.forward(tokens, engine.new_cache(4, 6), bank, bank.ids(names))
    plain = engine.forward(tokens[:1], engine.new_cache(1, 6))
    torch.testing.assert_close(out[:1], plain, atol=1e-6, rtol=0)  # batch 4 vs 1: float sums in another order
    for i in range(1, 4):
        assert (out[i] - out[0]).abs().max() > 1e-3, names[i]


def test_greedy_multi_adapter_generation_matches_one_adapter_at_a_time(served):
    root, spec = served["root"], served["spec"]
    engine = AbsorbedMLAEngine.load(root / "absorbed_base")
    bank = AdapterBank.load(spec, {n: root / n for n in ADAPTERS})
    names = ["proj_r6", "official_r4", "none"]
    prompt = batch(seq=5, size=3, seed=2)[0]
    together = generate(engine, prompt, 6, bank=bank, adapter_ids=bank.ids(names))[0]
    for i, name in enumerate(names):
        alone = generate(engine, prompt[i : i + 1], 6, bank=bank, adapter_ids=bank.ids([name]))[0]
        assert torch.equal(together[i : i + 1], alone), name


def test_bank_refuses_mlp_adapters_and_unknown_names(served, tmp_path):
    root, spec = served["root"], served["spec"]
    peft = MLALoRA(target_modules=["linear_fc1"], dim=2, alpha=2)
    model = peft(base_model(tiny_mla_config if spec.q_lora_rank else tiny_mla_noq_config))
    dist_ckpt.save_adapter(model, peft, spec, tmp_path / "mlp", base_dir=root / "base")
    with pytest.raises(ValueError, match="merge the others into the base first"):
        AdapterBank.load(spec, {"mlp": tmp_path / "mlp"})
    with pytest.raises(ValueError, match="unknown adapters"):
        AdapterBank.load(spec, {"a": root / "official_r4"}).ids(["b"])


@pytest.mark.slow
@pytest.mark.parametrize("served", ["q_lora"], indirect=True)  # the CLI's plumbing; both layouts in-process
def test_generate_cli_serves_an_adapter_on_the_absorbed_base(served, tmp_path):
    import subprocess
    import sys

    root = served["root"]
    dump = tmp_path / "logits.pt"
    args = [
        sys.executable,
        "-m",
        "nemo_mla_lora.recipes.generate",
        f"checkpoint={root / 'absorbed_base'}",
        "prompt='copy: ab ='",
        "max_new_tokens=3",
        f"dump_logits={dump}",
    ]
    proc = subprocess.run(
        args + [f"+adapters.official={root / 'official_r4'}", "adapter=official"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with_adapter = torch.load(dump)[0]["logits"][0]  # the first generated token's logits
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (torch.load(dump)[0]["logits"][0] - with_adapter).abs().max() > 1e-3


def test_ragged_batch_rows_equal_each_request_alone(served):
    """Prompts of different lengths, right-padded into one batch, each with its own adapter: every row's
    generated tokens and step logits equal those of that request run alone (no padding)."""
    root, spec = served["root"], served["spec"]
    engine = AbsorbedMLAEngine.load(root / "absorbed_base")
    bank = AdapterBank.load(spec, {n: root / n for n in ADAPTERS})
    names, lengths = ["kv_parts_r2", "none", "official_r4"], torch.tensor([7, 3, 5])
    prompt = batch(seq=7, size=3, seed=4)[0].clone()
    for i, n in enumerate(lengths.tolist()):
        prompt[i, n:] = 258  # PAD
    tokens, logits, _ = generate(engine, prompt, 5, bank=bank, adapter_ids=bank.ids(names), prompt_lengths=lengths)
    for i, (name, n) in enumerate(zip(names, lengths.tolist())):
        alone, alone_logits, _ = generate(engine, prompt[i : i + 1, :n], 5, bank=bank, adapter_ids=bank.ids([name]))
        assert torch.equal(tokens[i, 7:], alone[0, n:]), name
        torch.testing.assert_close(
            logits[i : i + 1], alone_logits, atol=2e-5, rtol=0, msg=lambda m, x=name: f"{x}\n{m}"
        )
