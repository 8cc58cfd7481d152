"""Group-relative advantages (GRPO) and the degenerate-group metric.

GRPO (Shao et al. 2024, DeepSeekMath) samples G completions per prompt and uses, per completion,

    A_i = (r_i - mean_g r) / (std_g r + eps)        (scale_by_std=True, GRPO)
    A_i =  r_i - mean_g r                           (scale_by_std=False, Dr. GRPO, Liu et al. 2025)

with the mean and std taken over the completion's own group; every token of completion i gets A_i.
Rewards are laid out group-contiguous: ``rewards_N[g * G : (g + 1) * G]`` is group g.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def grpo_advantages(
    rewards_N: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """Per-completion group-normalised advantages A_N (same length as ``rewards_N``).

    The std is the population std (``unbiased=False``): it normalises the group's own rewards, so
    a non-degenerate group's advantages have mean 0 and mean square 1 (up to eps), and a group of 1
    needs no special case. verl and TRL use the Bessel-corrected std, which makes their
    advantages smaller by sqrt((G - 1) / G), e.g. 0.935 for G = 8; a uniform scale the learning
    rate absorbs.

    A group whose rewards are all equal carries no learning signal; its advantages are exactly 0
    (computed r - mean can be rounding noise of order 1e-17 that division by std + eps would blow
    up to order 1e-11..1).

    Raises:
        ValueError: ``rewards_N`` not 1-D or empty, non-finite rewards, group_size < 1, N not
            divisible by group_size, or eps < 0.
    """
    rewards_GK = _grouped(rewards_N, group_size)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    mean_G1 = rewards_GK.mean(dim=1, keepdim=True)
    adv_GK = rewards_GK - mean_G1
    if scale_by_std:
        std_G1 = rewards_GK.std(dim=1, keepdim=True, unbiased=False)
        adv_GK = adv_GK / (std_G1 + eps)
    degenerate_G1 = _all_equal(rewards_GK).unsqueeze(1)
    adv_GK = torch.where(degenerate_G1, torch.zeros_like(adv_GK), adv_GK)
    return adv_GK.reshape(-1)


def degenerate_group_fraction(rewards_N: Tensor, group_size: int) -> Tensor:
    """Fraction of groups whose rewards are all equal (zero advantage, no gradient), a scalar.

    Same layout and validation as :func:`grpo_advantages`.
    """
    rewards_GK = _grouped(rewards_N, group_size)
    return _all_equal(rewards_GK).to(rewards_GK.dtype).mean()


def _all_equal(rewards_GK: Tensor) -> Tensor:
    return rewards_GK.amax(dim=1) == rewards_GK.amin(dim=1)


def _grouped(rewards_N: Tensor, group_size: int) -> Tensor:
    """Validate and reshape rewards to (num_groups, group_size), as floats (at least float32)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")
    if rewards_N.dim() != 1:
        raise ValueError(f"rewards_N must be 1-D (N,), got shape {tuple(rewards_N.shape)}")
    n = rewards_N.shape[0]
    if n == 0:
        raise ValueError("rewards_N is empty")
    if n % group_size:
        raise ValueError(f"number of rewards N={n} is not divisible by group_size={group_size}")
    rewards = rewards_N.to(torch.promote_types(rewards_N.dtype, torch.float32))
    n_nan = int(torch.isnan(rewards).sum())
    if n_nan:
        raise ValueError(f"rewards_N has {n_nan} NaN reward(s)")
    n_inf = int(torch.isinf(rewards).sum())
    if n_inf:
        raise ValueError(f"rewards_N has {n_inf} infinite reward(s)")
    return rewards.reshape(n // group_size, group_size)
