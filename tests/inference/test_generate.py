"""The absorbed engine (Megatron-Core modules, latent KV cache) on an absorbed export of the tiny models
(with and without q compression, MoE, all-linear LoRA with B != 0): prefill + decode logits equal the
plain-torch reference latent forward and the unmerged fine-tuned Megatron model; greedy generation equals
the unmerged model's token for token; the cache holds only c_kv + k_rope; the CLI runs."""

import subprocess
import sys

import pytest
import torch
from conftest import batch

from nemo_mla_lora.arch.mla_spec import MLASpec
from nemo_mla_lora.export.pipeline import export, read_export
from nemo_mla_lora.inference.engine import AbsorbedMLAEngine
from nemo_mla_lora.inference.generate import generate
from nemo_mla_lora.models.from_spec import config_from_spec
from nemo_mla_lora.reference import latent


@pytest.fixture(scope="module")
def absorbed(trained):
    out = trained["root"] / "export_for_engine"
    if not out.exists():
        export(trained["root"] / "base", trained["root"] / "adapter", out, fmt="absorbed", progress=False)
    return out


def test_config_from_spec_round_trips(trained):
    assert MLASpec.from_megatron(config_from_spec(trained["spec"])) == trained["spec"]


def test_prefill_and_decode_match_reference_and_unmerged_model(trained, absorbed):
    spec = trained["spec"]
    engine = AbsorbedMLAEngine.load(absorbed)
    tokens, positions, mask = batch(seq=12)
    cache = engine.new_cache(batch=2, max_length=12)
    steps = [engine.forward(tokens[:, :5], cache)] + [engine.forward(tokens[:, i : i + 1], cache) for i in range(5, 12)]
    logits = torch.cat(steps, dim=1)  # [b, s, vocab]
    reference, _ = latent.generate_logits(tokens, read_export(absorbed, "absorbed"), spec, prefill=5)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
    with torch.no_grad():
        unmerged = trained["model"](tokens, positions, mask)
    torch.testing.assert_close(logits, unmerged, atol=2e-5, rtol=0)
    assert cache.length == 12
    assert cache.bytes_per_token() == spec.num_layers * (spec.kv_lora_rank + spec.qk_rope_head_dim) * 4


def test_greedy_generation_equals_the_unmerged_model_token_for_token(trained, absorbed):
    engine = AbsorbedMLAEngine.load(absorbed)
    prompt = batch(seq=6, seed=3)[0]
    tokens, step_logits, cache = generate(engine, prompt, max_new_tokens=8)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):  # the unmerged model re-reads the whole sequence every step
            s = seq.shape[1]
            last = trained["model"](seq, torch.arange(s).expand(2, s), torch.ones(1, 1, s, s, dtype=torch.bool).triu(1))
            seq = torch.cat([seq, last[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(tokens, seq), (tokens, seq)
    assert step_logits.shape == (2, 8, trained["spec"].vocab_size) and cache.length == 6 + 7


def test_sampling_is_seeded_and_the_cache_refuses_overflow(absorbed):
    engine = AbsorbedMLAEngine.load(absorbed)
    prompt = batch(seq=4)[0]
    one = generate(engine, prompt, 5, temperature=0.8, top_k=20, seed=7)[0]
    assert torch.equal(one, generate(engine, prompt, 5, temperature=0.8, top_k=20, seed=7)[0])
    cache = engine.new_cache(batch=2, max_length=4)
    engine.forward(prompt, cache)
    with pytest.raises(ValueError, match="latent cache holds 4 tokens; position 4 requested"):
        engine.forward(prompt[:, :1], cache)


@pytest.mark.parametrize("fmt", ["mcore", "hf"])
def test_engine_absorbs_standard_layouts_at_load(trained, absorbed, fmt):
    """mcore / hf exports (standard linear_kv_up_proj) are absorbed at load: the same latent-cache logits as
    the absorbed export, the same cache size; an adapter-only export is refused."""
    out = trained["root"] / f"export_{fmt}_for_engine"
    if not out.exists():
        export(trained["root"] / "base", trained["root"] / "adapter", out, fmt=fmt, progress=False)
    tokens = batch(seq=9)[0]
    logits = {}
    for name, directory in (("absorbed", absorbed), (fmt, out)):
        engine = AbsorbedMLAEngine.load(directory)
        cache = engine.new_cache(batch=2, max_length=9)
        logits[name] = torch.cat(
            [engine.forward(tokens[:, :4], cache)] + [engine.forward(tokens[:, i : i + 1], cache) for i in range(4, 9)],
            dim=1,
        )
    torch.testing.assert_close(logits[fmt], logits["absorbed"], atol=1e-5, rtol=0)
    peft_out = trained["root"] / "export_hf_peft_for_engine"
    if not peft_out.exists():
        export(trained["root"] / "base", trained["root"] / "adapter", peft_out, fmt="hf_peft", progress=False)
    with pytest.raises(ValueError, match="the engine serves merged exports"):
        AbsorbedMLAEngine.load(peft_out)


def test_engine_builds_megatrons_local_spec_where_transformer_engine_imports(trained, absorbed, monkeypatch):
    """Where Transformer Engine imports, ``config_from_spec`` picks Megatron's TE spec (fused latent norms, grouped
    experts: other state names); the engine asks for the local spec, so an mcore export (local names) still loads
    and decodes as the absorbed export does."""
    from nemo_mla_lora.runtime import te_compat

    out = trained["root"] / "export_mcore_for_engine"
    if not out.exists():
        export(trained["root"] / "base", trained["root"] / "adapter", out, fmt="mcore", progress=False)
    want = AbsorbedMLAEngine.load(absorbed)
    monkeypatch.setattr(te_compat, "apply", lambda: False)  # what it returns where Transformer Engine imports
    engine = AbsorbedMLAEngine.load(out)
    attention = engine.model.decoder.layers[0].self_attention
    assert type(attention.kv_layernorm).__name__ != "IdentityOp", "the latent norm is a module of its own"
    tokens = batch(seq=5)[0]
    got = engine.forward(tokens, engine.new_cache(batch=2, max_length=5))
    torch.testing.assert_close(got, want.forward(tokens, want.new_cache(batch=2, max_length=5)), atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("trained", ["q_lora"], indirect=True)  # the CLI's plumbing; both layouts in-process above
def test_generate_cli_batches_prompts_of_different_lengths(absorbed, tmp_path):
    dump, prompts = tmp_path / "logits.pt", tmp_path / "prompts.txt"
    prompts.write_text("copy: abc =\ncopy: abcdefg =\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nemo_mla_lora.recipes.generate",
            f"checkpoint={absorbed}",
            f"prompt_file={prompts}",
            "max_new_tokens=4",
            f"dump_logits={dump}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "copy: abc =" in proc.stdout and "copy: abcdefg =" in proc.stdout
    assert "2 prompts in one batch" in proc.stdout + proc.stderr and "bytes per token" in proc.stdout + proc.stderr
    records = torch.load(dump)
    engine = AbsorbedMLAEngine.load(absorbed)
    for record, prompt_len in zip(records, (12, 16)):  # BOS + the prompt's bytes
        n = record["logits"].shape[0]
        assert 1 <= n <= 4 and record["tokens"].shape == (prompt_len + n,)
        alone = generate(engine, record["tokens"][None, :prompt_len], n)  # the same prompt, unbatched
        assert torch.equal(alone[0][0], record["tokens"]), record["prompt"]
        torch.testing.assert_close(alone[1][0], record["logits"], atol=2e-5, rtol=0)
