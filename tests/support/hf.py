"""Shared by the tests: tiny HF checkpoints made by transformers' own classes (``scripts/make_tiny_hf.py``) and
transformers' models as the oracle."""

import importlib.util
from pathlib import Path

import torch

from nemo_mla_lora.arch import hf_config, keymap
from nemo_mla_lora.arch.mla_spec import yarn_mscale

ROOT = Path(__file__).resolve().parents[2]


def _maker():
    spec = importlib.util.spec_from_file_location("make_tiny_hf", ROOT / "scripts" / "make_tiny_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAKER = _maker()
VARIANTS = sorted(MAKER.VARIANTS)


def hf_model(directory, adapter=None):
    """transformers' own model on the checkpoint (eager attention, fp32), with DeepSeek's V2 YaRN softmax
    factor (module docstring); with ``adapter``, peft's ``PeftModel`` over it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32, attn_implementation="eager")
    c = model.config
    if c.model_type == "deepseek_v2" and c.rope_scaling:
        m = yarn_mscale(c.rope_scaling["factor"], c.rope_scaling.get("mscale_all_dim", 0))
        for layer in model.model.layers:
            layer.self_attn.scaling = layer.self_attn.scaling * m * m
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def prompt_tokens(vocab: int, batch: int = 2, length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_model_from_state(spec, state):
    """transformers' DeepseekV3 (eager attention) holding a Megatron-named state dict."""
    from transformers import DeepseekV3ForCausalLM

    config = hf_config.hf_model_config(spec)
    config._attn_implementation = "eager"
    model = DeepseekV3ForCausalLM(config).to(next(iter(state.values())).dtype).eval()
    model.load_state_dict(keymap.megatron_to_hf(state), strict=True)
    return model
