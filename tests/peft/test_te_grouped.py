"""``peft/te_grouped.py``: LoRA on TE's grouped expert linears, checked without TE.

- Numerics: the wrapper's output and every gradient against the per-expert equations in float64, around a
  plain-torch grouped base with TE's call signature (``base(x, m_splits) -> (y, None)``), one expert empty.
- Checkpoint: Megatron's own ``TEGroupedMLP.sharded_state_dict`` over the wrapped linears gives the same
  adapter ShardedTensors (keys, global shapes and offsets, replica ids, values; fc1's B through the SwiGLU
  factory) as Megatron's ``SequentialMLP`` gives for MLALoRA's per-expert adapters on the same model.
The TE module itself is covered by the GPU run (bench/run_gpu.sh)."""

import pytest
import torch
from support.ops import op_counts
from torch import nn

from nemo_mla_lora.peft.te_grouped import GroupedLoRAAdapter, TEGroupedLoRALinear


class _GroupedBase(nn.Module):
    """Frozen per-expert weights called as TE's grouped linear is: (x [t, in], m_splits) -> (y [t, out], None)."""

    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.weights = nn.Parameter(weights, requires_grad=False)  # [E, out, in]

    def forward(self, x, m_splits):
        return torch.cat([xe @ w.T for xe, w in zip(x.split(list(m_splits)), self.weights)]), None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return {}


def _ddp_steps(dtype, main_dtype, stack_each: bool = False):
    """Two micro-batches through ``TEGroupedLoRALinear`` under Megatron's DDP hooks (conftest); ``stack_each``:
    the factors stacked by plain ``torch.stack`` (their gradients returned per expert, as before). Returns the
    adapter, main_grad before, the bucket, the float64 reference adapter's gradients, and the op counts."""
    from conftest import megatron_ddp_hooks

    torch.manual_seed(1)
    experts, din, dout, r, splits = 3, 12, 10, 4, [2, 0, 5]
    base = _GroupedBase(torch.randn(experts, dout, din, dtype=torch.float64).to(dtype))
    adapter = GroupedLoRAAdapter(experts, din, dout, dim=r, alpha=8.0, dtype=dtype)
    with torch.no_grad():
        for e in range(experts):
            adapter.expert(e)[1].normal_()
    ref = GroupedLoRAAdapter(experts, din, dout, dim=r, alpha=8.0, dtype=torch.float64)
    ref.load_state_dict({k: v.double() for k, v in adapter.state_dict().items()})
    before, (_accs, bucket) = megatron_ddp_hooks(list(adapter.parameters()), main_dtype)
    if stack_each:
        adapter.stacked = lambda: tuple(torch.stack(f) for f in zip(*map(adapter.expert, range(experts))))
    xs = [torch.randn(sum(splits), din, dtype=torch.float64) for _ in range(2)]
    gys = [torch.randn(sum(splits), dout, dtype=torch.float64) for _ in range(2)]

    def steps(module, cast):
        for x, gy in zip(xs, gys):
            TEGroupedLoRALinear(base if cast is dtype else _GroupedBase(base.weights.double()), module)(
                x.to(cast).requires_grad_(), splits
            )[0].backward(gy.to(cast))

    ops = op_counts(lambda: steps(adapter, dtype), top_level=True)
    steps(ref, torch.float64)
    return adapter, before, bucket, ref, ops


@pytest.mark.parametrize("dtype,main_dtype", [(torch.float64, torch.float64), (torch.bfloat16, torch.float32)])
def test_expert_factor_gradients_go_into_megatrons_main_grad(dtype, main_dtype):
    """Under Megatron's DDP hook, two micro-batches: each expert's factors' ``main_grad`` holds what it held plus
    both gradients (float64 equations), ``.grad`` is None, the flag set, every factor reported ready both times."""
    adapter, before, bucket, ref, _ = _ddp_steps(dtype, main_dtype)
    params, refs = list(adapter.parameters()), list(ref.parameters())
    assert len(bucket.ready) == 2 * len(params) == 2 * 6
    tol = 1e-12 if dtype == torch.float64 else 0.1
    for p, start, r in zip(params, before, refs):
        assert p.grad is None and p.grad_added_to_main_grad and p.main_grad.dtype == main_dtype
        torch.testing.assert_close(p.main_grad.double(), start.double() + r.grad, rtol=0.02, atol=tol)


def test_expert_factor_gradients_leave_ddps_hooks_nothing_to_add():
    """Counted on the CPU: stacked by ``torch.stack`` the factors' gradients reach DDP's hooks one per expert (an
    ``add_`` each); through ``StackFactors``, one multi-tensor add per factor and micro-batch instead."""
    *_, fused = _ddp_steps(torch.float64, torch.float64)
    *_, each = _ddp_steps(torch.float64, torch.float64, stack_each=True)
    assert each.get("aten::add_", 0) - fused.get("aten::add_", 0) == 2 * 6, (each, fused)  # (the rest: the deltas)
    assert fused.get("aten::_foreach_add_", 0) == 2 * 2, fused


def test_grouped_lora_matches_the_equations_in_float64():
    torch.manual_seed(0)
    experts, din, dout, r, splits = 4, 12, 10, 3, [5, 0, 7, 2]
    base = _GroupedBase(torch.randn(experts, dout, din, dtype=torch.float64))
    adapter = GroupedLoRAAdapter(experts, din, dout, dim=r, alpha=6.0, dtype=torch.float64)
    with torch.no_grad():
        for e in range(experts):
            adapter.expert(e)[1].normal_()
    x = torch.randn(sum(splits), din, dtype=torch.float64, requires_grad=True)
    y, bias = TEGroupedLoRALinear(base, adapter)(x, splits)
    gy = torch.randn_like(y)
    y.backward(gy)

    xr = x.detach().clone().requires_grad_(True)
    a, b = (t.detach().clone().requires_grad_(True) for t in adapter.stacked())
    ref = torch.cat(
        [
            xe @ w.T + 2.0 * (xe @ a[e].T) @ b[e].T  # scale = alpha / r = 2
            for e, (xe, w) in enumerate(zip(xr.split(splits), base.weights))
        ]
    )
    ref.backward(gy)
    assert bias is None
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=1e-12)
    for e in range(experts):
        ga, gb = (p.grad for p in adapter.expert(e))
        torch.testing.assert_close(ga, a.grad[e], rtol=0, atol=1e-12)
        torch.testing.assert_close(gb, b.grad[e], rtol=0, atol=1e-12)
    assert sum(p.grad.abs().sum() for p in adapter.expert(1)) == 0  # no tokens


def _flat(sharded: dict) -> dict:
    """Adapter entries, factories built: (key, global offset) -> (global shape, replica id, data)."""
    out = {}
    for value in sharded.values():
        if ".adapter." not in value.key:
            continue
        built = value.build() if hasattr(value, "build") else {"": value}
        for t in built.values() if isinstance(built, dict) else built:
            out[(t.key, t.global_offset)] = (t.global_shape, t.replica_id, t.data.detach().clone())
    return out


@pytest.mark.parametrize("singleton", [False, True])
def test_sharded_adapters_match_sequential_experts(mcore, singleton):
    from megatron.core.transformer.moe.experts import TEGroupedMLP

    from nemo_mla_lora.models.tiny import build_model, tiny_mla_config
    from nemo_mla_lora.peft import MLALoRA
    from nemo_mla_lora.peft.state import randomize_b

    config = tiny_mla_config()
    model = MLALoRA(placement="all_linear", dim=4, alpha=8)(build_model(config))
    randomize_b(model)
    layer = next(i for i, block in enumerate(model.decoder.layers) if hasattr(block.mlp, "experts"))
    experts = model.decoder.layers[layer].mlp.experts
    prefix, metadata = f"decoder.layers.{layer}.mlp.experts.", {"singleton_local_shards": singleton}
    sequential = _flat(experts.sharded_state_dict(prefix, (), metadata))

    grouped = TEGroupedMLP.__new__(TEGroupedMLP)  # Megatron's own sharded_state_dict over our wrappers
    nn.Module.__init__(grouped)
    grouped.config, grouped.num_local_experts = config, len(experts.local_experts)
    grouped.ep_group = type("Group", (), {"size": lambda self: 1, "rank": lambda self: 0})()
    for name in ("linear_fc1", "linear_fc2"):
        linears = [getattr(e.mlp if hasattr(e, "mlp") else e, name) for e in experts.local_experts]
        a = torch.stack([m.adapter.lora_a.detach() for m in linears])
        b = torch.stack([m.adapter.lora_b.detach() for m in linears])
        adapter = GroupedLoRAAdapter(
            len(linears),
            a.shape[2],
            b.shape[1],
            dim=4,
            alpha=8,
            kind="row" if name == "linear_fc2" else "column",
            glu_fc1=name == "linear_fc1" and config.gated_linear_unit,
        )
        with torch.no_grad():
            for e in range(len(linears)):
                adapter.expert(e)[0].copy_(a[e])
                adapter.expert(e)[1].copy_(b[e])
        setattr(grouped, name, TEGroupedLoRALinear(_GroupedBase(torch.zeros(1, 1, 1)), adapter))
    te = _flat(TEGroupedMLP.sharded_state_dict(grouped, prefix, (), metadata))
    _check_factors(model, layer, grouped)

    assert sequential and set(te) == set(sequential), sorted(set(te) ^ set(sequential))[:6]
    _check_reload(grouped.linear_fc2.adapter)
    _check_optimizer_map(TEGroupedMLP.sharded_state_dict(grouped, prefix, (), metadata), grouped)
    for k, (shape, replica, data) in sequential.items():
        assert te[k][0] == shape and te[k][1] == replica, k
        torch.testing.assert_close(te[k][2], data, rtol=0, atol=0)


def _check_factors(model, layer: int, grouped) -> None:
    """``state.adapter_factors`` names TE grouped adapters per expert exactly as it names SequentialMLP's."""
    from nemo_mla_lora.peft.state import adapter_factors

    root = nn.Module()  # decoder.layers.<layer>.mlp.experts holding the grouped wrappers
    root.decoder = nn.Module()
    root.decoder.layers = nn.ModuleList([nn.Module() for _ in range(layer + 1)])
    root.decoder.layers[layer].mlp = nn.Module()
    root.decoder.layers[layer].mlp.experts = grouped
    from nemo_mla_lora.callbacks.export import _has_adapters

    assert _has_adapters(root)  # the export callback finds a model whose only adapters are TE grouped ones
    ours = adapter_factors(root)
    theirs = {k: v for k, v in adapter_factors(model).items() if f"layers.{layer}.mlp.experts." in k}
    assert ours and set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))[:4]
    for k, (a, b, scale) in theirs.items():
        torch.testing.assert_close(ours[k][0], a, rtol=0, atol=0)
        torch.testing.assert_close(ours[k][1], b, rtol=0, atol=0)
        assert ours[k][2] == scale


def _check_reload(adapter: GroupedLoRAAdapter) -> None:
    """The state-dict keys a sharded load hands back (``adapter.lora_a{e}``) load into a fresh adapter."""
    state = {f"adapter.{n}": p.detach().clone() for n, p in adapter.named_parameters()}
    assert sorted(state) == sorted(f"adapter.lora_{f}{e}" for f in "ab" for e in range(adapter.num_experts))
    a, b = adapter.expert(0)
    fresh = GroupedLoRAAdapter(adapter.num_experts, a.shape[1], b.shape[0], dim=4, alpha=8, kind="row")
    wrapper = nn.Module()
    wrapper.adapter = fresh
    wrapper.load_state_dict(state)
    for got, want in zip(fresh.stacked(), adapter.stacked()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _check_optimizer_map(sharded: dict, grouped) -> None:
    """Megatron's distributed optimizer finds each trainable parameter's checkpoint entry by the parameter itself
    (``get_param_id_to_sharded_param_map``): every grouped adapter parameter has one (a stacked parameter
    handed out as per-expert slices had none: KeyError at NeMo's first checkpoint save on the GPU)."""
    from megatron.core.dist_checkpointing.optimizer import get_param_id_to_sharded_param_map

    params = [p for n, p in grouped.named_parameters() if ".adapter." in f".{n}"]
    mapped = get_param_id_to_sharded_param_map(sharded, iter(params))
    assert len(params) == 2 * 2 * grouped.num_local_experts and sorted(mapped) == list(range(len(params)))
