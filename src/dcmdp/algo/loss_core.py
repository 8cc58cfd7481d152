"""What every policy loss shares: the records, the registry, validation and the pieces a loss
variant is built from.

A loss is a pure function ``(LossInputs, LossSettings) -> LossOutput`` registered by name with
``@register_policy_loss``; the variants themselves, with the formula and source of each, are in
:mod:`dcmdp.algo.losses`. A variant starts with :func:`prepare` (validate, then replace masked
positions so garbage there reaches neither the loss nor the gradient), builds the PPO token loss
with :func:`weighted_surrogate`, and returns :func:`loss_output`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from dcmdp.algo.aggregation import AGG_MODES, aggregate
from dcmdp.algo.masked import masked_mean


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
    constraint_engine_logp_BT: Tensor | None = None
    """What the constraint compares the policy with, when not mu itself (a constant): with stale
    rollouts and ``loss.constraint_gap=engine``, mu carried to the current policy version,
    ``mu + (pi_old - pi_behaviour)``, so the constraint sees the engine gap without the staleness
    gap. The importance corrections always read mu."""

    @property
    def constraint_target_BT(self) -> Tensor:
        """The log-probs the constraint measures the gap to: ``constraint_engine_logp_BT`` or mu."""
        target = self.constraint_engine_logp_BT
        return self.engine_logp_BT if target is None else target


#: The values of ``LossSettings.constraint_samples``.
CONSTRAINT_SAMPLES = ("all", "signal")


@dataclass(frozen=True)
class LossSettings:
    """Plain numbers the losses read; validated when built (see :func:`check_loss_settings`)."""

    clip_low: float = 0.2
    """PPO clip below: r is clipped at 1 - clip_low."""
    clip_high: float = 0.28
    """PPO clip above: r is clipped at 1 + clip_high (DAPO clip-higher when > clip_low)."""
    agg: str = "token-mean"
    """Aggregation mode of the surrogate, one of ``dcmdp.algo.aggregation.AGG_MODES``."""
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
    """Lagrange multiplier value lambda >= 0, a plain number from ``dcmdp.algo.multiplier``."""
    tolerance: float = 0.0037
    """DCMDP tolerance c (the paper's value for Qwen3-8B); the hinge penalises delta above it."""
    shaping_baseline: bool = False
    """shaping and full forms: subtract the batch's token-mean of m from the cost ``m_t`` before it
    shifts the advantages (a baseline for the score-function part; see constraints.py)."""
    constraint_samples: str = "all"
    """Which samples the constraint acts on: ``all`` (the paper) or ``signal``, only those with a
    nonzero advantage (a group whose rewards differ), its penalty still divided by every response
    token so its weight falls with the share of samples that carry a reward signal
    (:func:`dcmdp.algo.constraints.on_signal_samples`)."""

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
    constraint_part: Tensor | None = None
    """The part of ``loss`` the discrepancy constraint adds (its penalty, plus for an advantage
    shift the shifted surrogate minus the plain one), or None without a constraint. The trainer's
    share bound backpropagates it on its own (:func:`dcmdp.algo.constraints.share_scale`)."""
    policy_part: Tensor | None = None
    """``loss`` without the constraint's part (the plain surrogate), as its own graph, or None
    (then ``loss - constraint_part``). The update bound (``loss.constraint_share_of=update``)
    backpropagates it and ``constraint_part`` separately, so neither gradient is a difference of
    two rounded ones."""
    constraint_scales_with_lam: bool = False
    """True when ``constraint_part`` is lambda times something (its gradient exactly 0 at lambda
    0), as for every built-in constraint: the trainer then skips its backward pass at lambda 0. A
    loss that leaves it False always gets the pass."""


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
    if settings.constraint_samples not in CONSTRAINT_SAMPLES:
        raise ValueError(
            f"LossSettings.constraint_samples {settings.constraint_samples!r} is not one of: "
            f"{', '.join(CONSTRAINT_SAMPLES)}"
        )
    if settings.agg not in AGG_MODES:
        raise ValueError(f"LossSettings.agg {settings.agg!r} is not one of: {', '.join(AGG_MODES)}")
    if settings.agg == "constant" and (settings.agg_constant is None or not settings.agg_constant > 0):
        raise ValueError(
            f"LossSettings.agg_constant must be > 0 when agg='constant', got {settings.agg_constant!r}"
        )
    if need_tolerance and not settings.tolerance > 0:
        raise ValueError(
            f"LossSettings.tolerance must be > 0 for dcmdp_hinge (the hinge constraint), got {settings.tolerance!r}"
        )


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
        if tensor is not None and tensor.shape != shape:
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
    if inputs.constraint_engine_logp_BT is not None:
        bad["constraint_engine_logp_BT"] = (
            nan_or_pos_inf(inputs.constraint_engine_logp_BT),
            "NaN or +inf values",
            "the engine log-probs carried to the current policy",
        )
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


def clean(inputs: LossInputs) -> LossInputs:
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
        constraint_engine_logp_BT=(
            None
            if inputs.constraint_engine_logp_BT is None
            else zero_out(inputs.constraint_engine_logp_BT.detach())
        ),
    )


def prepare(inputs: LossInputs, settings: LossSettings, *, need_tolerance: bool = False) -> LossInputs:
    check_loss_settings(settings, need_tolerance=need_tolerance)
    check_loss_inputs(inputs)
    return clean(inputs)


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
    r < 1 - clip_low ("low"). Expects finite values at masked positions (see ``clean``) and a
    non-empty mask; ``mask_BT`` (bool or 0/1) is only used for the metrics.
    """
    ratio_BT = torch.exp(logp_BT - old_logp_BT)
    clipped_BT = ratio_BT.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_BT = -torch.minimum(ratio_BT * adv_BT, clipped_BT * adv_BT)

    r_BT = ratio_BT.detach()
    high_BT = (adv_BT > 0) & (r_BT > 1.0 + clip_high)
    low_BT = (adv_BT < 0) & (r_BT < 1.0 - clip_low)
    metrics = {
        "clip/frac": masked_mean((high_BT | low_BT).to(r_BT.dtype), mask_BT),
        "clip/frac_low": masked_mean(low_BT.to(r_BT.dtype), mask_BT),
        "clip/frac_high": masked_mean(high_BT.to(r_BT.dtype), mask_BT),
        **masked_stats(r_BT, mask_BT, "ratio/mean", "ratio/max", "ratio/min"),
    }
    return loss_BT, metrics


def masked_stats(
    x_BT: Tensor, mask_BT: Tensor, mean: str, max_: str, min_: str | None = None
) -> dict[str, Tensor]:
    """Token mean, max (and min) of ``x_BT`` over the mask, detached, under the given metric names."""
    x_BT = x_BT.detach()
    keep_BT = mask_BT != 0
    stats = {mean: masked_mean(x_BT, keep_BT), max_: torch.where(keep_BT, x_BT, -math.inf).max()}
    if min_ is not None:
        stats[min_] = torch.where(keep_BT, x_BT, math.inf).min()
    return stats


def rho_stats(rho_BT: Tensor, mask_BT: Tensor) -> dict[str, Tensor]:
    return masked_stats(rho_BT, mask_BT, "is/rho_mean", "is/rho_max")


def log_rho(x: LossInputs) -> Tensor:
    """``log rho_t = old_logp - engine_logp`` (zero at masked positions after ``clean``)."""
    return x.old_logp_BT - x.engine_logp_BT


def seq_log_rho(x: LossInputs) -> Tensor:
    """``sum_t log rho_t`` per sequence [B]; masked positions hold zero after ``clean``."""
    return log_rho(x).sum(dim=-1)


def seq_frac(flag_B: Tensor, mask_BT: Tensor) -> Tensor:
    """Fraction of sequences with at least one response token for which ``flag_B`` holds."""
    has_tokens_B = mask_BT.any(dim=-1)
    return (flag_B & has_tokens_B).sum().to(torch.float32) / has_tokens_B.sum().to(torch.float32)


def seq_mean(v_B: Tensor, mask_BT: Tensor) -> Tensor:
    """Mean of ``v_B`` over sequences with at least one response token."""
    has_tokens_B = mask_BT.any(dim=-1)
    return torch.where(has_tokens_B, v_B, 0.0).sum() / has_tokens_B.sum().to(v_B.dtype)


def weighted_surrogate(x: LossInputs, s: LossSettings, weight_BT: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """``agg(l_t * w_t)`` with the PPO token loss ``l_t`` and a constant weight ``w_t``."""
    loss_BT, metrics = ppo_clipped_token_loss(
        x.logp_BT, x.old_logp_BT, x.advantages_BT, x.mask_BT, s.clip_low, s.clip_high
    )
    policy = aggregate(loss_BT * weight_BT.detach(), x.mask_BT, s.agg, s.agg_constant)
    return policy, metrics


def loss_output(
    total: Tensor,
    policy: Tensor,
    metrics: dict[str, Tensor],
    penalty: Tensor | None = None,
    constraint_part: Tensor | None = None,
    policy_part: Tensor | None = None,
    constraint_scales_with_lam: bool = False,
) -> LossOutput:
    metrics = {"loss/total": total.detach(), "loss/policy": policy.detach(), **metrics}
    return LossOutput(
        loss=total,
        metrics={k: v.detach() for k, v in metrics.items()},
        token_mean_part=penalty,
        constraint_part=constraint_part,
        policy_part=policy_part,
        constraint_scales_with_lam=constraint_scales_with_lam,
    )
