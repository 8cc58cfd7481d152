"""The Lagrange multiplier lambda of the discrepancy constraint D <= c, as small stateful objects.

DCMDP (arXiv 2606.08779) maximises E[R] subject to D <= c through the Lagrangian
L(theta, lambda) = J(theta) - lambda (D(theta) - c), lambda >= 0, and takes one projected dual
step per training step on the measured, detached D:

    lambda <- clip(lambda + eta (D - c), lambda_min, lambda_max)

Paper defaults: eta = 1.0, lambda_0 = 0.1 (8B dense; 0.05 for the 30B-A3B MoE), c = 0.0037 (8B;
0.0050 for the MoE). The paper reports that eta above about 1.5 oscillates; :class:`PIDMultiplier`
is the standard cure (Stooke, Achiam & Abbeel 2020). :class:`AutoTolerance` picks c from the
first measurements ("choosing c automatically" is the paper's named future work).

Every multiplier offers ``value``, ``tolerance``, ``steps``, ``update(measured) -> float``,
``state_dict()`` and ``load_state_dict()``; the loss takes ``value`` as a plain number. State is
plain Python floats, so a state dict pickles, JSON-serialises and round-trips exactly.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Protocol

#: DCMDP paper defaults for the 8B dense model (arXiv 2606.08779).
PAPER_ETA = 1.0
PAPER_LAMBDA_0 = 0.1
PAPER_TOLERANCE = 0.0037


class Multiplier(Protocol):
    """What the training loop needs from a multiplier."""

    @property
    def value(self) -> float: ...

    @property
    def tolerance(self) -> float | None: ...

    @property
    def steps(self) -> int: ...

    def update(self, measured: float) -> float: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class _MultiplierState:
    """What every multiplier shares: lambda in [lam_min, lam_max], the tolerance c, the step count,
    and the (optionally EMA-smoothed) measured D. Subclasses define ``update`` and their gains."""

    kind = ""

    def _init_state(
        self, init: float, tolerance: float, lam_min: float, lam_max: float, ema: float | None
    ) -> None:
        self._init, self._lam_min, self._lam_max = _check_bounds(init, lam_min, lam_max)
        self._tolerance = _check_positive("tolerance", tolerance)
        self._ema = _check_ema(ema)
        self._value = self._init
        self._steps = 0
        self._ema_value: float | None = None
        self._last_measured: float | None = None

    @property
    def value(self) -> float:
        """The current lambda."""
        return self._value

    @property
    def tolerance(self) -> float:
        """The constraint level c."""
        return self._tolerance

    @tolerance.setter
    def tolerance(self, c: float) -> None:
        self._tolerance = _check_positive("tolerance", c)

    @property
    def steps(self) -> int:
        """Number of updates so far."""
        return self._steps

    @property
    def last_measured(self) -> float | None:
        """The raw D of the last update (None before the first)."""
        return self._last_measured

    def _smoothed(self, measured: float) -> float:
        """Record a measured D and return the value the update uses (raw D or its EMA)."""
        d = _check_measured(measured)
        self._last_measured = d
        self._ema_value = _ema_step(self._ema, self._ema_value, d)
        return d if self._ema_value is None else self._ema_value

    def _state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "init": self._init,
            "tolerance": self._tolerance,
            "lam_min": self._lam_min,
            "lam_max": self._lam_max,
            "ema": self._ema,
            "value": self._value,
            "steps": self._steps,
            "ema_value": self._ema_value,
            "last_measured": self._last_measured,
        }

    def _restore_state(self, state: dict[str, Any]) -> None:
        self._value = _check_value_in_bounds(state["value"], self._lam_min, self._lam_max)
        self._steps = _check_steps(state["steps"])
        self._ema_value = _optional_float("ema_value", state["ema_value"])
        self._last_measured = _optional_float("last_measured", state["last_measured"])


class LagrangeMultiplier(_MultiplierState):
    """Projected dual ascent, the DCMDP paper's multiplier update (arXiv 2606.08779).

    update(D):  D_used = D, or with ``ema`` = beta the smoothed D_ema <- beta D_ema + (1 - beta) D
                (the first measurement initialises D_ema = D);
                lambda <- clip(lambda + eta (D_used - c), lam_min, lam_max).

    Below the tolerance (D < c) lambda shrinks by eta (c - D) per step until it reaches lam_min;
    above it lambda grows by eta (D - c) per step, up to lam_max.

    Args:
        init: lambda_0, within [lam_min, lam_max]. Paper: 0.1.
        eta: dual step size, > 0. Paper: 1.0.
        tolerance: c, > 0. Paper: 0.0037.
        lam_min, lam_max: projection bounds, 0 <= lam_min <= lam_max.
        ema: decay beta in (0, 1) of an exponential moving average of D, or None for raw D.
    """

    kind = "dual_ascent"

    def __init__(
        self,
        init: float = PAPER_LAMBDA_0,
        eta: float = PAPER_ETA,
        tolerance: float = PAPER_TOLERANCE,
        lam_min: float = 0.0,
        lam_max: float = 10.0,
        ema: float | None = None,
    ) -> None:
        self._init_state(init, tolerance, lam_min, lam_max, ema)
        self._eta = _check_positive("eta", eta)

    def update(self, measured: float) -> float:
        """One projected dual step on the measured D; returns the new lambda."""
        d_used = self._smoothed(measured)
        self._value = _clip(
            self._value + self._eta * (d_used - self._tolerance), self._lam_min, self._lam_max
        )
        self._steps += 1
        return self._value

    def state_dict(self) -> dict[str, Any]:
        """Configuration and state, plain Python values; ``load_state_dict`` restores both."""
        return {**self._state(), "eta": self._eta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore configuration and state (the checkpoint's hyperparameters win)."""
        _check_kind(self.kind, state)
        fresh = LagrangeMultiplier(
            init=state["init"],
            eta=state["eta"],
            tolerance=state["tolerance"],
            lam_min=state["lam_min"],
            lam_max=state["lam_max"],
            ema=state["ema"],
        )
        fresh._restore_state(state)
        self.__dict__.update(fresh.__dict__)

    def __repr__(self) -> str:
        return f"LagrangeMultiplier(value={self._value:.6g}, eta={self._eta}, tolerance={self._tolerance})"


class PIDMultiplier(_MultiplierState):
    """PID Lagrangian multiplier (Stooke, Achiam & Abbeel 2020, "Responsive Safety in
    Reinforcement Learning by PID Lagrangian Methods", ICML, Algorithm 2).

    Plain dual ascent is an integral-only controller: lambda follows the running sum of the error,
    and because the policy (and so D) reacts to lambda with a lag, the loop overshoots and
    oscillates, worse at large eta. A proportional term reacts to the error now and damps it; a
    derivative term on rising D brakes an increase before the sum catches up. Per update, with
    D_t the measured (or EMA-smoothed, see ``ema``) discrepancy:

        e_t      = D_t - c
        I_t      = clip(I_{t-1} + ki e_t, lam_min - init, lam_max - init),   I_0 = 0
        dD_t     = max(0, D_t - D_{t-1}),   0 at the first update
        lambda_t = clip(init + kp e_t + I_t + kd dD_t, lam_min, lam_max)

    Relation to the paper's Algorithm 2 (I <- (I + e)+, lambda <- (KP e + KI I + KD dD)+): ki sits
    inside the sum (so changing ki rescales future steps, not the past), lambda starts at ``init``
    rather than 0, and the integral is clipped so that init + I stays within the bounds (the
    paper's I >= 0 is the case init = lam_min = 0; the upper clip is anti-windup). The derivative
    is taken on D, as in the paper, not on e, so a change of c (``AutoTolerance``) is no kick.
    With kp = kd = 0 and ki = eta this is exactly :class:`LagrangeMultiplier`.

    What the P term can and cannot fix: when D integrates the push it gets (each training step
    moves D by the reward gradient minus k·lambda), integral-only control never settles and kp > 0
    damps it (tests/test_multiplier.py simulates this). When D instead jumped to its new level
    within one step, an integral gain with k·ki > 2 is unstable whatever kp is: lower ki then.

    Args:
        init: lambda_0 in [lam_min, lam_max]. Paper (DCMDP): 0.1.
        kp, ki, kd: gains, each >= 0, not all 0. ki = 1.0 is DCMDP's eta; kp = 10 (the P term
            worth ten integral steps of the same error) and kd = 0 are our guesses, not from
            either paper: tune kp to the plant.
        tolerance: c > 0. Paper (DCMDP): 0.0037.
        lam_min, lam_max: projection bounds, 0 <= lam_min <= lam_max.
        ema: decay beta in (0, 1) of an EMA of D used in all three terms, or None.
    """

    kind = "pid"

    def __init__(
        self,
        init: float = PAPER_LAMBDA_0,
        kp: float = 10.0,
        ki: float = PAPER_ETA,
        kd: float = 0.0,
        tolerance: float = PAPER_TOLERANCE,
        lam_min: float = 0.0,
        lam_max: float = 10.0,
        ema: float | None = None,
    ) -> None:
        self._init_state(init, tolerance, lam_min, lam_max, ema)
        self._kp = _check_non_negative("kp", kp)
        self._ki = _check_non_negative("ki", ki)
        self._kd = _check_non_negative("kd", kd)
        if self._kp == self._ki == self._kd == 0.0:
            raise ValueError("kp, ki and kd are all 0: the multiplier could never move")
        self._integral = 0.0
        self._prev_used: float | None = None

    @property
    def integral(self) -> float:
        """The clipped, ki-scaled error sum I."""
        return self._integral

    def update(self, measured: float) -> float:
        """One PID step on the measured D; returns the new lambda."""
        d_used = self._smoothed(measured)
        error = d_used - self._tolerance
        self._integral = _clip(
            self._integral + self._ki * error, self._lam_min - self._init, self._lam_max - self._init
        )
        rise = 0.0 if self._prev_used is None else max(0.0, d_used - self._prev_used)
        self._prev_used = d_used
        raw = self._init + self._kp * error + self._integral + self._kd * rise
        self._value = _clip(raw, self._lam_min, self._lam_max)
        self._steps += 1
        return self._value

    def state_dict(self) -> dict[str, Any]:
        """Configuration and state, plain Python values; ``load_state_dict`` restores both."""
        return {
            **self._state(),
            "kp": self._kp,
            "ki": self._ki,
            "kd": self._kd,
            "integral": self._integral,
            "prev_used": self._prev_used,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore configuration and state (the checkpoint's hyperparameters win)."""
        _check_kind(self.kind, state)
        fresh = PIDMultiplier(
            init=state["init"],
            kp=state["kp"],
            ki=state["ki"],
            kd=state["kd"],
            tolerance=state["tolerance"],
            lam_min=state["lam_min"],
            lam_max=state["lam_max"],
            ema=state["ema"],
        )
        fresh._restore_state(state)
        fresh._integral = _check_finite("integral", state["integral"])
        fresh._prev_used = _optional_float("prev_used", state["prev_used"])
        self.__dict__.update(fresh.__dict__)

    def __repr__(self) -> str:
        return (
            f"PIDMultiplier(value={self._value:.6g}, kp={self._kp}, ki={self._ki}, kd={self._kd}, "
            f"tolerance={self._tolerance})"
        )


class AutoTolerance:
    """Choose c from the run's own first measurements, then behave like the wrapped multiplier.

    For the first ``warmup_steps`` updates, lambda stays at the wrapped multiplier's initial value
    and the measured D's are collected; at the ``warmup_steps``-th update

        c = max(quantile_q(D_1..D_K) * multiple, min_tolerance)

    (linear interpolation between order statistics, numpy's default) is written into the wrapped
    multiplier, and later updates go to it unchanged. The wrapped multiplier's EMA (if any) starts
    with the first post-warm-up measurement. ``min_tolerance`` keeps c > 0 when the engines agree
    exactly (D = 0): the constraint is then met and lambda decays to lam_min.

    The quantile/multiple rule is our reading of "choose c automatically", named future work in
    DCMDP (arXiv 2606.08779): the paper found c near the discrepancy level of a healthy run.
    """

    kind = "auto_tolerance"

    def __init__(
        self,
        multiplier: LagrangeMultiplier | PIDMultiplier,
        warmup_steps: int,
        quantile: float = 0.5,
        multiple: float = 1.0,
        min_tolerance: float = 1e-6,
    ) -> None:
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an integer >= 1, got {warmup_steps!r}")
        quantile = _check_finite("quantile", quantile)
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {quantile}")
        self._inner = multiplier
        self._warmup_steps = warmup_steps
        self._quantile = quantile
        self._multiple = _check_positive("multiple", multiple)
        self._min_tolerance = _check_positive("min_tolerance", min_tolerance)
        self._collected: list[float] = []
        self._tolerance: float | None = None
        self._steps = 0

    @property
    def value(self) -> float:
        """The current lambda (the wrapped multiplier's)."""
        return self._inner.value

    @property
    def tolerance(self) -> float | None:
        """The chosen c, or None during warm-up."""
        return self._tolerance

    @property
    def steps(self) -> int:
        """Number of updates so far, warm-up included."""
        return self._steps

    @property
    def multiplier(self) -> LagrangeMultiplier | PIDMultiplier:
        """The wrapped multiplier."""
        return self._inner

    @property
    def collected(self) -> tuple[float, ...]:
        """The warm-up measurements."""
        return tuple(self._collected)

    def update(self, measured: float) -> float:
        """Collect during warm-up (lambda unchanged), then delegate; returns lambda."""
        d = _check_measured(measured)
        self._steps += 1
        if self._tolerance is not None:
            return self._inner.update(d)
        self._collected.append(d)
        if len(self._collected) == self._warmup_steps:
            c = max(_quantile(self._collected, self._quantile) * self._multiple, self._min_tolerance)
            self._inner.tolerance = c
            self._tolerance = self._inner.tolerance
        return self._inner.value

    def state_dict(self) -> dict[str, Any]:
        """Warm-up state, chosen c and the wrapped multiplier's state dict (under "inner")."""
        return {
            "kind": self.kind,
            "warmup_steps": self._warmup_steps,
            "quantile": self._quantile,
            "multiple": self._multiple,
            "min_tolerance": self._min_tolerance,
            "collected": list(self._collected),
            "tolerance": self._tolerance,
            "steps": self._steps,
            "inner": self._inner.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore (the checkpoint's settings win; the wrapped multiplier must be the same kind)."""
        _check_kind(self.kind, state)
        fresh = AutoTolerance(
            self._inner,
            warmup_steps=state["warmup_steps"],
            quantile=state["quantile"],
            multiple=state["multiple"],
            min_tolerance=state["min_tolerance"],
        )
        collected = [_check_finite("collected", x) for x in state["collected"]]
        if len(collected) > fresh._warmup_steps:
            raise ValueError(f"collected holds {len(collected)} values, more than warmup_steps")
        tolerance = _optional_float("tolerance", state["tolerance"])
        self._inner.load_state_dict(state["inner"])
        fresh._collected = collected
        fresh._tolerance = tolerance
        fresh._steps = _check_steps(state["steps"])
        self.__dict__.update(fresh.__dict__)

    def __repr__(self) -> str:
        return (
            f"AutoTolerance({self._inner!r}, warmup_steps={self._warmup_steps}, tolerance={self._tolerance})"
        )


#: The multiplier registry: ``make_multiplier(kind, **kwargs)``.
MULTIPLIERS: dict[str, type[LagrangeMultiplier] | type[PIDMultiplier]] = {
    "dual_ascent": LagrangeMultiplier,
    "pid": PIDMultiplier,
}


def make_multiplier(kind: str, **kwargs: Any) -> LagrangeMultiplier | PIDMultiplier:
    """Build a multiplier by name ("dual_ascent" or "pid") with its constructor's keyword args."""
    if kind not in MULTIPLIERS:
        raise ValueError(f"unknown multiplier kind {kind!r}; valid kinds: {', '.join(sorted(MULTIPLIERS))}")
    cls = MULTIPLIERS[kind]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for multiplier {kind!r}; accepted: {accepted}")
    return cls(**kwargs)


def build_multiplier(
    kind: str,
    *,
    init: float,
    tolerance: float | None,
    lam_min: float = 0.0,
    lam_max: float = 10.0,
    ema: float | None = None,
    eta: float = 1.0,
    kp: float = 1.0,
    ki: float = 1.0,
    kd: float = 0.0,
    auto_warmup_steps: int = 5,
    auto_quantile: float = 0.5,
    auto_multiple: float = 1.0,
) -> Multiplier:
    """The multiplier a run uses: ``kind`` "dual_ascent" (uses ``eta``) or "pid" (``kp``, ``ki``,
    ``kd``), with a fixed ``tolerance`` c, or ``tolerance=None`` for an automatic c
    (``AutoTolerance`` over the first ``auto_warmup_steps`` measurements).

    The one place the trainer and the TRL / verl integrations build their multiplier from settings.
    """
    kwargs: dict[str, Any] = {"init": init, "lam_min": lam_min, "lam_max": lam_max, "ema": ema}
    if kind == "dual_ascent":
        kwargs["eta"] = eta
    else:
        kwargs.update(kp=kp, ki=ki, kd=kd)
    if tolerance is None:
        inner = make_multiplier(kind, tolerance=1.0, **kwargs)  # placeholder c, set after the warm-up
        return AutoTolerance(
            inner, warmup_steps=auto_warmup_steps, quantile=auto_quantile, multiple=auto_multiple
        )
    return make_multiplier(kind, tolerance=tolerance, **kwargs)


# ----------------------------------------------------------------------------- helpers


def _quantile(values: list[float], q: float) -> float:
    """Quantile with linear interpolation between order statistics (numpy's 'linear')."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (pos - lo) * (xs[hi] - xs[lo])


def _ema_step(decay: float | None, current: float | None, measured: float) -> float | None:
    if decay is None:
        return None
    if current is None:
        return measured
    return decay * current + (1.0 - decay) * measured


def _clip(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def _check_finite(name: str, x: Any) -> float:
    try:
        value = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {x!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_positive(name: str, x: Any) -> float:
    value = _check_finite(name, x)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _check_non_negative(name: str, x: Any) -> float:
    value = _check_finite(name, x)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _check_bounds(init: Any, lam_min: Any, lam_max: Any) -> tuple[float, float, float]:
    lo = _check_non_negative("lam_min", lam_min)
    hi = _check_finite("lam_max", lam_max)
    if hi < lo:
        raise ValueError(f"lam_max ({hi}) must be >= lam_min ({lo})")
    start = _check_finite("init", init)
    if not lo <= start <= hi:
        raise ValueError(f"init ({start}) must lie within [lam_min, lam_max] = [{lo}, {hi}]")
    return start, lo, hi


def _check_value_in_bounds(x: Any, lo: float, hi: float) -> float:
    value = _check_finite("value", x)
    if not lo <= value <= hi:
        raise ValueError(f"value ({value}) must lie within [lam_min, lam_max] = [{lo}, {hi}]")
    return value


def _check_ema(ema: Any) -> float | None:
    if ema is None:
        return None
    decay = _check_finite("ema", ema)
    if not 0.0 < decay < 1.0:
        raise ValueError(f"ema (decay beta) must be in (0, 1), got {decay}")
    return decay


def _check_measured(measured: Any) -> float:
    return _check_finite("measured", measured)


def _check_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    return steps


def _optional_float(name: str, x: Any) -> float | None:
    return None if x is None else _check_finite(name, x)


def _check_kind(expected: str, state: dict[str, Any]) -> None:
    if state.get("kind") != expected:
        raise ValueError(f"state dict is for kind {state.get('kind')!r}, not {expected!r}")
