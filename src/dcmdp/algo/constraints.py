"""Discrepancy constraints: the second axis of a policy loss, and the measures they read.

DCMDP maximises reward subject to ``D <= c``, ``D = E_{o ~ pi}[m(o)]`` for a per-token discrepancy
measure ``m`` between the trainer pi_theta and the rollout engine mu, through the Lagrangian
``J - lam (D - c)`` (the constant ``lam c`` drops out of the gradient). The gradient of D has two
parts:

    grad D = E_pi[grad m]            (pathwise: m moves because pi's probabilities move)
           + E_pi[m grad log pi]     (score function: pi samples less where m is large)

A constraint form is a pure function ``(LossInputs, LossSettings, Measure) -> ConstraintTerms``
registered in :data:`CONSTRAINTS`; it returns a token-mean **penalty** added to the loss (the
pathwise part, gradient through ``logp``) and/or an advantage **shift** ``A_t -> A_t - shift_t``
(the score-function part: ``-(A - lam m) r`` differentiates to ``lam m grad log pi`` at r = 1).

| name    | penalty                              | shift                | keeps                    |
|---------|--------------------------------------|----------------------|--------------------------|
| none    |                                      |                      | (no constraint)          |
| penalty | lam * token-mean(m_t)                |                      | pathwise part (paper (a))|
| shaping |                                      | lam * m_t (detached) | score-function part ((b))|
| hinge   | lam * token-mean(max(0, m_t - c))    |                      | pathwise, excess over c  |
| full    | lam * token-mean(m_t)                | lam * m_t (detached) | both: the whole grad D   |

Measures (:data:`MEASURES`), each with the ``discrepancy/*`` metric the dual step reads, so the
multiplier compares the same quantity with its tolerance c (set c in the measure's own units):

| name          | m_t                                                      | dual step reads                     |
|---------------|----------------------------------------------------------|-------------------------------------|
| prob_gap      | abs(pi(o_t) - mu(o_t)) (the paper's delta)               | ``discrepancy/prob_gap_mean``        |
| k3            | r - 1 - log r, r = pi/mu (k3 estimate of KL(mu ‖ pi))    | ``discrepancy/kl_engine_trainer_k3`` |
| abs_log_ratio | abs(log pi(o_t) - log mu(o_t)), clamped at 20            | ``discrepancy/abs_log_ratio_mean``   |

The probability gap is smallest where the policy is near-deterministic or spread thin (both give
small probabilities or agreeing ones); the log-ratio measures do not reward either, which is why
they are offered (docs/concepts.md).

**The share bound** (``loss.constraint_share`` = kappa > 0). By default
(``loss.constraint_share_of=update``, kappa 0.5) it bounds how far the constraint moves the
weights, in the optimizer (:class:`dcmdp.grad_share.ShareBoundedAdamW`). With
``constraint_share_of=gradient`` the trainer applies :func:`share_scale`: per optimizer step, the gradient of the constraint's part of the loss
(``LossOutput.constraint_part``, backpropagated on its own) is scaled down, when needed, to at most
kappa times the norm of the rest of the gradient (the surrogate's, and the KL term's when it is
on), over all parameters. Where there is no reward signal (every group solved or every group
failed, so all advantages are 0) and no KL term, it does nothing. It is not enough to keep the
policy from collapsing: a bound on the gradients with respect to the token log-probs still
collapsed the ``harm`` runs (the policy gradient's token terms cancel in parameter space while the
constraint's add up), and so did this parameter-level bound at kappa 0.5 (AdamW's per-coordinate
scaling lets a steady small gradient win over a noisy large one). The update bound is what held
in every setting we measured; see docs/concepts.md, "Keeping the constraint safe". With ``model.dtype=bfloat16`` the split ``g - g_c`` is taken in bfloat16 and is coarse
when the constraint dominates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from dcmdp.algo.discrepancy import prob_gap
from dcmdp.algo.loss_core import LossInputs, LossSettings
from dcmdp.algo.masked import masked_mean

#: Bound on |log pi - log mu| before exp() in the k3 measure (as verl and the discrepancy metrics).
LOG_RATIO_BOUND = 20.0


# ----------------------------------------------------------------------------- measures


def k3_engine_trainer(logp: Tensor, engine_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(mu ‖ pi) under samples from mu: ``r - 1 - log r``, r = pi / mu,
    log r clamped at +-20. Non-negative; its gradient in ``logp`` is ``r - 1``."""
    log_r = (logp - engine_logp).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    return torch.expm1(log_r) - log_r


def abs_log_ratio(logp: Tensor, engine_logp: Tensor) -> Tensor:
    """Per-token ``|log pi(o_t) - log mu(o_t)|``, clamped at 20 (a log-prob of -inf, a token one
    side cannot sample, gives 20 and no gradient instead of inf)."""
    return (logp - engine_logp).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND).abs()


@dataclass(frozen=True)
class Measure:
    """A per-token discrepancy measure and the batch metric the dual step compares with c."""

    token_fn: Callable[[Tensor, Tensor], Tensor]
    """``(logp_BT, engine_logp_BT) -> m_BT``, differentiable in ``logp_BT``."""
    discrepancy_key: str
    """The ``discrepancy/*`` metric (token mean of m at pi_old) the dual step reads."""


MEASURES: dict[str, Measure] = {
    "prob_gap": Measure(prob_gap, "discrepancy/prob_gap_mean"),
    "k3": Measure(k3_engine_trainer, "discrepancy/kl_engine_trainer_k3"),
    "abs_log_ratio": Measure(abs_log_ratio, "discrepancy/abs_log_ratio_mean"),
}


def get_measure(name: str) -> Measure:
    """The measure registered as ``name``; an unknown name raises ``ValueError`` listing the valid ones."""
    if name not in MEASURES:
        raise ValueError(f"unknown discrepancy measure {name!r}; valid: {', '.join(MEASURES)}")
    return MEASURES[name]


# ----------------------------------------------------------------------------- constraint forms


@dataclass(frozen=True)
class ConstraintTerms:
    """What a constraint adds to the PPO surrogate."""

    penalty: Tensor | None = None
    """Token-mean term added to the loss (differentiable), or None."""
    shift_BT: Tensor | None = None
    """Constant subtracted from the advantages, or None."""
    metrics: dict[str, Tensor] = field(default_factory=dict)


ConstraintFn = Callable[[LossInputs, LossSettings, Measure], ConstraintTerms]
CONSTRAINTS: dict[str, ConstraintFn] = {}
SCALES_WITH_LAM: set[str] = set()
"""The constraint forms whose terms are lambda times something (every built-in one)."""


def register_constraint(name: str, scales_with_lam: bool = False) -> Callable[[ConstraintFn], ConstraintFn]:
    """Decorator adding a constraint form to :data:`CONSTRAINTS`; a taken name raises ``ValueError``.
    ``scales_with_lam``: its penalty and shift are lambda times something, so they vanish at lambda
    0 and the trainer may skip their backward pass there (:data:`SCALES_WITH_LAM`)."""

    def register(fn: ConstraintFn) -> ConstraintFn:
        if name in CONSTRAINTS:
            raise ValueError(f"discrepancy constraint {name!r} is already registered")
        CONSTRAINTS[name] = fn
        if scales_with_lam:
            SCALES_WITH_LAM.add(name)
        return fn

    return register


def get_constraint(name: str) -> ConstraintFn:
    """The constraint registered as ``name``; an unknown name raises ``ValueError`` listing the valid ones."""
    if name not in CONSTRAINTS:
        raise ValueError(f"unknown discrepancy constraint {name!r}; valid: {', '.join(CONSTRAINTS)}")
    return CONSTRAINTS[name]


def _metrics(
    x: LossInputs, measure: Measure, value: Tensor, penalty: Tensor, lam: float
) -> dict[str, Tensor]:
    """``dcmdp/prob_gap`` (always the probability gap), ``dcmdp/measure`` (the constrained measure,
    only when it is not the probability gap), ``dcmdp/penalty`` and ``dcmdp/lambda``."""
    metrics = {}
    if measure.token_fn is prob_gap:
        metrics["dcmdp/prob_gap"] = value.detach()
    else:
        metrics["dcmdp/prob_gap"] = masked_mean(
            prob_gap(x.logp_BT.detach(), x.constraint_target_BT), x.mask_BT
        )
        metrics["dcmdp/measure"] = value.detach()
    metrics["dcmdp/penalty"] = penalty.detach()
    metrics["dcmdp/lambda"] = torch.tensor(lam, dtype=value.dtype, device=value.device)
    return metrics


@register_constraint("none")
def no_constraint(x: LossInputs, s: LossSettings, measure: Measure) -> ConstraintTerms:
    """No constraint: the loss is the (corrected) surrogate alone and lambda is not read."""
    return ConstraintTerms()


@register_constraint("penalty", scales_with_lam=True)
def penalty_constraint(x: LossInputs, s: LossSettings, measure: Measure) -> ConstraintTerms:
    """Paper reading (a), the differentiable penalty ``lam * token-mean(m_t)``: the policy's own
    probabilities move towards the engine's ("self-correction"). A token mean whatever ``s.agg``,
    because the constraint is defined on the token mean."""
    value = masked_mean(measure.token_fn(x.logp_BT, x.constraint_target_BT), x.mask_BT)
    penalty = s.lam * value
    return ConstraintTerms(penalty=penalty, metrics=_metrics(x, measure, value, penalty, s.lam))


def cost_shift(m_BT: Tensor, mask_BT: Tensor, lam: float, baseline: bool) -> Tensor:
    """The score-function part's advantage shift ``lam * m_t`` (detached), or with ``baseline``
    ``lam * (m_t - token-mean(m))`` over the tokens this loss call sees (one micro-batch).

    Why a baseline: the samples come from the engine mu, not from pi, so the uncentred cost's
    constant part does not vanish in expectation: in the loss it is ``-lam * mean(m)`` times the
    cross-entropy from mu to pi, so descending it moves pi away from mu, the more the further
    apart they are (while the engine does not follow pi's small weight changes, as a coarse
    quantization does not). Centring drops that constant part; it is no unbiased estimate of the
    score-function gradient under mu (importance weights, ``correction=tis``, are what remove the
    bias), and it ignores the correction's and the aggregation's weights. A hypothesis for the
    long-response runaway of docs/RESULTS.md, tested there, not a proven cure."""
    m_BT = m_BT.detach()
    if baseline:
        m_BT = m_BT - masked_mean(m_BT, mask_BT)
    return lam * m_BT


@register_constraint("shaping", scales_with_lam=True)
def shaping_constraint(x: LossInputs, s: LossSettings, measure: Measure) -> ConstraintTerms:
    """Paper reading (b), advantage shaping ``A_t - lam * m_t`` with m detached (m as a cost;
    centred with ``s.shaping_baseline``); ``dcmdp/penalty`` reports ``lam * token-mean(m)``."""
    m_BT = measure.token_fn(x.logp_BT.detach(), x.constraint_target_BT)
    shift_BT = cost_shift(m_BT, x.mask_BT, s.lam, s.shaping_baseline)
    value = masked_mean(m_BT, x.mask_BT)
    return ConstraintTerms(shift_BT=shift_BT, metrics=_metrics(x, measure, value, s.lam * value, s.lam))


@register_constraint("hinge", scales_with_lam=True)
def hinge_constraint(x: LossInputs, s: LossSettings, measure: Measure) -> ConstraintTerms:
    """``lam * token-mean(max(0, m_t - c))``: only tokens above the tolerance are pulled back
    (this project's variant; needs c > 0)."""
    m_BT = measure.token_fn(x.logp_BT, x.constraint_target_BT)
    excess = masked_mean(torch.relu(m_BT - s.tolerance), x.mask_BT)
    penalty = s.lam * excess
    metrics = _metrics(x, measure, masked_mean(m_BT, x.mask_BT), penalty, s.lam)
    metrics["dcmdp/over_tol_frac"] = masked_mean((m_BT.detach() > s.tolerance).to(m_BT.dtype), x.mask_BT)
    return ConstraintTerms(penalty=penalty, metrics=metrics)


@register_constraint("full", scales_with_lam=True)
def full_constraint(x: LossInputs, s: LossSettings, measure: Measure) -> ConstraintTerms:
    """Both parts of grad D: the penalty ``lam * token-mean(m_t)`` and the shift ``lam * m_t``
    (detached). Their sum's gradient is ``lam`` times an estimate of the whole gradient of
    ``E_pi[m]`` (tested against finite differences on a toy policy)."""
    m_BT = measure.token_fn(x.logp_BT, x.constraint_target_BT)
    value = masked_mean(m_BT, x.mask_BT)
    penalty = s.lam * value
    shift_BT = cost_shift(m_BT, x.mask_BT, s.lam, s.shaping_baseline)
    return ConstraintTerms(
        penalty=penalty, shift_BT=shift_BT, metrics=_metrics(x, measure, value, penalty, s.lam)
    )


# ----------------------------------------------------------------------------- signal samples


def on_signal_samples(x: LossInputs) -> tuple[LossInputs, Tensor]:
    """The inputs with the mask narrowed to samples that carry a reward signal, a nonzero
    advantage (with binary rewards and group-relative advantages: the samples of groups whose
    rewards differ; with graded rewards a sample scored at its group's mean is left out too), and
    that mask's share of the response tokens (``loss.constraint_samples=signal``)."""
    keep_BT = x.mask_BT & (x.advantages_BT != 0)
    dtype = torch.promote_types(x.logp_BT.dtype, torch.float32)  # exact enough under bfloat16
    share = keep_BT.sum().to(dtype) / x.mask_BT.sum().clamp(min=1).to(dtype)
    return replace(x, mask_BT=keep_BT), share


def restrict_to_signal(
    terms: ConstraintTerms,
    x: LossInputs,
    signal: LossInputs,
    share: Tensor,
    s: LossSettings,
    measure: Measure,
) -> ConstraintTerms:
    """A form's terms computed on ``signal`` (:func:`on_signal_samples`), as terms of the whole
    batch: the penalty, a token mean over the signal tokens, times their share (so it is
    ``lam * sum over signal tokens of m / all response tokens``: with ``agg=token-mean`` the
    policy gradient's normaliser, so the constraint weighs against the reward as much as the
    samples it acts on carry), no shift outside them, and the gap metrics (``dcmdp/prob_gap``,
    ``dcmdp/measure``, ``dcmdp/over_tol_frac``) over every response token as without the
    restriction (``dcmdp/signal_share`` added)."""
    penalty = None if terms.penalty is None else terms.penalty * share
    shift_BT = None if terms.shift_BT is None else torch.where(signal.mask_BT, terms.shift_BT, 0.0)
    metrics = dict(terms.metrics)
    target = x.constraint_target_BT
    m_BT = measure.token_fn(x.logp_BT.detach(), target)
    gap_BT = m_BT if measure.token_fn is prob_gap else prob_gap(x.logp_BT.detach(), target)
    metrics["dcmdp/prob_gap"] = masked_mean(gap_BT, x.mask_BT)
    if "dcmdp/measure" in metrics:
        metrics["dcmdp/measure"] = masked_mean(m_BT, x.mask_BT)
    if "dcmdp/over_tol_frac" in metrics:
        metrics["dcmdp/over_tol_frac"] = masked_mean((m_BT > s.tolerance).to(m_BT.dtype), x.mask_BT)
    if penalty is not None:
        metrics["dcmdp/penalty"] = penalty.detach()
    elif "dcmdp/penalty" in metrics:
        metrics["dcmdp/penalty"] = metrics["dcmdp/penalty"] * share
    metrics["dcmdp/signal_share"] = share.detach()
    return ConstraintTerms(penalty=penalty, shift_BT=shift_BT, metrics=metrics)


# ----------------------------------------------------------------------------- the share bound


def share_scale(norm_policy: float, norm_constraint: float, kappa: float) -> float:
    """The factor the share bound applies to the constraint's gradient:
    ``min(1, kappa * |g_policy| / |g_constraint|)`` (1 when the constraint has no gradient, 0 when
    the policy has none).

    With kappa < 1 the combined gradient ``g_policy + scale * g_constraint`` keeps a positive inner
    product with ``g_policy`` (at least ``(1 - kappa) |g_policy|^2``): a plain gradient step is, to
    first order, still a step that improves the reward surrogate. AdamW rescales each
    coordinate, so its step carries no such guarantee, and a constraint whose gradient points the
    same way step after step gains on a noisy policy gradient through the moment estimates; in the
    ``harm`` setting a bound of 0.5 did not prevent the collapse (docs/RESULTS.md).
    """
    if not kappa >= 0:
        raise ValueError(f"kappa must be >= 0, got {kappa!r}")
    if norm_constraint <= 0:
        return 1.0
    return min(1.0, kappa * norm_policy / norm_constraint)
