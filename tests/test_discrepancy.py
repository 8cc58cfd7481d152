"""Discrepancy metrics: hand-derived values, loop-versus-vectorised, properties, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from dcmdp.discrepancy import (
    METRIC_NAMES,
    check_logprobs,
    discrepancy_metrics,
    fill_masked,
    masked_mean,
    mean_prob_gap,
    prob_gap,
    token_count,
)

LN2 = math.log(2.0)
NAN, INF = math.nan, math.inf


def values(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k.removeprefix("discrepancy/"): float(v) for k, v in metrics.items()}


def tiny_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three response tokens, (trainer p, engine q): (1/2, 1/4), (1/4, 1/4) in sequence 0,
    (1/4, 1/2) in sequence 1, sequence 2 empty; padding holds garbage."""
    logp = torch.tensor(
        [[math.log(0.5), math.log(0.25)], [math.log(0.25), NAN], [INF, 5.0]], dtype=torch.float64
    )
    engine = torch.tensor(
        [[math.log(0.25), math.log(0.25)], [math.log(0.5), -INF], [NAN, NAN]], dtype=torch.float64
    )
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    return logp, engine, mask


# ----------------------------------------------------------------------------- hand-derived


def test_hand_derived_values() -> None:
    logp, engine, mask = tiny_batch()
    got = values(discrepancy_metrics(logp, engine, mask, gap_threshold=0.1))
    L = LN2
    # logr = [L, 0, -L], r = [2, 1, 1/2], delta = [1/4, 0, 1/4], n = 3 tokens
    expected = {
        "prob_gap_mean": (0.25 + 0 + 0.25) / 3,  # 1/6
        "prob_gap_max": 0.25,
        "abs_log_ratio_mean": 2 * L / 3,
        "log_ratio_mean": 0.0,  # (L + 0 - L) / 3
        "kl_engine_trainer_k1": 0.0,  # mean(-logr)
        "kl_engine_trainer_k2": L**2 / 3,  # (L²/2 + 0 + L²/2) / 3
        # r - 1 - logr: (1 - L) + 0 + (-1/2 + L) = 1/2, over 3
        "kl_engine_trainer_k3": 1 / 6,
        # r logr: 2L + 0 - L/2 = 3L/2, over 3
        "kl_trainer_engine_k1": L / 2,
        # r logr²/2: 2·L²/2 + 0 + (1/2)·L²/2 = 5L²/4, over 3
        "kl_trainer_engine_k2": 5 * L**2 / 12,
        # 1 - r + r logr: (-1 + 2L) + 0 + (1/2 - L/2) = -1/2 + 3L/2, over 3
        "kl_trainer_engine_k3": -1 / 6 + L / 2,
        "chi2_token": (4 + 1 + 0.25) / 3 - 1,  # 0.75
        # sequence sums of logr: L and -L; (e^{2L} + e^{-2L}) / 2 - 1 = (4 + 1/4) / 2 - 1
        "chi2_seq": 1.125,
        # -mean logp = (L + 2L + 2L) / 3 = 5L/3 on both sides
        "ppl_trainer": 2 ** (5 / 3),
        "ppl_engine": 2 ** (5 / 3),
        "ppl_ratio": 1.0,
        "seq_log_ratio_mean": 0.0,  # (L - L) / 2
        "seq_log_ratio_abs_mean": L,
        # per-sequence mean logr: L/2 and -L -> (sqrt 2 + 1/2) / 2
        "seq_geo_ratio_mean": (math.sqrt(2) + 0.5) / 2,
        # p = [1/2, 1/4, 1/4], q = [1/4, 1/4, 1/2], both mean 1/3:
        # dp = [1/6, -1/12, -1/12], dq = [-1/12, -1/12, 1/6]; cov = -3/144, var = 6/144 each
        "prob_pearson": -0.5,
        "frac_gap_above": 2 / 3,  # two gaps of 0.25 > 0.1
        "num_tokens": 3.0,
        "num_seqs": 2.0,
        "num_empty_seqs": 1.0,
    }
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert got[name] == pytest.approx(want, abs=1e-12), name


def test_names_are_stable_and_complete() -> None:
    logp, engine, mask = tiny_batch()
    metrics = discrepancy_metrics(logp, engine, mask)
    assert tuple(metrics) == METRIC_NAMES
    assert all(name.startswith("discrepancy/") for name in METRIC_NAMES)
    for v in metrics.values():
        assert v.dim() == 0 and not v.requires_grad and v.dtype == torch.float64


def test_frac_gap_above_threshold_is_strict() -> None:
    logp, engine, mask = tiny_batch()
    assert (
        float(discrepancy_metrics(logp, engine, mask, gap_threshold=0.25)["discrepancy/frac_gap_above"]) == 0
    )
    assert (
        float(discrepancy_metrics(logp, engine, mask, gap_threshold=0.3)["discrepancy/frac_gap_above"]) == 0
    )
    # the paper's c = 0.0037 is the default: both gaps of 0.25 exceed it
    got = float(discrepancy_metrics(logp, engine, mask)["discrepancy/frac_gap_above"])
    assert got == pytest.approx(2 / 3)


def test_clamp_at_safety_bound() -> None:
    # logr = 30 on the single token: r is exp(20), not exp(30); chi2_seq uses exp(2·20)
    logp = torch.tensor([[0.0]], dtype=torch.float64)
    engine = torch.tensor([[-30.0]], dtype=torch.float64)
    got = values(discrepancy_metrics(logp, engine, torch.ones(1, 1, dtype=torch.bool)))
    assert got["chi2_token"] == pytest.approx(math.exp(40) - 1)
    assert got["chi2_seq"] == pytest.approx(math.exp(40) - 1)
    assert got["seq_geo_ratio_mean"] == pytest.approx(math.exp(20))
    assert got["kl_engine_trainer_k1"] == pytest.approx(-30.0)  # linear terms are not clamped
    assert all(math.isfinite(v) for v in got.values())


def test_building_blocks_hand_values() -> None:
    logp = torch.log(torch.tensor([0.5, 0.2], dtype=torch.float64))
    engine = torch.log(torch.tensor([0.4, 0.3], dtype=torch.float64))
    assert torch.allclose(prob_gap(logp, engine), torch.tensor([0.1, 0.1], dtype=torch.float64))
    v = torch.tensor([1.0, NAN, 3.0, INF])
    m = torch.tensor([1, 0, 1, 0])
    assert float(masked_mean(v, m)) == 2.0
    assert int(token_count(m)) == 2
    assert float(masked_mean(v, torch.zeros(4, dtype=torch.bool))) == 0.0  # empty mask: 0, not NaN
    assert torch.equal(fill_masked(v, m, fill=-1.0), torch.tensor([1.0, -1.0, 3.0, -1.0]))


# ----------------------------------------------------------------------------- loop versus vectorised


def reference_metrics(logp: list[list[float]], engine: list[list[float]], mask: list[list[bool]], thr: float):
    """Every metric with plain Python loops over sequences and tokens."""

    def clamp(x: float) -> float:
        return max(-20.0, min(20.0, x))

    toks = [(logp[b][t], engine[b][t]) for b in range(len(mask)) for t in range(len(mask[b])) if mask[b][t]]
    n = len(toks)
    acc = dict.fromkeys(
        ["gap", "abslr", "lr", "k1", "k2", "k3", "rk1", "rk2", "rk3", "r2", "lp", "el", "above"], 0.0
    )
    gap_max = 0.0
    for a, e in toks:
        lr = a - e
        r = math.exp(clamp(lr))
        gap = abs(math.exp(a) - math.exp(e))
        gap_max = max(gap_max, gap)
        acc["gap"] += gap
        acc["abslr"] += abs(lr)
        acc["lr"] += lr
        acc["k1"] += -lr
        acc["k2"] += 0.5 * lr * lr
        acc["k3"] += r - 1 - lr
        acc["rk1"] += r * lr
        acc["rk2"] += r * 0.5 * lr * lr
        acc["rk3"] += 1 - r + r * lr
        acc["r2"] += r * r
        acc["lp"] += a
        acc["el"] += e
        acc["above"] += 1.0 if gap > thr else 0.0
    seq_sums, seq_means = [], []
    for b in range(len(mask)):
        lrs = [logp[b][t] - engine[b][t] for t in range(len(mask[b])) if mask[b][t]]
        if lrs:
            seq_sums.append(sum(lrs))
            seq_means.append(sum(lrs) / len(lrs))
    s = len(seq_sums)
    ps = [math.exp(a) for a, _ in toks]
    qs = [math.exp(e) for _, e in toks]
    mp, mq = sum(ps) / n, sum(qs) / n
    cov = sum((x - mp) * (y - mq) for x, y in zip(ps, qs))
    vp = sum((x - mp) ** 2 for x in ps)
    vq = sum((y - mq) ** 2 for y in qs)
    if max(ps) == min(ps) or max(qs) == min(qs):
        pearson = 1.0 if ps == qs else 0.0
    else:
        pearson = cov / math.sqrt(vp * vq)
    return {
        "prob_gap_mean": acc["gap"] / n,
        "prob_gap_max": gap_max,
        "abs_log_ratio_mean": acc["abslr"] / n,
        "log_ratio_mean": acc["lr"] / n,
        "kl_engine_trainer_k1": acc["k1"] / n,
        "kl_engine_trainer_k2": acc["k2"] / n,
        "kl_engine_trainer_k3": acc["k3"] / n,
        "kl_trainer_engine_k1": acc["rk1"] / n,
        "kl_trainer_engine_k2": acc["rk2"] / n,
        "kl_trainer_engine_k3": acc["rk3"] / n,
        "chi2_token": acc["r2"] / n - 1,
        "chi2_seq": sum(math.exp(2 * clamp(x)) for x in seq_sums) / s - 1,
        "ppl_trainer": math.exp(-acc["lp"] / n),
        "ppl_engine": math.exp(-acc["el"] / n),
        "ppl_ratio": math.exp(-acc["lp"] / n) / math.exp(-acc["el"] / n),
        "seq_log_ratio_mean": sum(seq_sums) / s,
        "seq_log_ratio_abs_mean": sum(abs(x) for x in seq_sums) / s,
        "seq_geo_ratio_mean": sum(math.exp(clamp(x)) for x in seq_means) / s,
        "prob_pearson": pearson,
        "frac_gap_above": acc["above"] / n,
        "num_tokens": float(n),
        "num_seqs": float(s),
        "num_empty_seqs": float(len(mask) - s),
    }


def random_batch(gen: torch.Generator, B: int, T: int, spread: float):
    engine = -torch.rand(B, T, generator=gen, dtype=torch.float64).mul(4.0).exp().mul(0.5)  # in (-1, 0)
    engine = engine * torch.rand(B, T, generator=gen, dtype=torch.float64).mul(6.0)  # some tokens unlikely
    logp = (engine + spread * torch.randn(B, T, generator=gen, dtype=torch.float64)).clamp(max=0.0)
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    if not mask.any():
        mask[0, 0] = True
    # garbage at padding must not matter
    garbage = torch.tensor([NAN, INF, -INF, 7.0], dtype=torch.float64)
    idx = torch.randint(0, 4, (B, T), generator=gen)
    logp = torch.where(mask, logp, garbage[idx])
    engine = torch.where(mask, engine, garbage[(idx + 1) % 4])
    return logp, engine, mask


@pytest.mark.parametrize("seed", range(8))
def test_loop_versus_vectorised(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    B = int(torch.randint(1, 7, (1,), generator=gen))
    T = int(torch.randint(1, 12, (1,), generator=gen))
    spread = [0.0, 0.01, 0.3, 2.0][seed % 4]
    logp, engine, mask = random_batch(gen, B, T, spread)
    got = values(discrepancy_metrics(logp, engine, mask, gap_threshold=0.01))
    want = reference_metrics(logp.tolist(), engine.tolist(), mask.tolist(), 0.01)
    assert set(got) == set(want)
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-6, abs=1e-6), (name, seed)


# ----------------------------------------------------------------------------- properties


def test_identical_logprobs_give_zero_discrepancy() -> None:
    gen = torch.Generator().manual_seed(0)
    logp, _, mask = random_batch(gen, 5, 9, 0.0)
    engine = logp.clone()
    got = values(discrepancy_metrics(logp, engine, mask))
    for name in [
        "prob_gap_mean",
        "prob_gap_max",
        "abs_log_ratio_mean",
        "log_ratio_mean",
        "kl_engine_trainer_k1",
        "kl_engine_trainer_k2",
        "kl_engine_trainer_k3",
        "kl_trainer_engine_k1",
        "kl_trainer_engine_k2",
        "kl_trainer_engine_k3",
        "chi2_token",
        "chi2_seq",
        "seq_log_ratio_mean",
        "seq_log_ratio_abs_mean",
        "frac_gap_above",
    ]:
        assert got[name] == 0.0, name
    assert got["ppl_ratio"] == 1.0
    assert got["ppl_trainer"] == got["ppl_engine"]
    assert got["seq_geo_ratio_mean"] == 1.0
    assert got["prob_pearson"] == pytest.approx(1.0, abs=1e-12)


def test_masked_values_never_change_a_result() -> None:
    gen = torch.Generator().manual_seed(3)
    logp, engine, mask = random_batch(gen, 6, 10, 0.2)
    base = discrepancy_metrics(logp, engine, mask)
    for fill_a, fill_b in [(NAN, NAN), (INF, -INF), (-INF, INF), (1e9, -1e9), (0.0, 0.0), (123.0, NAN)]:
        got = discrepancy_metrics(
            torch.where(mask, logp, torch.full_like(logp, fill_a)),
            torch.where(mask, engine, torch.full_like(engine, fill_b)),
            mask,
        )
        for name in base:
            assert torch.equal(got[name], base[name]), (name, fill_a, fill_b)
    # a 0/1 integer or float mask is the same mask
    for other in (mask.long(), mask.double()):
        got = discrepancy_metrics(logp, engine, other)
        assert all(torch.equal(got[k], base[k]) for k in base)


def test_kl_estimators_k2_k3_non_negative_and_agree_for_small_gaps() -> None:
    gen = torch.Generator().manual_seed(5)
    logp, engine, mask = random_batch(gen, 8, 16, 0.01)
    got = values(discrepancy_metrics(logp, engine, mask))
    for name in (
        "kl_engine_trainer_k2",
        "kl_engine_trainer_k3",
        "kl_trainer_engine_k2",
        "kl_trainer_engine_k3",
    ):
        assert got[name] >= 0.0, name
    # small log-ratios: k2 ≈ k3 in each direction (both are 0.5·logr² to second order)
    assert got["kl_engine_trainer_k3"] == pytest.approx(got["kl_engine_trainer_k2"], rel=0.05)
    assert got["kl_trainer_engine_k3"] == pytest.approx(got["kl_trainer_engine_k2"], rel=0.05)
    assert got["ppl_ratio"] == pytest.approx(got["ppl_trainer"] / got["ppl_engine"], rel=1e-12)


def test_metrics_from_float32_and_bfloat16_inputs() -> None:
    logp, engine, mask = tiny_batch()
    ref = values(discrepancy_metrics(logp, engine, mask))
    got = values(discrepancy_metrics(logp.float(), engine.float(), mask))
    assert got["prob_gap_mean"] == pytest.approx(ref["prob_gap_mean"], rel=1e-6)
    got16 = values(discrepancy_metrics(logp.bfloat16(), engine.bfloat16(), mask))
    assert got16["prob_gap_mean"] == pytest.approx(ref["prob_gap_mean"], rel=1e-2)


@pytest.mark.parametrize(
    ("p", "q", "want"),
    [
        ([0.5, 0.5], [0.5, 0.5], 1.0),  # both constant and equal: perfect agreement
        ([0.5], [0.5], 1.0),  # a single token
        ([0.5, 0.5], [0.4, 0.4], 0.0),  # both constant, different
        ([0.5, 0.5], [0.4, 0.6], 0.0),  # one side constant
        ([0.1, 0.2, 0.3], [0.2, 0.4, 0.6], 1.0),  # exact linear relation
        ([0.1, 0.2, 0.3], [0.6, 0.4, 0.2], -1.0),
    ],
)
def test_pearson_defined_values(p: list[float], q: list[float], want: float) -> None:
    logp = torch.log(torch.tensor([p], dtype=torch.float64))
    engine = torch.log(torch.tensor([q], dtype=torch.float64))
    got = float(
        discrepancy_metrics(logp, engine, torch.ones_like(logp, dtype=torch.bool))["discrepancy/prob_pearson"]
    )
    assert got == pytest.approx(want, abs=1e-12)


def test_pearson_constant_column_with_inexact_float_mean() -> None:
    # three copies of 0.1: their float mean is not exactly 0.1, yet the result must be the defined 0
    logp = torch.log(torch.tensor([[0.1, 0.1, 0.1]], dtype=torch.float64))
    engine = torch.log(torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64))
    got = discrepancy_metrics(logp, engine, torch.ones(1, 3, dtype=torch.bool))
    assert float(got["discrepancy/prob_pearson"]) == 0.0


def test_prob_gap_gradient_and_nan_padding() -> None:
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.3]], dtype=torch.float64)).requires_grad_()
    engine = torch.tensor([[math.log(0.4), math.log(0.3), NAN]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    d = mean_prob_gap(logp, engine, mask)
    assert float(d.detach()) == pytest.approx(0.1)
    d.backward()
    # d/dlogp (1/2)·abs(e^logp - q) = (1/2)·sign(p - q)·p: +0.25, -0.1; padding gets exactly 0
    assert logp.grad is not None
    assert torch.allclose(logp.grad, torch.tensor([[0.25, -0.1, 0.0]], dtype=torch.float64))


# ----------------------------------------------------------------------------- bad input


def ok_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.3], [0.6, 0.1, 0.9]], dtype=torch.float64))
    return logp, logp - 0.01, torch.ones(2, 3, dtype=torch.bool)


@pytest.mark.parametrize(
    ("bad", "needle"),
    [(NAN, "1 NaN"), (INF, "1 +inf"), (-INF, "1 -inf")],
)
@pytest.mark.parametrize("which", ["logp_BT", "engine_logp_BT"])
def test_non_finite_logprobs_raise(bad: float, needle: str, which: str) -> None:
    logp, engine, mask = ok_batch()
    target = logp if which == "logp_BT" else engine
    target[1, 2] = bad
    with pytest.raises(ValueError, match="logp_BT") as info:
        discrepancy_metrics(logp, engine, mask)
    assert which in str(info.value) and needle in str(info.value)
    if bad == -INF:  # the message names the likely cause and the remedy
        assert "probability 0" in str(info.value) and "drop_trainer_impossible" in str(info.value)


def test_counts_every_bad_position() -> None:
    logp, engine, mask = ok_batch()
    engine[0, 0] = -INF
    engine[1, 1] = -INF
    with pytest.raises(ValueError, match="engine_logp_BT has 2 -inf"):
        discrepancy_metrics(logp, engine, mask)


def test_positive_logprobs_raise() -> None:
    logp, engine, mask = ok_batch()
    logp[0, 1] = 0.5
    with pytest.raises(ValueError, match=r"logp_BT has 1 positive value.*max 0\.5"):
        discrepancy_metrics(logp, engine, mask)
    logp[0, 1] = 5e-5  # rounding noise just above 0 is accepted
    discrepancy_metrics(logp, engine, mask)


def test_mismatched_shapes_raise_naming_both() -> None:
    logp, engine, mask = ok_batch()
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 2\)"):
        discrepancy_metrics(logp, engine[:, :2], mask)
    with pytest.raises(ValueError, match=r"mask_BT has shape \(3, 2\)"):
        discrepancy_metrics(logp, engine, mask.reshape(3, 2))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        discrepancy_metrics(logp[0], engine[0], mask[0])


def test_empty_mask_raises() -> None:
    logp, engine, mask = ok_batch()
    with pytest.raises(ValueError, match="empty"):
        discrepancy_metrics(logp, engine, torch.zeros_like(mask))


def test_bad_mask_values_and_threshold_raise() -> None:
    logp, engine, _ = ok_batch()
    with pytest.raises(ValueError, match="only 0/1"):
        discrepancy_metrics(logp, engine, torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="gap_threshold"):
        discrepancy_metrics(logp, engine, torch.ones(2, 3, dtype=torch.bool), gap_threshold=-1.0)


def test_check_logprobs_public_helper() -> None:
    x = torch.tensor([[-0.1, NAN, -INF]])
    check_logprobs("engine", x, torch.tensor([[True, False, False]]))  # bad values only at padding
    with pytest.raises(ValueError, match="engine has 1 -inf"):
        check_logprobs("engine", x, torch.tensor([[True, False, True]]))
    with pytest.raises(ValueError, match="floating-point"):
        check_logprobs("ids", torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool))
