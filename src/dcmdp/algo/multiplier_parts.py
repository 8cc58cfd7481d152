"""The parts every Lagrange multiplier is built from (by composition; see :mod:`dcmdp.algo.multiplier`).

:class:`LambdaState` is what each multiplier keeps whatever its update rule: lambda within
[lam_min, lam_max], the tolerance c, the step count and the (optionally EMA-smoothed) measured
D. The checks below turn user numbers into floats or raise ``ValueError`` naming the argument.
State is plain Python floats, so a state dict pickles, JSON-serialises and round-trips exactly.
"""

from __future__ import annotations

import math
from typing import Any


class LambdaState:
    """lambda in [lam_min, lam_max], the tolerance c, the step count and the EMA of D.

    A multiplier holds one and moves ``value`` with its own rule; the state-dict keys below are
    the common part of every multiplier's checkpoint format.
    """

    def __init__(self, init: Any, tolerance: Any, lam_min: Any, lam_max: Any, ema: Any) -> None:
        self.init, self.lam_min, self.lam_max = check_bounds(init, lam_min, lam_max)
        self._tolerance = check_positive("tolerance", tolerance)
        self.ema = check_ema(ema)
        self.value = self.init
        self.steps = 0
        self.ema_value: float | None = None
        self.last_measured: float | None = None

    @property
    def tolerance(self) -> float:
        """The constraint level c (> 0)."""
        return self._tolerance

    @tolerance.setter
    def tolerance(self, c: float) -> None:
        self._tolerance = check_positive("tolerance", c)

    def smoothed(self, measured: float) -> float:
        """Record a measured D and return the value the update uses (raw D or its EMA)."""
        d = check_measured(measured)
        self.last_measured = d
        self.ema_value = ema_step(self.ema, self.ema_value, d)
        return d if self.ema_value is None else self.ema_value

    def project(self, x: float) -> float:
        """``clip(x, lam_min, lam_max)``."""
        return clip(x, self.lam_min, self.lam_max)

    def state_dict(self, kind: str) -> dict[str, Any]:
        """The keys every multiplier's state dict starts with."""
        return {
            "kind": kind,
            "init": self.init,
            "tolerance": self._tolerance,
            "lam_min": self.lam_min,
            "lam_max": self.lam_max,
            "ema": self.ema,
            "value": self.value,
            "steps": self.steps,
            "ema_value": self.ema_value,
            "last_measured": self.last_measured,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Take the running values of ``state`` (checked against this object's bounds)."""
        value = check_value_in_bounds(state["value"], self.lam_min, self.lam_max)
        steps = check_steps(state["steps"])
        ema_value = optional_float("ema_value", state["ema_value"])
        last_measured = optional_float("last_measured", state["last_measured"])
        self.value, self.steps, self.ema_value, self.last_measured = value, steps, ema_value, last_measured

    @classmethod
    def configured_as(cls, state: dict[str, Any]) -> LambdaState:
        """A fresh state with the settings saved in ``state`` (not yet its running values)."""
        return cls(state["init"], state["tolerance"], state["lam_min"], state["lam_max"], state["ema"])


# ----------------------------------------------------------------------------- small maths


def quantile(values: list[float], q: float) -> float:
    """Quantile with linear interpolation between order statistics (numpy's 'linear')."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (pos - lo) * (xs[hi] - xs[lo])


def ema_step(decay: float | None, current: float | None, measured: float) -> float | None:
    if decay is None:
        return None
    if current is None:
        return measured
    return decay * current + (1.0 - decay) * measured


def clip(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


# ----------------------------------------------------------------------------- checks


def check_finite(name: str, x: Any) -> float:
    try:
        value = float(x)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int past a double's range
        raise ValueError(f"{name} must be a number, got {x!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_positive(name: str, x: Any) -> float:
    value = check_finite(name, x)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_non_negative(name: str, x: Any) -> float:
    value = check_finite(name, x)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_bounds(init: Any, lam_min: Any, lam_max: Any) -> tuple[float, float, float]:
    lo = check_non_negative("lam_min", lam_min)
    hi = check_finite("lam_max", lam_max)
    if hi < lo:
        raise ValueError(f"lam_max ({hi}) must be >= lam_min ({lo})")
    start = check_finite("init", init)
    if not lo <= start <= hi:
        raise ValueError(f"init ({start}) must lie within [lam_min, lam_max] = [{lo}, {hi}]")
    return start, lo, hi


def check_value_in_bounds(x: Any, lo: float, hi: float) -> float:
    value = check_finite("value", x)
    if not lo <= value <= hi:
        raise ValueError(f"value ({value}) must lie within [lam_min, lam_max] = [{lo}, {hi}]")
    return value


def check_ema(ema: Any) -> float | None:
    if ema is None:
        return None
    decay = check_finite("ema", ema)
    if not 0.0 < decay < 1.0:
        raise ValueError(f"ema (decay beta) must be in (0, 1), got {decay}")
    return decay


def check_measured(measured: Any) -> float:
    return check_finite("measured", measured)


def check_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    return steps


def optional_float(name: str, x: Any) -> float | None:
    return None if x is None else check_finite(name, x)


def check_kind(expected: str, state: dict[str, Any]) -> None:
    if state.get("kind") != expected:
        raise ValueError(f"state dict is for kind {state.get('kind')!r}, not {expected!r}")


def check_gains(kp: Any, ki: Any, kd: Any) -> tuple[float, float, float]:
    gains = check_non_negative("kp", kp), check_non_negative("ki", ki), check_non_negative("kd", kd)
    if gains == (0.0, 0.0, 0.0):
        raise ValueError("kp, ki and kd are all 0: the multiplier could never move")
    return gains


def check_auto(
    warmup_steps: Any, quantile: Any, multiple: Any, min_tolerance: Any
) -> tuple[int, float, float, float]:
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
        raise ValueError(f"warmup_steps must be an integer >= 1, got {warmup_steps!r}")
    q = check_finite("quantile", quantile)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    return (
        warmup_steps,
        q,
        check_positive("multiple", multiple),
        check_positive("min_tolerance", min_tolerance),
    )
