"""Train-inference discrepancy: the paper's D and the diagnostics users compare it against.

Notation. ``logp`` = log pi_theta(o_t) as the trainer computes it; ``engine_logp`` = log mu(o_t) as
the rollout engine returned it; the tokens o_t were *sampled from mu*. Per response token

    logr = logp - engine_logp = log(pi / mu)        (trainer over engine)
    r    = exp(clamp(logr, -20, 20))                (importance weight pi / mu; the clamp is verl's
                                                     SAFETY_BOUND, it keeps one broken token from
                                                     turning a whole metric into inf)
    delta = |exp(logp) - exp(engine_logp)|          (the paper's per-token discrepancy)

"mean" below is the mask-weighted mean over all response tokens of the batch; "seq-mean" is the
plain mean over sequences that have at least one response token (empty ones are skipped and
counted in ``num_empty_seqs``). All values come back as detached float64 scalar tensors.

| name (prefix ``discrepancy/``) | formula | direction |
|---|---|---|
| ``prob_gap_mean`` | mean delta: the paper's D (DCMDP, arXiv 2606.08779) | lower = closer |
| ``prob_gap_max`` | max delta | lower = closer |
| ``abs_log_ratio_mean`` | mean abs(logr) | lower = closer |
| ``log_ratio_mean`` | mean logr | 0 = unbiased; sign says who is more confident |
| ``kl_engine_trainer_k1`` | mean(-logr); KL(mu‖pi), unbiased, can be < 0 | lower = closer |
| ``kl_engine_trainer_k2`` | mean(0.5 logr²); KL(mu‖pi) to 2nd order, >= 0 | lower = closer |
| ``kl_engine_trainer_k3`` | mean(r - 1 - logr); KL(mu‖pi), unbiased, >= 0 | lower = closer |
| ``kl_trainer_engine_k1`` | mean(r·logr); KL(pi‖mu) by importance weighting | lower = closer |
| ``kl_trainer_engine_k2`` | mean(r·0.5 logr²); KL(pi‖mu) to 2nd order, >= 0 | lower = closer |
| ``kl_trainer_engine_k3`` | mean(1 - r + r·logr); KL(pi‖mu), unbiased, >= 0 | lower = closer |
| ``chi2_token`` | mean(r²) - 1; chi²(pi‖mu) per token (verl's ``chi2_token``) | lower = closer |
| ``chi2_seq`` | seq-mean(exp(2·clamp(Σ_t logr, ±20))) - 1 (verl's ``chi2_seq``) | lower = closer |
| ``ppl_trainer`` | exp(-mean logp) | (level; not a discrepancy) |
| ``ppl_engine`` | exp(-mean engine_logp) | (level; not a discrepancy) |
| ``ppl_ratio`` | ppl_trainer / ppl_engine = exp(-log_ratio_mean) | 1 = agree |
| ``seq_log_ratio_mean`` | seq-mean(Σ_t logr) = log of the sequence IS weight | 0 = agree |
| ``seq_log_ratio_abs_mean`` | seq-mean(abs(Σ_t logr)) | lower = closer |
| ``seq_geo_ratio_mean`` | seq-mean(exp(clamp(mean_t logr, ±20))), Geo-RS's ratio | 1 = agree |
| ``prob_pearson`` | Pearson corr. of exp(logp) and exp(engine_logp) over tokens | 1 = agree |
| ``frac_gap_above`` | fraction of tokens with delta > gap_threshold | lower = closer |
| ``num_tokens`` | number of response tokens | (count) |
| ``num_seqs`` | number of sequences with >= 1 response token | (count) |
| ``num_empty_seqs`` | number of sequences with no response token | (count) |

Differences from verl worth knowing when comparing dashboards: verl's ``rollout_corr/kl`` is our
``kl_engine_trainer_k1``; verl's ``training_ppl`` averages per-sequence perplexities, ours is the
token-level perplexity of the whole batch, exp(-mean logp), so long sequences weigh more.

Masked positions may hold anything, NaN and inf included: every reduction selects with
``torch.where`` (a multiply by a 0 mask would turn NaN * 0 into NaN).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dcmdp.algo.masked import as_bool, check_same_shape, masked_mean

#: verl's SAFETY_BOUND: log-ratios are clamped to [-20, 20] before exponentiating.
SAFETY_BOUND = 20.0
#: Largest log-prob accepted as "<= 0" (numerical noise from log_softmax can land slightly above 0).
LOGPROB_POSITIVE_TOLERANCE = 1e-4
#: The paper's tolerance c for the 8B dense model; the default threshold of ``frac_gap_above``.
PAPER_GAP_THRESHOLD = 0.0037

PREFIX = "discrepancy/"
#: Every key ``discrepancy_metrics`` returns, in order. Names are stable: dashboards key on them.
METRIC_NAMES: tuple[str, ...] = tuple(
    PREFIX + name
    for name in (
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
        "ppl_trainer",
        "ppl_engine",
        "ppl_ratio",
        "seq_log_ratio_mean",
        "seq_log_ratio_abs_mean",
        "seq_geo_ratio_mean",
        "prob_pearson",
        "frac_gap_above",
        "num_tokens",
        "num_seqs",
        "num_empty_seqs",
    )
)


# ----------------------------------------------------------------------------- building blocks


def prob_gap(logp: Tensor, engine_logp: Tensor) -> Tensor:
    """Per-token probability gap delta = abs(exp(logp) - exp(engine_logp)) (DCMDP's delta_it,
    arXiv 2606.08779); the one definition, which the DCMDP losses use too.

    Differentiable in ``logp`` (the trainer side); ``engine_logp`` is a constant. Any shape.
    If masked positions may hold NaN/inf, pass them through :func:`fill_masked` first: a later
    ``torch.where`` hides their values but not their NaN gradients.
    """
    check_same_shape("logp", logp, "engine_logp", engine_logp)
    return (torch.exp(logp) - torch.exp(engine_logp)).abs()


def fill_masked(values: Tensor, mask: Tensor, fill: float = 0.0) -> Tensor:
    """``values`` where ``mask`` is set, ``fill`` elsewhere (so garbage at padding cannot leak)."""
    check_same_shape("values", values, "mask", mask)
    return torch.where(as_bool(mask), values, torch.full_like(values, fill))


def token_count(mask: Tensor) -> Tensor:
    """Number of set positions of ``mask`` (bool or 0/1), as an int64 scalar tensor."""
    return as_bool(mask).sum()


def mean_prob_gap(logp: Tensor, engine_logp: Tensor, mask: Tensor) -> Tensor:
    """D = masked mean of :func:`prob_gap`, differentiable in ``logp``, safe against NaN padding.

    This is the quantity the DCMDP constraint D <= c is on (arXiv 2606.08779).
    """
    check_same_shape("logp", logp, "mask", mask)
    logp_safe = fill_masked(logp, mask)
    engine_safe = fill_masked(engine_logp, mask)
    return masked_mean(prob_gap(logp_safe, engine_safe), mask)


# ----------------------------------------------------------------------------- validation


def check_mask(mask: Tensor) -> None:
    """Raise ValueError unless ``mask`` is bool, or numeric holding only 0 and 1, and not empty."""
    if mask.dtype != torch.bool:
        bad = int(((mask != 0) & (mask != 1)).sum())  # NaN counts as bad: NaN != 0 and NaN != 1
        if bad:
            raise ValueError(f"mask must be bool or hold only 0/1; {bad} entries hold other values")
    if not bool(as_bool(mask).any()):
        raise ValueError(f"mask (shape {tuple(mask.shape)}) is empty: no response tokens to measure")


def check_logprobs(name: str, tensor: Tensor, mask: Tensor) -> None:
    """Raise ValueError if ``tensor`` is not a valid log-prob at any set position of ``mask``.

    Invalid: NaN, +inf, -inf (an engine that reports -inf for a token it sampled claims to have
    sampled an impossible token: usually raw instead of processed log-probs, or a top-k/top-p
    mismatch), or a value above ``LOGPROB_POSITIVE_TOLERANCE`` (logits or probabilities passed by
    mistake). Masked positions are not inspected. Costs one host sync.
    """
    check_same_shape(name, tensor, "mask", mask)
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    m = as_bool(mask)
    x = tensor.detach()
    counts = torch.stack(
        [
            (torch.isnan(x) & m).sum(),
            (torch.isposinf(x) & m).sum(),
            (torch.isneginf(x) & m).sum(),
            ((x > LOGPROB_POSITIVE_TOLERANCE) & torch.isfinite(x) & m).sum(),
        ]
    ).tolist()
    n_nan, n_posinf, n_neginf, n_pos = counts
    if n_nan:
        raise ValueError(f"{name} has {n_nan} NaN value(s) at response (unmasked) positions")
    if n_posinf:
        raise ValueError(f"{name} has {n_posinf} +inf value(s) at response (unmasked) positions")
    if n_neginf:
        raise ValueError(
            f"{name} has {n_neginf} -inf value(s) at response (unmasked) positions: that side gives "
            "probability 0 to a token the engine sampled. With top-k / top-p and an engine at another "
            "precision this is expected (the kept sets differ near the cut-off): take such sequences "
            "out of the mask first, as dcmdp.rollout.drop_trainer_impossible does. Otherwise the "
            "log-probs are raw where processed ones were needed, or the truncation settings differ."
        )
    if n_pos:
        biggest = float(torch.where(m, x, torch.full_like(x, -math.inf)).max())
        raise ValueError(
            f"{name} has {n_pos} positive value(s) above {LOGPROB_POSITIVE_TOLERANCE} (max {biggest:.4g}) "
            "at response positions; log-probs must be <= 0 (logits or probabilities passed?)"
        )


# ----------------------------------------------------------------------------- the metrics


def discrepancy_metrics(
    logp_BT: Tensor,
    engine_logp_BT: Tensor,
    mask_BT: Tensor,
    gap_threshold: float = PAPER_GAP_THRESHOLD,
) -> dict[str, Tensor]:
    """All discrepancy diagnostics of one batch (see the module docstring for every formula).

    Args:
        logp_BT: trainer log-probs log pi(o_t) of the sampled tokens, (B, T).
        engine_logp_BT: engine log-probs log mu(o_t) of the same tokens, (B, T); the samples
            came from mu, so KL(mu‖pi) is a plain mean and KL(pi‖mu) is importance-weighted.
        mask_BT: response mask, bool or 0/1, (B, T); masked positions may hold anything.
        gap_threshold: threshold of ``frac_gap_above`` (default: the paper's c = 0.0037).

    KL estimators (Schulman's k1/k2/k3). Samples o ~ mu, logr = log(pi/mu), r = pi/mu.
      KL(mu‖pi) = E_mu[log(mu/pi)]: k1 = -logr; k2 = 0.5 (log(pi/mu))² = 0.5 logr²;
        k3 = (pi/mu) - 1 - log(pi/mu) = r - 1 - logr, unbiased since E_mu[r - 1] = 0 and >= 0
        pointwise because e^x >= 1 + x.
      KL(pi‖mu) = E_pi[f] = E_mu[r f] for any f (importance weighting), with the k-estimators of
        KL(pi‖mu) under samples from pi, whose log-ratio is log(mu/pi) = -logr:
        k1: f = log(pi/mu) = logr               -> r·logr
        k2: f = 0.5 (log(mu/pi))² = 0.5 logr²  -> r·0.5 logr²
        k3: f = mu/pi - 1 - log(mu/pi) = 1/r - 1 + logr -> r·f = 1 - r + r·logr (>= 0 pointwise).
    ``r`` is clamped through clamp(logr, ±20) as verl does; within that range all are exact.

    Returns detached float64 scalar tensors keyed by ``METRIC_NAMES``. Computed in float64: the
    gaps are ~4e-3 and sums run over millions of tokens, and the cost is small next to a forward.

    Raises:
        ValueError: tensors not 2-D or of different shapes, an empty mask, a non-0/1 mask, or
            NaN / ±inf / positive values in either log-prob tensor at response positions.
    """
    check_same_shape("logp_BT", logp_BT, "engine_logp_BT", engine_logp_BT)
    check_same_shape("logp_BT", logp_BT, "mask_BT", mask_BT)
    if logp_BT.dim() != 2:
        raise ValueError(f"expected (B, T) tensors, got shape {tuple(logp_BT.shape)}")
    if not math.isfinite(gap_threshold) or gap_threshold < 0:
        raise ValueError(f"gap_threshold must be finite and >= 0, got {gap_threshold}")
    check_mask(mask_BT)
    check_logprobs("logp_BT", logp_BT, mask_BT)
    check_logprobs("engine_logp_BT", engine_logp_BT, mask_BT)

    m = as_bool(mask_BT)
    zero = torch.zeros((), dtype=torch.float64, device=logp_BT.device)
    # Masked positions become 0 here, so no NaN/inf from padding can reach any term below.
    logp = torch.where(m, logp_BT.detach().double(), zero)
    elogp = torch.where(m, engine_logp_BT.detach().double(), zero)

    n_tok = m.sum().double()

    def mean(v: Tensor) -> Tensor:
        return torch.where(m, v, zero).sum() / n_tok

    p, q = torch.exp(logp), torch.exp(elogp)
    delta = prob_gap(logp, elogp)
    logr = logp - elogp
    logr_safe = logr.clamp(-SAFETY_BOUND, SAFETY_BOUND)
    r = torch.exp(logr_safe)
    r_minus_1 = torch.expm1(logr_safe)  # exact near r = 1, where all the mass of a good run sits

    # sequence level, over sequences that have at least one response token
    len_B = m.sum(dim=-1)
    has_tokens_B = len_B > 0
    n_seq = has_tokens_B.sum().double()
    seq_logr_B = torch.where(m, logr, zero).sum(dim=-1)
    seq_mean_logr_B = seq_logr_B / len_B.clamp(min=1).double()

    def seq_mean(v_B: Tensor) -> Tensor:
        return torch.where(has_tokens_B, v_B, zero).sum() / n_seq

    log_ratio_mean = mean(logr)
    values = {
        "prob_gap_mean": mean(delta),
        "prob_gap_max": torch.where(m, delta, zero).max(),
        "abs_log_ratio_mean": mean(logr.abs()),
        "log_ratio_mean": log_ratio_mean,
        "kl_engine_trainer_k1": mean(-logr),
        "kl_engine_trainer_k2": mean(0.5 * logr**2),
        "kl_engine_trainer_k3": mean(r_minus_1 - logr),
        "kl_trainer_engine_k1": mean(r * logr),
        "kl_trainer_engine_k2": mean(r * 0.5 * logr**2),
        "kl_trainer_engine_k3": mean(r * logr - r_minus_1),
        "chi2_token": mean(r**2) - 1.0,
        "chi2_seq": seq_mean(torch.exp(2.0 * seq_logr_B.clamp(-SAFETY_BOUND, SAFETY_BOUND))) - 1.0,
        "ppl_trainer": torch.exp(-mean(logp)),
        "ppl_engine": torch.exp(-mean(elogp)),
        "ppl_ratio": torch.exp(-log_ratio_mean),
        "seq_log_ratio_mean": seq_mean(seq_logr_B),
        "seq_log_ratio_abs_mean": seq_mean(seq_logr_B.abs()),
        "seq_geo_ratio_mean": seq_mean(torch.exp(seq_mean_logr_B.clamp(-SAFETY_BOUND, SAFETY_BOUND))),
        "prob_pearson": _masked_pearson(p, q, m),
        "frac_gap_above": mean((delta > gap_threshold).double()),
        "num_tokens": n_tok,
        "num_seqs": n_seq,
        "num_empty_seqs": (~has_tokens_B).sum().double(),
    }
    return {PREFIX + k: v.detach() for k, v in values.items()}


# ----------------------------------------------------------------------------- helpers


def _masked_pearson(x: Tensor, y: Tensor, m: Tensor) -> Tensor:
    """Pearson correlation of x and y over the set positions of m (m has >= 1 set position).

    Defined where the textbook formula is 0/0: if either side is constant over the tokens, the
    result is 1.0 when the two sides are equal at every token (perfect agreement, e.g. a single
    token, or identical engines on a batch of certain tokens) and 0.0 otherwise. Clamped to [-1, 1]
    against rounding.
    """
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    n = m.sum().to(x.dtype)
    mx = torch.where(m, x, zero).sum() / n
    my = torch.where(m, y, zero).sum() / n
    dx = torch.where(m, x - mx, zero)
    dy = torch.where(m, y - my, zero)
    cov = (dx * dy).sum()
    var_x, var_y = (dx * dx).sum(), (dy * dy).sum()
    # Constancy is tested on the values themselves: the centred sums of a constant column are
    # rounding noise (the float mean of equal numbers need not equal them), not exactly zero.
    inf = torch.full_like(x, math.inf)
    x_const = torch.where(m, x, -inf).max() == torch.where(m, x, inf).min()
    y_const = torch.where(m, y, -inf).max() == torch.where(m, y, inf).min()
    degenerate = x_const | y_const
    identical = torch.where(m, x == y, torch.ones_like(m)).all()
    fallback = torch.where(identical, torch.ones_like(cov), torch.zeros_like(cov))
    denom = torch.sqrt(var_x * var_y)
    safe_denom = torch.where(degenerate | (denom == 0), torch.ones_like(denom), denom)
    corr = (cov / safe_denom).clamp(-1.0, 1.0)
    return torch.where(degenerate | (denom == 0), fallback, corr)
