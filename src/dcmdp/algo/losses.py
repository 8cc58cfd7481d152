"""Policy losses: an importance correction composed with a discrepancy constraint.

Every loss is the PPO clipped surrogate with two independent choices (STYLE: one pure function per
variant, composed in one place, :func:`compose_loss`):

- the **importance correction** (:mod:`dcmdp.algo.corrections`): none, tis, icepop, seq_tis,
  seq_mis, geo_mask, opsm - a constant per-token weight from ``rho_t = pi_old / mu``;
- the **discrepancy constraint** (:mod:`dcmdp.algo.constraints`): none, penalty, shaping, hinge,
  full - a token-mean penalty and/or an advantage shift from a per-token measure ``m_t``
  (prob_gap, k3 or abs_log_ratio), weighted by the Lagrange multiplier lambda.

    loss = agg(l_t(A_t - shift_t) * w_t) + penalty,   l_t(A) = -min(r_t A, clip(r_t) A)

with ``r_t = exp(logp - old_logp)``. Every loss takes a :class:`LossInputs` record (per-token
tensors [B, T]) and a :class:`LossSettings` record (plain numbers) and returns a
:class:`LossOutput`. :func:`compose_loss` builds any pair; the flat names of earlier versions are
registered shorthands for pairs (below) and compute exactly what they computed before (a test
compares them with outputs recorded before the composition existed). Pick a loss by name with
:func:`get_policy_loss`; the records, the registry and validation live in
:mod:`dcmdp.algo.loss_core`; the KL to a reference policy in :mod:`dcmdp.algo.kl`.

| shorthand          | correction | constraint | source                  |
|--------------------|------------|------------|-------------------------|
| grpo               | none       | none       | PPO, DAPO clip-higher   |
| tis                | tis        | none       | TIS, Yao et al. 2025    |
| icepop             | icepop     | none       | IcePop, Ling team 2025  |
| seq_tis            | seq_tis    | none       | verl rollout correction |
| seq_mis            | seq_mis    | none       | MIS, verl / Li et al.   |
| geo_mask           | geo_mask   | none       | Geo-RS, verl / Li et al.|
| offpolicy_seq_mask | opsm       | none       | DeepSeek-V3.2 OPSM      |
| dcmdp              | none       | penalty    | DCMDP arXiv 2606.08779  |
| dcmdp_shaping      | none       | shaping    | DCMDP arXiv 2606.08779  |
| dcmdp_hinge        | none       | hinge      | this project            |
| dcmdp_full         | none       | full       | this project            |

The shorthands use the probability gap as the measure. Masks and weights multiply the per-token
loss; they do not shrink the aggregation denominator (as in DeepSeek-V3.2's OPSM formula and
verl's ``pg_losses *= weights``). The penalty is not importance-weighted: it is the constraint on
the engine's own samples, as the paper writes it; a shift is (it passes through the surrogate).
With ``LossSettings.constraint_samples="signal"`` the constraint acts only on samples with a
nonzero advantage, its penalty still divided by every response token (so its weight falls with
the share of samples that carry a reward signal; constraints.py, :func:`on_signal_samples`).

Metrics (``LossOutput.metrics``; every value a detached 0-d tensor; token fractions and means are
over response tokens, sequence fractions over sequences with at least one response token):

| metric                   | when                                | meaning                                           |
|--------------------------|-------------------------------------|---------------------------------------------------|
| ``loss/total``           | all                                 | the returned loss                                 |
| ``loss/policy``          | all                                 | the (weighted, shifted) surrogate, without penalty|
| ``clip/frac``            | all                                 | tokens whose clip is active (zero gradient)       |
| ``clip/frac_low``        | all                                 | active low clip: A < 0 and r < 1 - clip_low       |
| ``clip/frac_high``       | all                                 | active high clip: A > 0 and r > 1 + clip_high     |
| ``ratio/mean``           | all                                 | token mean of raw r before clipping               |
| ``ratio/max``            | all                                 | max of raw r                                      |
| ``ratio/min``            | all                                 | min of raw r                                      |
| ``is/rho_mean``          | any correction                      | token mean of rho                                 |
| ``is/rho_max``           | any correction                      | max of rho                                        |
| ``is/weight_mean``       | tis, seq_tis                        | token mean of the weight multiplied into the loss |
| ``is/token_truncated_frac``| tis                               | tokens with rho > tis_cap                         |
| ``is/seq_log_rho_mean``  | seq_tis, seq_mis, geo_mask          | sequence mean of sum_t log rho                    |
| ``is/seq_truncated_frac``| seq_tis                             | sequences with prod rho > seq_cap                 |
| ``is/token_masked_frac`` | icepop, seq_mis, geo_mask, opsm     | tokens given weight 0                             |
| ``is/seq_masked_frac``   | seq_mis, geo_mask, opsm             | sequences with at least one token given weight 0  |
| ``is/opsm_kl_mean``      | opsm                                | sequence mean of mean_t (engine_logp - logp)      |
| ``dcmdp/prob_gap``       | any constraint                      | token mean of the probability gap delta           |
| ``dcmdp/measure``        | a constraint on k3 / abs_log_ratio  | token mean of the constrained measure m           |
| ``dcmdp/penalty``        | any constraint                      | lam * token-mean(m) (hinge: of the excess; with   |
|                          |                                     | ``signal``: sum over signal tokens / all tokens)  |
| ``dcmdp/lambda``         | any constraint                      | the multiplier value used                         |
| ``dcmdp/over_tol_frac``  | hinge                               | tokens with m > tolerance                         |
| ``dcmdp/signal_share``   | ``constraint_samples="signal"``     | share of response tokens the constraint acts on   |

Inputs are validated at the entry of every loss (:func:`check_loss_inputs`, one device read-back).
``old_logp_BT`` and ``engine_logp_BT`` are treated as constants (detached) even when they require
grad. Positions outside the mask may hold anything (NaN, inf): they are replaced before any
arithmetic, so they change neither the loss, nor the metrics, nor the gradient.
"""

from __future__ import annotations

from dataclasses import replace

from dcmdp.algo.constraints import (
    CONSTRAINTS,
    MEASURES,
    SCALES_WITH_LAM,
    Measure,
    get_constraint,
    get_measure,
    on_signal_samples,
    restrict_to_signal,
)
from dcmdp.algo.corrections import CORRECTIONS, SEQ_LOG_RHO_BOUND, get_correction
from dcmdp.algo.discrepancy import prob_gap
from dcmdp.algo.kl import KL_K3_MAX, KL_LOG_RATIO_BOUND, kl_to_reference_k3
from dcmdp.algo.loss_core import (
    MULTIPLIER_LOSSES,
    POLICY_LOSSES,
    LossInputs,
    LossOutput,
    LossSettings,
    PolicyLossFn,
    check_loss_inputs,
    check_loss_settings,
    get_policy_loss,
    loss_output,
    ppo_clipped_token_loss,
    prepare,
    register_policy_loss,
    weighted_surrogate,
)

#: The DCMDP per-token gap delta_t, under the name the losses have exported; written once as
#: :func:`dcmdp.algo.discrepancy.prob_gap`.
token_prob_gap = prob_gap

#: Flat names of earlier versions -> (correction, constraint); the measure is the probability gap.
SHORTHANDS: dict[str, tuple[str, str]] = {
    "grpo": ("none", "none"),
    "tis": ("tis", "none"),
    "icepop": ("icepop", "none"),
    "seq_tis": ("seq_tis", "none"),
    "seq_mis": ("seq_mis", "none"),
    "geo_mask": ("geo_mask", "none"),
    "offpolicy_seq_mask": ("opsm", "none"),
    "dcmdp": ("none", "penalty"),
    "dcmdp_shaping": ("none", "shaping"),
    "dcmdp_hinge": ("none", "hinge"),
    "dcmdp_full": ("none", "full"),
}


def composed_loss(
    inputs: LossInputs, settings: LossSettings, correction: str, constraint: str, measure: str = "prob_gap"
) -> LossOutput:
    """The surrogate with ``correction``'s weight and ``constraint``'s shift and penalty on
    ``measure`` (see the module docstring); ``LossOutput.constraint_part`` is what the constraint adds."""
    weigh, constrain, meas = get_correction(correction), get_constraint(constraint), get_measure(measure)
    x = prepare(inputs, settings, need_tolerance=constraint == "hinge")
    weight_BT, metrics = weigh(x, settings)
    if settings.constraint_samples == "signal" and constraint != "none":
        signal, share = on_signal_samples(x)
        terms = restrict_to_signal(constrain(signal, settings, meas), x, signal, share, settings, meas)
    else:
        terms = constrain(x, settings, meas)
    shifted = x if terms.shift_BT is None else replace(x, advantages_BT=x.advantages_BT - terms.shift_BT)
    policy, surrogate_metrics = weighted_surrogate(shifted, settings, weight_BT)
    total = policy if terms.penalty is None else policy + terms.penalty
    added = terms.penalty
    plain = policy
    if terms.shift_BT is not None:
        plain, _ = weighted_surrogate(x, settings, weight_BT)
        added = policy - plain if added is None else policy - plain + added
    metrics = surrogate_metrics | metrics | terms.metrics
    return loss_output(
        total,
        policy,
        metrics,
        terms.penalty,
        added,
        None if added is None else plain,
        constraint_scales_with_lam=constraint in SCALES_WITH_LAM,
    )


def compose_loss(
    correction: str = "none", constraint: str = "none", measure: str = "prob_gap"
) -> PolicyLossFn:
    """The loss function ``(inputs, settings) -> LossOutput`` of one (correction, constraint,
    measure) triple; unknown names raise ``ValueError`` listing the valid ones."""
    get_correction(correction), get_constraint(constraint), get_measure(measure)  # fail early

    def loss_fn(inputs: LossInputs, settings: LossSettings) -> LossOutput:
        return composed_loss(inputs, settings, correction, constraint, measure)

    loss_fn.__name__ = f"{correction}_x_{constraint}_on_{measure}"
    loss_fn.__doc__ = f"Correction {correction!r}, constraint {constraint!r} on the {measure!r} measure."
    return loss_fn


def uses_multiplier(constraint: str) -> bool:
    """Whether a loss with this constraint reads lambda (and so the multiplier takes dual steps)."""
    return constraint != "none"


def _shorthand(name: str) -> PolicyLossFn:
    correction, constraint = SHORTHANDS[name]
    fn = compose_loss(correction, constraint)
    fn.__name__ = f"{name}_loss"
    fn.__doc__ = (
        f"Shorthand {name!r}: correction {correction!r}, constraint {constraint!r} on the probability gap."
    )
    return register_policy_loss(name, uses_multiplier=uses_multiplier(constraint))(fn)


grpo_loss = _shorthand("grpo")
tis_loss = _shorthand("tis")
icepop_loss = _shorthand("icepop")
seq_tis_loss = _shorthand("seq_tis")
seq_mis_loss = _shorthand("seq_mis")
geo_mask_loss = _shorthand("geo_mask")
offpolicy_seq_mask_loss = _shorthand("offpolicy_seq_mask")
dcmdp_loss = _shorthand("dcmdp")
dcmdp_shaping_loss = _shorthand("dcmdp_shaping")
dcmdp_hinge_loss = _shorthand("dcmdp_hinge")
dcmdp_full_loss = _shorthand("dcmdp_full")


__all__ = [
    "CONSTRAINTS",
    "CORRECTIONS",
    "KL_K3_MAX",
    "KL_LOG_RATIO_BOUND",
    "MEASURES",
    "MULTIPLIER_LOSSES",
    "POLICY_LOSSES",
    "SEQ_LOG_RHO_BOUND",
    "SHORTHANDS",
    "LossInputs",
    "LossOutput",
    "LossSettings",
    "Measure",
    "PolicyLossFn",
    "check_loss_inputs",
    "check_loss_settings",
    "compose_loss",
    "composed_loss",
    "dcmdp_full_loss",
    "dcmdp_hinge_loss",
    "dcmdp_loss",
    "dcmdp_shaping_loss",
    "geo_mask_loss",
    "get_policy_loss",
    "grpo_loss",
    "icepop_loss",
    "kl_to_reference_k3",
    "offpolicy_seq_mask_loss",
    "ppo_clipped_token_loss",
    "register_policy_loss",
    "seq_mis_loss",
    "seq_tis_loss",
    "tis_loss",
    "token_prob_gap",
    "uses_multiplier",
]
