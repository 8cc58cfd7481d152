"""Moved to :mod:`dcmdp.algo.discrepancy`; this module keeps ``dcmdp.discrepancy`` imports working (see README, Layout)."""

from dcmdp.algo.discrepancy import (
    LOGPROB_POSITIVE_TOLERANCE,
    METRIC_NAMES,
    PAPER_GAP_THRESHOLD,
    PREFIX,
    SAFETY_BOUND,
    check_logprobs,
    check_mask,
    discrepancy_metrics,
    fill_masked,
    masked_mean,
    mean_prob_gap,
    prob_gap,
    token_count,
)

__all__ = [
    "LOGPROB_POSITIVE_TOLERANCE",
    "METRIC_NAMES",
    "PAPER_GAP_THRESHOLD",
    "PREFIX",
    "SAFETY_BOUND",
    "check_logprobs",
    "check_mask",
    "discrepancy_metrics",
    "fill_masked",
    "masked_mean",
    "mean_prob_gap",
    "prob_gap",
    "token_count",
]
