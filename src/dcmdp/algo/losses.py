"""Policy losses: a registry of one pure function per variant, all built on the PPO clipped surrogate.

Every loss takes a :class:`LossInputs` record (per-token tensors [B, T]) and a :class:`LossSettings`
record (plain numbers) and returns a :class:`LossOutput` (a differentiable scalar and detached
scalar metrics). Pick one by name with :func:`get_policy_loss`; add one with
``@register_policy_loss("name")``. The records, the registry, validation and the shared pieces
live in :mod:`dcmdp.algo.loss_core`; the KL to a reference policy in :mod:`dcmdp.algo.kl`; all are
importable from here.

Notation, per response token t of sequence b:
  - ``r_t = exp(logp - old_logp)``: PPO ratio pi_theta / pi_old (carries the gradient).
  - ``rho_t = exp(old_logp - engine_logp)``: train-inference ratio pi_old / mu (a constant).
  - ``delta_t = |exp(logp) - exp(engine_logp)|``: the DCMDP probability gap on the sampled token.
  - ``D = token-mean(delta)``: the batch discrepancy the dual step of the multiplier reads.

| name              | formula (per-token loss ``l_t`` is the PPO clipped loss)           | source                  |
|-------------------|--------------------------------------------------------------------|-------------------------|
| grpo              | agg(l)                                                             | PPO, DAPO clip-higher   |
| tis               | agg(l * min(rho, tis_cap))                                         | TIS, Yao et al. 2025    |
| icepop            | agg(l * 1[icepop_low <= rho <= icepop_high])                       | IcePop, Ling team 2025  |
| seq_tis           | agg(l * min(prod_t rho, seq_cap))                                  | verl rollout correction |
| seq_mis           | agg(l * 1[prod_t rho <= seq_cap])                                  | MIS, verl / Li et al.   |
| geo_mask          | agg(l * 1[geo_low <= (prod_t rho)^(1/T) <= geo_high])              | Geo-RS, verl / Li et al.|
| offpolicy_seq_mask| agg(l * (1 - 1[A < 0] 1[mean_t(engine_logp - logp) > opsm_delta]))| DeepSeek-V3.2 OPSM      |
| dcmdp             | agg(l) + lam * token-mean(delta)           (reading (a))           | DCMDP arXiv 2606.08779  |
| dcmdp_shaping     | agg(l with A - lam * delta.detach())       (reading (b))           | DCMDP arXiv 2606.08779  |
| dcmdp_hinge       | agg(l) + lam * token-mean(max(0, delta - tolerance))               | DCMDP arXiv 2606.08779  |

Masks and weights from rho multiply the per-token loss; they do not shrink the aggregation
denominator (as in DeepSeek-V3.2's OPSM formula and verl's ``pg_losses *= weights``).

Metrics (``LossOutput.metrics``; every value a detached 0-d tensor; token fractions and means are
over response tokens, sequence fractions over sequences with at least one response token; "opsm" is
offpolicy_seq_mask):

| metric                   | losses                              | meaning                                           |
|--------------------------|-------------------------------------|---------------------------------------------------|
| ``loss/total``           | all                                 | the returned loss                                 |
| ``loss/policy``          | all                                 | the (weighted) surrogate part, without penalty    |
| ``clip/frac``            | all                                 | tokens whose clip is active (zero gradient)       |
| ``clip/frac_low``        | all                                 | active low clip: A < 0 and r < 1 - clip_low       |
| ``clip/frac_high``       | all                                 | active high clip: A > 0 and r > 1 + clip_high     |
| ``ratio/mean``           | all                                 | token mean of raw r before clipping               |
| ``ratio/max``            | all                                 | max of raw r                                      |
| ``ratio/min``            | all                                 | min of raw r                                      |
| ``is/rho_mean``          | tis, icepop, seq_*, geo_mask, opsm  | token mean of rho                                 |
| ``is/rho_max``           | tis, icepop, seq_*, geo_mask, opsm  | max of rho                                        |
| ``is/weight_mean``       | tis, seq_tis                        | token mean of the weight multiplied into the loss |
| ``is/token_truncated_frac``| tis                               | tokens with rho > tis_cap                         |
| ``is/seq_log_rho_mean``  | seq_tis, seq_mis, geo_mask          | sequence mean of sum_t log rho                    |
| ``is/seq_truncated_frac``| seq_tis                             | sequences with prod rho > seq_cap                 |
| ``is/token_masked_frac`` | icepop, seq_mis, geo_mask, opsm     | tokens given weight 0                             |
| ``is/seq_masked_frac``   | seq_mis, geo_mask, opsm             | sequences with at least one token given weight 0  |
| ``is/opsm_kl_mean``      | offpolicy_seq_mask                  | sequence mean of mean_t (engine_logp - logp)      |
| ``dcmdp/prob_gap``       | dcmdp*                              | D = token mean of delta (what the dual step reads)|
| ``dcmdp/penalty``        | dcmdp*                              | lam * token-mean(delta) (hinge: of the excess)    |
| ``dcmdp/lambda``         | dcmdp*                              | the multiplier value used                         |
| ``dcmdp/over_tol_frac``  | dcmdp_hinge                         | tokens with delta > tolerance                     |

Inputs are validated at the entry of every loss (:func:`check_loss_inputs`, one device read-back).
``old_logp_BT`` and ``engine_logp_BT`` are treated as constants (detached) even when they require
grad. Positions outside the mask may hold anything (NaN, inf): they are replaced before any
arithmetic, so they change neither the loss, nor the metrics, nor the gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

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
    log_rho,
    loss_output,
    ppo_clipped_token_loss,
    prepare,
    register_policy_loss,
    rho_stats,
    seq_frac,
    seq_log_rho,
    seq_mean,
    weighted_surrogate,
)
from dcmdp.algo.masked import masked_mean

# verl's bound on the summed log ratio of a sequence before exp(); e^20 ~ 4.9e8 is far above any cap.
SEQ_LOG_RHO_BOUND = 20.0

#: The DCMDP per-token gap delta_t, under the name the losses have exported; written once as
#: :func:`dcmdp.algo.discrepancy.prob_gap`.
token_prob_gap = prob_gap

# ---------------------------------------------------------------------------------------------
# Baselines


@register_policy_loss("grpo")
def grpo_loss(inputs: LossInputs, settings: LossSettings) -> LossOutput:
    """GRPO / PPO clipped surrogate: ``agg(-min(r A, clip(r, 1 - clip_low, 1 + clip_high) A))``.

    Sources: PPO (Schulman et al. 2017), GRPO (Shao et al. 2024), clip-higher from DAPO (Yu et al. 2025).
    No train-inference correction.
    """
    x = prepare(inputs, settings)
    policy, metrics = weighted_surrogate(x, settings, torch.ones_like(x.logp_BT))
    return loss_output(policy, policy, metrics)


@register_policy_loss("tis")
def tis_loss(inputs: LossInputs, settings: LossSettings) -> LossOutput:
    """Token-level truncated importance sampling: ``agg(l_t * min(rho_t, tis_cap))``, rho = pi_old / mu.

    Source: Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
    training" (TIS); verl ``rollout_is: token``. The weight is a constant.
    """
    x = prepare(inputs, settings)
    rho_BT = torch.exp(log_rho(x))
    weight_BT = rho_BT.clamp(max=settings.tis_cap)
    policy, metrics = weighted_surrogate(x, settings, weight_BT)
    metrics |= rho_stats(rho_BT, x.mask_BT)
    metrics["is/weight_mean"] = masked_mean(weight_BT, x.mask_BT)
    metrics["is/token_truncated_frac"] = masked_mean((rho_BT > settings.tis_cap).to(rho_BT.dtype), x.mask_BT)
    return loss_output(policy, policy, metrics)


@register_policy_loss("icepop")
def icepop_loss(inputs: LossInputs, settings: LossSettings) -> LossOutput:
    """Token mask: ``agg(l_t * 1[icepop_low <= rho_t <= icepop_high])``, rho = pi_old / mu.

    Source: IcePop (Ling team, inclusionAI 2025, Ring-1T report); defaults alpha 0.5, beta 5.
    Masked tokens keep their place in the aggregation denominator.
    """
    x = prepare(inputs, settings)
    rho_BT = torch.exp(log_rho(x))
    keep_BT = (rho_BT >= settings.icepop_low) & (rho_BT <= settings.icepop_high)
    policy, metrics = weighted_surrogate(x, settings, keep_BT.to(rho_BT.dtype))
    metrics |= rho_stats(rho_BT, x.mask_BT)
    metrics["is/token_masked_frac"] = masked_mean((~keep_BT).to(rho_BT.dtype), x.mask_BT)
    return loss_output(policy, policy, metrics)


@register_policy_loss("seq_tis")
def seq_tis_loss(inputs: LossInputs, settings: LossSettings) -> LossOutput:
    """Sequence truncated IS: ``agg(l_t * min(prod_t rho_t, seq_cap))`` with one weight per sequence.

    ``prod_t rho_t`` is computed as ``exp(clamp(sum_t log rho_t, -20, 20))`` as verl does, so long
    sequences neither overflow nor underflow. Source: verl rollout correction docs
    (``rollout_is: sequence``; Li et al.).
    """
    x = prepare(inputs, settings)
    seq_log_rho_B = seq_log_rho(x)
    seq_rho_B = torch.exp(seq_log_rho_B.clamp(-SEQ_LOG_RHO_BOUND, SEQ_LOG_RHO_BOUND))
    weight_B = seq_rho_B.clamp(max=settings.seq_cap)
    weight_BT = weight_B[:, None].expand_as(x.logp_BT)
    policy, metrics = weighted_surrogate(x, settings, weight_BT)
    metrics |= rho_stats(torch.exp(log_rho(x)), x.mask_BT)
    metrics["is/weight_mean"] = masked_mean(weight_BT, x.mask_BT)
    metrics["is/seq_log_rho_mean"] = seq_mean(seq_log_rho_B, x.mask_BT)
    metrics["is/seq_truncated_frac"] = seq_frac(seq_rho_B > settings.seq_cap, x.mask_BT)
    return loss_output(policy, policy, metrics)


@register_policy_loss("seq_mis")
def seq_mis_loss(inputs: LossInputs, settings: LossSettings) -> LossOutput:
    """Sequence rejection (MIS): ``agg(l_t * 1[prod_t rho_t <= seq_cap])``.

    ``prod_t rho_t = exp(clamp(sum_t log rho_t, -20, 20))``. Source: verl rollout correction docs
    (sequence-level rejection sampling, ``seq_sum_k1``; Li et al., "MIS").
    """
    x = prepare(inputs, settings)
    seq_log_rho_B = seq_log_rho(x)
    seq_rho_B = torch.exp(seq_log_rho_B.clamp(-SEQ_LOG_RHO_BOUND, SEQ_LOG_RHO_BOUND))
    reject_B = seq_rho_B > settings.seq_cap
    keep_BT = (~reject_B)[:, None].expand_as(x.mask_BT)
    policy, metrics = weighted_surrogate(x, settings, keep_BT.to(x.logp_BT.dtype))
    metrics |= rho_stats(torch.exp(log_rho(x)), x.mask_BT)
    metrics["is/seq_log_rho_mean"] = seq_mean(seq_log_rho_B, x.mask_BT)
    metrics["is/token_masked_frac"] = masked_mean((~keep_BT).to(x.logp_BT.dtype), x.mask_BT)
    metrics["is/seq_masked_frac"] = seq_frac(reject_B, x.mask_BT)
    return loss_output(policy, policy, metrics)


@register_policy_loss("geo_mask")
def geo_mask_loss(inputs: LossInputs, settings: LossSettings) -> LossOutput:
    """Geometric-mean sequence mask (Geo-RS): keep sequence b iff
    ``geo_low <= exp(mean_t log rho_t) <= geo_high``; ``agg(l_t * keep_b)``.

    The mean runs over the sequence's response tokens. Source: verl rollout correction docs
    (``seq_mean_k1``, "geometric" level; Li et al.).
    """
    x = prepare(inputs, settings)
    seq_log_rho_B = seq_log_rho(x)
    tokens_B = x.mask_BT.sum(dim=-1).clamp(min=1).to(seq_log_rho_B.dtype)
    geo_B = torch.exp(seq_log_rho_B / tokens_B)
    keep_B = (geo_B >= settings.geo_low) & (geo_B <= settings.geo_high)
    keep_BT = keep_B[:, None].expand_as(x.mask_BT)
    policy, metrics = weighted_surrogate(x, settings, keep_BT.to(x.logp_BT.dtype))
    metrics |= rho_stats(torch.exp(log_rho(x)), x.mask_BT)
    metrics["is/seq_log_rho_mean"] = seq_mean(seq_log_rho_B, x.mask_BT)
    metrics["is/token_masked_frac"] = masked_mean((~keep_BT).to(x.logp_BT.dtype), x.mask_BT)
    metrics["is/seq_masked_frac"] = seq_frac(~keep_B, x.mask_BT)
    return loss_output(policy, policy, metrics)


@register_policy_loss("offpolicy_seq_mask")
def offpolicy_seq_mask_loss(inputs: LossInputs, settings: LossSettings) -> LossOutput:
    """DeepSeek-V3.2 off-policy sequence mask (OPSM): ``agg(l_t * M_t)`` with
    ``M_t = 0`` if ``A_t < 0`` and ``mean_t (engine_logp - logp.detach()) > opsm_delta`` else 1.

    With the sequence advantage broadcast over its tokens this drops whole negative-advantage
    sequences that the current policy has drifted far from. Source: DeepSeek-V3.2 technical report
    (2025), "Off-Policy Sequence Masking"; the KL term uses mu = the engine, pi_theta detached.
    """
    x = prepare(inputs, settings)
    tokens_B = x.mask_BT.sum(dim=-1).clamp(min=1).to(x.logp_BT.dtype)
    kl_B = (x.engine_logp_BT - x.logp_BT.detach()).sum(dim=-1) / tokens_B
    drop_BT = (x.advantages_BT < 0) & (kl_B > settings.opsm_delta)[:, None]
    policy, metrics = weighted_surrogate(x, settings, (~drop_BT).to(x.logp_BT.dtype))
    metrics |= rho_stats(torch.exp(log_rho(x)), x.mask_BT)
    metrics["is/opsm_kl_mean"] = seq_mean(kl_B, x.mask_BT)
    metrics["is/token_masked_frac"] = masked_mean(drop_BT.to(x.logp_BT.dtype), x.mask_BT)
    metrics["is/seq_masked_frac"] = seq_frac((drop_BT & x.mask_BT).any(dim=-1), x.mask_BT)
    return loss_output(policy, policy, metrics)


# ---------------------------------------------------------------------------------------------
# DCMDP (arXiv 2606.08779): the Lagrangian L = J_GRPO - lam * (D - c); the constant lam * c drops out.


def _dcmdp_metrics(gap: Tensor, penalty: Tensor, lam: float) -> dict[str, Tensor]:
    return {
        "dcmdp/prob_gap": gap.detach(),
        "dcmdp/penalty": penalty.detach(),
        "dcmdp/lambda": torch.tensor(lam, dtype=gap.dtype, device=gap.device),
    }


@register_policy_loss("dcmdp", uses_multiplier=True)
def dcmdp_loss(inputs: LossInputs, settings: LossSettings) -> LossOutput:
    """DCMDP reading (a), differentiable penalty:
    ``agg(l_t) + lam * token-mean(|exp(logp_t) - exp(engine_logp_t)|)``.

    The gradient of the penalty flows through ``logp`` (the trainer's pi_theta), so the policy
    itself moves towards the engine's probabilities ("self-correction"). The penalty is always a
    token mean over the mask, whatever ``settings.agg``, because the constraint D <= c is defined
    on the token mean of delta. Source: DCMDP, arXiv 2606.08779.
    """
    x = prepare(inputs, settings)
    policy, metrics = weighted_surrogate(x, settings, torch.ones_like(x.logp_BT))
    gap = masked_mean(prob_gap(x.logp_BT, x.engine_logp_BT), x.mask_BT)
    penalty = settings.lam * gap
    total = policy + penalty
    return loss_output(total, policy, metrics | _dcmdp_metrics(gap, penalty, settings.lam), penalty)


@register_policy_loss("dcmdp_shaping", uses_multiplier=True)
def dcmdp_shaping_loss(inputs: LossInputs, settings: LossSettings) -> LossOutput:
    """DCMDP reading (b), advantage shaping: ``A'_t = A_t - lam * delta_t.detach()``, then
    ``agg(-min(r A', clip(r) A'))``.

    No gradient flows through delta; the discrepancy reaches theta only through the shaped
    advantage. ``dcmdp/penalty`` reports ``lam * token-mean(delta)``, the mean advantage removed.
    Source: DCMDP, arXiv 2606.08779 (the shaping reading seen in a third-party port).
    """
    x = prepare(inputs, settings)
    delta_BT = prob_gap(x.logp_BT.detach(), x.engine_logp_BT)
    shaped = LossInputs(
        logp_BT=x.logp_BT,
        old_logp_BT=x.old_logp_BT,
        engine_logp_BT=x.engine_logp_BT,
        advantages_BT=x.advantages_BT - settings.lam * delta_BT,
        mask_BT=x.mask_BT,
    )
    policy, metrics = weighted_surrogate(shaped, settings, torch.ones_like(x.logp_BT))
    gap = masked_mean(delta_BT, x.mask_BT)
    return loss_output(policy, policy, metrics | _dcmdp_metrics(gap, settings.lam * gap, settings.lam))


@register_policy_loss("dcmdp_hinge", uses_multiplier=True)
def dcmdp_hinge_loss(inputs: LossInputs, settings: LossSettings) -> LossOutput:
    """DCMDP hinge variant: ``agg(l_t) + lam * token-mean(max(0, delta_t - tolerance))``.

    Only tokens whose gap exceeds the tolerance c are pulled back; the token mean ignores
    ``settings.agg`` as in :func:`dcmdp_loss`. ``tolerance`` must be > 0. Source: DCMDP,
    arXiv 2606.08779 (the hinge is this project's third option, not from the paper).
    """
    x = prepare(inputs, settings, need_tolerance=True)
    policy, metrics = weighted_surrogate(x, settings, torch.ones_like(x.logp_BT))
    delta_BT = prob_gap(x.logp_BT, x.engine_logp_BT)
    excess = masked_mean(torch.relu(delta_BT - settings.tolerance), x.mask_BT)
    penalty = settings.lam * excess
    total = policy + penalty
    metrics |= _dcmdp_metrics(masked_mean(delta_BT, x.mask_BT), penalty, settings.lam)
    metrics["dcmdp/over_tol_frac"] = masked_mean(
        (delta_BT.detach() > settings.tolerance).to(delta_BT.dtype), x.mask_BT
    )
    return loss_output(total, policy, metrics, penalty)


__all__ = [
    "KL_K3_MAX",
    "KL_LOG_RATIO_BOUND",
    "MULTIPLIER_LOSSES",
    "POLICY_LOSSES",
    "SEQ_LOG_RHO_BOUND",
    "LossInputs",
    "LossOutput",
    "LossSettings",
    "PolicyLossFn",
    "check_loss_inputs",
    "check_loss_settings",
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
]
