"""DeepSeek-V3's FP8 block format, written: a linear weight [out, in] as float8_e4m3fn with a float32
``<name>_scale_inv`` [ceil(out/128), ceil(in/128)], the dequantized weight being fp8 * scale_inv per 128x128
block (what ``sources.dequantize_fp8`` reads). Each block's scale is its max |w| / 448 (e4m3's largest finite
value); an all-zero block gets scale 1 (its fp8 values are zero). Which tensors: those DeepSeek-V3 ships in FP8,
the 2-D linear weights of attention, dense MLPs and experts; not embeddings, lm_head, norms, the router."""

import re

import torch

from nemo_mla_lora.checkpoints.sources import FP8_BLOCK, dequantize_fp8

E4M3_MAX = 448.0
QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}
FP8_LINEAR = re.compile(
    r"\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$"
)
SCALE_SUFFIX = "_scale_inv"


def is_quantized(hf_name: str, shape: tuple) -> bool:
    """Whether DeepSeek-V3 stores ``hf_name`` in FP8: a 2-D attention, MLP or expert linear weight.

    Args:
        hf_name: the HF tensor name.
        shape: its shape.
    """
    return len(shape) == 2 and FP8_LINEAR.search(hf_name) is not None


def scale_shape(shape: tuple) -> tuple:
    """The block scales' shape [ceil(out/128), ceil(in/128)] of a weight ``shape`` [out, in].

    Args:
        shape: the weight's shape.
    """
    return (-(-shape[0] // FP8_BLOCK), -(-shape[1] // FP8_BLOCK))


def quantize_block_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale_inv) of a 2-D ``weight``, 128x128 blocks, scale = block amax / 448.

    Args:
        weight: a 2-D float tensor [out, in].
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_block_fp8: expected a 2-D float weight, got {weight.dtype} {tuple(weight.shape)}")
    rows, cols = weight.shape
    blocks = scale_shape(weight.shape)
    w = weight.float()
    if not torch.isfinite(w).all():
        raise ValueError(f"quantize_block_fp8: the {tuple(weight.shape)} weight has non-finite values")
    padded = torch.zeros(blocks[0] * FP8_BLOCK, blocks[1] * FP8_BLOCK, device=w.device)
    padded[:rows, :cols] = w.abs()
    amax = padded.view(blocks[0], FP8_BLOCK, blocks[1], FP8_BLOCK).amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    per_element = scale.repeat_interleave(FP8_BLOCK, 0)[:rows].repeat_interleave(FP8_BLOCK, 1)[:, :cols]
    q = (w / per_element).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale.contiguous()


def quantize_hf(state: dict) -> tuple[dict, dict, dict]:
    """An HF state dict with its FP8 tensors quantized (each followed by its ``_scale_inv``), the dequantized
    weights (in each weight's own dtype) and each quantized tensor's max |dequantized - w| / max |w|.

    Args:
        state: HF name -> tensor (the bf16/fp32 merge).
    """
    out, dequantized, errors = {}, {}, {}
    for name, w in state.items():
        if not is_quantized(name, tuple(w.shape)):
            out[name] = dequantized[name] = w
            continue
        q, scale = quantize_block_fp8(w)
        out[name], out[name + SCALE_SUFFIX] = q, scale
        dequantized[name] = dequantize_fp8(q, scale, w.dtype, name=name)
        back = dequantize_fp8(q, scale, torch.float32, name=name)
        errors[name] = (back - w.float()).abs().max().item() / max(w.float().abs().max().item(), 1e-30)
    return out, dequantized, errors


def quantized_layout(layout: dict) -> dict:
    """An HF layout (name -> (dtype, shape)) as ``quantize_hf`` writes it: FP8 weights and their scales.

    Args:
        layout: HF name -> (dtype, shape) of the unquantized tensors.
    """
    out = {}
    for name, (dtype, shape) in layout.items():
        if is_quantized(name, shape):
            out[name] = (torch.float8_e4m3fn, shape)
            out[name + SCALE_SUFFIX] = (torch.float32, scale_shape(shape))
        else:
            out[name] = (dtype, shape)
    return out
