"""Typed schemas for ``conf/`` (YAML holds values only; these hold the types and defaults).

``register()`` stores ``finetune_schema`` / ``export_schema`` / ``generate_schema`` in Hydra's ConfigStore; the
primary configs extend them, so a wrongly typed value fails at composition. ``config/validate.py`` adds unknown
keys and the checks that span fields (parallel sizes against heads and experts), before any model is built.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ParallelConfig:
    """What a model needs at scale (used by ``trainer=megatron``): the official layout where there is one.

    Args:
        tensor, pipeline, expert, context: tensor / pipeline / expert / context parallel sizes.
        sequence_parallel: Megatron's sequence parallelism (with ``tensor`` > 1).
        layers_in_first_pipeline_stage, layers_in_last_pipeline_stage: an uneven pipeline split (None: even).
        nodes, devices_per_node: the machines the layout is laid out for.
    """

    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    context: int = 1
    sequence_parallel: bool = False
    layers_in_first_pipeline_stage: int | None = None
    layers_in_last_pipeline_stage: int | None = None
    nodes: int = 1
    devices_per_node: int = 1


@dataclass
class ModelConfig:
    """Which model, not what it is: the architecture comes from ``checkpoint``'s own config (HF config.json,
    our mla_spec.json, a NeMo checkpoint's context), or, with no checkpoint, from ``config``.

    Args:
        name: the config's name (the ``model=`` option).
        config: a built-in ``models/configs/<name>.json`` or a ``config.json`` path (used without ``checkpoint``).
        checkpoint: an HF directory, one of our base checkpoints (+ mla_spec.json) or a NeMo 2 checkpoint.
        arch: HF config.json fields to change (no checkpoint) or to assert (with one: a contradiction is an error;
            ``models/architecture.py``).
        dtype: float32 | bfloat16 | float16 | float64.
        seq_length: the training sequence length (the positions the rope tables cover).
        parallel: the layout the model needs at scale.
        fp8: the frozen linears compute in FP8 through Transformer Engine (``trainer=megatron``, bf16-mixed):
            ``blockwise`` (128 x 128 weight blocks, E4M3, as DeepSeek-V3 ships; Hopper), ``tensorwise`` (current
            scaling) or ``delayed`` (both E4M3 forward, E5M2 gradients); null: bf16. Adapters stay in bf16.
        fp8_param: with ``fp8``, the frozen weights are also held in FP8 (an HF directory, FP8 or not, is read
            one parameter at a time into them). In training this saves no memory on Hopper: Transformer Engine
            keeps each weight's FP8 data in both orientations (forward and input gradient) plus scales.
    """

    name: str = MISSING
    config: str | None = None
    checkpoint: str | None = None  # HF dir | our dist-ckpt (+ mla_spec.json) | NeMo 2 checkpoint
    arch: dict[str, Any] = field(default_factory=dict)
    dtype: str = "bfloat16"
    seq_length: int = 4096  # training sequence length (positions the rope tables cover)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    fp8: str | None = None  # blockwise | tensorwise | delayed | null (bf16): Transformer Engine recipes
    fp8_param: bool = True  # with fp8: frozen weights held in FP8


@dataclass
class PeftConfig:
    """The adapters (``MLALoRA``'s fields of the same names).

    Args:
        placement: a named placement (``peft/placements.py``); ignored when ``target_modules`` is non-empty.
        target_modules: leaf names or shell wildcards on full module names.
        exclude_modules: names or wildcards never adapted.
        parts: leaf -> part for part-selective adapters (``peft/parts.py``).
        dim: the LoRA rank r (HF PEFT's ``r``; the bench scripts' ``--rank(s)``).
        alpha: the LoRA alpha; the delta is scaled by alpha / dim.
        dropout: dropout on the adapter's input.
        apply_lr_scale: multiply ``optim.lr`` by the placement's suggested scale.
    """

    placement: str | None = "nemo_official"
    target_modules: list[str] = field(default_factory=list)
    exclude_modules: list[str] = field(default_factory=list)
    parts: dict[str, str] = field(default_factory=dict)  # leaf -> part (peft/parts.py)
    dim: int = 32
    alpha: float = 32
    dropout: float = 0.0
    apply_lr_scale: bool = False  # multiply optim.lr by the placement's suggested scale


@dataclass
class TrainerConfig:
    """How the run trains.

    Args:
        kind: ``cpu`` (plain Lightning over the Megatron-Core model) | ``megatron`` (NeMo's ``llm.finetune``).
        max_steps, val_check_interval, log_every_n_steps, checkpoint_every_n_steps, limit_val_batches: the
            Lightning trainer's settings of the same names.
        micro_batch_size, global_batch_size: batch sizes (the global one spans data-parallel ranks and
            gradient accumulation).
        precision: Lightning precision (``32``, ``bf16-mixed``, ...).
        devices, num_nodes: GPUs per node and nodes (``megatron``).
        tensor_parallel, pipeline_parallel, expert_parallel, context_parallel, sequence_parallel,
            layers_in_first_pipeline_stage, layers_in_last_pipeline_stage: Megatron's parallel layout.
        use_distributed_optimizer: Megatron's distributed optimizer.
        cross_entropy_loss_fusion: Megatron's fused cross entropy.
        resume_if_exists: resume from ``output_dir``'s last checkpoint.
        gc_interval: training steps between Python garbage collections, with the automatic collector off in
            between (NeMo's ``GarbageCollectionCallback``, which NeMo's DeepSeek-V3 recipe adds at 60 steps with
            ``performance_mode=True``: a full collection over a Megatron process's objects is a pause of its own in
            a host-bound step); 0 (that recipe's default) leaves Python's collector as it is.
    """

    kind: str = "cpu"  # cpu: plain Lightning over the Megatron-Core model; megatron: NeMo llm.finetune
    max_steps: int = 100
    val_check_interval: int = 25
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 50
    limit_val_batches: int = 8
    micro_batch_size: int = 1
    global_batch_size: int = 8
    precision: str = "32"
    devices: int = 1
    num_nodes: int = 1
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    expert_parallel: int = 1
    context_parallel: int = 1
    sequence_parallel: bool = False
    layers_in_first_pipeline_stage: int | None = None
    layers_in_last_pipeline_stage: int | None = None
    use_distributed_optimizer: bool = False
    cross_entropy_loss_fusion: bool = False
    resume_if_exists: bool = True
    gc_interval: int = 0


@dataclass
class DataConfig:
    """The data.

    Args:
        kind: ``jsonl`` (prompt/answer or input/output records) | ``squad`` (NeMo's SQuAD data module).
        train, validation: JSONL files (``pkg://NAME`` for the embedded ones).
        seq_length: tokens per sample.
        packed: pack several samples per sequence.
        tokenizer: ``byte`` | an HF id or path | unset: the checkpoint's own files (HF directory), else ``byte``.
        base_pretrain: without ``model.checkpoint``, the generic task that makes the base first.
        base_pretrain_steps, base_pretrain_lr: that stage's steps and learning rate.
    """

    kind: str = "jsonl"  # jsonl (prompt/answer or input/output) | squad (NeMo's SQuAD data module)
    train: str | None = None
    validation: str | None = None
    seq_length: int = 2048
    packed: bool = False
    tokenizer: str | None = None  # byte | HF id/path | unset: the checkpoint's own files (HF dir), else byte
    base_pretrain: str | None = None  # no model.checkpoint: the generic task that makes the base
    base_pretrain_steps: int = 0
    base_pretrain_lr: float = 3e-3


@dataclass
class OptimConfig:
    """The optimizer and its schedule.

    Args:
        name: ``adam``.
        lr, min_lr: peak and final learning rate.
        warmup_steps: linear warm-up steps.
        scheduler: ``cosine``.
        adam_beta1, adam_beta2, adam_eps, weight_decay: Adam's settings.
        clip_grad: gradient-norm clipping.
    """

    name: str = "adam"
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 50
    scheduler: str = "cosine"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-5
    weight_decay: float = 0.1
    clip_grad: float = 1.0


@dataclass
class ExportConfig:
    """The export the finetune recipe's callback writes at the end of training.

    Args:
        enabled: write the export.
        format: ``mcore`` | ``nemo`` | ``absorbed`` | ``hf`` | ``hf_peft`` (``export()``'s ``fmt``; the
            manifest's ``loaded_by`` says who reads each).
        names: ``mcore``/``nemo``: ``te`` (default) | ``local`` layer-spec names.
        fold: ``absorbed`` only: add the folded products.
        verify: ``full`` | ``sample`` (``verify_layers``) | ``none`` (true/false accepted; ``export/verify.py``).
        verify_layers: ``sample``'s layers (default: first, first MoE, last).
        tolerance: the verify bound (default: by dtype).
        every_checkpoint: export at every checkpoint, not only at the end.
        weight_dtype: ``hf`` only: ``fp8_block`` writes the linear weights in DeepSeek-V3's FP8 block format
            (``recipes.export``'s option of the same name); null: as merged.
    """

    enabled: bool = True
    format: str = "mcore"  # mcore | nemo | absorbed | hf | hf_peft (manifest "loaded_by" says who reads each)
    names: str | None = None  # mcore/nemo: te (default) | local layer-spec names
    fold: bool = False
    verify: str = "full"  # full | sample (verify_layers) | none (true/false accepted): export/verify.py
    verify_layers: list[int] | None = None  # sample: default first, first MoE, last
    tolerance: float | None = None
    every_checkpoint: bool = False
    weight_dtype: str | None = None  # hf: fp8_block (DeepSeek's FP8 with block scales) | null (as merged)


@dataclass
class FinetuneConfig:
    """``python -m nemo_mla_lora.recipes.finetune``: each group as above, plus

    Args:
        output_dir: where the run writes its checkpoints, logs, adapter and export.
        seed: the run's seed.
    """

    model: ModelConfig = MISSING
    peft: PeftConfig = field(default_factory=PeftConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    output_dir: str = "runs/finetune"
    seed: int = 1234


@dataclass
class ExportJobConfig:
    """``python -m nemo_mla_lora.recipes.export``.

    Args:
        base: our base checkpoint, an HF directory (bf16/fp32 or FP8) or a NeMo 2 checkpoint.
        adapter: our adapter or an HF PEFT directory; null: the base alone (a merged base that
            ``recipes.generate adapters=...`` serves with unmerged adapters).
        output: the export directory (refused if it overlaps a source or is not ours to replace).
        format: as ``ExportConfig.format`` (``export()``'s ``fmt``).
        names, fold, verify, verify_layers, tolerance: as ``ExportConfig``.
        tokenizer: ``nemo``: the context's tokenizer (default: the base's own files, else byte).
        overwrite: replace a previous export (its ``manifest.json``) or an empty directory.
        budget_mb: experts read, merged and written as one unit (``export/units.py``).
        weight_dtype: ``hf`` only: ``fp8_block`` writes the attention, MLP and expert linear weights as
            DeepSeek-V3 ships them (float8_e4m3fn with 128x128 ``weight_scale_inv`` block scales and config.json's
            ``quantization_config``); null: as merged (bf16/fp32).
    """

    base: str = MISSING
    adapter: str | None = MISSING  # null: the base alone (a merged base served with unmerged adapters)
    output: str = MISSING
    format: str = "mcore"
    names: str | None = None  # mcore/nemo: te (default) | local layer-spec names
    tokenizer: str | None = None  # nemo: the context's tokenizer (default: the base's own files, else byte)
    fold: bool = False
    verify: str = "full"  # full | sample (verify_layers) | none (true/false accepted): export/verify.py
    verify_layers: list[int] | None = None  # sample: default first, first MoE, last
    tolerance: float | None = None
    overwrite: bool = False
    budget_mb: int = 128  # experts read, merged and written as one unit (export/units.py)
    weight_dtype: str | None = None  # hf: fp8_block (DeepSeek's FP8 with block scales) | null (as merged)


@dataclass
class GenerateConfig:
    """``python -m nemo_mla_lora.recipes.generate``.

    Args:
        checkpoint: a merged export to serve (``mcore``, ``absorbed`` or ``hf``; the engine absorbs at load).
        prompt, prompt_file, prompt_ids_file: one prompt; one per line, run as one right-padded batch; a JSON list
            of token-id lists (made by another engine's tokenizer).
        max_new_tokens, temperature, top_k, seed: sampling (temperature 0: greedy).
        tokenizer: ``byte`` | an HF id or path | unset: the export's own files (``hf``), else ``byte``.
        device, dtype: where and in which dtype to run (default dtype: the export's).
        dump_logits: ``torch.save`` {tokens, logits} here, for comparison.
        adapters: name -> adapter directory, served unmerged on the merged base.
        adapter: which of ``adapters`` the prompts use (none: the checkpoint as it is).
        attention: decode attention: ``torch`` (einsums) | ``triton`` (our kernels, ``inference/kernels/``) |
            ``flashmla`` (FlashMLA's Hopper kernel, where the ``flash_mla`` package is installed) | ``gluon`` (our
            warp-specialised Hopper kernel, heads in blocks of 64).
        verify_checksums: check every tensor read against ``manifest.json`` (false: skip, faster).
    """

    checkpoint: str = MISSING  # a merged export directory (mcore, absorbed or hf): the served checkpoint
    prompt: str | None = None
    prompt_file: str | None = None  # one prompt per line, all run as one (right-padded) batch
    prompt_ids_file: str | None = None  # JSON list of token-id lists (made by another engine's tokenizer)
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    seed: int = 0
    tokenizer: str | None = None  # byte | an HF tokenizer id/path | unset: the export's own (hf), else byte
    device: str = "cpu"
    dtype: str | None = None  # default: the export's
    dump_logits: str | None = None  # torch.save {tokens, logits} here, for comparison
    adapters: dict[str, str] = field(default_factory=dict)  # name -> adapter dir, served unmerged on the base
    adapter: str | None = None  # which of ``adapters`` the prompts use (none: the checkpoint as is)
    attention: str = "torch"  # decode attention: torch (einsums) | triton (our kernels) | flashmla | gluon (Hopper)
    verify_checksums: bool = True  # every tensor read is checked against manifest.json (false: skip, faster)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="finetune_schema", node=FinetuneConfig)
    cs.store(name="export_schema", node=ExportJobConfig)
    cs.store(name="generate_schema", node=GenerateConfig)
