"""Means over the response tokens a mask selects: the one place they are written.

Two needs, two functions:

- :func:`masked_mean`, for measurements and token-mean terms: ``sum_t [m_t] v_t / sum_t [m_t]``
  over a bool or 0/1 mask; an empty mask gives 0 (not NaN), so an empty micro-batch adds nothing,
  and there is no device read-back (the losses call it many times per step).
- :func:`weighted_mean`, for the loss aggregation: ``sum_t w_t v_t / sum_t w_t`` over non-negative
  weights (a bool mask is weights 0/1); an all-zero mask raises ``ValueError``, because an empty
  batch has no loss to aggregate (one boolean read back from the device).

Masked positions never enter either result, nor the gradient reaching ``values``, even when they
hold NaN or inf: they are removed with ``torch.where`` (``nan * 0`` would be ``nan``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over the set positions of ``mask`` (same shape, bool or 0/1).

    sum_t [m_t] v_t / sum_t [m_t]; masked values never enter, even NaN. An empty mask gives 0
    (not NaN), so an empty micro-batch contributes nothing to a loss. Differentiable.
    """
    check_same_shape("values", values, "mask", mask)
    m = as_bool(mask)
    total = torch.where(m, values, torch.zeros_like(values)).sum()
    return total / m.sum().clamp(min=1).to(total.dtype)


def masked_weights(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(where(mask != 0, values * mask, 0), mask as values.dtype)``, after shape and emptiness
    checks: the weighted values and the weights that :func:`weighted_mean` and the loss
    aggregation (``dcmdp.algo.aggregation``) reduce."""
    if values.shape != mask.shape:
        raise ValueError(
            f"values and mask must have the same shape, got values {tuple(values.shape)} "
            f"and mask {tuple(mask.shape)}"
        )
    mask_f = mask.to(values.dtype)
    keep = mask_f != 0
    if not bool(keep.any()):
        raise ValueError(
            f"mask selects no response tokens (shape {tuple(mask.shape)}, all zero); "
            "an empty batch has no loss to aggregate"
        )
    return torch.where(keep, values * mask_f, torch.zeros_like(values)), mask_f


def weighted_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Token mean over the mask: ``sum(m * v) / sum(m)``, any shape, masked positions ignored;
    the mask may hold non-negative weights.

    Raises ``ValueError`` on a shape mismatch or an all-zero mask.
    """
    weighted, mask_f = masked_weights(values, mask)
    return weighted.sum() / mask_f.sum()


def as_bool(mask: Tensor) -> Tensor:
    """``mask`` as a bool tensor (non-zero = set)."""
    return mask if mask.dtype == torch.bool else mask != 0


def check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Raise ``ValueError`` naming both tensors when their shapes differ."""
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}")
