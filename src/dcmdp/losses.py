"""Policy losses: a registry of one pure function per variant, all built on the PPO clipped surrogate.

Every loss takes a :class:`LossInputs` record (per-token tensors [B, T]) and a :class:`LossSettings`
record (plain numbers) and returns a :class:`LossOutput` (a differentiable scalar and detached
scalar metrics). Pick one by name with :func:`get_policy_loss`; add one with
``@register_policy_loss("name")``.

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

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from dcmdp.aggregation import AGG_MODES, aggregate

# verl's bound on the summed log ratio of a sequence before exp(); e^20 ~ 4.9e8 is far above any cap.
SEQ_LOG_RHO_BOUND = 20.0


@dataclass(frozen=True)
class LossInputs:
    """Per-token tensors of one micro-batch, all of shape [B, T]."""

    logp_BT: Tensor
    """Trainer log-probs of the sampled tokens under the current parameters (requires grad)."""
    old_logp_BT: Tensor
    """Trainer log-probs at the start of the step, pi_old (a constant)."""
    engine_logp_BT: Tensor
    """Rollout-engine log-probs of the sampled tokens, mu (a constant)."""
    advantages_BT: Tensor
    """Per-token advantages (the sequence advantage broadcast over its tokens)."""
    mask_BT: Tensor
    """Response mask, bool or 0/1: 1 on tokens the policy generated, 0 on prompt and padding."""


@dataclass(frozen=True)
class LossSettings:
    """Plain numbers the losses read; validated when built (see :func:`check_loss_settings`)."""

    clip_low: float = 0.2
    """PPO clip below: r is clipped at 1 - clip_low."""
    clip_high: float = 0.28
    """PPO clip above: r is clipped at 1 + clip_high (DAPO clip-higher when > clip_low)."""
    agg: str = "token-mean"
    """Aggregation mode of the surrogate, one of ``dcmdp.aggregation.AGG_MODES``."""
    agg_constant: float | None = None
    """Normaliser for ``agg="constant"`` (Dr. GRPO); unused otherwise."""
    tis_cap: float = 2.0
    """TIS truncation C: token weight min(rho, C)."""
    icepop_low: float = 0.5
    """IcePop: keep a token only if rho >= icepop_low."""
    icepop_high: float = 5.0
    """IcePop: keep a token only if rho <= icepop_high."""
    seq_cap: float = 2.0
    """seq_tis truncation and seq_mis rejection threshold on prod_t rho."""
    geo_low: float = 0.999
    """Geo-RS: keep a sequence only if the geometric mean of rho >= geo_low."""
    geo_high: float = 1.001
    """Geo-RS: keep a sequence only if the geometric mean of rho <= geo_high."""
    opsm_delta: float = 0.5
    """OPSM: drop negative-advantage tokens of sequences whose mean log(mu / pi_theta) > opsm_delta."""
    lam: float = 0.0
    """Lagrange multiplier value lambda >= 0, a plain number from ``dcmdp.multiplier``."""
    tolerance: float = 0.0037
    """DCMDP tolerance c (the paper's value for Qwen3-8B); the hinge penalises delta above it."""

    def __post_init__(self) -> None:
        check_loss_settings(self)


@dataclass
class LossOutput:
    """A loss and its metrics."""

    loss: Tensor
    """Scalar, differentiable with respect to ``LossInputs.logp_BT``."""
    metrics: dict[str, Tensor]
    """Detached 0-d tensors keyed by the names in the module docstring."""
    token_mean_part: Tensor | None = None
    """The part of ``loss`` that is a token mean whatever ``settings.agg`` (the DCMDP gap
    penalty), or None. Gradient accumulation weighs it by the micro-batch's token share while
    the rest of ``loss`` gets the share of its aggregation (sequences for the seq-mean modes)."""


PolicyLossFn = Callable[[LossInputs, LossSettings], LossOutput]
POLICY_LOSSES: dict[str, PolicyLossFn] = {}
MULTIPLIER_LOSSES: set[str] = set()
"""Names of the losses that read ``LossSettings.lam`` (the Lagrange multiplier)."""


def register_policy_loss(name: str, uses_multiplier: bool = False) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator adding a loss to :data:`POLICY_LOSSES` under ``name``; a taken name raises ``ValueError``.
    ``uses_multiplier``: the loss reads lambda (listed in :data:`MULTIPLIER_LOSSES`)."""

    def register(fn: PolicyLossFn) -> PolicyLossFn:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is already registered")
        POLICY_LOSSES[name] = fn
        if uses_multiplier:
            MULTIPLIER_LOSSES.add(name)
        return fn

    return register


def get_policy_loss(name: str) -> PolicyLossFn:
    """The loss registered as ``name``; an unknown name raises ``ValueError`` listing the valid ones."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; valid names: {', '.join(sorted(POLICY_LOSSES))}")
    return POLICY_LOSSES[name]


# ---------------------------------------------------------------------------------------------
# Validation


def check_loss_settings(settings: LossSettings, *, need_tolerance: bool = False) -> None:
    """Raise ``ValueError`` naming the field when a setting is out of range.

    Every number must be finite; clips, ``lam`` and ``tolerance`` >= 0; caps > 0; low <= high;
    ``agg`` a known mode with ``agg_constant > 0`` when it is ``"constant"``. With
    ``need_tolerance`` (the hinge) ``tolerance`` must be > 0.
    """
    for f in fields(settings):
        value = getattr(settings, f.name)
        if isinstance(value, float | int) and not math.isfinite(value):
            raise ValueError(f"LossSettings.{f.name} must be finite, got {value!r}")
    non_negative = ("clip_low", "clip_high", "icepop_low", "geo_low", "lam", "tolerance")
    for name in non_negative:
        if getattr(settings, name) < 0:
            raise ValueError(f"LossSettings.{name} must be >= 0, got {getattr(settings, name)!r}")
    for name in ("tis_cap", "icepop_high", "seq_cap", "geo_high"):
        if not getattr(settings, name) > 0:
            raise ValueError(f"LossSettings.{name} must be > 0, got {getattr(settings, name)!r}")
    for low, high in (("icepop_low", "icepop_high"), ("geo_low", "geo_high")):
        if getattr(settings, low) > getattr(settings, high):
            raise ValueError(
                f"LossSettings.{low} ({getattr(settings, low)!r}) must be <= "
                f"LossSettings.{high} ({getattr(settings, high)!r})"
            )
    if settings.agg not in AGG_MODES:
        raise ValueError(f"LossSettings.agg {settings.agg!r} is not one of: {', '.join(AGG_MODES)}")
    if settings.agg == "constant" and (settings.agg_constant is None or not settings.agg_constant > 0):
        raise ValueError(
            f"LossSettings.agg_constant must be > 0 when agg='constant', got {settings.agg_constant!r}"
        )
    if need_tolerance and not settings.tolerance > 0:
        raise ValueError(f"LossSettings.tolerance must be > 0 for dcmdp_hinge, got {settings.tolerance!r}")


def check_loss_inputs(inputs: LossInputs) -> None:
    """Raise ``ValueError`` on inputs no loss can use.

    Checks: all five tensors 2-D with one shape; the mask selects at least one token; no NaN or
    +inf at response positions of ``logp_BT``, ``old_logp_BT`` or ``engine_logp_BT``, and no
    non-finite advantage there. Positions outside the mask are not inspected. All counts come back
    from the device in one read.
    """
    shape = inputs.logp_BT.shape
    if len(shape) != 2:
        raise ValueError(f"logp_BT must be 2-D [B, T], got shape {tuple(shape)}")
    for f in fields(inputs):
        tensor = getattr(inputs, f.name)
        if tensor.shape != shape:
            raise ValueError(
                f"{f.name} has shape {tuple(tensor.shape)} but logp_BT has shape {tuple(shape)}; "
                "all loss inputs must share one [B, T] shape"
            )
    keep_BT = inputs.mask_BT != 0

    def nan_or_pos_inf(t: Tensor) -> Tensor:
        t = t.detach()
        return torch.isnan(t) | (t == math.inf)

    # -inf log-probs are legal (probability 0); NaN and +inf are not. Advantages must be finite.
    bad = {
        "logp_BT": (nan_or_pos_inf(inputs.logp_BT), "NaN or +inf values", "the trainer forward pass"),
        "old_logp_BT": (nan_or_pos_inf(inputs.old_logp_BT), "NaN or +inf values", "the trainer recompute"),
        "engine_logp_BT": (
            nan_or_pos_inf(inputs.engine_logp_BT),
            "NaN or +inf values",
            "the rollout engine's returned log-probs",
        ),
        "advantages_BT": (~torch.isfinite(inputs.advantages_BT.detach()), "non-finite values", "the rewards"),
    }
    counts = torch.stack([keep_BT.sum(), *[(keep_BT & flag).sum() for flag, _, _ in bad.values()]])
    n_tokens, *n_bad = counts.tolist()  # the one device read-back
    if n_tokens == 0:
        raise ValueError(
            f"mask_BT selects no response tokens (shape {tuple(inputs.mask_BT.shape)}, all zero); "
            "there is nothing to train on"
        )
    for (name, (_, what, where)), count in zip(bad.items(), n_bad):
        if count:
            raise ValueError(
                f"{name} has {count} {what} at response (mask != 0) positions out of {n_tokens}; check {where}"
            )


def _clean(inputs: LossInputs) -> LossInputs:
    """Bool mask, detached constants, and zeros at masked positions so garbage there cannot reach the
    arithmetic or the gradient (``torch.where`` sends exactly zero gradient to the unselected side)."""
    keep_BT = inputs.mask_BT != 0

    def zero_out(t: Tensor) -> Tensor:
        return torch.where(keep_BT, t, torch.zeros((), dtype=t.dtype, device=t.device))

    return LossInputs(
        logp_BT=zero_out(inputs.logp_BT),
        old_logp_BT=zero_out(inputs.old_logp_BT.detach()),
        engine_logp_BT=zero_out(inputs.engine_logp_BT.detach()),
        advantages_BT=zero_out(inputs.advantages_BT.detach()),
        mask_BT=keep_BT,
    )


def _prepare(inputs: LossInputs, settings: LossSettings, *, need_tolerance: bool = False) -> LossInputs:
    check_loss_settings(settings, need_tolerance=need_tolerance)
    check_loss_inputs(inputs)
    return _clean(inputs)


# ---------------------------------------------------------------------------------------------
# Shared pieces


def ppo_clipped_token_loss(
    logp_BT: Tensor,
    old_logp_BT: Tensor,
    adv_BT: Tensor,
    mask_BT: Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token PPO clipped loss and its clip / ratio metrics.

    ``l_t = -min(r_t A_t, clip(r_t, 1 - clip_low, 1 + clip_high) A_t)``, ``r_t = exp(logp - old_logp)``.
    Source: PPO (Schulman et al. 2017); asymmetric bounds are DAPO's clip-higher (Yu et al. 2025).
    The clip is active (gradient zero) where A > 0 and r > 1 + clip_high ("high") or A < 0 and
    r < 1 - clip_low ("low"). Expects finite values at masked positions (see ``_clean``) and a
    non-empty mask; ``mask_BT`` (bool or 0/1) is only used for the metrics.
    """
    ratio_BT = torch.exp(logp_BT - old_logp_BT)
    clipped_BT = ratio_BT.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_BT = -torch.minimum(ratio_BT * adv_BT, clipped_BT * adv_BT)

    r_BT = ratio_BT.detach()
    high_BT = (adv_BT > 0) & (r_BT > 1.0 + clip_high)
    low_BT = (adv_BT < 0) & (r_BT < 1.0 - clip_low)
    metrics = {
        "clip/frac": _token_mean((high_BT | low_BT).to(r_BT.dtype), mask_BT),
        "clip/frac_low": _token_mean(low_BT.to(r_BT.dtype), mask_BT),
        "clip/frac_high": _token_mean(high_BT.to(r_BT.dtype), mask_BT),
        **_masked_stats(r_BT, mask_BT, "ratio/mean", "ratio/max", "ratio/min"),
    }
    return loss_BT, metrics


def _token_mean(x_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Token mean over a bool mask known to be non-empty (checked once by ``check_loss_inputs``, so
    no further device read-back here); masked positions are dropped with ``torch.where``."""
    keep_BT = mask_BT != 0
    return torch.where(keep_BT, x_BT, 0.0).sum() / keep_BT.sum().to(x_BT.dtype)


def _masked_stats(
    x_BT: Tensor, mask_BT: Tensor, mean: str, max_: str, min_: str | None = None
) -> dict[str, Tensor]:
    """Token mean, max (and min) of ``x_BT`` over the mask, detached, under the given metric names."""
    x_BT = x_BT.detach()
    keep_BT = mask_BT != 0
    stats = {mean: _token_mean(x_BT, keep_BT), max_: torch.where(keep_BT, x_BT, -math.inf).max()}
    if min_ is not None:
        stats[min_] = torch.where(keep_BT, x_BT, math.inf).min()
    return stats


def _rho_stats(rho_BT: Tensor, mask_BT: Tensor) -> dict[str, Tensor]:
    return _masked_stats(rho_BT, mask_BT, "is/rho_mean", "is/rho_max")


def token_prob_gap(logp_BT: Tensor, engine_logp_BT: Tensor) -> Tensor:
    """DCMDP per-token discrepancy ``delta_t = |exp(logp_t) - exp(engine_logp_t)|`` (arXiv 2606.08779).

    Differentiable through ``logp_BT``; pass detached tensors for a measurement.
    """
    return (torch.exp(logp_BT) - torch.exp(engine_logp_BT)).abs()


def _log_rho(x: LossInputs) -> Tensor:
    """``log rho_t = old_logp - engine_logp`` (zero at masked positions after ``_clean``)."""
    return x.old_logp_BT - x.engine_logp_BT


def _seq_log_rho(x: LossInputs) -> Tensor:
    """``sum_t log rho_t`` per sequence [B]; masked positions hold zero after ``_clean``."""
    return _log_rho(x).sum(dim=-1)


def _seq_frac(flag_B: Tensor, mask_BT: Tensor) -> Tensor:
    """Fraction of sequences with at least one response token for which ``flag_B`` holds."""
    has_tokens_B = mask_BT.any(dim=-1)
    return (flag_B & has_tokens_B).sum().to(torch.float32) / has_tokens_B.sum().to(torch.float32)


def _seq_mean(v_B: Tensor, mask_BT: Tensor) -> Tensor:
    """Mean of ``v_B`` over sequences with at least one response token."""
    has_tokens_B = mask_BT.any(dim=-1)
    return torch.where(has_tokens_B, v_B, 0.0).sum() / has_tokens_B.sum().to(v_B.dtype)


def _weighted_surrogate(
    x: LossInputs, s: LossSettings, weight_BT: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """``agg(l_t * w_t)`` with the PPO token loss ``l_t`` and a constant weight ``w_t``."""
    loss_BT, metrics = ppo_clipped_token_loss(
        x.logp_BT, x.old_logp_BT, x.advantages_BT, x.mask_BT, s.clip_low, s.clip_high
    )
    policy = aggregate(loss_BT * weight_BT.detach(), x.mask_BT, s.agg, s.agg_constant)
    return policy, metrics


def _output(
    total: Tensor, policy: Tensor, metrics: dict[str, Tensor], penalty: Tensor | None = None
) -> LossOutput:
    metrics = {"loss/total": total.detach(), "loss/policy": policy.detach(), **metrics}
    return LossOutput(
        loss=total, metrics={k: v.detach() for k, v in metrics.items()}, token_mean_part=penalty
    )


# ---------------------------------------------------------------------------------------------
# Baselines


@register_policy_loss("grpo")
def grpo_loss(inputs: LossInputs, settings: LossSettings) -> LossOutput:
    """GRPO / PPO clipped surrogate: ``agg(-min(r A, clip(r, 1 - clip_low, 1 + clip_high) A))``.

    Sources: PPO (Schulman et al. 2017), GRPO (Shao et al. 2024), clip-higher from DAPO (Yu et al. 2025).
    No train-inference correction.
    """
    x = _prepare(inputs, settings)
    policy, metrics = _weighted_surrogate(x, settings, torch.ones_like(x.logp_BT))
    return _output(policy, policy, metrics)


@register_policy_loss("tis")
def tis_loss(inputs: LossInputs, settings: LossSettings) -> LossOutput:
    """Token-level truncated importance sampling: ``agg(l_t * min(rho_t, tis_cap))``, rho = pi_old / mu.

    Source: Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
    training" (TIS); verl ``rollout_is: token``. The weight is a constant.
    """
    x = _prepare(inputs, settings)
    rho_BT = torch.exp(_log_rho(x))
    weight_BT = rho_BT.clamp(max=settings.tis_cap)
    policy, metrics = _weighted_surrogate(x, settings, weight_BT)
    metrics |= _rho_stats(rho_BT, x.mask_BT)
    metrics["is/weight_mean"] = _token_mean(weight_BT, x.mask_BT)
    metrics["is/token_truncated_frac"] = _token_mean((rho_BT > settings.tis_cap).to(rho_BT.dtype), x.mask_BT)
    return _output(policy, policy, metrics)


@register_policy_loss("icepop")
def icepop_loss(inputs: LossInputs, settings: LossSettings) -> LossOutput:
    """Token mask: ``agg(l_t * 1[icepop_low <= rho_t <= icepop_high])``, rho = pi_old / mu.

    Source: IcePop (Ling team, inclusionAI 2025, Ring-1T report); defaults alpha 0.5, beta 5.
    Masked tokens keep their place in the aggregation denominator.
    """
    x = _prepare(inputs, settings)
    rho_BT = torch.exp(_log_rho(x))
    keep_BT = (rho_BT >= settings.icepop_low) & (rho_BT <= settings.icepop_high)
    policy, metrics = _weighted_surrogate(x, settings, keep_BT.to(rho_BT.dtype))
    metrics |= _rho_stats(rho_BT, x.mask_BT)
    metrics["is/token_masked_frac"] = _token_mean((~keep_BT).to(rho_BT.dtype), x.mask_BT)
    return _output(policy, policy, metrics)


@register_policy_loss("seq_tis")
def seq_tis_loss(inputs: LossInputs, settings: LossSettings) -> LossOutput:
    """Sequence truncated IS: ``agg(l_t * min(prod_t rho_t, seq_cap))`` with one weight per sequence.

    ``prod_t rho_t`` is computed as ``exp(clamp(sum_t log rho_t, -20, 20))`` as verl does, so long
    sequences neither overflow nor underflow. Source: verl rollout correction docs
    (``rollout_is: sequence``; Li et al.).
    """
    x = _prepare(inputs, settings)
    seq_log_rho_B = _seq_log_rho(x)
    seq_rho_B = torch.exp(seq_log_rho_B.clamp(-SEQ_LOG_RHO_BOUND, SEQ_LOG_RHO_BOUND))
    weight_B = seq_rho_B.clamp(max=settings.seq_cap)
    weight_BT = weight_B[:, None].expand_as(x.logp_BT)
    policy, metrics = _weighted_surrogate(x, settings, weight_BT)
    metrics |= _rho_stats(torch.exp(_log_rho(x)), x.mask_BT)
    metrics["is/weight_mean"] = _token_mean(weight_BT, x.mask_BT)
    metrics["is/seq_log_rho_mean"] = _seq_mean(seq_log_rho_B, x.mask_BT)
    metrics["is/seq_truncated_frac"] = _seq_frac(seq_rho_B > settings.seq_cap, x.mask_BT)
    return _output(policy, policy, metrics)


@register_policy_loss("seq_mis")
def seq_mis_loss(inputs: LossInputs, settings: LossSettings) -> LossOutput:
    """Sequence rejection (MIS): ``agg(l_t * 1[prod_t rho_t <= seq_cap])``.

    ``prod_t rho_t = exp(clamp(sum_t log rho_t, -20, 20))``. Source: verl rollout correction docs
    (sequence-level rejection sampling, ``seq_sum_k1``; Li et al., "MIS").
    """
    x = _prepare(inputs, settings)
    seq_log_rho_B = _seq_log_rho(x)
    seq_rho_B = torch.exp(seq_log_rho_B.clamp(-SEQ_LOG_RHO_BOUND, SEQ_LOG_RHO_BOUND))
    reject_B = seq_rho_B > settings.seq_cap
    keep_BT = (~reject_B)[:, None].expand_as(x.mask_BT)
    policy, metrics = _weighted_surrogate(x, settings, keep_BT.to(x.logp_BT.dtype))
    metrics |= _rho_stats(torch.exp(_log_rho(x)), x.mask_BT)
    metrics["is/seq_log_rho_mean"] = _seq_mean(seq_log_rho_B, x.mask_BT)
    metrics["is/token_masked_frac"] = _token_mean((~keep_BT).to(x.logp_BT.dtype), x.mask_BT)
    metrics["is/seq_masked_frac"] = _seq_frac(reject_B, x.mask_BT)
    return _output(policy, policy, metrics)


@register_policy_loss("geo_mask")
def geo_mask_loss(inputs: LossInputs, settings: LossSettings) -> LossOutput:
    """Geometric-mean sequence mask (Geo-RS): keep sequence b iff
    ``geo_low <= exp(mean_t log rho_t) <= geo_high``; ``agg(l_t * keep_b)``.

    The mean runs over the sequence's response tokens. Source: verl rollout correction docs
    (``seq_mean_k1``, "geometric" level; Li et al.).
    """
    x = _prepare(inputs, settings)
    seq_log_rho_B = _seq_log_rho(x)
    tokens_B = x.mask_BT.sum(dim=-1).clamp(min=1).to(seq_log_rho_B.dtype)
    geo_B = torch.exp(seq_log_rho_B / tokens_B)
    keep_B = (geo_B >= settings.geo_low) & (geo_B <= settings.geo_high)
    keep_BT = keep_B[:, None].expand_as(x.mask_BT)
    policy, metrics = _weighted_surrogate(x, settings, keep_BT.to(x.logp_BT.dtype))
    metrics |= _rho_stats(torch.exp(_log_rho(x)), x.mask_BT)
    metrics["is/seq_log_rho_mean"] = _seq_mean(seq_log_rho_B, x.mask_BT)
    metrics["is/token_masked_frac"] = _token_mean((~keep_BT).to(x.logp_BT.dtype), x.mask_BT)
    metrics["is/seq_masked_frac"] = _seq_frac(~keep_B, x.mask_BT)
    return _output(policy, policy, metrics)


@register_policy_loss("offpolicy_seq_mask")
def offpolicy_seq_mask_loss(inputs: LossInputs, settings: LossSettings) -> LossOutput:
    """DeepSeek-V3.2 off-policy sequence mask (OPSM): ``agg(l_t * M_t)`` with
    ``M_t = 0`` if ``A_t < 0`` and ``mean_t (engine_logp - logp.detach()) > opsm_delta`` else 1.

    With the sequence advantage broadcast over its tokens this drops whole negative-advantage
    sequences that the current policy has drifted far from. Source: DeepSeek-V3.2 technical report
    (2025), "Off-Policy Sequence Masking"; the KL term uses mu = the engine, pi_theta detached.
    """
    x = _prepare(inputs, settings)
    tokens_B = x.mask_BT.sum(dim=-1).clamp(min=1).to(x.logp_BT.dtype)
    kl_B = (x.engine_logp_BT - x.logp_BT.detach()).sum(dim=-1) / tokens_B
    drop_BT = (x.advantages_BT < 0) & (kl_B > settings.opsm_delta)[:, None]
    policy, metrics = _weighted_surrogate(x, settings, (~drop_BT).to(x.logp_BT.dtype))
    metrics |= _rho_stats(torch.exp(_log_rho(x)), x.mask_BT)
    metrics["is/opsm_kl_mean"] = _seq_mean(kl_B, x.mask_BT)
    metrics["is/token_masked_frac"] = _token_mean(drop_BT.to(x.logp_BT.dtype), x.mask_BT)
    metrics["is/seq_masked_frac"] = _seq_frac((drop_BT & x.mask_BT).any(dim=-1), x.mask_BT)
    return _output(policy, policy, metrics)


# ---------------------------------------------------------------------------------------------
# DCMDP (arXiv 2606.08779): the Lagrangian L = J_GRPO - lam * (D - c); the constant lam * c drops out.


def _dcmdp_metrics(prob_gap: Tensor, penalty: Tensor, lam: float) -> dict[str, Tensor]:
    return {
        "dcmdp/prob_gap": prob_gap.detach(),
        "dcmdp/penalty": penalty.detach(),
        "dcmdp/lambda": torch.tensor(lam, dtype=prob_gap.dtype, device=prob_gap.device),
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
    x = _prepare(inputs, settings)
    policy, metrics = _weighted_surrogate(x, settings, torch.ones_like(x.logp_BT))
    gap = _token_mean(token_prob_gap(x.logp_BT, x.engine_logp_BT), x.mask_BT)
    penalty = settings.lam * gap
    total = policy + penalty
    return _output(total, policy, metrics | _dcmdp_metrics(gap, penalty, settings.lam), penalty)


@register_policy_loss("dcmdp_shaping", uses_multiplier=True)
def dcmdp_shaping_loss(inputs: LossInputs, settings: LossSettings) -> LossOutput:
    """DCMDP reading (b), advantage shaping: ``A'_t = A_t - lam * delta_t.detach()``, then
    ``agg(-min(r A', clip(r) A'))``.

    No gradient flows through delta; the discrepancy reaches theta only through the shaped
    advantage. ``dcmdp/penalty`` reports ``lam * token-mean(delta)``, the mean advantage removed.
    Source: DCMDP, arXiv 2606.08779 (the shaping reading seen in a third-party port).
    """
    x = _prepare(inputs, settings)
    delta_BT = token_prob_gap(x.logp_BT.detach(), x.engine_logp_BT)
    shaped = LossInputs(
        logp_BT=x.logp_BT,
        old_logp_BT=x.old_logp_BT,
        engine_logp_BT=x.engine_logp_BT,
        advantages_BT=x.advantages_BT - settings.lam * delta_BT,
        mask_BT=x.mask_BT,
    )
    policy, metrics = _weighted_surrogate(shaped, settings, torch.ones_like(x.logp_BT))
    gap = _token_mean(delta_BT, x.mask_BT)
    return _output(policy, policy, metrics | _dcmdp_metrics(gap, settings.lam * gap, settings.lam))


@register_policy_loss("dcmdp_hinge", uses_multiplier=True)
def dcmdp_hinge_loss(inputs: LossInputs, settings: LossSettings) -> LossOutput:
    """DCMDP hinge variant: ``agg(l_t) + lam * token-mean(max(0, delta_t - tolerance))``.

    Only tokens whose gap exceeds the tolerance c are pulled back; the token mean ignores
    ``settings.agg`` as in :func:`dcmdp_loss`. ``tolerance`` must be > 0. Source: DCMDP,
    arXiv 2606.08779 (the hinge is this project's third option, not from the paper).
    """
    x = _prepare(inputs, settings, need_tolerance=True)
    policy, metrics = _weighted_surrogate(x, settings, torch.ones_like(x.logp_BT))
    delta_BT = token_prob_gap(x.logp_BT, x.engine_logp_BT)
    excess = _token_mean(torch.relu(delta_BT - settings.tolerance), x.mask_BT)
    penalty = settings.lam * excess
    total = policy + penalty
    metrics |= _dcmdp_metrics(_token_mean(delta_BT, x.mask_BT), penalty, settings.lam)
    metrics["dcmdp/over_tol_frac"] = _token_mean(
        (delta_BT.detach() > settings.tolerance).to(delta_BT.dtype), x.mask_BT
    )
    return _output(total, policy, metrics, penalty)


# ---------------------------------------------------------------------------------------------
# KL to a reference policy (a regulariser added beside any policy loss)

# Bounds of the k3 estimator: the log ratio before exp(), and each token's k3 value. With top-k /
# top-p the reference can give probability 0 to a token the policy keeps (log ratio -inf, k3
# +inf); verl's "low_var_kl" clamps the same way (log ratio to +-20, k3 to 10).
KL_LOG_RATIO_BOUND = 20.0
KL_K3_MAX = 10.0


def kl_to_reference_k3(logp_BT: Tensor, ref_logp_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Token mean over the mask of the k3 estimator of KL(pi || ref), differentiable in ``logp_BT``.

    ``k3 = exp(log_r) - 1 - log_r`` with ``log_r = ref_logp - logp`` (Schulman's low-variance,
    always >= 0 estimator). Masked positions are replaced before any arithmetic: at prompt and
    padding positions both log-probs can be -inf under top-k / top-p, and ``-inf - -inf`` would
    put NaN into the gradient even behind a ``torch.where``. ``log_r`` is clamped to
    +-KL_LOG_RATIO_BOUND and k3 to KL_K3_MAX (a clamped token passes no gradient).
    """
    keep = mask_BT != 0
    zeros = torch.zeros_like(logp_BT)
    logp = torch.where(keep, logp_BT, zeros)
    ref = torch.where(keep, ref_logp_BT.detach(), zeros)
    finite = torch.isfinite(logp) & torch.isfinite(ref)
    # A probability 0 on one side only is the bound in that direction; on both sides, no term.
    edge = torch.where(torch.isneginf(ref), -KL_LOG_RATIO_BOUND, KL_LOG_RATIO_BOUND)
    edge = torch.where(torch.isneginf(ref) & torch.isneginf(logp), zeros, edge)
    log_r = torch.where(finite, ref - logp, edge).clamp(-KL_LOG_RATIO_BOUND, KL_LOG_RATIO_BOUND)
    k3 = (torch.exp(log_r) - 1 - log_r).clamp(max=KL_K3_MAX)
    k3 = torch.where(keep, k3, zeros)
    return k3.sum() / keep.sum().clamp(min=1)
