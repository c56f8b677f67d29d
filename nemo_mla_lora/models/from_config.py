"""The ``model`` and ``trainer`` config groups -> NeMo's DeepSeek config (a Megatron-Core ``MLATransformerConfig``).

The architecture comes from the checkpoint (``models/architecture.resolve``) and becomes Megatron fields in
one place (``models/from_spec.config_from_spec``); this adds only what the run chooses: dtype, sequence
length and the parallel layout.
"""

import torch

from nemo_mla_lora.models.architecture import resolve
from nemo_mla_lora.models.from_spec import config_from_spec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def nemo_model_config(model_cfg, trainer_cfg=None, spec=None):
    """DeepSeekV3Config / DeepSeekV2Config for the run (``spec``: already resolved, else read now)."""
    spec = spec or resolve(model_cfg)
    args = dict(seq_length=model_cfg.seq_length)
    if trainer_cfg is not None:
        t = trainer_cfg
        args.update(
            tensor_model_parallel_size=t.tensor_parallel,
            pipeline_model_parallel_size=t.pipeline_parallel,
            expert_model_parallel_size=t.expert_parallel,
            context_parallel_size=t.context_parallel,
            sequence_parallel=t.sequence_parallel,
            num_layers_in_first_pipeline_stage=t.layers_in_first_pipeline_stage,
            num_layers_in_last_pipeline_stage=t.layers_in_last_pipeline_stage,
            cross_entropy_loss_fusion=t.cross_entropy_loss_fusion,
        )
    return config_from_spec(spec, DTYPES[model_cfg.dtype], **args)
