"""Moved to :mod:`dcmdp.algo.advantages`; this module keeps ``dcmdp.advantages`` imports working (see README, Layout)."""

from dcmdp.algo.advantages import (
    degenerate_group_fraction,
    grpo_advantages,
)

__all__ = [
    "degenerate_group_fraction",
    "grpo_advantages",
]
