"""Lagrange multipliers: hand-derived steps, properties, PID damping, AutoTolerance, bad input."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest

from dcmdp.multiplier import (
    AutoTolerance,
    LagrangeMultiplier,
    PIDMultiplier,
    make_multiplier,
)

C = 0.0037


# ----------------------------------------------------------------------------- dual ascent, by hand


def test_paper_defaults() -> None:
    m = LagrangeMultiplier()
    assert (m.value, m.tolerance, m.steps) == (0.1, 0.0037, 0)
    assert m.state_dict()["eta"] == 1.0


def test_dual_ascent_hand_steps() -> None:
    m = LagrangeMultiplier(init=0.1, eta=1.0, tolerance=C)
    assert m.update(0.0137) == pytest.approx(0.11)  # 0.1 + 1·(0.0137 - 0.0037)
    assert m.update(0.0037) == pytest.approx(0.11)  # D = c: no change
    assert m.update(0.0) == pytest.approx(0.1063)  # 0.11 - 0.0037
    assert m.value == pytest.approx(0.1063)
    assert m.steps == 3 and m.last_measured == 0.0


def test_dual_ascent_projection_hand_steps() -> None:
    m = LagrangeMultiplier(init=0.1, eta=10.0, tolerance=C)
    # each step at D = 0 subtracts 10·0.0037 = 0.037: 0.063, 0.026, then clipped at lam_min = 0
    assert [m.update(0.0) for _ in range(4)] == pytest.approx([0.063, 0.026, 0.0, 0.0])
    m = LagrangeMultiplier(init=0.1, eta=100.0, tolerance=C, lam_max=10.0)
    assert m.update(1.0) == 10.0  # 0.1 + 100·0.9963 = 99.73 -> clipped at lam_max


def test_dual_ascent_ema_hand_steps() -> None:
    m = LagrangeMultiplier(init=0.1, eta=1.0, tolerance=C, ema=0.5)
    # first measurement initialises D_ema = 0.02: 0.1 + (0.02 - 0.0037) = 0.1163
    assert m.update(0.02) == pytest.approx(0.1163)
    # D_ema = 0.5·0.02 + 0.5·0 = 0.01: 0.1163 + (0.01 - 0.0037) = 0.1226
    assert m.update(0.0) == pytest.approx(0.1226)
    assert m.state_dict()["ema_value"] == pytest.approx(0.01)


# ----------------------------------------------------------------------------- properties


def test_rises_while_above_and_falls_to_lam_min_while_below() -> None:
    m = LagrangeMultiplier(init=0.1, eta=1.0, tolerance=C)
    previous = m.value
    for _ in range(50):  # D = 2c: +0.0037 per step
        assert m.update(2 * C) > previous
        previous = m.value
    assert m.value == pytest.approx(0.1 + 50 * C)
    for _ in range(200):  # D = c/2: -0.00185 per step until lam_min
        value = m.update(C / 2)
        assert value <= previous
        previous = value
    assert m.value == 0.0
    assert m.update(0.0) == 0.0  # stays at lam_min


@pytest.mark.parametrize("kind", ["dual_ascent", "pid", "auto"])
def test_never_leaves_bounds_under_random_measurements(kind: str) -> None:
    rng = random.Random(1234)
    for trial in range(20):
        lam_min = rng.uniform(0.0, 0.5)
        lam_max = lam_min + rng.uniform(0.0, 2.0)
        init = rng.uniform(lam_min, lam_max)
        eta = 10 ** rng.uniform(-2, 3)
        ema = rng.choice([None, 0.9])
        m: LagrangeMultiplier | PIDMultiplier | AutoTolerance
        if kind == "dual_ascent":
            m = LagrangeMultiplier(init, eta, C, lam_min, lam_max, ema)
        else:
            pid = PIDMultiplier(init, eta, eta, eta, C, lam_min, lam_max, ema)
            m = pid if kind == "pid" else AutoTolerance(pid, warmup_steps=5)
        for _ in range(300):
            # heavy-tailed, sometimes zero, sometimes far above c
            d = rng.choice([0.0, rng.expovariate(1 / C), rng.paretovariate(1.0) * C, 1e3])
            value = m.update(d)
            assert lam_min <= value <= lam_max, (trial, value)
            assert value == m.value


def make_all(kind: str) -> LagrangeMultiplier | PIDMultiplier | AutoTolerance:
    if kind == "dual_ascent":
        return LagrangeMultiplier(init=0.2, eta=5.0, tolerance=C, ema=0.7)
    if kind == "pid":
        return PIDMultiplier(init=0.2, kp=3.0, ki=2.0, kd=4.0, tolerance=C, ema=0.7)
    return AutoTolerance(
        PIDMultiplier(init=0.2, kp=3.0, ki=2.0, kd=4.0, ema=0.7), warmup_steps=6, quantile=0.7
    )


@pytest.mark.parametrize("kind", ["dual_ascent", "pid", "auto"])
@pytest.mark.parametrize("split", [3, 10])  # mid warm-up and after it
def test_state_dict_round_trip_continues_identically(kind: str, split: int) -> None:
    rng = random.Random(7)
    measurements = [rng.uniform(0.0, 3 * C) for _ in range(40)]
    uninterrupted = make_all(kind)
    for d in measurements[:split]:
        uninterrupted.update(d)
    saved = json.loads(json.dumps(uninterrupted.state_dict()))  # survives JSON exactly
    # resume into an object built with other settings: the checkpoint wins
    if kind == "dual_ascent":
        resumed: LagrangeMultiplier | PIDMultiplier | AutoTolerance = LagrangeMultiplier(init=1.0, eta=0.1)
    elif kind == "pid":
        resumed = PIDMultiplier(init=1.0, kp=0.0, ki=0.1, kd=0.0)
    else:
        resumed = AutoTolerance(PIDMultiplier(init=1.0), warmup_steps=2)
    resumed.load_state_dict(saved)
    assert resumed.state_dict() == uninterrupted.state_dict()
    for d in measurements[split:]:
        assert resumed.update(d) == uninterrupted.update(d)
    assert resumed.state_dict() == uninterrupted.state_dict()
    assert resumed.steps == 40


def test_state_dict_is_a_copy_and_checks_kind() -> None:
    m = LagrangeMultiplier()
    state = m.state_dict()
    m.update(1.0)
    assert state["value"] == 0.1 and state["steps"] == 0
    with pytest.raises(ValueError, match="kind 'pid'"):
        m.load_state_dict(PIDMultiplier().state_dict())
    bad = LagrangeMultiplier().state_dict()
    bad["value"] = 99.0
    with pytest.raises(ValueError, match="value"):
        m.load_state_dict(bad)


# ----------------------------------------------------------------------------- PID


def test_pid_hand_steps() -> None:
    m = PIDMultiplier(init=0.1, kp=2.0, ki=1.0, kd=3.0, tolerance=0.01)
    # D=0.03: e=0.02, I=0.02, no previous D -> 0.1 + 2·0.02 + 0.02 = 0.16
    assert m.update(0.03) == pytest.approx(0.16)
    # D=0.05: e=0.04, I=0.06, rise 0.02 -> 0.1 + 0.08 + 0.06 + 3·0.02 = 0.30
    assert m.update(0.05) == pytest.approx(0.30)
    # D=0.00: e=-0.01, I=0.05, a fall is not braked -> 0.1 - 0.02 + 0.05 = 0.13
    assert m.update(0.0) == pytest.approx(0.13)
    assert m.integral == pytest.approx(0.05)


def test_pid_without_p_and_d_is_dual_ascent() -> None:
    rng = random.Random(3)
    da = LagrangeMultiplier(init=0.1, eta=7.0, tolerance=C, lam_max=0.5, ema=0.8)
    pid = PIDMultiplier(init=0.1, kp=0.0, ki=7.0, kd=0.0, tolerance=C, lam_max=0.5, ema=0.8)
    for _ in range(200):
        d = rng.uniform(0.0, 4 * C)
        assert pid.update(d) == pytest.approx(da.update(d), abs=1e-12)


def test_pid_integral_anti_windup() -> None:
    m = PIDMultiplier(init=0.1, kp=0.0, ki=1.0, kd=0.0, tolerance=C, lam_max=1.0)
    for _ in range(1000):
        m.update(1.0)  # far above c for a long time
    assert m.value == 1.0
    assert m.integral == pytest.approx(0.9)  # clipped at lam_max - init, not ~996
    m.update(C - 0.5)  # one step well below c already brings lambda down
    assert m.value == pytest.approx(0.5)


def simulate(
    m: LagrangeMultiplier | PIDMultiplier, steps: int = 400, seed: int = 0
) -> tuple[list[float], list[float]]:
    """A policy whose discrepancy integrates the push it gets: each step the reward gradient
    raises D by g and the penalty lowers it by k·lambda (plus noise), so the equilibrium is
    lambda* = g/k with D = c. Dual ascent is integral control, and integral control of an
    integrating plant does not settle (the error dynamics have determinant 1): it oscillates."""
    rng = random.Random(seed)
    g, k = 0.0005, 0.005
    d = 0.006
    lams, errors = [], []
    for _ in range(steps):
        d = max(0.0, d + g - k * m.value + rng.gauss(0.0, 1e-5))
        lams.append(m.update(d))
        errors.append(d - C)
    return lams, errors


def total_variation(xs: list[float]) -> float:
    return sum(abs(a - b) for a, b in zip(xs[1:], xs[:-1]))


@pytest.mark.parametrize("eta", [10.0, 50.0])
def test_pid_oscillates_less_than_plain_ascent_at_large_eta(eta: float) -> None:
    da_lams, da_err = simulate(LagrangeMultiplier(init=0.1, eta=eta, tolerance=C))
    pid_lams, pid_err = simulate(PIDMultiplier(init=0.1, kp=10.0, ki=eta, kd=0.0, tolerance=C))
    tail = slice(200, None)  # after settling
    da_tv, pid_tv = total_variation(da_lams[tail]), total_variation(pid_lams[tail])
    da_amp = max(abs(e) for e in da_err[tail])
    pid_amp = max(abs(e) for e in pid_err[tail])
    assert da_amp > 5e-4  # plain ascent is still swinging D by more than c/8
    assert pid_tv < 0.2 * da_tv
    assert pid_amp < 0.2 * da_amp
    # and the PID holds D near c: the equilibrium is lambda* = g/k = 0.1
    assert abs(sum(pid_lams[tail]) / len(pid_lams[tail]) - 0.1) < 0.01


def test_pid_defaults_damp_paper_scale_loop() -> None:
    da_lams, _ = simulate(LagrangeMultiplier())  # eta = 1: slow, undamped swing
    pid_lams, _ = simulate(PIDMultiplier())
    assert total_variation(pid_lams[200:]) < 0.2 * total_variation(da_lams[200:])


# ----------------------------------------------------------------------------- AutoTolerance


def test_auto_tolerance_sets_c_from_first_k_measures() -> None:
    inner = LagrangeMultiplier(init=0.1, eta=1.0, tolerance=1.0)  # placeholder c
    m = AutoTolerance(inner, warmup_steps=5)
    warmup = [0.004, 0.002, 0.006, 0.010, 0.003]
    for i, d in enumerate(warmup):
        assert m.tolerance is None
        assert m.update(d) == 0.1  # lambda frozen during warm-up
        assert m.steps == i + 1
    assert m.tolerance == pytest.approx(0.004)  # median of the five
    assert inner.tolerance == m.tolerance
    assert inner.steps == 0  # the wrapped multiplier saw no warm-up measurement
    assert m.update(0.005) == pytest.approx(0.101)  # 0.1 + (0.005 - 0.004)
    assert m.collected == tuple(warmup)


@pytest.mark.parametrize(("q", "multiple"), [(0.0, 1.0), (0.75, 2.0), (0.9, 1.0), (1.0, 0.5), (0.33, 1.5)])
def test_auto_tolerance_quantile_matches_numpy(q: float, multiple: float) -> None:
    rng = random.Random(int(q * 100))
    warmup = [rng.uniform(0.001, 0.02) for _ in range(9)]
    m = AutoTolerance(PIDMultiplier(), warmup_steps=9, quantile=q, multiple=multiple)
    for d in warmup:
        m.update(d)
    assert m.tolerance == pytest.approx(float(np.quantile(warmup, q)) * multiple, rel=1e-12)
    # sorted: 0.002 0.003 0.004 0.006 0.010; q = 0.9 -> position 3.6 -> 0.006 + 0.6·0.004 = 0.0084
    hand = AutoTolerance(LagrangeMultiplier(), warmup_steps=5, quantile=0.9)
    for d in [0.004, 0.002, 0.006, 0.010, 0.003]:
        hand.update(d)
    assert hand.tolerance == pytest.approx(0.0084)


def test_auto_tolerance_floor_when_engines_agree() -> None:
    m = AutoTolerance(LagrangeMultiplier(), warmup_steps=3, min_tolerance=1e-6)
    for _ in range(3):
        m.update(0.0)
    assert m.tolerance == 1e-6
    for _ in range(100):
        m.update(0.0)
    assert m.value < 0.1  # constraint met: lambda decays


# ----------------------------------------------------------------------------- tolerance floor


@pytest.mark.parametrize("floor", [1.0, 1.5])
def test_tolerance_floor_raises_c_below_the_measured_gap(floor: float) -> None:
    """multiplier.tolerance_floor: a fixed c below floor x the warm-up median becomes that; lambda
    stays at init while the warm-up is measured, and the user's c is the tolerance meanwhile."""
    from dcmdp.algo.multiplier import MultiplierSettings, build_multiplier

    m = build_multiplier(MultiplierSettings(tolerance=1e-4, tolerance_floor=floor, reward_guard=0.0))
    warmup = [0.004, 0.002, 0.006, 0.010, 0.003]  # median 0.004
    for d in warmup:
        assert m.tolerance == 1e-4
        assert m.update(d) == 0.1
    assert m.tolerance == pytest.approx(0.004 * floor)
    assert m.update(0.005) == pytest.approx(0.1 + 0.005 - 0.004 * floor)


def test_tolerance_floor_keeps_a_c_above_the_measured_gap() -> None:
    from dcmdp.algo.multiplier import MultiplierSettings, build_multiplier

    m = build_multiplier(MultiplierSettings(tolerance=0.05, tolerance_floor=1.0, reward_guard=0.0))
    for d in [0.004, 0.002, 0.006, 0.010, 0.003]:
        m.update(d)
    assert m.tolerance == 0.05
    assert m.update(0.01) == pytest.approx(0.1 - 0.04)


def test_tolerance_floor_off_or_automatic_c_builds_what_it_did() -> None:
    from dcmdp.algo.multiplier import MultiplierSettings, build_multiplier

    off = build_multiplier(MultiplierSettings(tolerance_floor=0.0, reward_guard=0.0))
    assert isinstance(off, LagrangeMultiplier) and off.tolerance == C
    auto = build_multiplier(MultiplierSettings(tolerance=None, tolerance_floor=3.0, reward_guard=0.0))
    assert isinstance(auto, AutoTolerance) and auto.at_least is None  # the floor is ignored
    for d in [0.004, 0.002, 0.006, 0.010, 0.003]:
        auto.update(d)
    assert auto.tolerance == pytest.approx(0.004)  # auto_multiple 1, not the floor's 3
    with pytest.raises(ValueError, match="tolerance_floor"):
        build_multiplier(MultiplierSettings(tolerance_floor=-1.0))


def test_tolerance_floor_round_trips_and_reads_checkpoints_from_before_it() -> None:
    rng = random.Random(3)
    measurements = [rng.uniform(0.0, 0.01) for _ in range(12)]
    first = AutoTolerance(LagrangeMultiplier(tolerance=1e-4), warmup_steps=4, at_least=1e-4)
    for d in measurements[:6]:
        first.update(d)
    saved = json.loads(json.dumps(first.state_dict()))
    resumed = AutoTolerance(LagrangeMultiplier(), warmup_steps=4)  # the checkpoint's settings win
    resumed.load_state_dict(saved)
    assert resumed.at_least == 1e-4 and resumed.state_dict() == first.state_dict()
    for d in measurements[6:]:
        assert resumed.update(d) == first.update(d)
    older = AutoTolerance(LagrangeMultiplier(), warmup_steps=4).state_dict()
    assert "at_least" not in older  # an automatic c saves what it saved before the floor existed
    back = AutoTolerance(LagrangeMultiplier(), warmup_steps=4, at_least=1e-4)
    back.load_state_dict(older)
    assert back.at_least is None and back.tolerance is None
    bad = dict(saved, at_least=-1.0)
    with pytest.raises(ValueError, match="at_least"):
        resumed.load_state_dict(bad)
    fixed = LagrangeMultiplier(tolerance=1e-4).state_dict()  # a fixed-c run, resumed with the floor on
    floored = AutoTolerance(LagrangeMultiplier(), warmup_steps=4, at_least=1e-4)
    with pytest.raises(ValueError, match="tolerance_floor=0"):
        floored.load_state_dict(fixed)


# ----------------------------------------------------------------------------- factory and bad input


def test_make_multiplier() -> None:
    assert isinstance(make_multiplier("dual_ascent", eta=2.0), LagrangeMultiplier)
    pid = make_multiplier("pid", kp=1.0, ki=0.5, kd=0.1)
    assert isinstance(pid, PIDMultiplier) and pid.state_dict()["kd"] == 0.1
    with pytest.raises(ValueError, match=r"unknown multiplier kind 'pi'.*dual_ascent, pid"):
        make_multiplier("pi")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['kp'\]"):
        make_multiplier("dual_ascent", kp=1.0)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"eta": 0.0}, "eta must be > 0"),
        ({"eta": -1.0}, "eta must be > 0"),
        ({"eta": float("nan")}, "eta must be finite"),
        ({"tolerance": 0.0}, "tolerance must be > 0"),
        ({"tolerance": -0.01}, "tolerance must be > 0"),
        ({"tolerance": float("inf")}, "tolerance must be finite"),
        ({"lam_min": -0.1}, "lam_min must be >= 0"),
        ({"lam_min": 1.0, "lam_max": 0.5, "init": 0.7}, "lam_max (0.5) must be >= lam_min"),
        ({"init": 11.0}, "init (11.0) must lie within"),
        ({"init": 0.05, "lam_min": 0.1}, "init (0.05) must lie within"),
        ({"ema": 0.0}, "ema (decay beta) must be in (0, 1)"),
        ({"ema": 1.0}, "ema (decay beta) must be in (0, 1)"),
    ],
)
def test_dual_ascent_bad_config_raises(kwargs: dict[str, float], needle: str) -> None:
    with pytest.raises(ValueError) as info:
        LagrangeMultiplier(**kwargs)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"kp": -1.0}, "kp must be >= 0"),
        ({"ki": -1.0}, "ki must be >= 0"),
        ({"kd": float("nan")}, "kd must be finite"),
        ({"kp": 0.0, "ki": 0.0, "kd": 0.0}, "all 0"),
        ({"tolerance": 0.0}, "tolerance must be > 0"),
        ({"lam_max": -1.0}, "lam_max"),
    ],
)
def test_pid_bad_config_raises(kwargs: dict[str, float], needle: str) -> None:
    with pytest.raises(ValueError) as info:
        PIDMultiplier(**kwargs)
    assert needle in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), "x"])
def test_bad_measurement_raises(bad: object) -> None:
    for m in (LagrangeMultiplier(), PIDMultiplier(), AutoTolerance(LagrangeMultiplier(), warmup_steps=2)):
        before = copy.deepcopy(m.state_dict())
        with pytest.raises(ValueError, match="measured"):
            m.update(bad)  # type: ignore[arg-type]
        assert m.state_dict() == before  # a rejected measurement changes nothing


def test_auto_tolerance_bad_config_raises() -> None:
    with pytest.raises(ValueError, match="warmup_steps"):
        AutoTolerance(LagrangeMultiplier(), warmup_steps=0)
    with pytest.raises(ValueError, match="quantile"):
        AutoTolerance(LagrangeMultiplier(), warmup_steps=3, quantile=1.5)
    with pytest.raises(ValueError, match="multiple must be > 0"):
        AutoTolerance(LagrangeMultiplier(), warmup_steps=3, multiple=0.0)


def test_tolerance_setter_validates() -> None:
    m = PIDMultiplier()
    with pytest.raises(ValueError, match="tolerance must be > 0"):
        m.tolerance = 0.0
    m.tolerance = 0.005
    assert m.tolerance == 0.005


@pytest.mark.parametrize(
    ("kind", "field", "bad", "needle"),
    [
        ("dual_ascent", "kp", float("nan"), "kp must be finite"),  # PID gains: ignored by dual ascent
        ("dual_ascent", "kd", float("inf"), "kd must be finite"),
        ("dual_ascent", "kp", -5.0, "kp must be >= 0"),
        ("dual_ascent", "ki", None, "ki must be a number"),
        ("dual_ascent", "kp", True, "kp must be a number"),
        ("pid", "eta", float("nan"), "eta must be finite"),  # eta: ignored by PID
        ("dual_ascent", "auto_quantile", float("nan"), "quantile must be finite"),  # ignored with a fixed c
        ("dual_ascent", "auto_quantile", 7.0, "quantile must be in [0, 1]"),
        ("dual_ascent", "auto_quantile", None, "auto_quantile must be a number"),
        ("dual_ascent", "auto_warmup_steps", 2.5, "warmup_steps must be an integer"),
        ("dual_ascent", "auto_multiple", "x", "auto_multiple must be a number"),
        ("pid", "reward_guard_relative", float("nan"), "reward_guard_relative must be finite"),
    ],
)
def test_build_multiplier_rejects_bad_numbers_in_fields_its_kind_ignores(
    kind: str, field: str, bad: object, needle: str
) -> None:
    from dcmdp.algo.multiplier import MultiplierSettings, build_multiplier

    with pytest.raises(ValueError) as info:
        build_multiplier(MultiplierSettings(type=kind, **{field: bad}))  # type: ignore[arg-type]
    assert needle in str(info.value)
    build_multiplier(MultiplierSettings(type=kind))  # the same kind with that field left alone builds
    for optional in ("tolerance", "ema", "reward_guard"):  # None where the field allows it
        build_multiplier(MultiplierSettings(type=kind, **{optional: None}))  # type: ignore[arg-type]
