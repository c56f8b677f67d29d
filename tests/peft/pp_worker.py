"""Worker for test_pipeline_parallel: one of four gloo processes running a tiny HF-made model under pipeline
parallelism through Megatron's pipeline schedule (``get_forward_backward_func``, the one NeMo's trainer runs),
first stage one layer more (``num_layers_in_first_pipeline_stage``, as NeMo's DeepSeek-V3 recipe splits 61 layers).

Layouts over the four processes: PP=2 (x DP=2, both replicas fed the same micro-batches), PP=2 x TP=2 with
sequence parallelism (Megatron refuses MoE training at TP > 1 without it) and PP=2 x EP=2 (each stage's routed
experts split over its two data-parallel ranks, the token dispatcher between them)."""

import os
from pathlib import Path

import torch
import torch.distributed as dist

DTYPE = torch.float64
LAYOUTS = {"pp2": dict(pp=2), "pp2_tp2": dict(pp=2, tp=2, sequence_parallel=True), "pp2_ep2": dict(pp=2, ep=2)}
FIRST_STAGE_LAYERS = 2  # of the tiny models' 3: the dense layer 0 and MoE layer 1 on stage 0, MoE layer 2 on stage 1
MICRO_BATCHES, MICRO_BATCH_SIZE, SEQ = 3, 2, 8
# every linear of both kinds of layer; part-selective B on two of them; one module excluded by its global layer
# index (under PP=2 it is the last stage's local layer 0)
PEFT_KWARGS = dict(
    placement="all_linear",
    dim=4,
    alpha=8,
    exclude_modules=["*layers.2.self_attention.linear_proj"],
    parts={"linear_kv_up_proj": "k", "linear_kv_down_proj": "latent"},
)


def micro_batches(vocab: int, seed: int = 0) -> list:
    """``MICRO_BATCHES`` x (tokens [b, s], position ids [b, s], causal mask [1, 1, s, s], True = masked)."""
    gen = torch.Generator().manual_seed(seed)
    positions = torch.arange(SEQ).expand(MICRO_BATCH_SIZE, SEQ)
    mask = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).triu(1)
    return [
        (torch.randint(0, vocab, (MICRO_BATCH_SIZE, SEQ), generator=gen), positions, mask) for _ in range(MICRO_BATCHES)
    ]


def build(spec, tp: int = 1, pp: int = 1, sequence_parallel: bool = False, ep: int = 1):
    """The adapted Megatron model of ``spec`` for this rank's stage (call after ``parallel.init_megatron``)."""
    from nemo_mla_lora.models.from_spec import config_from_spec
    from nemo_mla_lora.models.tiny import build_model
    from nemo_mla_lora.peft import MLALoRA

    layout = dict(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        expert_model_parallel_size=ep,
    )
    if pp > 1:
        layout["num_layers_in_first_pipeline_stage"] = FIRST_STAGE_LAYERS
    return MLALoRA(**PEFT_KWARGS)(build_model(config_from_spec(spec, DTYPE, **layout))).train()


def load(model, base_dir, adapter_dir) -> None:
    """Base and adapter dist-checkpoints into ``model`` through its own sharded state dict (any layout)."""
    from megatron.core import dist_checkpointing

    from nemo_mla_lora.checkpoints import dist_ckpt

    sharded = model.sharded_state_dict()
    base = {k: v for k, v in sharded.items() if ".adapter." not in k}
    adapters = {k: v for k, v in sharded.items() if ".adapter." in k and not k.endswith("_extra_state")}
    state = dist_checkpointing.load(base, str(base_dir))
    state.update(dist_checkpointing.load(adapters, str(adapter_dir)))
    dist_ckpt.load_weights(model, state, f"{base_dir} + {adapter_dir}")


def pipeline_step(model, micro: list) -> list:
    """Forward and backward of ``micro`` through Megatron's schedule; the loss of a micro-batch is its mean
    per-token loss (the schedule divides it by the number of micro-batches). Returns each micro-batch's loss
    on the last stage, [] elsewhere."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data, model):
        tokens, positions, mask = next(data)
        output = model(tokens, positions, mask, labels=tokens)  # last stage: per-token loss; others: hidden states

        def loss_func(per_token):
            mean = per_token.mean()
            return mean, {"loss": mean.detach().clone()}

        return output, loss_func

    model.zero_grad(set_to_none=True)
    out = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro),
        model=[model],
        num_microbatches=len(micro),
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH_SIZE,
    )
    return [o["loss"] for o in out]


def all_ranks(obj) -> list:
    items = [None] * dist.get_world_size()
    dist.all_gather_object(items, obj)
    return items


def global_grads(model) -> dict:
    """{one-process module name: (dA, dB)} of every adapter on any rank (TP shards gathered)."""
    from tp_worker import global_grads as stage_grads

    from nemo_mla_lora.peft.state import global_names

    grads = stage_grads(model, global_experts=False)  # this stage's and this expert rank's names
    names = global_names(model, grads)
    out = {}
    for part in all_ranks({names[n]: g for n, g in grads.items()}):
        out.update(part)
    return out


def adapter_tensors(model) -> dict:
    """{one-process parameter name: tensor} of this rank's adapters (TP=1: every tensor whole)."""
    from nemo_mla_lora.peft.state import global_names

    params = {n.replace(".to_wrap", ""): p.detach().clone() for n, p in model.named_parameters() if ".adapter." in n}
    names = global_names(model, params)
    return {names[n]: t for n, t in params.items()}


def tied_weight(model):
    """With tied embeddings: the word embeddings on the first stage, Megatron's copy of them (the output layer's
    weight) on the last; else None."""
    if not model.share_embeddings_and_output_weights:
        return None
    return model.shared_embedding_or_output_weight().detach().clone()


def worker(rank: int, world: int, port: int, root: str, variants: list) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from megatron.core import parallel_state

    from nemo_mla_lora.checkpoints import dist_ckpt
    from nemo_mla_lora.peft import MLALoRA
    from nemo_mla_lora.runtime import parallel

    for variant in variants:
        d = Path(root) / variant
        spec = dist_ckpt.read_spec(d / "base")
        for layout, kw in LAYOUTS.items():
            parallel.init_megatron(tp=kw.get("tp", 1), pp=kw["pp"], ep=kw.get("ep", 1))
            model = build(spec, **kw)
            load(model, d / "base", d / "adapter")
            tensors = adapter_tensors(model) if layout == "pp2" else {}
            losses = pipeline_step(model, micro_batches(spec.vocab_size))
            stage = {
                "stage": parallel_state.get_pipeline_model_parallel_rank(),
                "layers": [m.layer_number - 1 for m in model.decoder.layers],
                "losses": losses,
                "tensors": tensors,
                "embedding": model.pre_process,
                "output_layer": model.post_process,
                "tied": tied_weight(model) if layout == "pp2" else None,
            }
            result = {"grads": global_grads(model), "ranks": all_ranks(stage)}
            dist_ckpt.save_adapter(model, MLALoRA(**PEFT_KWARGS), spec, d / f"adapter_{layout}")
            if layout == "pp2":
                export_through_callback(model, spec, d / f"callback_{layout}")
            if rank == 0:
                torch.save(result, d / f"{layout}.pt")
    parallel.destroy()


def export_through_callback(model, spec, out_dir) -> None:
    """The export callback as NeMo's trainer uses it: made on every rank before training (it checks its outputs
    then), run at train end: every rank saves base and adapter, rank 0 exports (in a child process, verified)
    while the others wait."""
    from nemo_mla_lora.callbacks.export import MLAExportCallback
    from nemo_mla_lora.peft import MLALoRA

    holder = torch.nn.Module()
    holder.model = model
    callback = MLAExportCallback(MLALoRA(**PEFT_KWARGS), spec, None, out_dir)
    dist.barrier()  # training starts once every rank has its callbacks
    callback.run(holder, "")
