"""Weight-only round-to-nearest (RTN) fake quantization, for quantized rollout engines.

Each weight matrix is quantized per output channel (one scale per row) and immediately
dequantized back to the working dtype, so any backend runs the model with plain matmuls while the
numbers are those of a weight-only int8 / int4 / fp8 deployment. Activations stay in the working
dtype (int3 stands for an aggressive 3-bit build). This imitates the error of a quantized inference build (what vLLM's fp8 or a GPTQ/AWQ int4
checkpoint does to the weights), not its speed.

What is quantized: the weight of every ``nn.Linear`` in the transformer blocks (attention
q/k/v/o and MLP projections) and the fused 3-D expert stacks of MoE layers (``(E, out, in)``,
quantized per expert and output row). What is not: the token embeddings, the output head
(``lm_head``), norms, biases and MoE routers (router weights are 2-D ``nn.Parameter``s, not
``nn.Linear``). Keeping the head and embeddings in high precision is what weight-only
deployments usually do (vLLM fp8, GPTQ, AWQ) and it keeps a tied embedding / head pair intact.

Rounding is ``torch.round`` (round half to even); the fp8 cast rounds to nearest even as well.
All functions are deterministic, so re-quantizing the same weights gives the same result.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

QUANT_MODES = ("int8", "int4", "int3", "fp8")
FP8_E4M3_MAX = 448.0  # largest finite torch.float8_e4m3fn value
DEFAULT_SKIP = ("lm_head",)


def _check_mode(mode: str) -> None:
    if mode not in QUANT_MODES:
        raise ValueError(f"quantization {mode!r} is unknown; valid: {', '.join(QUANT_MODES)}")


def _row_absmax(w: Tensor) -> Tensor:
    """max_j |w[..., i, j]| per output row (last dim reduced), kept for broadcasting."""
    return w.abs().amax(dim=-1, keepdim=True)


def _safe_scale(absmax: Tensor, qmax: float) -> Tensor:
    # An all-zero row has scale 0; use 1 so it stays exactly zero instead of 0/0 = NaN.
    scale = absmax / qmax
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _quantize_symmetric_int(w: Tensor, qmax: int) -> Tensor:
    """Symmetric per-output-channel RTN to the signed grid [-(qmax + 1), qmax], dequantized.

    s_i = max_j |w_ij| / qmax;  q_ij = clamp(round(w_ij / s_i), -(qmax + 1), qmax);  w'_ij = s_i * q_ij.
    (With this scale round(w/s) already lies in [-qmax, qmax]; the clamp states the integer range.)
    Computed in float32 and returned in ``w.dtype``.
    """
    w32 = w.float()
    s = _safe_scale(_row_absmax(w32), float(qmax))
    return (torch.clamp(torch.round(w32 / s), -(qmax + 1), qmax) * s).to(w.dtype)


def quantize_int8(w: Tensor) -> Tensor:
    """int8: s_i = max_j |w_ij| / 127, levels in [-127, 127] (-128 is never reached)."""
    return _quantize_symmetric_int(w, 127)


def quantize_int4(w: Tensor) -> Tensor:
    """int4: s_i = max_j |w_ij| / 7, levels in [-8, 7]."""
    return _quantize_symmetric_int(w, 7)


def quantize_int3(w: Tensor) -> Tensor:
    """int3 (an aggressive 3-bit deployment): s_i = max_j |w_ij| / 3, levels in [-4, 3]."""
    return _quantize_symmetric_int(w, 3)


def quantize_fp8(w: Tensor) -> Tensor:
    """Per-output-channel fp8 e4m3 round trip, dequantized.

    s_i = max_j |w_ij| / 448;  w'_ij = s_i * float(fp8_e4m3fn(w_ij / s_i)),
    so each row's largest entry maps to the fp8 maximum 448 and the rest round to the nearest
    e4m3 value (3 mantissa bits: relative spacing 2^-3 within each binade).
    """
    w32 = w.float()
    s = _safe_scale(_row_absmax(w32), FP8_E4M3_MAX)
    q = (w32 / s).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()
    return (q * s).to(w.dtype)


_QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4, "int3": quantize_int3, "fp8": quantize_fp8}


def quantize_weight(w: Tensor, mode: str) -> Tensor:
    """Quantize-dequantize one weight tensor (rows = output channels, last dim = inputs)."""
    _check_mode(mode)
    return _QUANTIZERS[mode](w)


def quantizable_weight_names(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP) -> list[str]:
    """Names (as in ``model.named_parameters(remove_duplicate=False)``) of the weights that
    ``quantize_linear_weights_`` touches: ``nn.Linear`` weights and 3-D parameters (fused MoE
    expert stacks), minus any whose module path has a component in ``skip``.

    A weight shared with a skipped module (a tied ``lm_head`` / embedding) is never included.
    """
    skip = tuple(skip)
    skipped_ids: set[int] = set()
    candidates: list[tuple[str, Tensor]] = []
    for mod_name, module in model.named_modules():
        parts = mod_name.split(".") if mod_name else []
        is_skipped = any(s in parts for s in skip) or isinstance(module, nn.Embedding)
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if is_skipped:
                skipped_ids.add(id(p))
            elif (isinstance(module, nn.Linear) and p_name == "weight") or p.ndim == 3:
                candidates.append((full, p))
    return [name for name, p in candidates if id(p) not in skipped_ids]


@torch.no_grad()
def quantize_linear_weights_(
    model: nn.Module, mode: str, skip: Iterable[str] = DEFAULT_SKIP, skip_names: Iterable[str] = ()
) -> list[str]:
    """Replace, in place, each weight named by ``quantizable_weight_names`` (except those in
    ``skip_names``) with its quantize-dequantize image under ``mode`` ("int8" | "int4" | "int3" |
    "fp8"). Returns the names touched.
    """
    _check_mode(mode)
    kept = set(skip_names)
    names = [n for n in quantizable_weight_names(model, skip) if n not in kept]
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in names:
        params[name].copy_(quantize_weight(params[name], mode))
    return names
