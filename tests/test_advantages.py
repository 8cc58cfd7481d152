"""GRPO advantages: hand-derived values, loop versus vectorised, properties, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from dcmdp.advantages import degenerate_group_fraction, grpo_advantages


def test_hand_derived_grpo() -> None:
    # group 0: mean 1/2, population std 1/2 -> (r - 1/2) / (1/2) = ±1
    # group 1: all equal -> exactly 0
    # group 2: mean 3/4, deviations (-3/4, -3/4, -3/4, 9/4), variance (3·9/16 + 81/16)/4 = 27/16,
    #          std = (3/4)·sqrt(3) -> (-1/sqrt3, -1/sqrt3, -1/sqrt3, sqrt3)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 3.0], dtype=torch.float64)
    s = math.sqrt(3)
    want = [1, -1, -1, 1, 0, 0, 0, 0, -1 / s, -1 / s, -1 / s, s]
    got = grpo_advantages(rewards, group_size=4, eps=0.0)
    assert got.tolist() == pytest.approx(want, abs=1e-12)
    # eps sits in the denominator: group 0 becomes ±(1/2)/(1/2 + eps)
    got_eps = grpo_advantages(rewards, group_size=4, eps=0.5)
    assert got_eps[:4].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5], abs=1e-12)


def test_hand_derived_dr_grpo_no_std() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 3.0], dtype=torch.float64)
    got = grpo_advantages(rewards, group_size=4, scale_by_std=False)
    want = [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.75, -0.75, -0.75, 2.25]
    assert got.tolist() == pytest.approx(want, abs=1e-12)


def test_degenerate_group_fraction_hand() -> None:
    rewards = torch.tensor([1.0, 0.0, 2.0, 2.0, 0.5, 0.5])  # groups: (1,0) (2,2) (0.5,0.5)
    assert float(degenerate_group_fraction(rewards, 2)) == pytest.approx(2 / 3)
    assert float(degenerate_group_fraction(rewards, 1)) == 1.0  # a group of one is always degenerate
    assert float(degenerate_group_fraction(rewards, 6)) == 0.0


def test_equal_rewards_give_exact_zero_not_amplified_noise() -> None:
    # the float mean of three 0.1s is not exactly 0.1; without the guard, r - mean is ~1e-17 and
    # division by (std + eps) would amplify it
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 1 / 3, 1 / 3, 1 / 3], dtype=torch.float64)
    got = grpo_advantages(rewards, group_size=3)
    assert torch.equal(got, torch.zeros(9, dtype=torch.float64))
    assert not torch.isnan(got).any()
    assert torch.equal(grpo_advantages(rewards, group_size=1), torch.zeros(9, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_loop_versus_vectorised(seed: int, scale_by_std: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    group_size = int(torch.randint(1, 9, (1,), generator=gen))
    num_groups = int(torch.randint(1, 6, (1,), generator=gen))
    # binary rewards make degenerate groups common; a few groups get continuous rewards
    rewards = torch.randint(0, 2, (num_groups * group_size,), generator=gen).double()
    rewards[:group_size] = torch.rand(group_size, generator=gen, dtype=torch.float64)
    got = grpo_advantages(rewards, group_size, scale_by_std=scale_by_std, eps=1e-6).tolist()
    flat = rewards.tolist()
    want = []
    for g in range(num_groups):
        group = flat[g * group_size : (g + 1) * group_size]
        mean = sum(group) / group_size
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / group_size)
        for x in group:
            if max(group) == min(group):
                want.append(0.0)
            elif scale_by_std:
                want.append((x - mean) / (std + 1e-6))
            else:
                want.append(x - mean)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)


def test_properties_zero_mean_unit_mean_square() -> None:
    gen = torch.Generator().manual_seed(11)
    rewards = torch.randn(5 * 8, generator=gen, dtype=torch.float64)
    adv = grpo_advantages(rewards, 8, eps=0.0).reshape(5, 8)
    assert torch.allclose(adv.mean(dim=1), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(adv.pow(2).mean(dim=1), torch.ones(5, dtype=torch.float64), atol=1e-12)
    # shifting or positively scaling a group's rewards does not change its normalised advantages
    assert torch.allclose(grpo_advantages(3.0 * rewards + 7.0, 8, eps=0.0).reshape(5, 8), adv, atol=1e-12)


def test_integer_and_low_precision_rewards_become_float() -> None:
    got = grpo_advantages(torch.tensor([1, 0, 0, 1]), 2, eps=0.0)
    assert got.dtype == torch.float32
    assert got.tolist() == [1.0, -1.0, -1.0, 1.0]
    assert grpo_advantages(torch.tensor([1.0, 0.0], dtype=torch.bfloat16), 2).dtype == torch.float32


@pytest.mark.parametrize(
    ("rewards", "group_size", "needle"),
    [
        (torch.zeros(7), 4, "not divisible"),
        (torch.zeros(4), 0, "group_size"),
        (torch.zeros(4), -2, "group_size"),
        (torch.tensor([1.0, math.nan, 0.0, 1.0]), 2, "1 NaN"),
        (torch.tensor([1.0, math.inf, 0.0, 1.0]), 2, "infinite"),
        (torch.zeros(2, 4), 4, "1-D"),
        (torch.zeros(0), 4, "empty"),
    ],
)
def test_bad_input_raises(rewards: torch.Tensor, group_size: int, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        grpo_advantages(rewards, group_size)
    with pytest.raises(ValueError, match=needle):
        degenerate_group_fraction(rewards, group_size)


def test_bad_eps_raises() -> None:
    with pytest.raises(ValueError, match="eps"):
        grpo_advantages(torch.zeros(4), 2, eps=-1.0)
