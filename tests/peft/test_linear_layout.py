"""``peft/linear_layout.py``: how an adapter sees Megatron's and Transformer Engine's linears.

TE cannot be imported here (no CUDA): its modules' shape and mode logic is tested on the values TE keeps
(per-partition ``out_features`` for column linears, ``in_features`` for row linears, ``parallel_mode`` None
for duplicated ones, as TE's ``Linear.__init__`` sets them); the modules themselves are covered by the GPU
run (bench/run_gpu.sh). Megatron's own linears are read from a real tiny model."""

import pytest
import torch

from nemo_mla_lora.peft.linear_layout import LinearLayout, is_linear, layout, te_layout


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_te_column_linears_hold_per_partition_outputs(tp):
    for name in ("TEColumnParallelLinear", "TELayerNormColumnParallelLinear"):
        lay = te_layout(
            name,
            "column",
            out_features=3072 // tp,
            in_features=1536,
            tp_size=tp,
            tp_rank=tp - 1,
            sequence_parallel=True,
        )
        assert (lay.out_features, lay.in_features) == (3072, 1536)
        assert lay.kind == "column" and lay.mode == ("column" if tp > 1 else "plain")
        assert lay.tp_size == tp and lay.tp_rank == tp - 1 and lay.sequence_parallel == (tp > 1)
        assert lay.fused_norm == (name == "TELayerNormColumnParallelLinear") and lay.te


@pytest.mark.parametrize("tp", [1, 2, 8])
def test_te_row_linear_holds_per_partition_inputs(tp):
    lay = te_layout("TERowParallelLinear", "row", out_features=7168, in_features=16384 // tp, tp_size=tp, tp_rank=0)
    assert (lay.out_features, lay.in_features) == (7168, 16384)
    assert lay.kind == "row" and lay.mode == ("row" if tp > 1 else "plain") and not lay.fused_norm


def test_duplicated_te_linear_is_plain_whatever_the_tp_size():
    """q/kv down projections (TELinear, parallel_mode "duplicated" -> TE's None): full weight on every rank."""
    lay = te_layout("TELinear", None, out_features=576, in_features=7168, tp_size=8, tp_rank=5, sequence_parallel=True)
    assert lay == LinearLayout(kind="column", mode="plain", out_features=576, in_features=7168, te=True)


def test_te_layout_refuses_what_it_does_not_know():
    with pytest.raises(TypeError, match="TEGroupedLinear is not a TE linear MLALoRA wraps"):
        te_layout("TEGroupedLinear", "column", 8, 8, 1)
    with pytest.raises(ValueError, match="TERowParallelLinear with parallel_mode='column'; expected 'row'"):
        te_layout("TERowParallelLinear", "column", 8, 8, 2)
    with pytest.raises(ValueError, match="parallel_mode='duplicated'"):
        te_layout("TELinear", "duplicated", 8, 8, 1)


def test_megatron_linears_of_a_real_model(mcore):
    """Global shapes straight from Megatron's linears (TP size 1 here: every mode plain)."""
    from nemo_mla_lora.models.tiny import build_model, tiny_mla_config

    model = build_model(tiny_mla_config())
    attn = model.decoder.layers[0].self_attention
    for name, module in attn.named_children():
        if not is_linear(module):
            continue
        lay = layout(module)
        assert (lay.out_features, lay.in_features) == tuple(module.weight.shape), name
        assert lay.mode == "plain" and lay.tp_size == 1 and not lay.te and not lay.fused_norm
    assert layout(attn.linear_proj).kind == "row" and layout(attn.linear_kv_up_proj).kind == "column"
    assert not is_linear(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="Linear is not a Megatron Column/RowParallelLinear or a TE linear"):
        layout(torch.nn.Linear(4, 4))


def test_te_block_spec_keeps_deepseek_v2_group_router_and_latent_eps(mcore, monkeypatch):
    """``te_mla_block_spec`` over Megatron's block spec (its TE variant cannot be built without TE; the
    layer list and module slots are the same, with Megatron's TE norm + linear put where the TE spec has it):
    the MoE layers get ``DeepSeekMoELayer`` and the fused q/kv latent norms the linear that takes DeepSeek's
    latent eps (its numerics: tests/peft/test_te_gpu.py, Moonlight-style eps 1e-5 / 1e-6)."""
    from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from nemo_mla_lora.models import layer_spec
    from nemo_mla_lora.models.tiny import tiny_mla_config

    real = gpt_layer_specs.get_gpt_decoder_block_spec
    asked = []

    def stand_in(config, use_transformer_engine, vp_stage=None):
        asked.append(use_transformer_engine)
        spec = real(config, use_transformer_engine=False, vp_stage=vp_stage)
        for one in spec.layer_specs:
            attention = one.submodules.self_attention.submodules
            attention.linear_q_up_proj = attention.linear_kv_up_proj = TELayerNormColumnParallelLinear
        return spec

    monkeypatch.setattr(layer_spec, "get_gpt_decoder_block_spec", stand_in)
    config = tiny_mla_config()
    spec = layer_spec.te_mla_block_spec(config, group_score="max", latent_norm_eps=config.layernorm_epsilon / 10)
    mlps = [s.submodules.mlp.module for s in spec.layer_specs]
    assert asked == [True] and layer_spec.DeepSeekMoELayer in mlps and MoELayer not in mlps
    assert config.moe_router_group_score == "max" and config.mla_latent_norm_eps == config.layernorm_epsilon / 10
    latent = layer_spec.latent_norm_te_linear()
    assert latent is not TELayerNormColumnParallelLinear  # (a subclass where TE imports: the GPU test)
    for one in spec.layer_specs:
        attention = one.submodules.self_attention.submodules
        assert attention.linear_q_up_proj is latent and attention.linear_kv_up_proj is latent


def test_adapter_parameters_take_the_base_weights_reduction_flags():
    """Megatron reduces a parameter's gradient by the flags on it: TE's duplicated linears carry
    ``sequence_parallel`` (all-reduced over TP under SP), routed experts under EP ``allreduce=False``."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    from nemo_mla_lora.peft.adapter import MLALoRAAdapter

    cases = ({}, {"sequence_parallel": True}, {"allreduce": False}, {"allreduce": True, "sequence_parallel": False})
    for flags in cases:
        base = ColumnParallelLinear.__new__(ColumnParallelLinear)  # its attributes only: no process groups here
        torch.nn.Module.__init__(base)
        base.weight = torch.nn.Parameter(torch.empty(6, 4), requires_grad=False)
        base.output_size, base.input_size = 6, 4
        for k, v in flags.items():
            setattr(base.weight, k, v)
        adapter = MLALoRAAdapter(base, dim=2, alpha=4.0)
        for p in (adapter.lora_a, adapter.lora_b):
            assert {k: getattr(p, k) for k in ("allreduce", "sequence_parallel") if hasattr(p, k)} == flags


def test_te_state_names_map_to_the_local_specs_flat_names():
    """A TE-spec model's state dict names (fused norms, TEGroupedMLP's ``weight{e}``) -> the names the local spec's
    model, the reference forward and ``adapter_factors`` use; the rest unchanged, ``_extra_state`` dropped."""
    from nemo_mla_lora.arch import keymap

    layer = "decoder.layers.3"
    cases = {
        f"{layer}.mlp.experts.linear_fc1.weight0": f"{layer}.mlp.experts.local_experts.0.linear_fc1.weight",
        f"{layer}.mlp.experts.linear_fc2.weight11": f"{layer}.mlp.experts.local_experts.11.linear_fc2.weight",
        f"{layer}.self_attention.linear_q_up_proj.layer_norm_weight": f"{layer}.self_attention.q_layernorm.weight",
        f"{layer}.self_attention.linear_kv_up_proj.layer_norm_weight": f"{layer}.self_attention.kv_layernorm.weight",
        "decoder.layers.0.mlp.linear_fc1.layer_norm_weight": "decoder.layers.0.pre_mlp_layernorm.weight",
        f"{layer}.mlp.shared_experts.linear_fc1.weight": f"{layer}.mlp.shared_experts.linear_fc1.weight",
        f"{layer}.mlp.router.expert_bias": f"{layer}.mlp.router.expert_bias",
        f"{layer}.self_attention.linear_q_up_proj._extra_state": None,
        f"{layer}.mlp.experts.linear_fc1._extra_state": None,
    }
    assert {name: keymap.from_te_state_name(name) for name in cases} == cases


def test_te_norm_linear_outputs_with_and_without_te_returning_the_bias():
    """Megatron's TELayerNormColumnParallelLinear with ``return_layernorm_output``: ((out, normed), None), or TE's
    (out, bias, normed) when the wrapper returns TE's bias as it is (TE's LayerNormLinear.forward return order)."""
    from nemo_mla_lora.peft.mla_lora import te_norm_linear_outputs

    out, normed, bias = torch.ones(2), torch.zeros(2), torch.full((2,), 3.0)
    plain, with_bias = torch.nn.Module(), torch.nn.Module()
    plain.te_return_bias, with_bias.te_return_bias = False, True
    assert te_norm_linear_outputs(plain, ((out, normed), None)) == (out, normed, None)
    assert te_norm_linear_outputs(with_bias, (out, bias, normed)) == (out, normed, bias)
