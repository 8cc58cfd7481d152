"""Importance corrections: the first axis of a policy loss.

A correction turns the train-inference ratio ``rho_t = pi_old(o_t) / mu(o_t)`` (trainer at the start
of the step over the rollout engine) into a constant per-token weight ``w_t`` that multiplies the
PPO token loss: ``agg(l_t * w_t)``. Each one is a pure function
``(LossInputs, LossSettings) -> (weight_BT, metrics)`` registered in :data:`CORRECTIONS`; the
second axis, the discrepancy constraint, is in :mod:`dcmdp.algo.constraints`, and
:mod:`dcmdp.algo.losses` composes the two.

| name     | weight ``w_t``                                                  | source                   |
|----------|-----------------------------------------------------------------|--------------------------|
| none     | 1                                                               | PPO / GRPO               |
| tis      | min(rho_t, tis_cap)                                             | TIS, Yao et al. 2025     |
| icepop   | 1[icepop_low <= rho_t <= icepop_high]                           | IcePop, Ling team 2025   |
| seq_tis  | min(prod_t rho_t, seq_cap), one weight per sequence             | verl rollout correction  |
| seq_mis  | 1[prod_t rho_t <= seq_cap]                                      | MIS, verl / Li et al.    |
| geo_mask | 1[geo_low <= (prod_t rho_t)^(1/T) <= geo_high]                  | Geo-RS, verl / Li et al. |
| opsm     | 1 - 1[A_t < 0] 1[mean_t(log mu - log pi_theta) > opsm_delta]    | DeepSeek-V3.2 OPSM       |

Inputs have been through :func:`dcmdp.algo.loss_core.prepare` (masked positions hold zeros).
``prod_t rho_t`` is ``exp(clamp(sum_t log rho_t, -20, 20))`` as verl computes it. OPSM reads the
advantages the correction is given: the caller passes the unshaped ones, so a shaping constraint
never decides which sequences OPSM drops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dcmdp.algo.loss_core import LossInputs, LossSettings, log_rho, rho_stats, seq_frac, seq_log_rho, seq_mean
from dcmdp.algo.masked import masked_mean

# verl's bound on the summed log ratio of a sequence before exp(); e^20 ~ 4.9e8 is far above any cap.
SEQ_LOG_RHO_BOUND = 20.0

CorrectionFn = Callable[[LossInputs, LossSettings], tuple[Tensor, dict[str, Tensor]]]
CORRECTIONS: dict[str, CorrectionFn] = {}


def register_correction(name: str) -> Callable[[CorrectionFn], CorrectionFn]:
    """Decorator adding a correction to :data:`CORRECTIONS`; a taken name raises ``ValueError``."""

    def register(fn: CorrectionFn) -> CorrectionFn:
        if name in CORRECTIONS:
            raise ValueError(f"importance correction {name!r} is already registered")
        CORRECTIONS[name] = fn
        return fn

    return register


def _seq_rho(x: LossInputs) -> tuple[Tensor, Tensor]:
    seq_log_rho_B = seq_log_rho(x)
    return seq_log_rho_B, torch.exp(seq_log_rho_B.clamp(-SEQ_LOG_RHO_BOUND, SEQ_LOG_RHO_BOUND))


@register_correction("none")
def no_correction(x: LossInputs, s: LossSettings) -> tuple[Tensor, dict[str, Tensor]]:
    """Weight 1: the samples are used as if the trainer had drawn them."""
    return torch.ones_like(x.logp_BT), {}


@register_correction("tis")
def tis_weight(x: LossInputs, s: LossSettings) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-level truncated importance sampling, ``min(rho_t, tis_cap)``."""
    rho_BT = torch.exp(log_rho(x))
    weight_BT = rho_BT.clamp(max=s.tis_cap)
    metrics = rho_stats(rho_BT, x.mask_BT)
    metrics["is/weight_mean"] = masked_mean(weight_BT, x.mask_BT)
    metrics["is/token_truncated_frac"] = masked_mean((rho_BT > s.tis_cap).to(rho_BT.dtype), x.mask_BT)
    return weight_BT, metrics


@register_correction("icepop")
def icepop_weight(x: LossInputs, s: LossSettings) -> tuple[Tensor, dict[str, Tensor]]:
    """Token mask, keep ``icepop_low <= rho_t <= icepop_high`` (defaults 0.5 and 5, the report's)."""
    rho_BT = torch.exp(log_rho(x))
    keep_BT = (rho_BT >= s.icepop_low) & (rho_BT <= s.icepop_high)
    metrics = rho_stats(rho_BT, x.mask_BT)
    metrics["is/token_masked_frac"] = masked_mean((~keep_BT).to(rho_BT.dtype), x.mask_BT)
    return keep_BT.to(rho_BT.dtype), metrics


@register_correction("seq_tis")
def seq_tis_weight(x: LossInputs, s: LossSettings) -> tuple[Tensor, dict[str, Tensor]]:
    """Sequence truncated IS, one weight ``min(prod_t rho_t, seq_cap)`` per sequence."""
    seq_log_rho_B, seq_rho_B = _seq_rho(x)
    weight_BT = seq_rho_B.clamp(max=s.seq_cap)[:, None].expand_as(x.logp_BT)
    metrics = rho_stats(torch.exp(log_rho(x)), x.mask_BT)
    metrics["is/weight_mean"] = masked_mean(weight_BT, x.mask_BT)
    metrics["is/seq_log_rho_mean"] = seq_mean(seq_log_rho_B, x.mask_BT)
    metrics["is/seq_truncated_frac"] = seq_frac(seq_rho_B > s.seq_cap, x.mask_BT)
    return weight_BT, metrics


@register_correction("seq_mis")
def seq_mis_weight(x: LossInputs, s: LossSettings) -> tuple[Tensor, dict[str, Tensor]]:
    """Sequence rejection (MIS): drop sequences with ``prod_t rho_t > seq_cap``."""
    seq_log_rho_B, seq_rho_B = _seq_rho(x)
    reject_B = seq_rho_B > s.seq_cap
    keep_BT = (~reject_B)[:, None].expand_as(x.mask_BT)
    metrics = rho_stats(torch.exp(log_rho(x)), x.mask_BT)
    metrics["is/seq_log_rho_mean"] = seq_mean(seq_log_rho_B, x.mask_BT)
    metrics["is/token_masked_frac"] = masked_mean((~keep_BT).to(x.logp_BT.dtype), x.mask_BT)
    metrics["is/seq_masked_frac"] = seq_frac(reject_B, x.mask_BT)
    return keep_BT.to(x.logp_BT.dtype), metrics


@register_correction("geo_mask")
def geo_mask_weight(x: LossInputs, s: LossSettings) -> tuple[Tensor, dict[str, Tensor]]:
    """Geometric-mean sequence mask (Geo-RS): keep ``geo_low <= exp(mean_t log rho_t) <= geo_high``,
    the mean over the sequence's response tokens. Long sequences need a band that suits their
    length: the geometric mean averages the per-token noise, so its spread shrinks like 1/sqrt(T)."""
    seq_log_rho_B = seq_log_rho(x)
    tokens_B = x.mask_BT.sum(dim=-1).clamp(min=1).to(seq_log_rho_B.dtype)
    geo_B = torch.exp(seq_log_rho_B / tokens_B)
    keep_B = (geo_B >= s.geo_low) & (geo_B <= s.geo_high)
    keep_BT = keep_B[:, None].expand_as(x.mask_BT)
    metrics = rho_stats(torch.exp(log_rho(x)), x.mask_BT)
    metrics["is/seq_log_rho_mean"] = seq_mean(seq_log_rho_B, x.mask_BT)
    metrics["is/token_masked_frac"] = masked_mean((~keep_BT).to(x.logp_BT.dtype), x.mask_BT)
    metrics["is/seq_masked_frac"] = seq_frac(~keep_B, x.mask_BT)
    return keep_BT.to(x.logp_BT.dtype), metrics


@register_correction("opsm")
def opsm_weight(x: LossInputs, s: LossSettings) -> tuple[Tensor, dict[str, Tensor]]:
    """DeepSeek-V3.2 off-policy sequence mask: weight 0 on the negative-advantage tokens of sequences
    with ``mean_t (engine_logp - logp.detach()) > opsm_delta`` (mu = the engine, pi_theta detached)."""
    tokens_B = x.mask_BT.sum(dim=-1).clamp(min=1).to(x.logp_BT.dtype)
    kl_B = (x.engine_logp_BT - x.logp_BT.detach()).sum(dim=-1) / tokens_B
    drop_BT = (x.advantages_BT < 0) & (kl_B > s.opsm_delta)[:, None]
    metrics = rho_stats(torch.exp(log_rho(x)), x.mask_BT)
    metrics["is/opsm_kl_mean"] = seq_mean(kl_B, x.mask_BT)
    metrics["is/token_masked_frac"] = masked_mean(drop_BT.to(x.logp_BT.dtype), x.mask_BT)
    metrics["is/seq_masked_frac"] = seq_frac((drop_BT & x.mask_BT).any(dim=-1), x.mask_BT)
    return (~drop_BT).to(x.logp_BT.dtype), metrics


def get_correction(name: str) -> CorrectionFn:
    """The correction registered as ``name``; an unknown name raises ``ValueError`` listing the valid ones."""
    if name not in CORRECTIONS:
        raise ValueError(f"unknown importance correction {name!r}; valid: {', '.join(CORRECTIONS)}")
    return CORRECTIONS[name]
