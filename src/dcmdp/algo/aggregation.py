"""Reduce a per-token quantity ``values_BT`` over the response tokens selected by ``mask_BT``.

One helper serves every policy loss (STYLE principle 2); the loss picks the mode by name.

| mode                  | formula                                                        | used by            |
|-----------------------|----------------------------------------------------------------|--------------------|
| ``token-mean``        | sum_bt m_bt v_bt / sum_bt m_bt                                 | DAPO, verl default |
| ``seq-mean-token-mean``| mean over sequences with >=1 token of (sum_t m v / sum_t m)   | original GRPO      |
| ``seq-mean-token-sum``| mean over sequences with >=1 token of sum_t m v                | verl option        |
| ``constant``          | sum_bt m_bt v_bt / constant                                    | Dr. GRPO           |

Sources: DAPO (Yu et al. 2025) for token-mean; GRPO (Shao et al. 2024) for the per-sequence mean;
Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training") for a constant normaliser that
does not depend on response length. Mode names follow verl's ``loss_agg_mode``.

The mask may be bool or numeric (0/1, or non-negative weights); it is cast to the values' dtype.
Positions where the mask is zero never influence the result, nor the gradient reaching
``values_BT``, even when they hold NaN or inf: they are removed with ``torch.where`` rather than by
multiplying with zero (``nan * 0`` is ``nan``).

An empty mask raises ``ValueError``; that check reads one boolean back from the device. The
masked means themselves live in :mod:`dcmdp.algo.masked`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dcmdp.algo.masked import masked_weights, weighted_mean

AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "constant")

#: The strict token mean (weights allowed, an empty mask raises), under the name it has had here;
#: written once in :mod:`dcmdp.algo.masked`.
masked_mean = weighted_mean


def aggregate(values_BT: Tensor, mask_BT: Tensor, mode: str, constant: float | None = None) -> Tensor:
    """Reduce per-token ``values_BT`` [B, T] over response tokens ``mask_BT`` [B, T] to a scalar.

    Modes (see the module docstring for sources):
      - ``token-mean``: ``sum_bt m v / sum_bt m``; every token weighs the same (DAPO).
      - ``seq-mean-token-mean``: ``mean_b (sum_t m v / sum_t m)`` over sequences with at least one
        response token; every sequence weighs the same (GRPO).
      - ``seq-mean-token-sum``: ``mean_b sum_t m v`` over sequences with at least one response token.
      - ``constant``: ``sum_bt m v / constant``, ``constant > 0`` given by the caller (Dr. GRPO).

    Raises ``ValueError`` for an unknown mode, a missing or non-positive constant, tensors that are
    not 2-D of the same shape, or a mask that selects no token.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; valid modes: {', '.join(AGG_MODES)}")
    if mode == "constant" and (constant is None or not constant > 0):
        raise ValueError(f"aggregation mode 'constant' needs constant > 0, got {constant!r}")
    if values_BT.ndim != 2:
        raise ValueError(f"values_BT must be 2-D [B, T], got shape {tuple(values_BT.shape)}")
    weighted_BT, mask_f_BT = masked_weights(values_BT, mask_BT)

    if mode == "token-mean":
        return weighted_BT.sum() / mask_f_BT.sum()
    if mode == "constant":
        assert constant is not None  # checked above; narrows the type for mypy
        return weighted_BT.sum() / constant

    tokens_B = mask_f_BT.sum(dim=-1)
    has_tokens_B = tokens_B > 0
    sum_B = weighted_BT.sum(dim=-1)
    if mode == "seq-mean-token-mean":
        # clamp keeps empty sequences finite (0 / 1); they are then dropped by the where below.
        per_seq_B = sum_B / tokens_B.clamp(min=torch.finfo(tokens_B.dtype).tiny)
    else:  # seq-mean-token-sum
        per_seq_B = sum_B
    per_seq_B = torch.where(has_tokens_B, per_seq_B, torch.zeros_like(per_seq_B))
    return per_seq_B.sum() / has_tokens_B.sum().to(values_BT.dtype)
