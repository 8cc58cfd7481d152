"""Moved to :mod:`dcmdp.algo.aggregation`; this module keeps ``dcmdp.aggregation`` imports working (see README, Layout)."""

from dcmdp.algo.aggregation import (
    AGG_MODES,
    aggregate,
    masked_mean,
)

__all__ = [
    "AGG_MODES",
    "aggregate",
    "masked_mean",
]
