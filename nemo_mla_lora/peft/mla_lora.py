"""``MLALoRA``: NeMo PEFT for MLA models (NeMo finds it as ``PEFT_STR2CLS["mla_lora"]``).

Use it wherever NeMo takes ``peft=``::

    peft = MLALoRA(placement="nemo_official", dim=32, alpha=32, parts={"linear_kv_up_proj": "k"})
    llm.finetune(model=..., data=..., trainer=..., peft=peft)

or on a bare Megatron-Core model: ``model = peft(model)`` (freezes the base, wraps the targets).

Targets are a named placement (``placements.PLACEMENTS``) or a free-form list: a bare leaf name
(``linear_kv_up_proj``) matches that leaf anywhere; a pattern with ``*``, ``?``, ``[`` or ``.`` is a
shell-style wildcard on the full module name (``*.layers.1.*`` does not match ``layers.11``).
``exclude_modules`` removes matches the same way. Only Megatron linears with a target leaf name
(attention linears, ``linear_fc1``/``linear_fc2`` of dense MLPs, shared and routed experts, and standard
attention's ``linear_qkv`` for the placement study's twin) are wrapped.
A layer index in a pattern is the global one (``layers.60`` is DeepSeek-V3's last layer on whichever
pipeline stage holds it), as in checkpoints: under pipeline parallelism a stage's module names count from
its own first layer, and ``match`` reads them as global first.

Speed (bench/README.md): a wrapped linear runs base + adapter as one autograd function (``lora_fn``)
between Megatron's TP mappings, and Megatron's ``SequentialMLP`` experts become ``grouped_experts.LoRASequentialMLP``:
every expert's A and B in grouped GEMMs, frozen experts through the same path; same parameters, same
state dict, same numbers. Elsewhere (dropout, part-selective rows, expert TP, a row-parallel linear at
TP > 1) the adapter's own path runs.
"""

import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Literal

import torch
from nemo.collections.llm.peft.lora import LoRALinear
from nemo.collections.llm.peft.module_matcher import ModuleMatcher
from nemo.lightning.pytorch.callbacks.peft import PEFT
from torch import nn

from nemo_mla_lora.peft import parts as mla_parts
from nemo_mla_lora.peft import placements, te_grouped
from nemo_mla_lora.peft.adapter import MLALoRAAdapter
from nemo_mla_lora.peft.grouped_experts import group_experts
from nemo_mla_lora.peft.linear_layout import is_linear, is_te_grouped
from nemo_mla_lora.peft.lora_around import lora_fork, lora_onto


class MLALoRALinear(LoRALinear):
    """A Megatron linear with an ``MLALoRAAdapter``: returns (base(x) + delta(x), bias).

    Its state dict keeps the base linear's own keys (``...linear_proj.weight``, as NeMo's wrappers do)
    plus ``...linear_proj.adapter.lora_a`` / ``lora_b``; loading accepts the same keys."""

    def __init__(self, to_wrap: nn.Module, adapter: nn.Module):
        super().__init__(to_wrap, adapter)
        self._register_load_state_dict_pre_hook(_route_base_keys_to_wrapped)
        if adapter.layout.fused_norm:
            # TE LayerNormLinear: the adapter takes the normalised input TE returns, not gathered over the
            # sequence (``return_layernorm_output_gathered`` stays False). TE adds that output's gradient to its
            # input gradient after its own TP reduction (its backward's "residual gradient"), so the adapter's
            # usual column-parallel mappings (copy, or sequence gather) reduce the adapter's part, as for
            # Megatron's ColumnParallelLinear behind a separate norm.
            to_wrap.return_layernorm_output = True

    def forward(self, x, *args, **kwargs):
        if self.adapter.layout.fused_norm:
            out, normed, bias = te_norm_linear_outputs(self.to_wrap, self.to_wrap(x, *args, **kwargs))
            if self.adapter.around(normed, normed=True):  # hs = scale * normed A^T [t, r]; out += hs B^T in place
                _, hs = lora_fork(normed, self.adapter.lora_a, self.adapter.scale)  # the base does not read normed
                return lora_onto(out, hs, self.adapter.lora_b), bias
            return self.adapter.add_to(out, normed), bias
        if not args and not kwargs and self.adapter.fused(self.to_wrap):  # base + adapter: one autograd fn
            return self.adapter.fused_forward(self.to_wrap, x), None
        if self.adapter.around(x):  # TE's linear, the adapter's GEMMs onto its output and input gradient
            x1, hs = lora_fork(x, self.adapter.lora_a, self.adapter.scale)
            out, bias = self.to_wrap(x1, *args, **kwargs)
            return lora_onto(out, hs, self.adapter.lora_b), bias
        if hasattr(self.to_wrap, "finish_output"):  # e.g. KVDownProjection: the delta goes on the shard
            out_local, bias = self.to_wrap.local_forward(x)
            return self.to_wrap.finish_output(self.adapter.add_to(out_local, x)), bias
        out, bias = self.to_wrap(x, *args, **kwargs)  # Megatron linears return (output, bias)
        return self.adapter.add_to(out, x), bias


def te_norm_linear_outputs(to_wrap: nn.Module, result: tuple) -> tuple:
    """What Megatron's ``TELayerNormColumnParallelLinear`` returns with ``return_layernorm_output`` -> (output,
    normalised input, bias): ``((output, normed), None)``, or TE's own ``(output, bias, normed)`` where the
    wrapper hands TE's bias back as it is (``te_return_bias``: a bias with ``skip_bias_add``)."""
    if getattr(to_wrap, "te_return_bias", False):
        out, bias, normed = result
    else:
        (out, normed), bias = result
    return out, normed, bias


WRAPPERS = (MLALoRALinear, te_grouped.TEGroupedLoRALinear)  # what MLALoRA puts around an adapted linear


def _route_base_keys_to_wrapped(state_dict, prefix, *args, **kwargs):
    """``prefix + 'weight'`` -> ``prefix + 'to_wrap.weight'`` (the inverse of AdapterWrapper.state_dict)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        if not rest.startswith(("adapter.", "to_wrap.")):
            state_dict[f"{prefix}to_wrap.{rest}"] = state_dict.pop(key)


def is_adaptable(module: nn.Module, name: str) -> bool:
    """A target leaf on a Megatron or TE linear, or on TE's grouped expert linear (``te_grouped``)."""
    return name in placements.ADAPTABLE and (is_linear(module) or is_te_grouped(module))


def pattern_matches(pattern: str, name: str, full_name: str) -> bool:
    if not any(ch in pattern for ch in "*?[."):
        return name == pattern
    return fnmatchcase(full_name, pattern)


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Full name -> module for every Megatron linear a target could name (wrapped ones included)."""
    out = {}
    for full_name, module in model.named_modules():
        leaf = full_name.rsplit(".", 1)[-1]
        if isinstance(module, WRAPPERS):
            out[full_name] = module.to_wrap
        elif is_adaptable(module, leaf) and not full_name.endswith(".to_wrap"):
            out[full_name] = module
    return out


@dataclass
class MLALoRA(PEFT, ModuleMatcher):
    """MLA-aware LoRA (see the module docstring); ``model = MLALoRA(...)(model)`` freezes the base and wraps targets.

    Args:
        placement: a named placement (``placements.PLACEMENTS``); ignored when ``target_modules`` is non-empty.
        target_modules: leaf names (``linear_kv_up_proj``) or shell wildcards on full module names, global layer
            indices.
        exclude_modules: names or wildcards never adapted.
        parts: leaf -> part for part-selective adapters (``parts.CHOICES``: e.g. ``{"linear_kv_up_proj": "k"}``).
        dim: the LoRA rank r (NeMo's name; HF PEFT's ``r``).
        alpha: the LoRA alpha; the delta is ``alpha / dim * B A x``.
        dropout: dropout on the adapter's input (or output, ``dropout_position="post"``).
        dropout_position: ``pre`` | ``post``.
        lora_A_init_method: ``xavier`` | ``kaiming`` | ``normal`` (NeMo's names) for A.
        lora_B_init_method: ``zero`` (the only one: the model is unchanged at the start).
        lora_dtype: the adapters' dtype (None: the base linear's).
    """

    placement: str | None = "nemo_official"
    target_modules: list = field(default_factory=list)
    exclude_modules: list = field(default_factory=list)
    parts: dict = field(default_factory=dict)
    dim: int = 32
    alpha: float = 32
    dropout: float = 0.0
    dropout_position: Literal["pre", "post"] = "pre"
    lora_A_init_method: str = "xavier"
    lora_B_init_method: str = "zero"
    lora_dtype: torch.dtype | None = None

    def __post_init__(self):
        if not self.target_modules and not self.placement:
            raise ValueError("MLALoRA needs a placement or a non-empty target_modules list")
        if not self.target_modules:
            placements.get(self.placement)
        if self.dim <= 0:
            raise ValueError(f"LoRA dim must be positive, got {self.dim}")
        mla_parts.validate(self.parts)
        self._resolved_targets = None
        self._match_counts = {}

    @property
    def requested_targets(self) -> tuple:
        return tuple(self.target_modules) or placements.get(self.placement).targets

    @property
    def lr_scale(self) -> float:
        """The learning-rate scale this placement suggests (multiply a standard LoRA learning rate)."""
        if self.target_modules:
            return placements.suggested_lr_scale(self.target_modules)
        return placements.get(self.placement).lr_scale

    def resolve(self, model: nn.Module) -> tuple:
        present = {n.rsplit(".", 1)[-1] for n in adaptable_modules(model)}
        targets = self.requested_targets
        if not self.target_modules:
            targets = placements.resolve_for_model(targets, present)
        self._resolved_targets = targets
        return targets

    def match(self, m: nn.Module, name: str | None = None, prefix: str | None = None) -> tuple[str, str] | None:
        if not is_adaptable(m, name):
            return None
        full_name = _global_layer(f"{prefix}.{name}" if prefix else name, getattr(self, "_layer_of", {}).get(id(m)))
        if any(pattern_matches(p, name, full_name) for p in self.exclude_modules):
            return None
        for pattern in self._resolved_targets or self.requested_targets:
            if pattern_matches(pattern, name, full_name):
                self._match_counts[pattern] = self._match_counts.get(pattern, 0) + 1
                return pattern, full_name
        return None

    def transform(self, m: nn.Module, name: str | None = None, prefix: str | None = None) -> nn.Module:
        if self.match(m, name, prefix) is None:
            return m
        if is_te_grouped(m):  # TEGroupedMLP's fc1/fc2: every local expert's adapter in one module
            return te_grouped.wrap(
                m, name, self.dim, self.alpha, self.lora_A_init_method, self.dropout, self.lora_dtype
            )
        adapter = MLALoRAAdapter(
            m,
            dim=self.dim,
            alpha=self.alpha,
            dropout=self.dropout,
            dropout_position=self.dropout_position,
            a_init=self.lora_A_init_method,
            b_init=self.lora_B_init_method,
            row_mask=mla_parts.row_mask(name, self.parts.get(name), m.config),
            glu_fc1=name == "linear_fc1" and m.config.gated_linear_unit,
            dtype=self.lora_dtype,
        )
        return MLALoRALinear(m, adapter)

    def __call__(self, model: nn.Module) -> nn.Module:
        """Freeze the base, wrap every target; a target (or part) that matches nothing is an error."""
        targets = self.resolve(model)
        self._match_counts = {}
        self._layer_of = layer_positions(model)  # module ids: valid while this walk runs
        if hasattr(model, "walk"):  # NeMo's Lightning model / MegatronParallel
            model = super().__call__(model)
        else:  # a bare Megatron-Core module
            from nemo.collections.llm import fn

            model.requires_grad_(False)
            model = fn.walk(model, self.transform)
        self._layer_of = {}
        self._check_matches(model, targets)
        group_experts(model, frozen_too=True)
        return model

    def _check_matches(self, model: nn.Module, targets: tuple) -> None:
        wrapped_leaves = {n.rsplit(".", 1)[-1] for n, _ in _wrapped(model)}
        counts = torch.tensor(
            [self._match_counts.get(t, 0) for t in targets] + [int(leaf in wrapped_leaves) for leaf in self.parts],
            dtype=torch.long,
        )
        pp_group = _pipeline_group()
        if pp_group is not None:  # a target or part may live on another stage only
            torch.distributed.all_reduce(counts, group=pp_group)
        missing = [t for t, c in zip(targets, counts.tolist()) if c == 0]
        unused_parts = [leaf for leaf, c in zip(self.parts, counts.tolist()[len(targets) :]) if c == 0]
        if missing or unused_parts:
            names = sorted(adaptable_modules(model))
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise ValueError(
                f"MLALoRA: targets {missing or unused_parts} matched no module "
                f"(excludes: {self.exclude_modules}). Adaptable leaves in this model: {leaves}; "
                f"e.g. {names[:6]}{' ...' if len(names) > 6 else ''}"
            )


def layer_positions(model: nn.Module) -> dict:
    """{id(module): (global layer index, its name inside the layer)} for every module under a Megatron
    ``TransformerLayer`` (global index: ``layer_number - 1``, whatever the pipeline stage)."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    out = {}
    for layer in model.modules():
        if isinstance(layer, TransformerLayer):
            out.update({id(m): (layer.layer_number - 1, n) for n, m in layer.named_modules() if n})
    return out


def _global_layer(full_name: str, position) -> str:
    """``...layers.<local>.<inner>`` -> ``...layers.<global>.<inner>`` for a module at ``position``
    (``layer_positions``); other names unchanged."""
    if position is None:
        return full_name
    index, inner = position
    return re.sub(rf"(^|\.)(layers\.)\d+(\.{re.escape(inner)})$", rf"\g<1>\g<2>{index}\g<3>", full_name)


def _wrapped(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, WRAPPERS)]


def _pipeline_group():
    from megatron.core import parallel_state

    if (
        torch.distributed.is_initialized()
        and parallel_state.model_parallel_is_initialized()
        and parallel_state.get_pipeline_model_parallel_world_size() > 1
    ):
        return parallel_state.get_pipeline_model_parallel_group()
    return None


def _register_with_nemo() -> None:
    from nemo.collections.llm import peft as nemo_peft

    import nemo_mla_lora

    nemo_mla_lora._register(nemo_peft)


_register_with_nemo()
