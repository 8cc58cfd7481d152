"""Moved to :mod:`dcmdp.algo.multiplier`; this module keeps ``dcmdp.multiplier`` imports working (see README, Layout)."""

from dcmdp.algo.multiplier import (
    MULTIPLIER_KINDS,
    MULTIPLIERS,
    PAPER_ETA,
    PAPER_LAMBDA_0,
    PAPER_TOLERANCE,
    AutoTolerance,
    LagrangeMultiplier,
    Multiplier,
    MultiplierSettings,
    PIDMultiplier,
    build_multiplier,
    make_multiplier,
)

__all__ = [
    "MULTIPLIERS",
    "MULTIPLIER_KINDS",
    "PAPER_ETA",
    "PAPER_LAMBDA_0",
    "PAPER_TOLERANCE",
    "AutoTolerance",
    "LagrangeMultiplier",
    "Multiplier",
    "MultiplierSettings",
    "PIDMultiplier",
    "build_multiplier",
    "make_multiplier",
]
