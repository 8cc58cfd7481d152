"""Rollout engines behind one small protocol (see base.py)."""

from dcmdp.engines.base import (
    Completion,
    EngineSpec,
    GenerateResult,
    RolloutEngine,
    SamplingSettings,
    UnsupportedQuantizationError,
    make_engine,
    validate_completions,
)

__all__ = [
    "Completion",
    "EngineSpec",
    "GenerateResult",
    "RolloutEngine",
    "SamplingSettings",
    "UnsupportedQuantizationError",
    "make_engine",
    "validate_completions",
]
