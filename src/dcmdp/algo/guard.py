"""The reward guard: the constraint may not cost the run its reward (``multiplier.reward_guard``).

Dual ascent raises lambda for as long as the measured gap D stays above c. When the engine's own
floor is above c (a weight-rounded engine, a c taken from another model) the constraint cannot be
met, lambda climbs without end, and the constraint's pull towards where trainer and engine agree
drives the policy to a degenerate point: near-uniform or near-deterministic, reward 0. That is what
every DCMDP form did in the ``harm`` experiment (docs/RESULTS.md).

The guard watches the training reward. It keeps an exponential moving average of the step's mean
reward and the best value that average has reached (slowly forgotten: the best falls by
``BEST_FORGET * margin`` per step, so one lucky stretch does not hold the guard shut for ever).
While the average is more than ``margin`` below its best, the constraint is taken to be costing
reward: a cap on lambda is cut to ``BACKOFF`` times the lambda in use, every step, and on entering
that state a ceiling is cut the same way, once (not when lambda is already 0: then the constraint
cannot be the cause). While it is not, the cap recovers (``cap <- cap * RECOVER + RECOVER_STEP``)
up to the ceiling, and the ceiling itself recovers slowly (``CEILING_RECOVER_STEP`` per step). The
loss uses ``min(lambda, cap)``, which may be below ``lam_min``. The multiplier so settles below the
largest value the reward tolerated instead of climbing straight back to ``lam_max`` and collapsing
the run a second time; a trip caused by reward noise costs the constraint a while, not the run. This adds a second constraint, "reward at least its recent best
minus the margin", with a fast controller in front of the slow dual ascent.

A margin in reward units is blind where the reward itself is smaller than it: in the long-response
regime the training reward starts near 0.04, so a margin of 0.05 cannot trip before the reward is
already 0 (docs/RESULTS.md, ``long_stress_q4_0``). ``relative`` (``multiplier.reward_guard_relative``)
bounds the margin by that fraction of the best average as well: the guard trips when the average
falls below ``best - min(margin, max(relative * best, MIN_MARGIN * margin))`` (the floor keeps a
reward at or below 0 from tripping it on every dip). The best is still forgotten at
``BEST_FORGET * margin`` per step, so a trip always ends.

:class:`GuardedMultiplier` wraps any multiplier; the trainer calls :meth:`GuardedMultiplier.observe_reward`
once per step, before the dual step. Integrations that do not call it get the wrapped multiplier
unchanged (the cap stays at ``lam_max``).
"""

from __future__ import annotations

from typing import Any

from dcmdp.algo.multiplier_parts import check_finite, check_kind, check_non_negative, optional_float

#: EMA decay of the step's mean reward (about a 10-step window).
REWARD_EMA = 0.9
#: The best reward average is forgotten by this fraction of the margin per step (a margin in 200
#: steps): slow enough that a reward falling by a margin over 60 steps still trips the guard (at
#: 0.02, a shaping run in ``harm`` declined unnoticed until lambda was 2.1 and lost 0.4 accuracy).
BEST_FORGET = 0.005
#: With a relative margin, the margin never falls below this fraction of the absolute one.
MIN_MARGIN = 0.2
#: Factor applied to the lambda in use when the guard trips.
BACKOFF = 0.5
#: Recovery per healthy step: ``cap <- cap * RECOVER + RECOVER_STEP`` (a cap of 0 recovers too).
RECOVER = 1.05
RECOVER_STEP = 0.01
#: The ceiling's own recovery per healthy step: slow (0.3 in 150 steps), so that a trip caused by
#: reward noise rather than by the constraint does not turn the constraint off for good.
CEILING_RECOVER_STEP = 0.002


class GuardedMultiplier:
    """A multiplier whose value is capped by the reward guard; otherwise the wrapped one."""

    kind = "reward_guard"

    def __init__(self, multiplier: Any, margin: float, lam_max: float, relative: float = 0.0) -> None:
        self._inner = multiplier
        self.margin = check_non_negative("reward_guard", margin)
        self.relative = check_relative(relative)
        self.lam_max = check_non_negative("lam_max", lam_max)
        self.cap = self.lam_max
        self.ceiling = self.lam_max
        self.reward_ema: float | None = None
        self.best_ema: float | None = None
        self.trips = 0

    @property
    def value(self) -> float:
        """The lambda the loss uses: ``min(wrapped lambda, cap)``."""
        return min(self._inner.value, self.cap)

    @property
    def tolerance(self) -> float | None:
        return self._inner.tolerance  # type: ignore[no-any-return]

    @property
    def steps(self) -> int:
        return self._inner.steps  # type: ignore[no-any-return]

    @property
    def multiplier(self) -> Any:
        """The wrapped multiplier."""
        return self._inner

    def effective_margin(self) -> float:
        """``margin``; with a relative bound ``min(margin, max(relative * best, MIN_MARGIN * margin))``."""
        if self.relative > 0 and self.best_ema is not None:
            return min(self.margin, max(self.relative * self.best_ema, MIN_MARGIN * self.margin))
        return self.margin

    @property
    def tripped(self) -> bool:
        """Whether the last observed reward average was more than the margin below its best."""
        return (
            self.reward_ema is not None
            and self.best_ema is not None
            and self.reward_ema < self.best_ema - self.effective_margin()
        )

    def observe_reward(self, reward: float) -> float:
        """One guard step on this step's mean training reward; returns the new cap."""
        r = check_finite("reward", reward)
        was_tripped = self.tripped
        ema = r if self.reward_ema is None else REWARD_EMA * self.reward_ema + (1 - REWARD_EMA) * r
        best = ema if self.best_ema is None else max(self.best_ema - BEST_FORGET * self.margin, ema)
        self.reward_ema, self.best_ema = ema, best
        in_use = self.value
        if self.tripped and in_use > 0:  # a lambda of 0 cannot have cost the reward
            if not was_tripped:  # a new episode: the ceiling drops below the lambda that led here
                self.ceiling = min(self.ceiling, in_use) * BACKOFF
                self.trips += 1
            self.cap = min(self.cap, in_use) * BACKOFF
        elif not self.tripped:
            self.ceiling = min(self.lam_max, self.ceiling + CEILING_RECOVER_STEP)
            self.cap = min(self.ceiling, self.cap * RECOVER + RECOVER_STEP)
        return self.cap

    def update(self, measured: float) -> float:
        """The wrapped multiplier's dual step; returns the capped lambda."""
        self._inner.update(measured)
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "margin": self.margin,
            "relative": self.relative,
            "lam_max": self.lam_max,
            "cap": self.cap,
            "ceiling": self.ceiling,
            "reward_ema": self.reward_ema,
            "best_ema": self.best_ema,
            "trips": self.trips,
            "inner": self._inner.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; everything is checked before anything changes."""
        check_kind(self.kind, state)
        margin = check_non_negative("margin", state["margin"])
        relative = check_relative(state.get("relative", 0.0))  # states saved before it existed: 0
        lam_max = check_non_negative("lam_max", state["lam_max"])
        cap = check_non_negative("cap", state["cap"])
        ceiling = check_non_negative("ceiling", state["ceiling"])
        reward_ema = optional_float("reward_ema", state["reward_ema"])
        best_ema = optional_float("best_ema", state["best_ema"])
        trips = int(state["trips"])
        self._inner.load_state_dict(state["inner"])
        self.margin, self.relative, self.lam_max = margin, relative, lam_max
        self.cap, self.ceiling = cap, ceiling
        self.reward_ema, self.best_ema, self.trips = reward_ema, best_ema, trips

    def __repr__(self) -> str:
        return (
            f"GuardedMultiplier({self._inner!r}, margin={self.margin}, relative={self.relative}, cap={self.cap:.4g}, "
            f"ceiling={self.ceiling:.4g})"
        )


def check_relative(value: Any) -> float:
    relative = check_non_negative("reward_guard_relative", value)
    if relative >= 1:
        raise ValueError(f"reward_guard_relative must be in [0, 1), got {relative}")
    return relative
