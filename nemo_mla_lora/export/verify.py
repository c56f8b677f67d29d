"""``verify``: the export's outputs against the unmerged fine-tuned model, computed while the export streams.

What it compares: two fixed prompts of 16 tokens (``fixed_prompts``, seeded) through two models at once,
unit by unit as the export passes them (``units.py``), so neither the base nor the export is read again:

- the unmerged fine-tuned model: the base's tensors as read, LoRA applied as x A^T B^T (reference forward,
  ``reference/model.py``), before the merge; for an HF PEFT adapter, the adapter read again on its own and applied
  as peft defines its merge (``peft_reference.py``: DoRA, replaced modules, embedding LoRA), never the factors the
  merge was given, so that a misread adapter cannot make both sides agree;
- the export: the merged (and, for ``absorbed``, split) tensors exactly as written (every unit is read
  back from the file and checked by the writer), through the latent-cache forward for the
  latent formats (``absorbed``/``mcore``/``nemo``: prefill 8 tokens, then decode the rest one by one, caching
  only c_kv + k_rope) and the reference forward for ``hf``.

Computation is fp32 (fp64 for fp64 checkpoints); each weight is converted when used, so memory holds one
unit and one weight in fp32 (the latent path keeps one layer's attention weights in fp32 while it decodes). Both
runs use the unmerged run's expert choices: with saturated router scores a 1e-16 change can flip a top-k tie (a
1.3e-5 logit difference in float64 on a trained tiny model), which says nothing about the merge; the gate weights
are recomputed from each run's own scores.

Modes: ``full`` (default) runs the prompts through every layer and compares the logits; ``sample`` checks
the chosen ``layers`` each on its own (fixed random hidden states into that layer of both models, its
output compared relative to the layer's own contribution) plus the final norm and output layer, and skips
the rest (their bytes are still read back and compared); ``none`` checks nothing.
"""

import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from nemo_mla_lora.arch.absorb import K_UP, absorb_layer
from nemo_mla_lora.reference.latent import latent_attention_steps
from nemo_mla_lora.reference.model import gated_mlp, mla_attention, moe_experts, moe_routing, rms_norm, rope_cos_sin

# Relative to the largest |logit| of the reference (at least 1): max |diff| <= tolerance * scale.
# fp32: the merged weights' own rounding (~1e-8 per linear) reaches ~3e-5 x max|logit| on the trained tiny
# model (measured 1.6e-4 at max|logit| 3.8), so 1e-4 leaves ~3x room; a wrong merge misses by orders.
DEFAULT_TOLERANCE = {"float32": 1e-4, "float64": 1e-10, "bfloat16": 2e-2, "float16": 5e-3}
MODES = ("full", "sample", "none")
VOCAB_CHUNK = 4096  # output-layer rows converted to fp32 at a time


def prefix(layer: int) -> str:
    return f"decoder.layers.{layer}.self_attention"


def fixed_prompts(vocab_size: int, count: int = 2, length: int = 16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(20261127)
    return torch.randint(0, vocab_size, (count, length), generator=gen)


def check_mode(mode) -> str:
    """``verify`` as given (also true/false) -> one of ``MODES``."""
    if isinstance(mode, str):
        mode = mode.lower()  # Hydra hands a YAML true to a str field as "True"
    mode = {True: "full", False: "none", "true": "full", "false": "none"}.get(mode, mode)
    if mode not in MODES:
        raise ValueError(f"verify={mode!r}; expected one of {MODES} (or true/false)")
    return mode


class Compute(Mapping):
    """A state dict seen in the compute dtype, each tensor converted when read (``memo``: kept after)."""

    def __init__(self, state: dict, dtype, memo: bool = False):
        self.state, self.dtype, self.memo = state, dtype, {} if memo else None

    def __getitem__(self, key):
        if self.memo is not None and key in self.memo:
            return self.memo[key]
        t = self.state[key].to(self.dtype)
        if self.memo is not None:
            self.memo[key] = t
        return t

    def __iter__(self):
        return iter(self.state)

    def __len__(self):
        return len(self.state)


@dataclass
class _Side:
    """One model's activations: x [b, s, hidden] and, inside an MoE layer, its tokens, choice and sum."""

    latent: bool
    x: torch.Tensor = None
    layer_in: torch.Tensor = None
    tokens: torch.Tensor = None
    top: torch.Tensor = None
    weights: torch.Tensor = None
    acc: torch.Tensor = None
    embedding: dict = None  # tied models: the output layer is the embedding
    logits: torch.Tensor = None


class StreamingVerify:
    """Call ``reference(unit, base, factors)`` before a unit is merged and ``export(unit, written)`` after,
    in plan order; then ``report()``. ``reading``: the reference side's own reading of the adapter
    (``peft_reference.open_reference``), used instead of ``factors`` when given."""

    def __init__(
        self,
        spec,
        latent: bool,
        mode: str = "full",
        layers=None,
        tolerance: float | None = None,
        dtype: str = "float32",
        reading=None,
    ):
        self.spec, self.mode, self.dtype, self.reading = spec, check_mode(mode), dtype, reading
        self.layers = set(range(spec.num_layers)) if self.mode == "full" else set(layers or default_layers(spec))
        bad = sorted(i for i in self.layers if not 0 <= i < spec.num_layers)
        if bad:
            raise ValueError(f"verify layers {bad} are not layers of this {spec.num_layers}-layer model")
        self.compute = torch.float64 if dtype == "float64" else torch.float32
        self.tolerance = DEFAULT_TOLERANCE.get(dtype, 1e-4) if tolerance is None else tolerance
        self.tokens = fixed_prompts(spec.vocab_size)
        self.ref, self.exp = _Side(latent=False), _Side(latent=latent)
        self.routing, self.layer_reports, self.seconds, self.cached = {}, {}, 0.0, 0

    def reference(self, unit, base: dict, factors: dict) -> None:
        if self.reading is not None:
            base, factors = self.reading.view(base, self.compute), None
        self._run(self.ref, unit, base, factors)

    def export(self, unit, written: dict) -> None:
        self._run(self.exp, unit, written, None)
        if unit.closes_group and isinstance(unit.group, int) and self.mode == "sample" and unit.group in self.layers:
            self._layer_report(unit.group)

    @torch.no_grad()
    def _run(self, side: _Side, unit, state: dict, adapters) -> None:
        if self.mode == "none" or (isinstance(unit.group, int) and unit.group not in self.layers):
            return
        start = time.perf_counter()
        adapters = {m: (a.to(self.compute), b.to(self.compute), s) for m, (a, b, s) in (adapters or {}).items()}
        getattr(self, f"_{unit.kind}")(side, unit, state, adapters)
        if unit.closes_group and unit.kind == "experts":
            side.x = side.x + side.acc.view(side.x.shape)
            side.tokens = side.top = side.weights = side.acc = None
        self.seconds += time.perf_counter() - start

    def _pre(self, side, unit, state, adapters):
        emb = state["embedding.word_embeddings.weight"]
        side.x = emb[self.tokens].to(self.compute)  # the prompts' rows only
        if "embedding.word_embeddings" in adapters:  # the table's rows W + s B A, B [vocab, r]
            a, b, s = adapters["embedding.word_embeddings"]
            side.x = side.x + s * b[self.tokens] @ a
        if self.spec.tie_word_embeddings:
            side.embedding = {"embedding.word_embeddings.weight": emb}

    def _attention(self, side, unit, state, adapters):
        layer, spec = unit.group, self.spec
        if self.mode == "sample":  # this layer alone, on fixed hidden states
            gen = torch.Generator().manual_seed(1000 + layer)
            side.x = torch.randn(*self.tokens.shape, spec.hidden_size, generator=gen, dtype=self.compute)
        side.layer_in = side.x
        p = f"decoder.layers.{layer}"
        h = rms_norm(side.x, state[f"{p}.input_layernorm.weight"].to(self.compute), spec.norm_eps)
        if side.latent:
            if f"{prefix(layer)}.{K_UP}" not in state:  # standard layout: absorbed as engines load it
                state = absorb_layer(state, prefix(layer), spec)
            out, cache = latent_attention_steps(
                h, Compute(state, self.compute, memo=True), prefix(layer), spec, h.shape[1] // 2
            )
            self.cached += cache.values_per_token()
        else:
            cos, sin = rope_cos_sin(spec, torch.arange(h.shape[1]), self.compute)
            out = mla_attention(h, Compute(state, self.compute), adapters, prefix(layer), spec, cos, sin)
        side.x = side.x + out

    def _mlp(self, side, unit, state, adapters):
        layer, spec = unit.group, self.spec
        p, weights = f"decoder.layers.{layer}", Compute(state, self.compute)
        hidden = rms_norm(side.x, weights[f"{p}.pre_mlp_layernorm.weight"], spec.norm_eps)
        if not spec.is_moe_layer(layer):
            side.x = side.x + gated_mlp(hidden, weights, adapters, f"{p}.mlp")
            return
        side.tokens = hidden.reshape(-1, spec.hidden_size)  # [n, hidden]
        replay = self.routing.get(layer)  # the reference's choice (it runs first)
        side.top, side.weights = moe_routing(side.tokens, weights, f"{p}.mlp", spec, replay)
        self.routing.setdefault(layer, side.top)
        side.acc = torch.zeros_like(side.tokens)
        if spec.shared_expert_ffn_hidden_size:
            side.acc += gated_mlp(side.tokens, weights, adapters, f"{p}.mlp.shared_experts")

    def _experts(self, side, unit, state, adapters):
        moe_experts(
            side.tokens,
            side.top,
            side.weights,
            Compute(state, self.compute),
            adapters,
            f"decoder.layers.{unit.group}.mlp",
            unit.experts,
            side.acc,
        )

    def _post(self, side, unit, state, adapters):
        spec = self.spec
        x = rms_norm(side.x, state["decoder.final_layernorm.weight"].to(self.compute), spec.norm_eps)
        source = side.embedding if spec.tie_word_embeddings else state
        w = source["embedding.word_embeddings.weight" if spec.tie_word_embeddings else "output_layer.weight"]
        side.logits = torch.cat(
            [x @ w[i : i + VOCAB_CHUNK].to(self.compute).T for i in range(0, w.shape[0], VOCAB_CHUNK)], dim=-1
        )  # [b, s, vocab]
        if "output_layer" in adapters:
            a, b, s = adapters["output_layer"]
            side.logits = side.logits + s * (x @ a.T) @ b.T

    def _layer_report(self, layer: int) -> None:
        own = (self.ref.x - self.ref.layer_in).abs().max().item()  # the layer's own contribution
        diff = (self.exp.x - self.ref.x).abs().max().item()
        scale = max(own, 1e-6)
        self.layer_reports[layer] = {
            "max_abs_diff": diff,
            "max_abs_contribution": own,
            "bound": self.tolerance * scale,
            "passed": diff <= self.tolerance * scale,
        }

    def report(self) -> dict:
        if self.mode == "none":
            return {"mode": "none", "passed": True}
        out = _report(self.exp.logits, self.ref.logits, self.tokens, self.tolerance)
        out.update(
            mode=self.mode,
            seconds=round(self.seconds, 2),
            compared="logits of the unmerged model (base + LoRA) vs the export as written, "
            + ("latent-cache prefill + decode" if self.exp.latent else "full forward"),
            cached_values_per_token=self.cached if self.exp.latent else None,
        )
        if self.mode == "sample":
            out["layers"] = {str(k): v for k, v in sorted(self.layer_reports.items())}
            out["passed"] = out["passed"] and all(v["passed"] for v in self.layer_reports.values())
        return out


def default_layers(spec) -> list[int]:
    """``sample``'s layers when none are named: the first, the first MoE layer, the last."""
    moe = [i for i in range(spec.num_layers) if spec.is_moe_layer(i)]
    return sorted({0, spec.num_layers - 1, *moe[:1]})


def _report(logits, reference, tokens, tol) -> dict:
    diff = (logits - reference).abs()
    scale = max(1.0, reference.abs().max().item())
    return {
        "max_abs_logit_diff": diff.max().item(),
        "mean_abs_logit_diff": diff.mean().item(),
        "max_abs_logit": scale,
        "tolerance": tol,
        "bound": tol * scale,
        "passed": bool(diff.max().item() <= tol * scale),
        "prompts": list(tokens.shape),
    }
