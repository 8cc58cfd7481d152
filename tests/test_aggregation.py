"""Tests of dcmdp.aggregation: hand-derived values, loop versus vectorised, masking, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from dcmdp.aggregation import AGG_MODES, aggregate, masked_mean

# B=3, T=3. Row 1 has no response token, so the sequence means must skip it.
VALUES_BT = torch.tensor([[1.0, 2.0, 3.0], [7.0, 8.0, 9.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
MASK_BT = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)


def test_token_mean_hand_value() -> None:
    # selected tokens 1, 2, 4 -> (1 + 2 + 4) / 3 = 7/3
    assert aggregate(VALUES_BT, MASK_BT, "token-mean").item() == pytest.approx(7 / 3)


def test_seq_mean_token_mean_hand_value() -> None:
    # row 0: (1 + 2) / 2 = 1.5; row 1 empty, skipped; row 2: 4 / 1 = 4 -> (1.5 + 4) / 2 = 2.75
    assert aggregate(VALUES_BT, MASK_BT, "seq-mean-token-mean").item() == pytest.approx(2.75)


def test_seq_mean_token_sum_hand_value() -> None:
    # row 0: 1 + 2 = 3; row 2: 4 -> (3 + 4) / 2 = 3.5
    assert aggregate(VALUES_BT, MASK_BT, "seq-mean-token-sum").item() == pytest.approx(3.5)


def test_constant_hand_value() -> None:
    # (1 + 2 + 4) / 10 = 0.7
    assert aggregate(VALUES_BT, MASK_BT, "constant", constant=10.0).item() == pytest.approx(0.7)


def test_masked_mean_hand_value() -> None:
    # any shape: (1 + 2 + 4) / 3
    assert masked_mean(VALUES_BT.flatten(), MASK_BT.flatten()).item() == pytest.approx(7 / 3)
    assert masked_mean(VALUES_BT, MASK_BT).item() == pytest.approx(7 / 3)


def test_float_weight_mask() -> None:
    # weights 0.5 on value 1 and 2.0 on value 4: (0.5 * 1 + 2 * 4) / 2.5 = 8.5 / 2.5 = 3.4
    values = torch.tensor([[1.0, 9.0], [4.0, 9.0]])
    weights = torch.tensor([[0.5, 0.0], [2.0, 0.0]])
    assert aggregate(values, weights, "token-mean").item() == pytest.approx(3.4)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_bool_and_float_masks_agree(mode: str) -> None:
    a = aggregate(VALUES_BT, MASK_BT, mode, constant=4.0)
    b = aggregate(VALUES_BT, MASK_BT.to(torch.float32), mode, constant=4.0)
    c = aggregate(VALUES_BT, MASK_BT.to(torch.int64), mode, constant=4.0)
    assert a.item() == pytest.approx(b.item()) == pytest.approx(c.item())
    assert a.dtype == torch.float64


def _loop_aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str, constant: float) -> float:
    """Reference: explicit Python loops over sequences and tokens."""
    total, count, seq_values = 0.0, 0.0, []
    for b in range(values.shape[0]):
        seq_sum, seq_count = 0.0, 0.0
        for t in range(values.shape[1]):
            if mask[b, t]:
                seq_sum += float(values[b, t])
                seq_count += 1
        total += seq_sum
        count += seq_count
        if seq_count > 0:
            seq_values.append(seq_sum / seq_count if mode == "seq-mean-token-mean" else seq_sum)
    if mode == "token-mean":
        return total / count
    if mode == "constant":
        return total / constant
    return sum(seq_values) / len(seq_values)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("seed", range(5))
def test_loop_versus_vectorised(mode: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    B = int(torch.randint(1, 6, (), generator=g))
    T = int(torch.randint(1, 8, (), generator=g))
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.6
    mask[0, 0] = True
    got = aggregate(values, mask, mode, constant=3.0).item()
    assert got == pytest.approx(_loop_aggregate(values, mask, mode, 3.0), abs=1e-12)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_garbage_at_masked_positions_changes_nothing(mode: str) -> None:
    dirty = VALUES_BT.clone()
    dirty[~MASK_BT] = torch.tensor(
        [math.nan, math.inf, -math.inf, 1e30, math.nan, math.nan], dtype=torch.float64
    )
    dirty.requires_grad_(True)
    out = aggregate(dirty, MASK_BT, mode, constant=2.0)
    assert out.item() == pytest.approx(aggregate(VALUES_BT, MASK_BT, mode, constant=2.0).item())
    out.backward()
    assert dirty.grad is not None
    assert torch.isfinite(dirty.grad).all()
    assert (dirty.grad[~MASK_BT] == 0).all()


def test_token_mean_gradient_is_mask_over_count() -> None:
    values = VALUES_BT.clone().requires_grad_(True)
    aggregate(values, MASK_BT, "token-mean").backward()
    assert values.grad is not None
    torch.testing.assert_close(values.grad, MASK_BT.to(torch.float64) / 3)


def test_unknown_mode_lists_valid_modes() -> None:
    with pytest.raises(ValueError, match="unknown aggregation mode 'mean'") as err:
        aggregate(VALUES_BT, MASK_BT, "mean")
    for mode in AGG_MODES:
        assert mode in str(err.value)


@pytest.mark.parametrize("constant", [None, 0.0, -1.0])
def test_constant_mode_needs_positive_constant(constant: float | None) -> None:
    with pytest.raises(ValueError, match="constant > 0"):
        aggregate(VALUES_BT, MASK_BT, "constant", constant=constant)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_empty_mask_raises(mode: str) -> None:
    with pytest.raises(ValueError, match="mask selects no response tokens"):
        aggregate(VALUES_BT, torch.zeros_like(MASK_BT), mode, constant=1.0)
    with pytest.raises(ValueError, match="mask selects no response tokens"):
        masked_mean(VALUES_BT, torch.zeros(3, 3))


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match=r"same shape.*\(3, 3\).*\(3, 2\)"):
        aggregate(VALUES_BT, MASK_BT[:, :2], "token-mean")
    with pytest.raises(ValueError, match="2-D"):
        aggregate(VALUES_BT.flatten(), MASK_BT.flatten(), "token-mean")
