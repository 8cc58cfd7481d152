"""Tests of dcmdp.losses, three ways: hand-derived values, loop versus vectorised, properties.

Hand-derived cases build log-probs from chosen ratios: ``old = log 0.5``, ``logp = old + log r``,
``engine = old - log rho``, so ``r = exp(logp - old)`` and ``rho = exp(old - engine)`` are the
numbers written in the test. Everything runs in float64.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch

from dcmdp.aggregation import AGG_MODES
from dcmdp.losses import (
    POLICY_LOSSES,
    LossInputs,
    LossOutput,
    LossSettings,
    check_loss_inputs,
    dcmdp_loss,
    dcmdp_shaping_loss,
    get_policy_loss,
    grpo_loss,
    register_policy_loss,
    token_prob_gap,
)

F64 = torch.float64
ALL_LOSSES = (
    "grpo",
    "tis",
    "icepop",
    "seq_tis",
    "seq_mis",
    "geo_mask",
    "offpolicy_seq_mask",
    "dcmdp",
    "dcmdp_shaping",
    "dcmdp_hinge",
    "dcmdp_full",
)


def t64(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def from_ratios(
    r: list[list[float]],
    rho: list[list[float]],
    adv_B: list[float],
    mask: list[list[int]],
) -> LossInputs:
    """Inputs whose PPO ratios are ``r`` and train-inference ratios are ``rho``."""
    old_BT = torch.full((len(r), len(r[0])), math.log(0.5), dtype=F64)
    logp_BT = (old_BT + t64(r).log()).requires_grad_(True)
    engine_BT = old_BT - t64(rho).log()
    adv_BT = torch.tensor(adv_B, dtype=F64)[:, None].expand_as(old_BT).clone()
    return LossInputs(logp_BT, old_BT, engine_BT, adv_BT, torch.tensor(mask, dtype=torch.bool))


def from_probs(p: list[list[float]], q: list[list[float]], adv_B: list[float]) -> LossInputs:
    """Inputs with trainer probabilities ``p`` (old == current, so r = 1) and engine probabilities ``q``."""
    logp_BT = t64(p).log().requires_grad_(True)
    adv_BT = torch.tensor(adv_B, dtype=F64)[:, None].expand_as(logp_BT).clone()
    return LossInputs(
        logp_BT, logp_BT.detach().clone(), t64(q).log(), adv_BT, torch.ones_like(logp_BT, dtype=torch.bool)
    )


def metric(out: LossOutput, name: str) -> float:
    value = out.metrics[name]
    assert not value.requires_grad and value.ndim == 0
    return value.item()


# ---------------------------------------------------------------------------------------------
# Hand-derived values


# PPO case, B=2, T=3, clip_low 0.2, clip_high 0.28 (clip range [0.8, 1.28]).
# row 0, A = +1, r = [1.5, 0.5, 1.0]: l = -min(r, clip(r)) = [-1.28, -0.5, -1.0]   (token 0 clipped high)
# row 1, A = -1, r = [1.5, 0.5, (1.1 masked)]: l = max(r, clip(r)) = [1.5, 0.8]    (token 1 clipped low)
def ppo_inputs() -> LossInputs:
    return from_ratios(
        r=[[1.5, 0.5, 1.0], [1.5, 0.5, 1.1]],
        rho=[[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],
        adv_B=[1.0, -1.0],
        mask=[[1, 1, 1], [1, 1, 0]],
    )


@pytest.mark.parametrize(
    ("agg", "constant", "expected"),
    [
        ("token-mean", None, -0.096),  # (-1.28 - 0.5 - 1.0 + 1.5 + 0.8) / 5 = -0.48 / 5
        ("seq-mean-token-mean", None, (-2.78 / 3 + 2.3 / 2) / 2),  # rows: -2.78/3, 2.3/2
        ("seq-mean-token-sum", None, -0.24),  # (-2.78 + 2.3) / 2
        ("constant", 10.0, -0.048),  # -0.48 / 10
    ],
)
def test_grpo_hand_values(agg: str, constant: float | None, expected: float) -> None:
    out = grpo_loss(ppo_inputs(), LossSettings(agg=agg, agg_constant=constant))
    assert out.loss.item() == pytest.approx(expected)
    assert metric(out, "loss/total") == pytest.approx(expected)
    assert metric(out, "loss/policy") == pytest.approx(expected)


def test_grpo_hand_metrics_and_gradient() -> None:
    x = ppo_inputs()
    out = grpo_loss(x, LossSettings())
    # active clips: (0,0) high (A>0, r=1.5>1.28), (1,1) low (A<0, r=0.5<0.8) -> 1/5 each, 2/5 total
    assert metric(out, "clip/frac_high") == pytest.approx(0.2)
    assert metric(out, "clip/frac_low") == pytest.approx(0.2)
    assert metric(out, "clip/frac") == pytest.approx(0.4)
    # raw r over the 5 response tokens: (1.5 + 0.5 + 1.0 + 1.5 + 0.5) / 5 = 1.0, max 1.5, min 0.5
    assert metric(out, "ratio/mean") == pytest.approx(1.0)
    assert metric(out, "ratio/max") == pytest.approx(1.5)
    assert metric(out, "ratio/min") == pytest.approx(0.5)
    # d/dlogp of the token-mean: clipped tokens 0; else -A r / 5 (dr/dlogp = r):
    # (0,1): -0.5/5 = -0.1; (0,2): -1/5 = -0.2; (1,0): +1.5/5 = 0.3; masked (1,2): 0
    out.loss.backward()
    torch.testing.assert_close(x.logp_BT.grad, t64([[0.0, -0.1, -0.2], [0.3, 0.0, 0.0]]))


def test_tis_hand_values() -> None:
    # r = 1, so l = -A; weights min(rho, 2): row 0 [2, 1, 0.5], row 1 [1.5, 2, 1]
    # loss = (-(2 + 1 + 0.5) + (1.5 + 2 + 1)) / 6 = 1/6
    x = from_ratios([[1.0] * 3] * 2, [[3.0, 1.0, 0.5], [1.5, 4.0, 1.0]], [1.0, -1.0], [[1] * 3] * 2)
    out = get_policy_loss("tis")(x, LossSettings())
    assert out.loss.item() == pytest.approx(1 / 6)
    assert metric(out, "is/weight_mean") == pytest.approx(8 / 6)  # (3.5 + 4.5) / 6
    assert metric(out, "is/token_truncated_frac") == pytest.approx(2 / 6)  # rho 3 and 4
    assert metric(out, "is/rho_mean") == pytest.approx(11 / 6)  # (4.5 + 6.5) / 6
    assert metric(out, "is/rho_max") == pytest.approx(4.0)


def test_icepop_hand_values() -> None:
    # keep rho in [0.5, 5]: row 0 [0.4, 1, 6] -> [0, 1, 0]; row 1 [0.6, 4.9, 2] -> all kept
    # loss = (-1 + 1 + 1 + 1) / 6 = 1/3 (dropped tokens stay in the denominator)
    x = from_ratios([[1.0] * 3] * 2, [[0.4, 1.0, 6.0], [0.6, 4.9, 2.0]], [1.0, -1.0], [[1] * 3] * 2)
    out = get_policy_loss("icepop")(x, LossSettings())
    assert out.loss.item() == pytest.approx(1 / 3)
    assert metric(out, "is/token_masked_frac") == pytest.approx(2 / 6)


# Sequence case: row 0 rho [2, 2, 1] (prod 4), row 1 rho [0.5, 1.5, 1000 masked] (prod 0.75).
def seq_inputs() -> LossInputs:
    return from_ratios(
        r=[[1.0] * 3] * 2,
        rho=[[2.0, 2.0, 1.0], [0.5, 1.5, 1000.0]],
        adv_B=[1.0, -1.0],
        mask=[[1, 1, 1], [1, 1, 0]],
    )


def test_seq_tis_hand_values() -> None:
    # weights min(prod, 2): row 0 -> 2, row 1 -> 0.75; l = -A
    # loss = (-2 * 3 + 0.75 * 2) / 5 = -4.5 / 5 = -0.9
    out = get_policy_loss("seq_tis")(seq_inputs(), LossSettings())
    assert out.loss.item() == pytest.approx(-0.9)
    assert metric(out, "is/weight_mean") == pytest.approx(1.5)  # (2 * 3 + 0.75 * 2) / 5
    assert metric(out, "is/seq_truncated_frac") == pytest.approx(0.5)
    assert metric(out, "is/seq_log_rho_mean") == pytest.approx((math.log(4) + math.log(0.75)) / 2)


def test_seq_mis_hand_values() -> None:
    # row 0 prod 4 > 2 rejected; row 1 kept -> loss = (0 + 1 + 1) / 5 = 0.4
    out = get_policy_loss("seq_mis")(seq_inputs(), LossSettings())
    assert out.loss.item() == pytest.approx(0.4)
    assert metric(out, "is/seq_masked_frac") == pytest.approx(0.5)
    assert metric(out, "is/token_masked_frac") == pytest.approx(3 / 5)


def test_geo_mask_hand_values() -> None:
    # band [0.9, 1.1]; row 0 rho [1.2, 1/1.2, 1] -> geo 1, kept; row 1 rho [2, 1] -> geo sqrt 2, dropped
    # loss = (-1 - 1 - 1 + 0 + 0) / 5 = -0.6
    x = from_ratios(
        [[1.0] * 3] * 2, [[1.2, 1 / 1.2, 1.0], [2.0, 1.0, 1000.0]], [1.0, -1.0], [[1, 1, 1], [1, 1, 0]]
    )
    out = get_policy_loss("geo_mask")(x, LossSettings(geo_low=0.9, geo_high=1.1))
    assert out.loss.item() == pytest.approx(-0.6)
    assert metric(out, "is/seq_masked_frac") == pytest.approx(0.5)
    assert metric(out, "is/token_masked_frac") == pytest.approx(2 / 5)


def test_offpolicy_seq_mask_hand_values() -> None:
    # r = 1; mean_t (engine - logp): row 0 = 1 (A = +1, kept: positive advantage),
    # row 1 = 1 > 0.5 with A = -1 -> dropped, row 2 = 0.1 (one token) with A = -1 -> kept
    # loss = (-1 - 1 + 0 + 0 + 1) / 5 = -0.2
    logp_BT = torch.full((3, 2), math.log(0.2), dtype=F64, requires_grad=True)
    engine_BT = logp_BT.detach() + t64([[1.0, 1.0], [1.0, 1.0], [0.1, 5.0]])
    adv_BT = t64([[1.0, 1.0], [-1.0, -1.0], [-1.0, -1.0]])
    mask_BT = torch.tensor([[1, 1], [1, 1], [1, 0]], dtype=torch.bool)
    x = LossInputs(logp_BT, logp_BT.detach().clone(), engine_BT, adv_BT, mask_BT)
    out = get_policy_loss("offpolicy_seq_mask")(x, LossSettings(opsm_delta=0.5))
    assert out.loss.item() == pytest.approx(-0.2)
    assert metric(out, "is/seq_masked_frac") == pytest.approx(1 / 3)
    assert metric(out, "is/token_masked_frac") == pytest.approx(2 / 5)
    assert metric(out, "is/opsm_kl_mean") == pytest.approx((1 + 1 + 0.1) / 3)


# DCMDP case, B=2, T=2, r = 1 (old == current), A = [+1, -1]:
# p = [[0.5, 0.2], [0.9, 0.1]], q = [[0.4, 0.25], [0.8, 0.3]] -> delta = [[0.1, 0.05], [0.1, 0.2]]
# D = 0.45 / 4 = 0.1125; surrogate = token-mean(-A) = 0.
DCMDP_P = [[0.5, 0.2], [0.9, 0.1]]
DCMDP_Q = [[0.4, 0.25], [0.8, 0.3]]


def test_dcmdp_hand_values_and_gradient() -> None:
    x = from_probs(DCMDP_P, DCMDP_Q, [1.0, -1.0])
    out = dcmdp_loss(x, LossSettings(lam=2.0))
    # loss = 0 + 2 * 0.1125 = 0.225
    assert out.loss.item() == pytest.approx(0.225)
    assert metric(out, "loss/policy") == pytest.approx(0.0, abs=1e-15)
    assert metric(out, "dcmdp/prob_gap") == pytest.approx(0.1125)
    assert metric(out, "dcmdp/penalty") == pytest.approx(0.225)
    assert metric(out, "dcmdp/lambda") == pytest.approx(2.0)
    # d/dlogp = -A/4 + lam/4 * sign(p - q) * p:
    # (0,0) -0.25 + 0.5*0.5 = 0; (0,1) -0.25 - 0.5*0.2 = -0.35; (1,0) 0.25 + 0.5*0.9 = 0.7; (1,1) 0.25 - 0.5*0.1 = 0.2
    out.loss.backward()
    torch.testing.assert_close(x.logp_BT.grad, t64([[0.0, -0.35], [0.7, 0.2]]))


def test_dcmdp_penalty_is_token_mean_whatever_agg() -> None:
    # seq-mean-token-sum of the surrogate: rows (-1 - 1) and (+1 + 1) -> mean 0; penalty still 2 * 0.1125
    x = from_probs(DCMDP_P, DCMDP_Q, [1.0, -1.0])
    out = dcmdp_loss(x, LossSettings(lam=2.0, agg="seq-mean-token-sum"))
    assert out.loss.item() == pytest.approx(0.225)


def test_dcmdp_shaping_hand_values_and_gradient() -> None:
    x = from_probs(DCMDP_P, DCMDP_Q, [1.0, -1.0])
    out = dcmdp_shaping_loss(x, LossSettings(lam=2.0))
    # A' = A - 2 delta = [[0.8, 0.9], [-1.2, -1.4]]; loss = -mean(A') = 0.9 / 4 = 0.225
    assert out.loss.item() == pytest.approx(0.225)
    assert metric(out, "loss/policy") == pytest.approx(0.225)
    assert metric(out, "dcmdp/prob_gap") == pytest.approx(0.1125)
    assert metric(out, "dcmdp/penalty") == pytest.approx(0.225)
    # no gradient through delta: d/dlogp = -A'/4
    out.loss.backward()
    torch.testing.assert_close(x.logp_BT.grad, t64([[-0.2, -0.225], [0.3, 0.35]]))


def test_dcmdp_hinge_hand_values_and_gradient() -> None:
    x = from_probs(DCMDP_P, DCMDP_Q, [1.0, -1.0])
    out = get_policy_loss("dcmdp_hinge")(x, LossSettings(lam=2.0, tolerance=0.06))
    # excess max(0, delta - 0.06) = [[0.04, 0], [0.04, 0.14]] -> mean 0.055; loss = 2 * 0.055 = 0.11
    assert out.loss.item() == pytest.approx(0.11)
    assert metric(out, "dcmdp/penalty") == pytest.approx(0.11)
    assert metric(out, "dcmdp/prob_gap") == pytest.approx(0.1125)
    assert metric(out, "dcmdp/over_tol_frac") == pytest.approx(0.75)
    # token (0,1) is inside the tolerance, so only the surrogate pulls it: -0.25
    out.loss.backward()
    torch.testing.assert_close(x.logp_BT.grad, t64([[0.0, -0.25], [0.7, 0.2]]))


# ---------------------------------------------------------------------------------------------
# Loop versus vectorised


def loop_loss(name: str, x: LossInputs, s: LossSettings) -> float:
    """Independent reference: explicit loops over sequences and tokens on Python floats."""
    B, T = x.logp_BT.shape
    lp, old, eng = x.logp_BT.tolist(), x.old_logp_BT.tolist(), x.engine_logp_BT.tolist()
    adv, mask = x.advantages_BT.tolist(), x.mask_BT.tolist()
    token_loss = [[0.0] * T for _ in range(B)]
    delta = [[abs(math.exp(lp[b][t]) - math.exp(eng[b][t])) for t in range(T)] for b in range(B)]
    for b in range(B):
        ts = [t for t in range(T) if mask[b][t]]
        seq_log_rho = sum(old[b][t] - eng[b][t] for t in ts)
        seq_rho = math.exp(min(max(seq_log_rho, -20.0), 20.0))
        geo = math.exp(seq_log_rho / len(ts)) if ts else 1.0
        kl = sum(eng[b][t] - lp[b][t] for t in ts) / len(ts) if ts else 0.0
        for t in ts:
            a = adv[b][t]
            if name in ("dcmdp_shaping", "dcmdp_full"):
                a -= s.lam * delta[b][t]
            r = math.exp(lp[b][t] - old[b][t])
            clipped = min(max(r, 1 - s.clip_low), 1 + s.clip_high)
            ppo = -min(r * a, clipped * a)
            rho = math.exp(old[b][t] - eng[b][t])
            weight = {
                "tis": min(rho, s.tis_cap),
                "icepop": 1.0 if s.icepop_low <= rho <= s.icepop_high else 0.0,
                "seq_tis": min(seq_rho, s.seq_cap),
                "seq_mis": 0.0 if seq_rho > s.seq_cap else 1.0,
                "geo_mask": 1.0 if s.geo_low <= geo <= s.geo_high else 0.0,
                "offpolicy_seq_mask": 0.0 if (a < 0 and kl > s.opsm_delta) else 1.0,
            }.get(name, 1.0)
            token_loss[b][t] = ppo * weight

    n_tokens = sum(sum(1 for v in row if v) for row in mask)
    if s.agg == "token-mean":
        policy = sum(map(sum, token_loss)) / n_tokens
    elif s.agg == "constant":
        assert s.agg_constant is not None
        policy = sum(map(sum, token_loss)) / s.agg_constant
    else:
        per_seq = []
        for b in range(B):
            count = sum(1 for v in mask[b] if v)
            if count:
                total = sum(token_loss[b])
                per_seq.append(total / count if s.agg == "seq-mean-token-mean" else total)
        policy = sum(per_seq) / len(per_seq)

    mean = lambda f: sum(f(b, t) for b in range(B) for t in range(T) if mask[b][t]) / n_tokens  # noqa: E731
    if name in ("dcmdp", "dcmdp_full"):
        return policy + s.lam * mean(lambda b, t: delta[b][t])
    if name == "dcmdp_hinge":
        return policy + s.lam * mean(lambda b, t: max(0.0, delta[b][t] - s.tolerance))
    return policy


def random_inputs(seed: int, *, garbage: bool = False) -> LossInputs:
    """Random B, T, mask; r spread to hit both clips, rho spread to hit caps and masks."""
    g = torch.Generator().manual_seed(seed)
    B = int(torch.randint(1, 6, (), generator=g))
    T = int(torch.randint(1, 8, (), generator=g))
    logp_BT = torch.empty(B, T, dtype=F64).uniform_(0.05, 0.95, generator=g).log()
    old_BT = logp_BT + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    engine_BT = old_BT + 0.5 * torch.randn(B, T, generator=g, dtype=F64)
    adv_B = torch.randn(B, generator=g, dtype=F64)
    adv_B[torch.rand(B, generator=g) < 0.2] = 0.0
    mask_BT = torch.rand(B, T, generator=g) < 0.7
    mask_BT[int(torch.randint(0, B, (), generator=g)), 0] = True
    adv_BT = adv_B[:, None].expand(B, T).clone()
    if garbage:
        for t in (logp_BT, old_BT, engine_BT, adv_BT):
            t[~mask_BT] = math.nan
        engine_BT[~mask_BT] = math.inf
    return LossInputs(logp_BT.requires_grad_(True), old_BT, engine_BT, adv_BT, mask_BT)


RANDOM_SETTINGS = LossSettings(
    lam=0.7, tolerance=0.05, geo_low=0.8, geo_high=1.25, seq_cap=1.5, opsm_delta=0.1
)


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_loop_versus_vectorised(name: str, agg: str) -> None:
    settings = dataclasses.replace(RANDOM_SETTINGS, agg=agg, agg_constant=7.0 if agg == "constant" else None)
    for seed in range(8):
        x = random_inputs(seed)
        got = POLICY_LOSSES[name](x, settings).loss.item()
        assert got == pytest.approx(loop_loss(name, x, settings), rel=1e-6, abs=1e-9), f"seed {seed}"


def test_random_cases_exercise_the_branches() -> None:
    """The loop test is only meaningful if the random data hit clips, caps and masks."""
    settings = RANDOM_SETTINGS
    seen: dict[str, float] = {}
    for seed in range(8):
        x = random_inputs(seed)
        for name, key in [
            ("grpo", "clip/frac"),
            ("tis", "is/token_truncated_frac"),
            ("seq_mis", "is/seq_masked_frac"),
            ("geo_mask", "is/seq_masked_frac"),
            ("offpolicy_seq_mask", "is/seq_masked_frac"),
            ("dcmdp_hinge", "dcmdp/over_tol_frac"),
        ]:
            seen[f"{name}:{key}"] = max(
                seen.get(f"{name}:{key}", 0.0), metric(POLICY_LOSSES[name](x, settings), key)
            )
    assert all(v > 0 for v in seen.values()), seen


# ---------------------------------------------------------------------------------------------
# Properties


def test_registry_holds_every_variant() -> None:
    assert set(ALL_LOSSES) <= set(POLICY_LOSSES)


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("seed", range(3))
def test_identical_logprobs_reduce_to_grpo(name: str, seed: int) -> None:
    base = random_inputs(seed)
    same = base.logp_BT.detach()
    ref = dataclasses.replace(
        base, logp_BT=same.clone().requires_grad_(True), old_logp_BT=same, engine_logp_BT=same
    )
    x = dataclasses.replace(ref, logp_BT=same.clone().requires_grad_(True))
    settings = LossSettings(lam=0.9)
    out, expected = POLICY_LOSSES[name](x, settings), grpo_loss(ref, settings)
    assert out.loss.item() == pytest.approx(expected.loss.item(), rel=1e-12, abs=1e-15)
    out.loss.backward()
    expected.loss.backward()
    torch.testing.assert_close(x.logp_BT.grad, ref.logp_BT.grad)
    if name.startswith("dcmdp"):
        assert metric(out, "dcmdp/prob_gap") == 0.0
        assert metric(out, "dcmdp/penalty") == 0.0


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("seed", range(4))
def test_masked_positions_never_matter(name: str, seed: int) -> None:
    clean, dirty = random_inputs(seed), random_inputs(seed, garbage=True)
    assert torch.isnan(dirty.logp_BT).any() or dirty.mask_BT.all()
    settings = RANDOM_SETTINGS
    a, b = POLICY_LOSSES[name](clean, settings), POLICY_LOSSES[name](dirty, settings)
    assert a.loss.item() == b.loss.item()
    assert a.metrics.keys() == b.metrics.keys()
    for key in a.metrics:
        assert a.metrics[key].item() == b.metrics[key].item(), key
    a.loss.backward()
    b.loss.backward()
    assert clean.logp_BT.grad is not None and dirty.logp_BT.grad is not None
    assert torch.isfinite(dirty.logp_BT.grad).all()
    mask = clean.mask_BT
    assert (dirty.logp_BT.grad[~mask] == 0).all()
    torch.testing.assert_close(dirty.logp_BT.grad[mask], clean.logp_BT.grad[mask])


def test_penalty_gradient_descent_closes_the_gap() -> None:
    """Self-correction in miniature: SGD on the dcmdp penalty alone moves the trainer's probabilities
    of the sampled tokens towards a fixed engine distribution."""
    g = torch.Generator().manual_seed(0)
    B, T, V = 4, 5, 7
    logits_BTV = torch.randn(B, T, V, generator=g, dtype=F64).requires_grad_(True)
    engine_logits_BTV = torch.randn(B, T, V, generator=g, dtype=F64)
    tokens_BT = torch.randint(0, V, (B, T), generator=g)
    engine_logp_BT = torch.log_softmax(engine_logits_BTV, -1).gather(-1, tokens_BT[..., None])[..., 0]
    zeros_BT = torch.zeros(B, T, dtype=F64)
    mask_BT = torch.ones(B, T, dtype=torch.bool)
    settings = LossSettings(lam=1.0)
    opt = torch.optim.SGD([logits_BTV], lr=20.0)
    gaps = []
    for _ in range(201):
        logp_BT = torch.log_softmax(logits_BTV, -1).gather(-1, tokens_BT[..., None])[..., 0]
        out = dcmdp_loss(LossInputs(logp_BT, logp_BT.detach(), engine_logp_BT, zeros_BT, mask_BT), settings)
        gaps.append(metric(out, "dcmdp/prob_gap"))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert gaps[0] > 0.1
    assert gaps[-1] < 0.5 * gaps[0], (gaps[0], gaps[-1])


def test_shaping_gradient_is_grpo_gradient_with_shaped_advantages() -> None:
    x = random_inputs(3)
    engine_BT = x.engine_logp_BT.clone().requires_grad_(True)
    x = dataclasses.replace(x, engine_logp_BT=engine_BT)
    settings = LossSettings(lam=0.8)
    out = dcmdp_shaping_loss(x, settings)
    out.loss.backward()

    delta_BT = token_prob_gap(x.logp_BT.detach(), engine_BT.detach())
    logp_ref = x.logp_BT.detach().clone().requires_grad_(True)
    ref = dataclasses.replace(
        x, logp_BT=logp_ref, engine_logp_BT=engine_BT.detach(), advantages_BT=x.advantages_BT - 0.8 * delta_BT
    )
    expected = grpo_loss(ref, settings)
    expected.loss.backward()
    assert out.loss.item() == pytest.approx(expected.loss.item(), rel=1e-12)
    torch.testing.assert_close(x.logp_BT.grad, logp_ref.grad)
    assert engine_BT.grad is None  # mu is a constant: nothing flows to the engine's log-probs


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_no_gradient_reaches_old_or_engine_logprobs(name: str) -> None:
    x = random_inputs(5)
    old_BT = x.old_logp_BT.clone().requires_grad_(True)
    engine_BT = x.engine_logp_BT.clone().requires_grad_(True)
    out = POLICY_LOSSES[name](
        dataclasses.replace(x, old_logp_BT=old_BT, engine_logp_BT=engine_BT), LossSettings(lam=0.5)
    )
    out.loss.backward()
    assert old_BT.grad is None and engine_BT.grad is None
    assert x.logp_BT.grad is not None


@pytest.mark.parametrize("name", ["dcmdp", "dcmdp_hinge"])
def test_penalty_gradient_matches_gradcheck(name: str) -> None:
    x = random_inputs(1)
    # advantages zero: only the penalty carries gradient; gradcheck uses float64 finite differences
    settings = LossSettings(lam=1.3, tolerance=0.02)
    loss_fn = POLICY_LOSSES[name]
    # keep every delta away from the kinks of |.| and the hinge
    delta_BT = token_prob_gap(x.logp_BT.detach(), x.engine_logp_BT)
    assert (delta_BT[x.mask_BT] > 1e-3).all() and ((delta_BT - 0.02).abs()[x.mask_BT] > 1e-3).all()

    def penalty(logp_BT: torch.Tensor) -> torch.Tensor:
        zeros = torch.zeros_like(x.advantages_BT)
        return loss_fn(dataclasses.replace(x, logp_BT=logp_BT, advantages_BT=zeros), settings).loss

    assert torch.autograd.gradcheck(penalty, (x.logp_BT.detach().clone().requires_grad_(True),), eps=1e-6)


def test_full_dcmdp_loss_matches_gradcheck() -> None:
    x = random_inputs(2)
    settings = LossSettings(lam=0.6, agg="seq-mean-token-mean")

    def loss(logp_BT: torch.Tensor) -> torch.Tensor:
        return dcmdp_loss(dataclasses.replace(x, logp_BT=logp_BT), settings).loss

    assert torch.autograd.gradcheck(loss, (x.logp_BT.detach().clone().requires_grad_(True),), eps=1e-7)


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("engine_logp_BT", math.nan),
        ("engine_logp_BT", math.inf),
        ("old_logp_BT", math.nan),
        ("old_logp_BT", math.inf),
    ],
)
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_non_finite_logprobs_at_response_tokens_raise(field: str, value: float, name: str) -> None:
    x = from_probs(DCMDP_P, DCMDP_Q, [1.0, -1.0])
    bad = getattr(x, field).clone()
    bad[0, 1] = value
    bad[1, 0] = value
    with pytest.raises(ValueError, match=rf"{field} has 2 NaN or \+inf values at response .* out of 4"):
        POLICY_LOSSES[name](dataclasses.replace(x, **{field: bad}), LossSettings(lam=1.0))


def test_negative_infinite_engine_logprob_is_allowed() -> None:
    # log 0 from the engine is a legal (if alarming) value: rho = +inf, which the caps handle
    x = from_probs(DCMDP_P, DCMDP_Q, [1.0, -1.0])
    engine = x.engine_logp_BT.clone()
    engine[0, 0] = -math.inf
    out = get_policy_loss("tis")(dataclasses.replace(x, engine_logp_BT=engine), LossSettings())
    assert torch.isfinite(out.loss)


def test_non_finite_advantages_raise() -> None:
    x = from_probs(DCMDP_P, DCMDP_Q, [1.0, -1.0])
    adv = x.advantages_BT.clone()
    adv[1, 1] = -math.inf
    with pytest.raises(ValueError, match="advantages_BT has 1 non-finite"):
        grpo_loss(dataclasses.replace(x, advantages_BT=adv), LossSettings())


def test_mismatched_shapes_raise() -> None:
    x = from_probs(DCMDP_P, DCMDP_Q, [1.0, -1.0])
    with pytest.raises(ValueError, match=r"engine_logp_BT has shape \(2, 1\) but logp_BT has shape \(2, 2\)"):
        check_loss_inputs(dataclasses.replace(x, engine_logp_BT=x.engine_logp_BT[:, :1]))
    with pytest.raises(ValueError, match=r"mask_BT has shape \(2, 3\)"):
        dcmdp_loss(dataclasses.replace(x, mask_BT=torch.ones(2, 3, dtype=torch.bool)), LossSettings())
    with pytest.raises(ValueError, match="2-D"):
        flat = x.logp_BT.detach().flatten()
        grpo_loss(LossInputs(flat, flat, flat, flat, torch.ones(4, dtype=torch.bool)), LossSettings())


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_empty_mask_raises(name: str) -> None:
    x = from_probs(DCMDP_P, DCMDP_Q, [1.0, -1.0])
    with pytest.raises(ValueError, match="mask_BT selects no response tokens"):
        POLICY_LOSSES[name](dataclasses.replace(x, mask_BT=torch.zeros(2, 2)), LossSettings())


def test_unknown_loss_lists_names() -> None:
    with pytest.raises(ValueError, match="unknown policy loss 'ppo'") as err:
        get_policy_loss("ppo")
    for name in ALL_LOSSES:
        assert name in str(err.value)


def test_unknown_agg_mode_raises() -> None:
    with pytest.raises(ValueError, match=r"LossSettings\.agg 'sum' is not one of") as err:
        LossSettings(agg="sum")
    assert "seq-mean-token-mean" in str(err.value)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"clip_low": -0.1}, "clip_low"),
        ({"clip_high": -0.1}, "clip_high"),
        ({"tis_cap": 0.0}, "tis_cap"),
        ({"seq_cap": -2.0}, "seq_cap"),
        ({"icepop_low": 6.0}, "icepop_low"),
        ({"geo_low": 1.01, "geo_high": 1.0}, "geo_low"),
        ({"lam": -0.1}, "lam"),
        ({"lam": math.nan}, "lam"),
        ({"tolerance": -1.0}, "tolerance"),
        ({"agg": "constant"}, "agg_constant"),
        ({"agg": "constant", "agg_constant": 0.0}, "agg_constant"),
    ],
)
def test_bad_settings_name_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"LossSettings\.{field}"):
        dataclasses.replace(LossSettings(), **changes)


def test_hinge_needs_positive_tolerance() -> None:
    x = from_probs(DCMDP_P, DCMDP_Q, [1.0, -1.0])
    settings = LossSettings(lam=1.0, tolerance=0.0)
    assert torch.isfinite(dcmdp_loss(x, settings).loss)  # fine for the other variants
    with pytest.raises(ValueError, match=r"LossSettings\.tolerance must be > 0 for dcmdp_hinge"):
        get_policy_loss("dcmdp_hinge")(x, settings)


def test_register_policy_loss() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_policy_loss("grpo")(grpo_loss)

    @register_policy_loss("test_double_grpo")
    def double(inputs: LossInputs, settings: LossSettings) -> LossOutput:
        out = grpo_loss(inputs, settings)
        return LossOutput(2 * out.loss, out.metrics)

    try:
        x = from_probs(DCMDP_P, DCMDP_Q, [1.0, 0.5])
        got = get_policy_loss("test_double_grpo")(x, LossSettings()).loss.item()
        assert got == pytest.approx(2 * grpo_loss(x, LossSettings()).loss.item())
    finally:
        POLICY_LOSSES.pop("test_double_grpo")


def test_multiplier_losses_are_the_dcmdp_forms() -> None:
    from dcmdp.losses import MULTIPLIER_LOSSES, POLICY_LOSSES

    assert {"dcmdp", "dcmdp_shaping", "dcmdp_hinge", "dcmdp_full"} == MULTIPLIER_LOSSES
    assert set(POLICY_LOSSES) >= MULTIPLIER_LOSSES
