"""Config checks beyond the schemas' types: keys no schema declares, and the finetune config's cross-field checks
(parallel sizes against the model's heads and experts, data, outputs, FP8), each with an expected-vs-actual
message, before any model is built or anything is written."""

import dataclasses

FORMATS = ("absorbed", "mcore", "nemo", "hf", "hf_peft")
NAMES = ("te", "local")
WEIGHT_DTYPES = ("fp8_block",)


def unknown_keys(node, path: str = "") -> list[str]:
    """Keys that no schema declares (Hydra's ``+key=value`` adds them even to typed nodes, where they would be
    silently ignored). Free-form dict fields (peft.parts, model.arch, adapters) are not checked inside."""
    from omegaconf import DictConfig, OmegaConf

    kind = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(kind):
        return []
    declared = {f.name for f in dataclasses.fields(kind)}
    found = []
    for key in node:
        if key == "hydra":
            continue
        name = f"{path}{key}"
        if key not in declared:
            found.append(name)
        elif isinstance(node._get_node(key), DictConfig):
            found += unknown_keys(node[key], name + ".")
    return found


def check_known_keys(cfg) -> None:
    unknown = unknown_keys(cfg)
    if unknown:
        raise ValueError(f"invalid config:\n  - unknown keys {unknown} (no such setting; see --cfg job for the names)")


def validate(cfg) -> None:
    """Cross-field checks with expected-vs-actual messages, every problem listed at once. Raises ValueError.

    Args:
        cfg: the composed finetune config.
    """
    check_known_keys(cfg)
    from nemo_mla_lora.models.architecture import resolve

    try:
        spec = resolve(cfg.model)  # reads the checkpoint's config only
    except (ValueError, OSError) as err:
        raise ValueError(f"invalid config:\n  - model: {err}") from err
    errors = (
        trainer_errors(cfg, spec)
        + data_errors(cfg, spec)
        + output_dir_errors(cfg)
        + fp8_errors(cfg)
        + export_and_peft_errors(cfg)
    )
    if errors:
        raise ValueError("invalid config:\n  - " + "\n  - ".join(errors))


def trainer_errors(cfg, spec) -> list[str]:
    """The trainer's kind, steps, batch sizes and parallel layout against the model (heads, experts).

    Args:
        cfg: the composed finetune config.
        spec: the model's ``MLASpec``.
    """
    m, t, errors = cfg.model, cfg.trainer, []
    if t.kind not in ("cpu", "megatron"):
        errors.append(f"trainer.kind={t.kind!r}; expected 'cpu' or 'megatron'")
    if t.kind == "cpu" and (t.tensor_parallel, t.pipeline_parallel, t.expert_parallel) != (1, 1, 1):
        errors.append(
            "trainer=cpu runs one process: tensor/pipeline/expert parallel must be 1 "
            f"(got {t.tensor_parallel}/{t.pipeline_parallel}/{t.expert_parallel})"
        )
    if spec.num_heads % t.tensor_parallel:
        errors.append(
            f"trainer.tensor_parallel={t.tensor_parallel} does not divide "
            f"the model's num_attention_heads={spec.num_heads}"
        )
    if spec.num_experts and spec.num_experts % t.expert_parallel:
        errors.append(
            f"trainer.expert_parallel={t.expert_parallel} does not divide "
            f"the model's n_routed_experts={spec.num_experts}"
        )
    if not spec.num_experts and t.expert_parallel > 1:
        errors.append(f"trainer.expert_parallel={t.expert_parallel} but model {m.name} has no experts")
    if t.gc_interval < 0:
        errors.append(f"trainer.gc_interval={t.gc_interval}; expected >= 0 (0: Python's own garbage collector)")
    if t.max_steps < 1:
        errors.append(f"trainer.max_steps={t.max_steps}; expected >= 1 (0 steps train nothing: no adapter, no export)")
    if t.global_batch_size % t.micro_batch_size:
        errors.append(
            f"trainer.global_batch_size={t.global_batch_size} is not a multiple of "
            f"micro_batch_size={t.micro_batch_size}"
        )
    return errors


def data_errors(cfg, spec) -> list[str]:
    """Where the base and the data come from: base pretraining steps, JSONL files, the checkpoint kind
    ``trainer=megatron`` starts from, the tokenizer against the model's vocabulary.

    Args:
        cfg: the composed finetune config.
        spec: the model's ``MLASpec``.
    """
    from nemo_mla_lora.checkpoints.kind import checkpoint_kind

    m, t, d, errors = cfg.model, cfg.trainer, cfg.data, []
    if not m.checkpoint and d.base_pretrain and d.base_pretrain_steps < 1:
        errors.append(
            f"data.base_pretrain_steps={d.base_pretrain_steps}; expected >= 1 to make the base from "
            f"data.base_pretrain (no model.checkpoint given)"
        )
    if d.kind == "jsonl" and not (d.train and d.validation):
        errors.append(
            f"data.kind=jsonl needs data.train and data.validation (JSONL files); got train={d.train}, "
            f"validation={d.validation}"
        )
    if t.kind == "megatron" and m.checkpoint and checkpoint_kind(m.checkpoint) not in ("hf", "nemo"):
        errors.append(
            f"trainer=megatron starts from an HF directory (streamed into the sharded model) or a NeMo 2 "
            f"checkpoint (RestoreConfig); model.checkpoint={m.checkpoint} is one of our base checkpoints: "
            "export it with format=nemo first, or use trainer=cpu"
        )
    if t.kind == "megatron" and not d.tokenizer and not m.checkpoint:
        errors.append("trainer=megatron without model.checkpoint needs data.tokenizer (byte, or an HF id/path)")
    byte_ids = 512 if t.kind == "megatron" else 259  # NeMo's ByteLevelTokenizer / ours
    if d.tokenizer == "byte" and spec.vocab_size < byte_ids:
        errors.append(f"data.tokenizer=byte has {byte_ids} ids; the model's vocab_size={spec.vocab_size} is smaller")
    return errors


def export_and_peft_errors(cfg) -> list[str]:
    """The export's format and names, the adapters' rank, parts and placement.

    Args:
        cfg: the composed finetune config.
    """
    errors = []
    if cfg.export.format not in FORMATS:
        errors.append(f"export.format={cfg.export.format!r}; expected one of {FORMATS}")
    weight_dtype = cfg.export.get("weight_dtype")
    if weight_dtype not in (None, *WEIGHT_DTYPES):
        errors.append(f"export.weight_dtype={weight_dtype!r}; expected one of {WEIGHT_DTYPES} or null (as merged)")
    elif weight_dtype is not None and cfg.export.format != "hf":
        errors.append(
            f"export.weight_dtype={weight_dtype!r} writes DeepSeek's FP8 block format, which only export.format=hf "
            f"holds (got export.format={cfg.export.format!r})"
        )
    if cfg.export.get("names") not in (None, *NAMES):
        errors.append(f"export.names={cfg.export.names!r}; expected one of {NAMES} (or null: the format's default)")
    if cfg.peft.dim <= 0:
        errors.append(f"peft.dim must be positive, got {cfg.peft.dim}")
    from nemo_mla_lora.peft import parts, placements

    try:
        parts.validate(dict(cfg.peft.parts))
        if not cfg.peft.target_modules:
            placements.get(cfg.peft.placement)
    except ValueError as err:
        errors.append(f"peft: {err}")
    return errors


FP8_RECIPES = ("blockwise", "tensorwise", "delayed")


def fp8_errors(cfg) -> list[str]:
    """``model.fp8`` against the trainer: Transformer Engine's FP8 GEMMs run in NeMo's trainer on a GPU, with bf16
    for everything else.

    Args:
        cfg: the composed finetune config.
    """
    m, t = cfg.model, cfg.trainer
    if m.get("fp8") is None:
        return []
    errors = []
    if m.fp8 not in FP8_RECIPES:
        errors.append(f"model.fp8={m.fp8!r}; expected one of {FP8_RECIPES} or null (bf16)")
    if t.kind != "megatron":
        errors.append(
            f"model.fp8={m.fp8!r} runs Transformer Engine's FP8 GEMMs in NeMo's trainer on a GPU: trainer=megatron "
            f"(got trainer.kind={t.kind!r})"
        )
    if t.precision != "bf16-mixed":
        errors.append(f"model.fp8={m.fp8!r} needs trainer.precision=bf16-mixed (got {t.precision!r})")
    return errors


def output_dir_errors(cfg) -> list[str]:
    """``output_dir`` against ``model.checkpoint`` (``checkpoint.check_output``): the run writes checkpoints, logs,
    the adapter and the export under ``output_dir``, so it may not be, hold or lie inside the checkpoint it reads
    (nor be the working directory or a file).

    Args:
        cfg: the composed finetune config.
    """
    from nemo_mla_lora.checkpoints.output_dir import check_output

    ckpt = cfg.model.checkpoint
    try:
        check_output(cfg.output_dir, [ckpt] if ckpt else [])
    except ValueError as err:
        where = f" (model.checkpoint={ckpt})" if ckpt else ""
        return [
            f"output_dir={cfg.output_dir}{where}: {err}; the run writes its checkpoints, logs, adapter and "
            "export under output_dir"
        ]
    return []
