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
``state_dict()`` and ``load_state_dict()`` (the :class:`Multiplier` protocol); the loss takes
``value`` as a plain number. State is plain Python floats, so a state dict pickles,
JSON-serialises and round-trips exactly.

Every option of the multiplier a run uses, and its one default, is a field of
:class:`MultiplierSettings` (the ``multiplier`` section of the run config); the constructors'
defaults and the TRL / verl integrations read theirs from it, and :func:`build_multiplier` turns
settings into a multiplier. The multipliers share code by composition: each holds a
:class:`~dcmdp.algo.multiplier_parts.LambdaState` (lambda in its bounds, c, steps, the EMA of D)
and adds its own update rule.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from typing import Any, Protocol

from dcmdp.algo.multiplier_parts import (
    LambdaState,
    check_auto,
    check_finite,
    check_gains,
    check_kind,
    check_measured,
    check_non_negative,
    check_positive,
    check_steps,
    clip,
    optional_float,
    quantile,
)

#: DCMDP paper defaults for the 8B dense model (arXiv 2606.08779).
PAPER_ETA = 1.0
PAPER_LAMBDA_0 = 0.1
PAPER_TOLERANCE = 0.0037
#: The tolerance a loss gets while an automatic c is still being measured (:class:`AutoTolerance`):
#: above every value a measure can take (probability gaps are below 1, the log-ratio measures are
#: clamped at |log r| = 20, so k3 stays below e^20 ~ 4.9e8), so the hinge is off during the
#: warm-up, which only measures D.
WARMUP_LOSS_TOLERANCE = 1e9


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


#: The reward guard's margin where ``reward_guard`` is null and nothing turns it off (the trainer
#: turns it off where the update bound is on: :func:`dcmdp.run_setup.multiplier_from_config`).
GUARD_MARGIN = 0.05


@dataclass
class MultiplierSettings:
    """The multiplier of a run: every option and its one default (the config's ``multiplier`` section).

    Checked when the multiplier is built (:func:`build_multiplier`), which the config does when it
    is loaded, so a bad value stops a run before any model is loaded.
    """

    type: str = "dual_ascent"
    """dual_ascent (the paper's projected dual ascent) | pid (PID Lagrangian)."""
    init: float = PAPER_LAMBDA_0
    """lambda_0 (paper: 0.1 dense, 0.05 MoE)."""
    eta: float = PAPER_ETA
    """Dual step size (paper: 1.0). PID uses kp/ki/kd instead. To hold lambda fixed, set
    lam_min = lam_max = init."""
    tolerance: float | None = PAPER_TOLERANCE
    """c, the tolerated mean probability gap (paper: 0.0037 dense, 0.005 MoE). null = automatic."""
    lam_min: float = 0.0
    """Lower bound of the projection."""
    lam_max: float = 1.0
    """Upper bound of the projection (1, the bound of the paper's public implementation). With the
    reward guard it kept every DCMDP form from collapsing in the ``harm`` experiment, where the
    guard alone let one run fall once lambda reached 1.9 (docs/RESULTS.md). Runs before this default
    used 10."""
    ema: float | None = None
    """EMA decay of the measured discrepancy before the dual step (null = raw)."""
    kp: float = 10.0
    """PID: proportional gain (10: the P term worth ten integral steps of the same error; a guess,
    tune it to the run)."""
    ki: float = PAPER_ETA
    """PID: integral gain (ki = eta, kp = kd = 0 is plain dual ascent)."""
    kd: float = 0.0
    """PID: derivative gain (on increases of D only)."""
    auto_warmup_steps: int = 5
    """Automatic tolerance: steps measured before c is set."""
    auto_quantile: float = 0.5
    """Automatic tolerance: c = quantile of the warm-up D's ..."""
    auto_multiple: float = 1.0
    """... times this multiple."""
    tolerance_floor: float = 0.0
    """Keep a fixed c within the engine's reach: c is raised to at least this multiple of the
    auto_quantile of D over the first auto_warmup_steps steps (lambda stays at init, and the loss
    reads your c, while they are measured); 0 = off. With 1, the starting policy meets the constraint, so lambda grows only
    while training pushes the gap above where it started. Ignored with tolerance=null, whose c
    is measured anyway."""
    reward_guard: float | None = None
    """Reward guard margin, in reward units; 0 = off. While the training reward's moving average is
    more than this below its best, lambda is capped and the cap backs off
    (:mod:`dcmdp.algo.guard`); keeps the constraint from costing the run its reward. null (the
    default): on, at :data:`GUARD_MARGIN` (0.05), where the update bound is off
    (``loss.constraint_share=0`` or ``constraint_share_of=gradient``; without either, every DCMDP
    form collapsed in the ``harm`` experiment), and off where it is on (with the bound the guard
    added no safety and cost accuracy in ``harm``; docs/RESULTS.md), unless
    ``reward_guard_relative`` > 0 asks for the guard."""
    reward_guard_relative: float = 0.0
    """Reward guard: also bound the margin by this fraction of the best reward average (the guard
    trips below ``best - min(reward_guard, max(this x best, 0.2 x reward_guard))``); 0 = off, < 1.
    For tasks whose training reward is near or below the margin, where an absolute margin cannot
    trip before the reward is gone (docs/RESULTS.md, long_stress_q4_0). Off by default: not yet
    measured in ``harm``."""


# Constructor defaults below are the MultiplierSettings field defaults (class attributes of the
# dataclass), so each default has one definition.
_D = MultiplierSettings


class LagrangeMultiplier:
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
        init: float = _D.init,
        eta: float = _D.eta,
        tolerance: float = PAPER_TOLERANCE,
        lam_min: float = _D.lam_min,
        lam_max: float = _D.lam_max,
        ema: float | None = _D.ema,
    ) -> None:
        self._lam = LambdaState(init, tolerance, lam_min, lam_max, ema)
        self._eta = check_positive("eta", eta)

    @property
    def value(self) -> float:
        """The current lambda."""
        return self._lam.value

    @property
    def tolerance(self) -> float:
        """The constraint level c."""
        return self._lam.tolerance

    @tolerance.setter
    def tolerance(self, c: float) -> None:
        self._lam.tolerance = c

    @property
    def steps(self) -> int:
        """Number of updates so far."""
        return self._lam.steps

    @property
    def last_measured(self) -> float | None:
        """The raw D of the last update (None before the first)."""
        return self._lam.last_measured

    def update(self, measured: float) -> float:
        """One projected dual step on the measured D; returns the new lambda."""
        lam = self._lam
        d_used = lam.smoothed(measured)
        lam.value = lam.project(lam.value + self._eta * (d_used - lam.tolerance))
        lam.steps += 1
        return lam.value

    def state_dict(self) -> dict[str, Any]:
        """Configuration and state, plain Python values; ``load_state_dict`` restores both."""
        return {**self._lam.state_dict(self.kind), "eta": self._eta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore configuration and state (the checkpoint's hyperparameters win). Everything is
        checked before anything changes."""
        check_kind(self.kind, state)
        lam = LambdaState.configured_as(state)
        eta = check_positive("eta", state["eta"])
        lam.restore(state)
        self._lam, self._eta = lam, eta

    def __repr__(self) -> str:
        return f"LagrangeMultiplier(value={self.value:.6g}, eta={self._eta}, tolerance={self.tolerance})"


class PIDMultiplier:
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
            either paper: tune kp to the plant. Defaults from :class:`MultiplierSettings`.
        tolerance: c > 0. Paper (DCMDP): 0.0037.
        lam_min, lam_max: projection bounds, 0 <= lam_min <= lam_max.
        ema: decay beta in (0, 1) of an EMA of D used in all three terms, or None.
    """

    kind = "pid"

    def __init__(
        self,
        init: float = _D.init,
        kp: float = _D.kp,
        ki: float = _D.ki,
        kd: float = _D.kd,
        tolerance: float = PAPER_TOLERANCE,
        lam_min: float = _D.lam_min,
        lam_max: float = _D.lam_max,
        ema: float | None = _D.ema,
    ) -> None:
        self._lam = LambdaState(init, tolerance, lam_min, lam_max, ema)
        self._kp, self._ki, self._kd = check_gains(kp, ki, kd)
        self._integral = 0.0
        self._prev_used: float | None = None

    @property
    def value(self) -> float:
        """The current lambda."""
        return self._lam.value

    @property
    def tolerance(self) -> float:
        """The constraint level c."""
        return self._lam.tolerance

    @tolerance.setter
    def tolerance(self, c: float) -> None:
        self._lam.tolerance = c

    @property
    def steps(self) -> int:
        """Number of updates so far."""
        return self._lam.steps

    @property
    def last_measured(self) -> float | None:
        """The raw D of the last update (None before the first)."""
        return self._lam.last_measured

    @property
    def integral(self) -> float:
        """The clipped, ki-scaled error sum I."""
        return self._integral

    def update(self, measured: float) -> float:
        """One PID step on the measured D; returns the new lambda."""
        lam = self._lam
        d_used = lam.smoothed(measured)
        error = d_used - lam.tolerance
        self._integral = clip(
            self._integral + self._ki * error, lam.lam_min - lam.init, lam.lam_max - lam.init
        )
        rise = 0.0 if self._prev_used is None else max(0.0, d_used - self._prev_used)
        self._prev_used = d_used
        raw = lam.init + self._kp * error + self._integral + self._kd * rise
        lam.value = lam.project(raw)
        lam.steps += 1
        return lam.value

    def state_dict(self) -> dict[str, Any]:
        """Configuration and state, plain Python values; ``load_state_dict`` restores both."""
        return {
            **self._lam.state_dict(self.kind),
            "kp": self._kp,
            "ki": self._ki,
            "kd": self._kd,
            "integral": self._integral,
            "prev_used": self._prev_used,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore configuration and state (the checkpoint's hyperparameters win). Everything is
        checked before anything changes."""
        check_kind(self.kind, state)
        lam = LambdaState.configured_as(state)
        gains = check_gains(state["kp"], state["ki"], state["kd"])
        lam.restore(state)
        integral = check_finite("integral", state["integral"])
        prev_used = optional_float("prev_used", state["prev_used"])
        self._lam = lam
        (self._kp, self._ki, self._kd), self._integral, self._prev_used = gains, integral, prev_used

    def __repr__(self) -> str:
        return (
            f"PIDMultiplier(value={self.value:.6g}, kp={self._kp}, ki={self._ki}, kd={self._kd}, "
            f"tolerance={self.tolerance})"
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

    With ``at_least`` (a fixed c the user chose; ``multiplier.tolerance_floor``), the chosen c is
    ``max(at_least, quantile x multiple)``, and ``at_least`` is the tolerance during the warm-up:
    a fixed c raised to the engine's measured floor when it lies below it.

    The quantile/multiple rule is our reading of "choose c automatically", named future work in
    DCMDP (arXiv 2606.08779): the paper found c near the discrepancy level of a healthy run.
    """

    kind = "auto_tolerance"

    def __init__(
        self,
        multiplier: LagrangeMultiplier | PIDMultiplier,
        warmup_steps: int,
        quantile: float = _D.auto_quantile,
        multiple: float = _D.auto_multiple,
        min_tolerance: float = 1e-6,
        at_least: float | None = None,
    ) -> None:
        self._inner = multiplier
        self._warmup_steps, self._quantile, self._multiple, self._min_tolerance = check_auto(
            warmup_steps, quantile, multiple, min_tolerance
        )
        self._at_least = None if at_least is None else check_positive("at_least", at_least)
        self._collected: list[float] = []
        self._tolerance: float | None = None
        self._steps = 0

    @property
    def value(self) -> float:
        """The current lambda (the wrapped multiplier's)."""
        return self._inner.value

    @property
    def tolerance(self) -> float | None:
        """The chosen c; during warm-up ``at_least`` (None for an automatic c)."""
        return self._at_least if self._tolerance is None else self._tolerance

    @property
    def warming_up(self) -> bool:
        """True until the warm-up's measurements have set c."""
        return self._tolerance is None

    @property
    def at_least(self) -> float | None:
        """The fixed c that the measured one may only raise (None for an automatic c)."""
        return self._at_least

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
        d = check_measured(measured)
        self._steps += 1
        if self._tolerance is not None:
            return self._inner.update(d)
        self._collected.append(d)
        if len(self._collected) == self._warmup_steps:
            c = max(
                quantile(self._collected, self._quantile) * self._multiple,
                self._min_tolerance,
                self._at_least or 0.0,
            )
            self._inner.tolerance = c
            self._tolerance = self._inner.tolerance
        return self._inner.value

    def state_dict(self) -> dict[str, Any]:
        """Warm-up state, chosen c, the floor's fixed c ("at_least", only with one) and the wrapped
        multiplier's state dict (under "inner")."""
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
            # only with a floor, so an automatic c's state is what it was before the floor existed
            **({} if self._at_least is None else {"at_least": self._at_least}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore (the checkpoint's settings win; the wrapped multiplier must be the same kind).
        Everything is checked before anything changes."""
        if self._at_least is not None and state.get("kind") in MULTIPLIERS:
            raise ValueError(
                f"state dict is for a fixed c ({state.get('kind')!r}, saved without the tolerance "
                "floor): resume it with tolerance_floor=0 (TRL and verl: dcmdp_tolerance_floor=0)"
            )
        check_kind(self.kind, state)
        settings = check_auto(
            state["warmup_steps"], state["quantile"], state["multiple"], state["min_tolerance"]
        )
        at_least = optional_float("at_least", state.get("at_least"))  # absent before the floor
        if at_least is not None:
            check_positive("at_least", at_least)
        collected = [check_finite("collected", x) for x in state["collected"]]
        if len(collected) > settings[0]:
            raise ValueError(f"collected holds {len(collected)} values, more than warmup_steps")
        tolerance = optional_float("tolerance", state["tolerance"])
        steps = check_steps(state["steps"])
        self._inner.load_state_dict(state["inner"])  # checks all before changing the inner one
        self._warmup_steps, self._quantile, self._multiple, self._min_tolerance = settings
        self._collected, self._tolerance, self._steps = collected, tolerance, steps
        self._at_least = at_least

    def __repr__(self) -> str:
        floor = "" if self._at_least is None else f", at_least={self._at_least}"
        return (
            f"AutoTolerance({self._inner!r}, warmup_steps={self._warmup_steps}, "
            f"tolerance={self._tolerance}{floor})"
        )


# ----------------------------------------------------------------------------- registry and builder

#: The multiplier registry: ``make_multiplier(kind, **kwargs)``; its keys are the valid
#: ``MultiplierSettings.type`` values.
MULTIPLIERS: dict[str, type[LagrangeMultiplier] | type[PIDMultiplier]] = {
    "dual_ascent": LagrangeMultiplier,
    "pid": PIDMultiplier,
}
#: The multiplier kinds, in registry order.
MULTIPLIER_KINDS: tuple[str, ...] = tuple(MULTIPLIERS)


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


def check_every_setting(s: MultiplierSettings) -> None:
    """Every number in ``s``, also those its kind ignores (a PID gain under dual_ascent, the
    automatic tolerance's options under a fixed c): a NaN, a negative gain or a word left in the
    config is a mistake even where it does nothing today, and would start doing harm the day the
    user switches kind. None only where the field allows it (``tolerance``, ``ema``,
    ``reward_guard``)."""
    for f in fields(MultiplierSettings):
        value = getattr(s, f.name)
        if f.name == "type" or (value is None and "None" in str(f.type)):
            continue
        if isinstance(value, bool):
            raise ValueError(f"{f.name} must be a number, got {value!r}")
        check_finite(f.name, value)
    for gain in ("kp", "ki", "kd"):
        check_non_negative(gain, getattr(s, gain))
    check_auto(s.auto_warmup_steps, s.auto_quantile, s.auto_multiple, 1.0)


def build_multiplier(settings: MultiplierSettings | str, **options: Any) -> Multiplier:
    """The multiplier a run uses: ``settings.type`` "dual_ascent" (uses ``eta``) or "pid" (``kp``,
    ``ki``, ``kd``), with a fixed ``tolerance`` c, or ``tolerance=None`` for an automatic c
    (:class:`AutoTolerance` over the first ``auto_warmup_steps`` measurements); a fixed c with
    ``tolerance_floor > 0`` is an :class:`AutoTolerance` whose measured c may only raise it.

    ``build_multiplier("pid", kp=2.0, tolerance=None)`` is short for
    ``build_multiplier(MultiplierSettings(type="pid", kp=2.0, tolerance=None))``. A bad value raises
    ``ValueError`` naming it. The one place the trainer, the config check and the TRL / verl
    integrations build their multiplier from settings.
    """
    if isinstance(settings, str):
        unknown = sorted(set(options) - {f.name for f in fields(MultiplierSettings)})
        if unknown:
            raise ValueError(f"unknown multiplier option(s) {unknown}")
        settings = MultiplierSettings(type=settings, **options)
    elif options:
        raise TypeError("pass either MultiplierSettings or a kind with keyword options, not both")
    s = settings
    check_every_setting(s)
    kwargs: dict[str, Any] = {"init": s.init, "lam_min": s.lam_min, "lam_max": s.lam_max, "ema": s.ema}
    if s.type == "dual_ascent":
        kwargs["eta"] = s.eta
    else:
        kwargs.update(kp=s.kp, ki=s.ki, kd=s.kd)
    built: Multiplier
    floor = check_non_negative("tolerance_floor", s.tolerance_floor)
    if s.tolerance is None:
        inner = make_multiplier(s.type, tolerance=1.0, **kwargs)  # placeholder c, set after the warm-up
        built = AutoTolerance(
            inner, warmup_steps=s.auto_warmup_steps, quantile=s.auto_quantile, multiple=s.auto_multiple
        )
    elif floor > 0:
        inner = make_multiplier(s.type, tolerance=s.tolerance, **kwargs)
        built = AutoTolerance(
            inner, s.auto_warmup_steps, quantile=s.auto_quantile, multiple=floor, at_least=s.tolerance
        )
    else:
        built = make_multiplier(s.type, tolerance=s.tolerance, **kwargs)
    from dcmdp.algo.guard import GuardedMultiplier, check_relative

    margin = check_non_negative("reward_guard", GUARD_MARGIN if s.reward_guard is None else s.reward_guard)
    if check_relative(s.reward_guard_relative) > 0 and margin == 0:
        raise ValueError("reward_guard_relative bounds the reward guard's margin: it needs reward_guard > 0")
    if margin > 0:
        built = GuardedMultiplier(built, margin=margin, lam_max=s.lam_max, relative=s.reward_guard_relative)
    return built
