"""Moved to :mod:`dcmdp.engines.quantize`; this module keeps ``dcmdp.quantize`` imports working (see README, Layout)."""

from dcmdp.engines.quantize import (
    DEFAULT_SKIP,
    FP8_E4M3_MAX,
    QUANT_MODES,
    quantizable_weight_names,
    quantize_fp8,
    quantize_int3,
    quantize_int4,
    quantize_int8,
    quantize_linear_weights_,
    quantize_weight,
)

__all__ = [
    "DEFAULT_SKIP",
    "FP8_E4M3_MAX",
    "QUANT_MODES",
    "quantizable_weight_names",
    "quantize_fp8",
    "quantize_int3",
    "quantize_int4",
    "quantize_int8",
    "quantize_linear_weights_",
    "quantize_weight",
]
