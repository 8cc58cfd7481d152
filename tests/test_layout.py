"""The package layout keeps its promises (issue 12): the old import paths still work, each knob
has one definition, checkpoints of earlier runs still load, and the numbers did not move.

The numbers below were recorded with the code before the move (commit 04e71db); the recorded
comparison of that move found every metric of 29 short runs bit-identical (see the issue 12
report). A CPU with other matmul kernels may differ in the last digits, hence ``rel=1e-5``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import dcmdp.trainer as trainer
from dcmdp.algo.losses import LossSettings
from dcmdp.algo.multiplier import (
    AutoTolerance,
    LagrangeMultiplier,
    MultiplierSettings,
    PIDMultiplier,
    build_multiplier,
)
from dcmdp.checkpoint import read_metrics
from dcmdp.config import Config, ConfigError, LossConfig, MultiplierConfig, load_config
from dcmdp.engines.fake import FakeEngine
from dcmdp.models import EOS, char_vocab, load_model

# ----------------------------------------------------------------------------- old import paths

MOVED = {
    "dcmdp.advantages": "dcmdp.algo.advantages",
    "dcmdp.aggregation": "dcmdp.algo.aggregation",
    "dcmdp.discrepancy": "dcmdp.algo.discrepancy",
    "dcmdp.losses": "dcmdp.algo.losses",
    "dcmdp.multiplier": "dcmdp.algo.multiplier",
    "dcmdp.logprobs": "dcmdp.rollout",
    "dcmdp.quantize": "dcmdp.engines.quantize",
    "dcmdp.gguf_export": "dcmdp.engines.gguf_export",
}


@pytest.mark.parametrize(("old", "new"), MOVED.items())
def test_old_paths_re_export_the_same_objects(old: str, new: str) -> None:
    if old == "dcmdp.gguf_export":
        pytest.importorskip("gguf")
    old_mod, new_mod = importlib.import_module(old), importlib.import_module(new)
    assert old_mod.__all__, old
    for name in old_mod.__all__:
        assert getattr(old_mod, name) is getattr(new_mod, name), f"{old}.{name}"


def test_tasks_package_keeps_its_names() -> None:
    import dcmdp.tasks as tasks

    for name in tasks.__all__:
        assert hasattr(tasks, name), name
    assert list(tasks.TASKS)[:3] == ["arithmetic", "countdown", "jsonl"]


# ----------------------------------------------------------------------------- one definition per knob


def test_every_loss_setting_but_lambda_and_c_is_a_config_field() -> None:
    settings = {f.name for f in dataclasses.fields(LossSettings)} - {"lam", "tolerance"}
    config = {f.name for f in dataclasses.fields(LossConfig)}
    assert settings <= config, (
        f"LossConfig lacks {sorted(settings - config)}: add it and map it in settings()"
    )
    assert LossConfig().settings() == LossSettings(), "LossConfig and LossSettings disagree on a default"


def test_multiplier_defaults_have_one_definition() -> None:
    from dcmdp.integrations import DCMDPOptions

    assert MultiplierConfig is MultiplierSettings
    assert Config().multiplier == MultiplierSettings()
    # The integrations differ in one field on purpose: they do not pass the training reward to the
    # multiplier, so the reward guard is off there.
    assert DCMDPOptions().multiplier_settings() == dataclasses.replace(MultiplierSettings(), reward_guard=0.0)
    dual = build_multiplier(MultiplierSettings(reward_guard=0.0))
    pid = build_multiplier(MultiplierSettings(type="pid", reward_guard=0.0))
    assert LagrangeMultiplier().state_dict() == dual.state_dict()
    assert PIDMultiplier().state_dict() == pid.state_dict()
    auto = build_multiplier(MultiplierSettings(tolerance=None, reward_guard=0.0))
    assert isinstance(auto, AutoTolerance)
    assert auto.state_dict()["warmup_steps"] == MultiplierSettings().auto_warmup_steps


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"lambda_init": 2.0}, "lambda_init (2.0) must lie within [lambda_min, lambda_max] = [0.0, 1.0]"),
        (
            {"lambda_min": 0.5, "lambda_max": 0.2, "lambda_init": 0.3},
            "lambda_max (0.2) must be >= lambda_min",
        ),
        ({"multiplier": "pid", "pid_kp": -1.0}, "pid_kp must be >= 0"),
    ],
)
def test_integration_options_are_refused_in_their_own_names(options: dict[str, Any], needle: str) -> None:
    from dcmdp.integrations import DCMDPOptions

    with pytest.raises(ValueError) as err:
        DCMDPOptions(**options)
    assert needle in str(err.value) and "dcmdp_" in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["multiplier.ema=2"], "ema"),
        (["multiplier.type=pid", "multiplier.kp=-1"], "kp must be >= 0"),
        (["multiplier.type=pid", "multiplier.kp=0", "multiplier.ki=0"], "all 0"),
        (["multiplier.tolerance=null", "multiplier.auto_warmup_steps=0"], "warmup_steps"),
    ],
)
def test_multiplier_options_are_checked_when_the_config_loads(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(overrides=overrides)


@pytest.mark.parametrize("bad", ["loss.tis_cap=-1", "multiplier.ema=2"])
def test_a_bad_knob_stops_train_before_any_model_is_loaded(
    bad: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from dcmdp.cli import main

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model was loaded or an engine started")

    for name in ("resolve_base_model", "load_model", "load_tokenizer", "make_engine"):
        monkeypatch.setattr(trainer, name, refuse)
    out = tmp_path / "run"
    assert main(["train", bad, f"run.out_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config error" in err[0] and bad.split("=")[0].split(".")[1] in err[0]
    assert not out.exists()


# ----------------------------------------------------------------------------- checkpoints of earlier runs

# state_dict() of each kind after 3 updates, and the next 3 values, from the code before the move
EARLIER_STATES: dict[str, dict[str, Any]] = {
    "dual_ascent": {
        "state": {
            "kind": "dual_ascent",
            "init": 0.2,
            "tolerance": 0.0037,
            "lam_min": 0.0,
            "lam_max": 10.0,
            "ema": 0.7,
            "value": 0.18695,
            "steps": 3,
            "ema_value": 0.0037900000000000004,
            "last_measured": 0.004,
            "eta": 5.0,
        },
        "next": [0.184715, 0.2076005, 0.21807035],
    },
    "pid": {
        "state": {
            "kind": "pid",
            "init": 0.2,
            "tolerance": 0.0037,
            "lam_min": 0.0,
            "lam_max": 10.0,
            "ema": 0.7,
            "value": 0.19541,
            "steps": 3,
            "ema_value": 0.0037900000000000004,
            "last_measured": 0.004,
            "kp": 3.0,
            "ki": 2.0,
            "kd": 4.0,
            "integral": -0.005219999999999999,
            "prev_used": 0.0037900000000000004,
        },
        "next": [0.192545, 0.23686790000000002, 0.21351005],
    },
    "auto_tolerance": {
        "state": {
            "kind": "auto_tolerance",
            "warmup_steps": 2,
            "quantile": 0.7,
            "multiple": 1.0,
            "min_tolerance": 1e-06,
            "collected": [0.001, 0.01],
            "tolerance": 0.0073,
            "steps": 3,
            "inner": {
                "kind": "pid",
                "init": 0.2,
                "tolerance": 0.0073,
                "lam_min": 0.0,
                "lam_max": 10.0,
                "ema": 0.7,
                "value": 0.18350000000000002,
                "steps": 1,
                "ema_value": 0.004,
                "last_measured": 0.004,
                "kp": 3.0,
                "ki": 2.0,
                "kd": 4.0,
                "integral": -0.0066,
                "prev_used": 0.004,
            },
        },
        "next": [0.17390000000000003, 0.21092, 0.18059000000000003],
    },
}


@pytest.mark.parametrize("kind", EARLIER_STATES)
def test_state_dicts_of_earlier_runs_resume_identically(kind: str) -> None:
    saved = json.loads(json.dumps(EARLIER_STATES[kind]["state"]))
    m: LagrangeMultiplier | PIDMultiplier | AutoTolerance
    if kind == "dual_ascent":
        m = LagrangeMultiplier()
    elif kind == "pid":
        m = PIDMultiplier()
    else:
        m = AutoTolerance(PIDMultiplier(), warmup_steps=5)
    m.load_state_dict(saved)
    assert m.state_dict() == saved
    assert [m.update(d) for d in (0.002, 0.02, 0.0)] == EARLIER_STATES[kind]["next"]


# ----------------------------------------------------------------------------- pinned numbers

PINNED_KEYS = (
    "reward/mean",
    "discrepancy/prob_gap_mean",
    "loss/total",
    "loss/policy",
    "dcmdp/prob_gap",
    "multiplier/lambda_next",
    "optim/grad_norm",
    "reward/degenerate_groups",
)
# Three steps of `dcmdp train` (DCMDP penalty, format reward 0.1) on the tiny random model with a
# fixed engine distribution (digits and EOS), so the samples do not depend on matmul kernels.
PINNED: list[dict[str, float]] = [
    {
        "reward/mean": 0.0625,
        "discrepancy/prob_gap_mean": 0.13532399564586844,
        "loss/total": -0.3378407657146454,
        "loss/policy": -0.4055027663707733,
        "dcmdp/prob_gap": 0.13532398641109467,
        "multiplier/lambda_next": 0.6316239956458685,
        "optim/grad_norm": 5.492227554321289,
        "reward/degenerate_groups": 0.0,
    },
    {
        "reward/mean": 0.05000000074505806,
        "discrepancy/prob_gap_mean": 0.14091316153671216,
        "loss/total": -0.4538421928882599,
        "loss/policy": -0.5428463220596313,
        "dcmdp/prob_gap": 0.14091317355632782,
        "multiplier/lambda_next": 0.7688371571825806,
        "optim/grad_norm": 5.79714298248291,
        "reward/degenerate_groups": 0.0,
    },
    {
        "reward/mean": 0.05000000074505806,
        "discrepancy/prob_gap_mean": 0.13191980331395112,
        "loss/total": -0.3476150333881378,
        "loss/policy": -0.44903987646102905,
        "dcmdp/prob_gap": 0.13191980123519897,
        "multiplier/lambda_next": 0.8970569604965317,
        "optim/grad_norm": 3.9783694744110107,
        "reward/degenerate_groups": 0.0,
    },
]


def test_a_short_run_gives_the_pinned_numbers(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vocab = char_vocab()
    vocab_size = load_model(tiny_model_dir).config.vocab_size
    probs_V = torch.zeros(vocab_size)
    for ch in "0123456789":
        probs_V[vocab[ch]] = 1.0
    probs_V[vocab[EOS]] = 4.0
    probs_V /= probs_V.sum()

    def make(spec):  # type: ignore[no-untyped-def]
        return FakeEngine(vocab_size=vocab_size, probs_V=probs_V, seed=spec.seed)

    monkeypatch.setattr(trainer, "make_engine", make)
    out = tmp_path / "run"
    overrides = [
        f"model.path={tiny_model_dir}",
        "engine.type=fake",
        "task.options.digits=1",
        "task.options.format_reward=0.1",
        "run.steps=3",
        "run.prompts_per_step=4",
        "run.group_size=4",
        "run.eval_every=0",
        "run.checkpoint_every=0",
        "run.tensorboard=false",
        f"run.out_dir={out}",
        "run.threads=1",
        "optim.lr=1e-3",
        "multiplier.init=0.5",
        "sampling.max_tokens=4",
        "loss.constraint_share=0",  # the numbers were pinned with plain AdamW
    ]
    trainer.train(load_config(overrides=overrides), log=lambda _m: None)
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    got = [{k: r[k] for k in PINNED_KEYS} for r in rows]
    assert len(got) == len(PINNED)
    for step, (row, pinned) in enumerate(zip(got, PINNED, strict=True), start=1):
        for key, value in pinned.items():
            assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-12), f"step {step} {key}"


# ----------------------------------------------------------------------------- the README's library snippet


def test_readme_library_snippet_runs_and_steps_on_d_before_the_update() -> None:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    after = text[text.index("The library is usable without the CLI") :]
    snippet = after[
        after.index("```python") + len("```python") : after.index("```", after.index("```python") + 9)
    ]
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 3, dtype=torch.bool)
    engine_logp = -torch.rand(2, 3, generator=g) - 0.1
    old_logp = engine_logp + 0.05 * torch.randn(2, 3, generator=g)
    # the policy being updated has moved away from pi_old (as after a first minibatch)
    logp = (old_logp + 0.1 * torch.randn(2, 3, generator=g)).requires_grad_(True)
    scope: dict[str, Any] = {
        "logp": logp,
        "old_logp": old_logp,
        "engine_logp": engine_logp,
        "adv": torch.randn(2, 3, generator=g),
        "mask": mask,
    }
    exec(snippet, scope)
    d_before = float((old_logp.double().exp() - engine_logp.double().exp()).abs().mean())
    expected = LagrangeMultiplier(init=0.1, eta=1.0, tolerance=0.0037)
    assert scope["lam"].value == expected.update(d_before)
    assert logp.grad is not None
