"""Moved to :mod:`dcmdp.algo.losses`; this module keeps ``dcmdp.losses`` imports working (see README, Layout)."""

from dcmdp.algo.losses import *  # noqa: F403
from dcmdp.algo.losses import __all__  # noqa: F401
