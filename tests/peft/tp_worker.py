"""Worker for test_tensor_parallel: one of two gloo processes running the tiny model under TP/SP/EP."""

import os
import re

import torch
import torch.distributed as dist

PEFT_KWARGS = dict(
    placement="all_linear",
    dim=4,
    alpha=8,
    parts={"linear_kv_up_proj": "k", "linear_kv_down_proj": "latent", "linear_q_up_proj": "rope"},
)
LAYOUTS = {"tp2": dict(tp=2), "tp2_sp": dict(tp=2, sequence_parallel=True), "ep2": dict(ep=2)}


def build(sequence_parallel=False):
    from nemo_mla_lora.models.tiny import build_model, tiny_mla_config
    from nemo_mla_lora.peft import MLALoRA

    config = tiny_mla_config(
        sequence_parallel=sequence_parallel, tensor_model_parallel_size=_tp(), expert_model_parallel_size=_ep()
    )
    return MLALoRA(**PEFT_KWARGS)(build_model(config))


def _tp():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def _ep():
    from megatron.core import parallel_state

    return parallel_state.get_expert_model_parallel_world_size()


def run_step(model, tokens, positions, mask):
    """Forward (full-vocab logits) and backward of the summed per-token loss."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model.eval()  # MoE + TP without SP refuses training mode; dropout is 0, so eval == train here
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(tokens, positions, mask))
    loss = model(tokens, positions, mask, labels=tokens)
    loss.sum().backward()
    return logits, loss.detach()


def global_grads(model, global_experts: bool = True):
    """{module name: (dA, dB)} with TP shards gathered and (``global_experts``) local expert indices made global."""
    from megatron.core import parallel_state

    from nemo_mla_lora.peft.state import adapter_modules

    out = {}
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    for name, module in adapter_modules(model).items():
        ad = module.adapter
        da, db = ad.lora_a.grad, ad.lora_b.grad
        if ad.base_kind == "row" and ad.tp_size > 1:
            da = _gather(da, 1, ad.tp_group)
        if ad.base_kind == "column" and not ad.b_replicated and ad.tp_size > 1:
            parts = _gather_list(db, ad.tp_group)
            if ad.glu_fc1:  # each rank holds [gate_local; up_local]
                parts = [p.chunk(2)[0] for p in parts] + [p.chunk(2)[1] for p in parts]
            db = torch.cat(parts)
        m = re.search(r"local_experts\.(\d+)\.", name)
        if m and global_experts:
            n_local = module.to_wrap.config.num_moe_experts // _ep()
            name = name.replace(m.group(0), f"local_experts.{ep_rank * n_local + int(m.group(1))}.")
        out[name] = (da.clone(), db.clone())
    return out


def _gather_list(t, group):
    parts = [torch.empty_like(t) for _ in range(group.size())]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _gather(t, dim, group):
    return torch.cat(_gather_list(t, group), dim=dim)


def worker(rank, world, port, ckpt, batch_path, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from megatron.core import dist_checkpointing

    from nemo_mla_lora.runtime import parallel

    tokens, positions, mask = torch.load(batch_path)
    for layout, kw in LAYOUTS.items():
        parallel.init_megatron(tp=kw.get("tp", 1), ep=kw.get("ep", 1))
        model = build(kw.get("sequence_parallel", False))
        state = dist_checkpointing.load(model.sharded_state_dict(), ckpt)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
        logits, loss = run_step(model, tokens, positions, mask)
        grads = {}
        for part in _all_gather_objects(global_grads(model)):
            grads.update(part)
        if rank == 0:
            torch.save(
                {
                    "logits": logits,
                    "loss": loss,
                    "grads": grads,
                    "fused": fused_paths(model),
                    "allreduce": allreduce_flags(model),
                },
                f"{out_dir}/{layout}.pt",
            )
        if layout in ("tp2_sp", "ep2"):
            export_through_callback(model, f"{out_dir}/callback_{layout}")
    parallel.destroy()


def fused_paths(model):
    """{module name: which forward ran} for every adapted linear: 'fused' (lora_fn), 'grouped' (an expert
    of a LoRASequentialMLP that groups), or 'adapter' (MLALoRAAdapter's own TP path)."""
    from nemo_mla_lora.peft.grouped_experts import LoRASequentialMLP
    from nemo_mla_lora.peft.state import adapter_modules

    grouped = {n for n, m in model.named_modules() if isinstance(m, LoRASequentialMLP) and m.grouped_plan()}
    out = {}
    for name, module in adapter_modules(model).items():
        if any(name.startswith(g + ".") for g in grouped):
            out[name] = "grouped"
        else:
            out[name] = "fused" if module.adapter.fused(module.to_wrap) else "adapter"
    return out


def allreduce_flags(model):
    """{module name: (Megatron's ``allreduce`` flag on the base weight, on A, on B)}: which DDP group reduces them."""
    from nemo_mla_lora.peft.state import adapter_modules

    return {
        n: tuple(getattr(p, "allreduce", True) for p in (m.to_wrap.weight, m.adapter.lora_a, m.adapter.lora_b))
        for n, m in adapter_modules(model).items()
    }


def export_through_callback(model, out_dir):
    """The export callback as NeMo's trainer calls it at train end, under TP=2 + SP or EP=2: every rank
    saves, rank 0 exports (absorbed, verified) while the other waits."""
    from nemo_mla_lora.arch.mla_spec import MLASpec
    from nemo_mla_lora.callbacks.export import MLAExportCallback
    from nemo_mla_lora.peft import MLALoRA

    holder = torch.nn.Module()
    holder.model = model
    spec = MLASpec.from_megatron(model.config)
    MLAExportCallback(MLALoRA(**PEFT_KWARGS), spec, None, out_dir).run(holder, "")


def _all_gather_objects(obj):
    items = [None] * dist.get_world_size()
    dist.all_gather_object(items, obj)
    return items
