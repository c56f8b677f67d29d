"""``weight_dtype=fp8_block`` of the ``hf`` export: each merged unit quantized to DeepSeek's FP8 block format
(``checkpoints/fp8.py``) before it is written. The usual verify then compares the unmerged model with the
export as written (the FP8 weights dequantized), and its bound is widened by the measured quantization error
alone: the logits (``sample``: each layer's output) of the dequantized export against the bf16/fp32 merge,
computed by a second verifier over the same units."""

import time

from nemo_mla_lora.arch import keymap
from nemo_mla_lora.checkpoints import fp8
from nemo_mla_lora.export.verify import StreamingVerify

WEIGHT_DTYPES = ("fp8_block",)


def check_weight_dtype(weight_dtype: str | None, fmt: str) -> None:
    """Refuses an unknown ``weight_dtype`` or one for a format other than ``hf``.

    Args:
        weight_dtype: None (as merged) or ``fp8_block``.
        fmt: the export format.
    """
    if weight_dtype is None:
        return
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype={weight_dtype!r}; expected one of {WEIGHT_DTYPES} or null (as merged)")
    if fmt != "hf":
        raise ValueError(
            f"weight_dtype={weight_dtype} applies to format=hf only (DeepSeek's FP8 safetensors), not format={fmt}"
        )


class FP8Quantize:
    """``__call__(unit, merged)`` -> (the HF tensors to write, FP8 quantized, and the dequantized weights under
    Megatron names, for the verify); ``widen(report)`` and ``report()`` after the last unit."""

    def __init__(self, spec, mode: str, layers, dtype: str):
        self.errors, self.seconds = {}, 0.0
        self.gap = StreamingVerify(spec, False, mode, layers, None, dtype)  # the bf16/fp32 merge vs the FP8 export

    def __call__(self, unit, merged: dict) -> tuple[dict, dict]:
        start = time.perf_counter()
        written, dequantized, errors = fp8.quantize_hf(keymap.megatron_to_hf(merged))
        self.errors.update(errors)
        dequantized = keymap.hf_to_megatron(dequantized)
        self.gap.reference(unit, merged, {})
        self.gap.export(unit, dequantized)
        self.seconds += time.perf_counter() - start
        return written, dequantized

    def widen(self, report: dict) -> dict:
        """The verify ``report`` with each bound raised by the measured FP8 difference at the same place."""
        if report["mode"] == "none":
            return report
        gap = self.gap.report()
        report = dict(report, bound_unquantized=report["bound"], bound=report["bound"] + gap["max_abs_logit_diff"])
        report["passed"] = report["max_abs_logit_diff"] <= report["bound"]
        for layer, entry in report.get("layers", {}).items():
            widened = entry["bound"] + self.gap.layer_reports[int(layer)]["max_abs_diff"]
            entry.update(bound_unquantized=entry["bound"], bound=widened, passed=entry["max_abs_diff"] <= widened)
            report["passed"] = report["passed"] and entry["passed"]
        report["compared"] += "; FP8 weights dequantized, bound widened by the FP8 export's difference from the merge"
        return report

    def report(self) -> dict:
        """The manifest's ``fp8`` entry: the format written and the measured quantization error."""
        worst = max(self.errors, key=self.errors.get) if self.errors else None
        out = {
            "quantization_config": dict(fp8.QUANTIZATION_CONFIG),
            "quantized_tensors": len(self.errors),
            "max_relative_error": self.errors[worst] if worst else 0.0,
            "max_relative_error_tensor": worst,
            "relative_error": "per tensor: max |dequantized FP8 - merged weight| / max |merged weight|",
        }
        if self.gap.mode != "none":
            gap = self.gap.report()
            out["logits_vs_merge"] = {
                k: gap[k] for k in ("max_abs_logit_diff", "mean_abs_logit_diff", "max_abs_logit", "mode") if k in gap
            }
            if "layers" in gap:
                out["logits_vs_merge"]["layers"] = {k: v["max_abs_diff"] for k, v in gap["layers"].items()}
        return out
