"""`dcmdp train --resume` takes the run's saved config.yaml as its base (issue 10, item 6).

Overrides apply on top and are printed; changes that would alter what the run trains are refused
(exit 2); a finished run says so and exits without loading a model or starting an engine."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from dcmdp.checkpoint import latest_checkpoint, read_metrics
from dcmdp.cli import main
from dcmdp.config import ConfigError, dump_config, load_config, load_resume_config


def tiny_run(model_dir: Path, out: Path, **extra: object) -> list[str]:
    values: dict[str, object] = {
        "model.path": str(model_dir),
        "engine.type": "fake",
        "engine.dtype": "float32",
        "loss.type": "grpo",
        "sampling.max_tokens": 3,
        "run.steps": 3,
        "run.prompts_per_step": 2,
        "run.group_size": 2,
        "run.eval_every": 0,
        "run.checkpoint_every": 1,
        "run.tensorboard": False,
        "run.threads": 1,
        "run.out_dir": str(out),
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def train_steps(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]


def saved(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((out / "config.yaml").read_text())
    return data


def last_err_line(capsys: pytest.CaptureFixture) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


@pytest.fixture
def losses_used(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the policy losses the trainer asks for; warm-starting the default model fails."""
    from dcmdp.config import LossConfig

    names: list[str] = []
    real = LossConfig.loss_fn

    def spy(self: LossConfig) -> Any:
        names.append(self.type)
        return real(self)

    def no_warm_start(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the resumed run fell back to the default model")

    monkeypatch.setattr(LossConfig, "loss_fn", spy)
    monkeypatch.setattr("dcmdp.pretrain.ensure_base_model", no_warm_start)
    return names


def test_resume_keeps_the_runs_loss_and_extends_it(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, losses_used: list[str]
) -> None:
    out = tmp_path / "grpo"
    assert main(["train", *tiny_run(tiny_model_dir, out)]) == 0
    assert train_steps(out) == [1, 2, 3] and set(losses_used) == {"grpo"}
    capsys.readouterr()
    losses_used.clear()
    # the run says what it started from: the model's weight fingerprint (no pretrain record here)
    from dcmdp.config import WARM_START_FILE
    from dcmdp.pretrain import weights_fingerprint

    started = json.loads((out / WARM_START_FILE).read_text())
    assert started["weights"] == weights_fingerprint(tiny_model_dir) and started["pretrain_accuracy"] is None
    assert started["model_path"] == str(tiny_model_dir)
    (out / WARM_START_FILE).write_text(json.dumps({**started, "weights": "kept"}))

    # The README's pattern: only the directory and the new length on the command line.
    assert main(["train", "--resume", f"run.out_dir={out}", "run.steps=5"]) == 0
    printed = capsys.readouterr().out
    assert "run.steps: 3 -> 5" in printed
    assert "loss.type" not in printed
    assert train_steps(out) == [1, 2, 3, 4, 5]
    assert set(losses_used) == {"grpo"}, "the resumed steps used another loss"
    cfg = saved(out)
    assert cfg["loss"]["type"] == "grpo" and cfg["run"]["steps"] == 5
    assert cfg["engine"]["type"] == "fake" and cfg["model"]["path"] == str(tiny_model_dir)
    assert latest_checkpoint(out) == out / "checkpoints" / "step_000005"
    # a resume from a checkpoint starts from the checkpoint, not the warm start: the file stays
    assert json.loads((out / WARM_START_FILE).read_text())["weights"] == "kept"


def _run_with_checkpoints(model_dir: Path, out: Path, **extra: object) -> tuple[str, Path]:
    """A finished 3-step run in ``out`` with a checkpoint each step: its config.yaml and newest checkpoint."""
    assert main(["train", *tiny_run(model_dir, out, **extra)]) == 0
    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    return (out / "config.yaml").read_text(), ckpt


def test_a_resume_whose_checkpoint_fails_to_load_leaves_the_config_as_it_was(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "grpo"
    before, ckpt = _run_with_checkpoints(tiny_model_dir, out)
    (ckpt / "trainer_state.pt").write_bytes(b"torn")
    capsys.readouterr()
    resume = ["train", "--resume", f"run.out_dir={out}", "run.steps=5", "run.rollout_timeout_s=99"]
    assert main(resume) == 2  # a clear error, not a traceback
    err = capsys.readouterr().err
    assert f"resume failed: checkpoint {ckpt} cannot be read (trainer_state.pt: " in err
    assert "continue from step_000002" in err
    assert (out / "config.yaml").read_text() == before
    assert train_steps(out) == [1, 2, 3]
    # the way out the message gives works: without the damaged folder the run resumes at step 2
    ckpt.rename(tmp_path / "damaged")
    assert main(resume) == 0
    assert train_steps(out) == [1, 2, 3, 4, 5]


def test_a_resume_from_damaged_weights_names_the_fallback(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "grpo"
    assert main(["train", *tiny_run(tiny_model_dir, out, **{"run.keep_checkpoints": 1})]) == 0
    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    assert main(["train", "--resume", f"run.out_dir={out}", "run.steps=5", "run.rollout_timeout_s=99"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {ckpt} cannot be read (model weights: " in err
    assert "continue from step 0 (no earlier checkpoint is kept)" in err
    assert train_steps(out) == [1, 2, 3]


def test_a_trainer_state_without_an_entry_is_refused(tmp_path: Path) -> None:
    import torch

    from dcmdp.checkpoint import CheckpointError, load_trainer_state

    ckpt = tmp_path / "checkpoints" / "step_000001"
    ckpt.mkdir(parents=True)
    torch.save({"step": 1, "optimizer": {}}, ckpt / "trainer_state.pt")
    with pytest.raises(CheckpointError, match="lacks scheduler, multiplier, generator, random"):
        load_trainer_state(ckpt)
    torch.save([1, 2], ckpt / "trainer_state.pt")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_trainer_state(ckpt)


def test_train_validates_a_config_changed_after_it_was_built(tmp_path: Path, no_model: None) -> None:
    # a NaN set on a built Config was saved as .nan, which the saved config then refused on resume
    from dcmdp import trainer

    cfg = load_config(overrides=[f"run.out_dir={tmp_path / 'r'}"])
    cfg.multiplier.kp = float("nan")
    with pytest.raises(ConfigError, match=r"multiplier\.kp: must be a number"):
        trainer.train(cfg, log=lambda _m: None)
    assert not (tmp_path / "r").exists()


def test_a_saved_config_that_no_longer_validates_says_to_edit_it(tmp_path: Path) -> None:
    run = tmp_path / "r"
    _save_run(run)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("kp: 10.0", "kp: .nan"))
    with pytest.raises(ConfigError, match=r"multiplier\.kp: must be a number, got nan \(edit that file"):
        load_resume_config(None, [f"run.out_dir={run}", "multiplier.kp=10"])


def test_resume_refuses_a_change_of_meaning(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "grpo"
    assert main(["train", *tiny_run(tiny_model_dir, out, **{"run.steps": 2})]) == 0
    before = (out / "config.yaml").read_text()
    capsys.readouterr()

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an engine was started")

    monkeypatch.setattr("dcmdp.trainer.make_engine", refuse)
    for override, needle in [
        ("loss.type=dcmdp", "loss.type: grpo -> dcmdp"),
        ("loss.clip_high=0.5", "loss.clip_high: 0.28 -> 0.5"),
        ("task.options.digits=3", "task.options: {} -> {digits: 3}"),
        ("engine.type=transformers", "engine.type: fake -> transformers"),
        ("model.dtype=bfloat16", "model.dtype: float32 -> bfloat16"),
        ("optim.lr=1.0", "optim.lr: 0.0001 -> 1.0"),
    ]:
        assert main(["train", "--resume", f"run.out_dir={out}", "run.steps=4", override]) == 2, override
        line = last_err_line(capsys)
        assert line.startswith("config error: --resume refuses to change what the run in ") and needle in line
        assert f"model.path={out}/checkpoints/step_000002 run.out_dir=NEW_DIR" in line
        assert "run.steps" not in line, "an allowed change is not listed as refused"
    assert (out / "config.yaml").read_text() == before
    assert train_steps(out) == [1, 2]


def test_resume_of_a_finished_run_starts_nothing(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "done"
    assert main(["train", *tiny_run(tiny_model_dir, out, **{"run.steps": 2})]) == 0
    before = (out / "config.yaml").read_text()
    capsys.readouterr()

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model was loaded or an engine started")

    for name in ("make_engine", "load_model", "load_tokenizer", "resolve_base_model"):
        monkeypatch.setattr(f"dcmdp.trainer.{name}", refuse)
    assert main(["train", "--resume", f"run.out_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert "already finished (step 2 of run.steps=2)" in printed
    assert (out / "config.yaml").read_text() == before
    # Asking for fewer steps than the run already took is a mistake, not a finished run.
    assert main(["train", "--resume", f"run.out_dir={out}", "run.steps=1"]) == 2
    assert "already at step 2" in last_err_line(capsys)


def test_resume_needs_a_saved_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--resume", f"run.out_dir={empty}"]) == 2
    assert "holds no config.yaml" in last_err_line(capsys)
    assert main(["train", "--resume", f"run.out_dir={tmp_path / 'nowhere'}"]) == 2
    assert "no such directory" in last_err_line(capsys)
    (empty / "config.yaml").write_text("loss: {type: ppo}\n")
    assert main(["train", "--resume", f"run.out_dir={empty}"]) == 2
    assert "config.yaml is not a valid config: loss.type: 'ppo'" in last_err_line(capsys)


# ----------------------------------------------------------------------------- config merging only


def _save_run(run_dir: Path, *overrides: str) -> None:
    run_dir.mkdir(parents=True)
    cfg = load_config(overrides=[*overrides, f"run.out_dir={run_dir}"])
    (run_dir / "config.yaml").write_text(dump_config(cfg))


def test_saved_config_is_the_base(tmp_path: Path) -> None:
    run = tmp_path / "r"
    _save_run(run, "loss.type=tis", "run.steps=30", "task.options.digits=3", "optim.betas=[0.8, 0.9]")
    cfg, changes = load_resume_config(None, [f"run.out_dir={run}"])
    assert (cfg.loss.type, cfg.run.steps, cfg.task.options, cfg.optim.betas) == (
        "tis",
        30,
        {"digits": 3},
        (0.8, 0.9),
    )
    assert changes == []
    # Repeating the original command line changes nothing.
    cfg, changes = load_resume_config(None, ["loss.type=tis", "task.options.digits=3", f"run.out_dir={run}"])
    assert changes == []


def test_a_run_saved_before_the_reward_guard_resumes_without_it(tmp_path: Path) -> None:
    from dcmdp.algo.guard import GuardedMultiplier
    from dcmdp.run_setup import multiplier_from_config

    run = tmp_path / "old"
    _save_run(run, "loss.type=dcmdp")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["multiplier"]["reward_guard"]  # as written before the field existed
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    cfg, changes = load_resume_config(None, [f"run.out_dir={run}"])
    assert cfg.multiplier.reward_guard == 0.0 and changes == []
    old_state = multiplier_from_config(cfg.multiplier, update_bound=False).state_dict()  # bound off too
    assert old_state["kind"] == "dual_ascent"  # what its checkpoint holds, so it loads
    # a run saved with the field keeps its value
    _save_run(tmp_path / "new", "loss.type=dcmdp", "multiplier.reward_guard=0.05")
    cfg, _ = load_resume_config(None, [f"run.out_dir={tmp_path / 'new'}"])
    assert cfg.multiplier.reward_guard == 0.05
    assert isinstance(multiplier_from_config(cfg.multiplier, update_bound=True), GuardedMultiplier)
    # today's default, null: the guard only where the update bound is off
    _save_run(tmp_path / "today", "loss.type=dcmdp")
    cfg, _ = load_resume_config(None, [f"run.out_dir={tmp_path / 'today'}"])
    assert cfg.multiplier.reward_guard is None
    assert isinstance(multiplier_from_config(cfg.multiplier, update_bound=False), GuardedMultiplier)
    assert multiplier_from_config(cfg.multiplier, update_bound=True).state_dict()["kind"] == "dual_ascent"
    # the relative knob asks for the guard, so a null margin is then 0.05 beside the bound too
    relative = dataclasses.replace(cfg.multiplier, reward_guard_relative=0.3)
    assert isinstance(multiplier_from_config(relative, update_bound=True), GuardedMultiplier)


def test_a_run_composed_with_seq_tis_before_the_refusal_resumes(tmp_path: Path) -> None:
    """seq_tis / opsm beside a constraint were allowed (cautioned) before the config refused them:
    a run saved then, without the field, resumes as it ran; one saved since keeps its permission."""
    allow = "loss.allow_failed_composition=true"
    for correction in ("seq_tis", "opsm"):
        run = tmp_path / f"old_{correction}"
        _save_run(run, "loss.type=dcmdp", f"loss.correction={correction}", allow)
        saved = yaml.safe_load((run / "config.yaml").read_text())
        del saved["loss"]["allow_failed_composition"]  # as written before the field existed
        (run / "config.yaml").write_text(yaml.safe_dump(saved))
        cfg, changes = load_resume_config(None, [f"run.out_dir={run}"])
        assert cfg.loss.composition() == (correction, "penalty", "prob_gap") and changes == []
        assert cfg.loss.allow_failed_composition
    # a permission, not a setting: a resume may add or drop it (the Python API compares a fresh
    # Config, whose field is False, with the saved True of a run written before the field)
    from dcmdp.config import check_resume, saved_run_config

    plain = tmp_path / "old_plain"
    _save_run(plain, "loss.type=dcmdp")
    saved = yaml.safe_load((plain / "config.yaml").read_text())
    del saved["loss"]["allow_failed_composition"]
    (plain / "config.yaml").write_text(yaml.safe_dump(saved))
    old = saved_run_config(plain)
    assert old.loss.allow_failed_composition
    fresh = load_config(overrides=["loss.type=dcmdp", f"run.out_dir={plain}"])
    assert "loss.allow_failed_composition" in [
        c.field for c in check_resume(old, fresh, plain)
    ]  # not refused
    # a new run must ask: refused without the field
    with pytest.raises(ConfigError, match=r"loss\.allow_failed_composition=true"):
        _save_run(tmp_path / "new", "loss.type=dcmdp", "loss.correction=seq_tis")


def test_a_run_that_named_long_addition_before_it_changed_may_name_the_cap_2000_model(
    tmp_path: Path,
) -> None:
    """ "long-addition" most likely meant today's "long-addition-cap2000" for a run saved before
    runs kept a warm_start.json: a resume may say so (experiments/run.py does), or keep the old
    name as it is; runs written since cannot change model.path."""
    from dcmdp.config import WARM_START_FILE

    old = tmp_path / "old"
    _save_run(old, "model.path=long-addition")
    cfg, changes = load_resume_config(None, [f"run.out_dir={old}"])
    assert cfg.model.path == "long-addition" and changes == []  # nothing changed silently
    cfg, changes = load_resume_config(None, [f"run.out_dir={old}", "model.path=long-addition-cap2000"])
    assert cfg.model.path == "long-addition-cap2000" and [c.field for c in changes] == ["model.path"]
    with pytest.raises(ConfigError, match=r"model\.path: long-addition -> tiny-qwen3"):  # only that name
        load_resume_config(None, [f"run.out_dir={old}", "model.path=tiny-qwen3"])
    new = tmp_path / "new"
    _save_run(new, "model.path=long-addition")
    (new / WARM_START_FILE).write_text(json.dumps({"weights": "x"}))
    with pytest.raises(ConfigError, match=r"model\.path: long-addition -> long-addition-cap2000"):
        load_resume_config(None, [f"run.out_dir={new}", "model.path=long-addition-cap2000"])


def test_default_run_dir_and_a_copied_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _save_run(tmp_path / "orig", "loss.type=grpo")
    (tmp_path / "runs").mkdir()
    (tmp_path / "orig").rename(tmp_path / "runs" / "default")  # a copy keeps its old run.out_dir
    cfg, changes = load_resume_config(None, [])
    assert cfg.loss.type == "grpo" and cfg.run.out_dir == "runs/default"
    assert [c.field for c in changes] == ["run.out_dir"]


def test_config_file_applies_as_overrides(tmp_path: Path) -> None:
    run = tmp_path / "r"
    _save_run(run, "loss.type=grpo", "run.steps=10")
    same = tmp_path / "same.yaml"
    same.write_text(f"loss: {{type: grpo}}\nrun: {{out_dir: {run}, steps: 20, eval_every: 5}}\n")
    cfg, changes = load_resume_config(same, ["run.eval_every=4"])
    assert [str(c) for c in changes] == ["run.steps: 10 -> 20", "run.eval_every: 10 -> 4"]
    assert cfg.loss.type == "grpo"
    other = tmp_path / "other.yaml"
    other.write_text(f"loss: {{type: tis}}\nrun: {{out_dir: {run}}}\n")
    with pytest.raises(ConfigError, match=r"--resume refuses to change .*: loss\.type: grpo -> tis\."):
        load_resume_config(other, [])


def test_resume_help_documents_the_rules(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "config.yaml is the base" in text and "--config FILE" in text and "run.steps" in text


def test_resume_of_a_finished_run_without_checkpoints_starts_nothing(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # experiments/run.py runs with run.checkpoint_every=0: resuming used to retrain from step 0
    out = tmp_path / "nock"
    assert main(["train", *tiny_run(tiny_model_dir, out, **{"run.steps": 2, "run.checkpoint_every": 0})]) == 0
    log_before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    monkeypatch.setattr("dcmdp.trainer.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["train", "--resume", f"run.out_dir={out}"]) == 0
    assert "already finished (step 2" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_text() == log_before


def test_resume_refuses_to_extend_a_cosine_schedule(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # the cosine decay is as long as the run: more steps would restart it from a higher rate
    out = tmp_path / "cos"
    assert (
        main(["train", *tiny_run(tiny_model_dir, out, **{"run.steps": 2, "optim.schedule": "cosine"})]) == 0
    )
    capsys.readouterr()
    assert main(["train", "--resume", f"run.out_dir={out}", "run.steps=4"]) == 2
    assert "run.steps" in last_err_line(capsys)
    assert train_steps(out) == [1, 2]


def test_resume_compares_the_resolved_update_bound_not_how_it_was_written(tmp_path: Path) -> None:
    # a composed loss saved with kappa null (a quarter): writing the quarter out is no change,
    # any other kappa is; a run saved at 0.5 keeps 0.5 and refuses null (which now means 0.25)
    composed = ["loss.type=dcmdp", "loss.correction=tis"]
    for saved_share, same, other in [("null", "0.25", "0.5"), ("0.5", "0.5", "null")]:
        out = tmp_path / f"run_{saved_share}"
        out.mkdir()
        cfg = load_config(None, [*composed, f"loss.constraint_share={saved_share}", f"run.out_dir={out}"])
        (out / "config.yaml").write_text(dump_config(cfg))
        resumed, _ = load_resume_config(None, [f"run.out_dir={out}", f"loss.constraint_share={same}"])
        assert resumed.loss.share() == cfg.loss.share()
        assert load_resume_config(None, [f"run.out_dir={out}"])[0].loss.share() == cfg.loss.share()
        with pytest.raises(ConfigError, match=r"loss\.constraint_share"):
            load_resume_config(None, [f"run.out_dir={out}", f"loss.constraint_share={other}"])


def _log_steps(run_dir: Path, *steps: int) -> None:
    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "kind": "train"}) + "\n" for s in steps)
    )


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dcmdp.trainer.load_model", lambda *a, **k: pytest.fail("a model was loaded"))


def test_python_resume_checks_the_saved_config_like_the_cli(tmp_path: Path, no_model: None) -> None:
    # trainer.train(cfg, resume=True) used to take the config it was given: resuming a composed run
    # saved at kappa 0.5 with a freshly loaded config continued at 0.25 and rewrote config.yaml
    from dcmdp import trainer

    composed = ["loss.type=dcmdp", "loss.correction=tis", "run.steps=4"]
    run = tmp_path / "r"
    _save_run(run, *composed, "loss.constraint_share=0.5")
    _log_steps(run, 1, 2, 3, 4)
    saved_text = (run / "config.yaml").read_text()
    fresh = load_config(overrides=[*composed, f"run.out_dir={run}"])
    assert fresh.loss.share() == 0.25
    with pytest.raises(ConfigError) as refused:
        trainer.train(fresh, resume=True, log=lambda _m: None)
    assert str(refused.value).startswith(f"train(resume=True) refuses to change what the run in {run} trains")
    assert "loss.constraint_share: 0.5 -> null" in str(refused.value)
    other = load_config(overrides=["loss.type=grpo", "run.steps=4", f"run.out_dir={run}"])
    with pytest.raises(ConfigError, match=r"loss\.type: dcmdp -> grpo"):
        trainer.train(other, resume=True, log=lambda _m: None)
    assert (run / "config.yaml").read_text() == saved_text
    # what may change on resume still may: the finished run says so and loads nothing
    same = load_config(
        overrides=[*composed, "loss.constraint_share=0.5", "run.eval_every=2", f"run.out_dir={run}"]
    )
    assert trainer.train(same, resume=True, log=lambda _m: None)["finished"] is True
    # a tuple and a list of the same values are one setting (a config built in Python may hold either)
    listed = dataclasses.replace(same, optim=dataclasses.replace(same.optim, betas=list(same.optim.betas)))
    assert trainer.train(listed, resume=True, log=lambda _m: None)["finished"] is True


def test_python_resume_refusal_is_one_line(tmp_path: Path, no_model: None) -> None:
    from dcmdp import trainer

    run = tmp_path / "r"
    _save_run(run, "loss.type=grpo", "run.steps=2", "engine.type=transformers")
    _log_steps(run, 1, 2)
    modules = "[" + ",".join(f"{part}.{i}" for part in ("attention", "mlp") for i in range(6)) + "]"
    long = load_config(
        overrides=[
            "loss.type=grpo",
            "run.steps=2",
            "engine.type=transformers",
            f"engine.fp32_modules={modules}",
            f"run.out_dir={run}",
        ]
    )
    with pytest.raises(ConfigError, match=r"engine\.fp32_modules") as refused:
        trainer.train(long, resume=True, log=lambda _m: None)
    assert len(str(refused.value).splitlines()) == 1, str(refused.value)
    lines = dataclasses.replace(long, model=dataclasses.replace(long.model, path="two\nlines"))
    with pytest.raises(ConfigError, match=r"model\.path") as refused:
        trainer.train(lines, resume=True, log=lambda _m: None)
    assert len(str(refused.value).splitlines()) == 1, str(refused.value)


@pytest.mark.parametrize("loss", ["grpo", "dcmdp"])
def test_python_resume_of_a_run_saved_before_the_bound(tmp_path: Path, no_model: None, loss: str) -> None:
    # a config.yaml written before the update bound and the reward guard existed lacks their
    # fields, which stood for "off" then: loaded with today's defaults it would resume another run
    # (for GRPO too: its checkpoint holds the multiplier's state, whose shape the guard changes)
    from dcmdp import trainer

    run = tmp_path / "old"
    _save_run(run, f"loss.type={loss}", "run.steps=2")
    data = yaml.safe_load((run / "config.yaml").read_text())
    for section, key in [
        ("loss", "constraint_share"),
        ("loss", "constraint_share_of"),
        ("multiplier", "reward_guard"),
        ("multiplier", "tolerance_floor"),
    ]:
        del data[section][key]
    (run / "config.yaml").write_text(yaml.safe_dump(data))
    _log_steps(run, 1, 2)
    with pytest.raises(ConfigError, match=r"multiplier\.reward_guard: 0\.0 -> null"):
        trainer.train(load_config(run / "config.yaml"), resume=True, log=lambda _m: None)
    # the CLI's base is the saved file with the old meanings filled in: nothing changes
    cfg, changes = load_resume_config(None, [f"run.out_dir={run}"])
    assert changes == [] and cfg.multiplier.reward_guard == 0.0
    assert trainer.train(cfg, resume=True, log=lambda _m: None)["finished"] is True


def test_resume_refuses_another_multiplier_for_a_loss_without_constraint(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # GRPO does not read lambda, but its checkpoint holds the multiplier's state: another kind of
    # multiplier would fail to load it after the model had loaded and config.yaml been rewritten
    from dcmdp import trainer

    out = tmp_path / "grpo"
    assert main(["train", *tiny_run(tiny_model_dir, out, **{"run.steps": 2})]) == 0
    before = (out / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", f"run.out_dir={out}", "run.steps=3", "multiplier.type=pid"]) == 2
    assert "multiplier.type: dual_ascent -> pid" in last_err_line(capsys)
    other = load_config(overrides=tiny_run(tiny_model_dir, out, **{"run.steps": 3, "multiplier.type": "pid"}))
    with pytest.raises(ConfigError, match=r"train\(resume=True\) refuses .*multiplier\.type"):
        trainer.train(other, resume=True, log=lambda _m: None)
    assert (out / "config.yaml").read_text() == before and train_steps(out) == [1, 2]


def test_cli_resume_of_a_copied_run_by_a_relative_path(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the saved run.out_dir names where the run first lived; a copy resumes where it is now
    import shutil

    first = tmp_path / "first"
    assert main(["train", *tiny_run(tiny_model_dir, first, **{"run.steps": 2})]) == 0
    shutil.copytree(first, tmp_path / "copy")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["train", "--resume", "run.out_dir=copy", "run.steps=3"]) == 0
    assert "run.steps: 2 -> 3" in capsys.readouterr().out
    assert train_steps(tmp_path / "copy") == [1, 2, 3] and train_steps(first) == [1, 2]
    assert saved(tmp_path / "copy")["run"]["out_dir"] == "copy"


def test_configuration_page_names_every_field_a_resume_may_change() -> None:
    import re

    from dcmdp.config import RESUME_CHANGEABLE

    page = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    paragraph = page[page.index("`dcmdp train --resume") : page.index("This page is generated")]
    named = re.findall(r"`([a-z_.*]+)`", paragraph)
    for field in RESUME_CHANGEABLE:
        assert any(field == n or (n.endswith("*") and field.startswith(n.rstrip("*"))) for n in named), (
            f"docs/configuration.md does not say that --resume may change {field}"
        )


def test_a_checkpoint_set_aside_inside_checkpoints_is_not_taken(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "grpo"
    assert main(["train", *tiny_run(tiny_model_dir, out)]) == 0
    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    ckpt.rename(ckpt.with_name(ckpt.name + ".bad"))  # was a raw ValueError from the name's int()
    assert latest_checkpoint(out) == out / "checkpoints" / "step_000002"
    ckpt.with_name(ckpt.name + ".bad").rename(ckpt.with_name(ckpt.name + "_bad"))  # was taken as step 3
    assert latest_checkpoint(out) == out / "checkpoints" / "step_000002"
    assert main(["train", "--resume", f"run.out_dir={out}", "run.steps=4", "run.rollout_timeout_s=99"]) == 0
    assert train_steps(out) == [1, 2, 3, 4]


def test_a_trainer_state_with_wrong_contents_or_nan_weights_is_refused(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path / "grpo"
    before, ckpt = _run_with_checkpoints(tiny_model_dir, out)
    resume = ["train", "--resume", f"run.out_dir={out}", "run.steps=5", "run.rollout_timeout_s=99"]
    state_file = ckpt / "trainer_state.pt"
    good = state_file.read_bytes()
    state = torch.load(state_file, weights_only=True)
    for key, bad in (("optimizer", {"x": 1}), ("random", {})):  # every entry there, one of them wrong
        torch.save({**state, key: bad}, state_file)
        capsys.readouterr()
        assert main(resume) == 2
        assert f"checkpoint {ckpt} cannot be read (trainer_state.pt: " in capsys.readouterr().err
        assert (out / "config.yaml").read_text() == before
    state_file.write_bytes(good)
    weights = load_file(ckpt / "model.safetensors")
    name = next(iter(weights))
    weights[name] = torch.full_like(weights[name], float("nan"))  # bytes garbled, the header intact
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert main(resume) == 2
    assert "holds a NaN or inf" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == before
    assert train_steps(out) == [1, 2, 3]


def test_an_error_that_says_nothing_about_the_checkpoint_passes_through(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from dcmdp import trainer

    def out_of_memory(*_a: Any, **_k: Any) -> Any:
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(trainer, "trainer_model", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):  # not "cannot be read ... delete that folder"
        trainer.checkpoint_model(tmp_path, "float32", "cpu")


def test_a_finished_run_whose_checkpoints_are_gone_is_not_called_finished(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "grpo"
    assert main(["train", *tiny_run(tiny_model_dir, out)]) == 0
    for ckpt in (out / "checkpoints").iterdir():
        ckpt.rename(tmp_path / ckpt.name)
    capsys.readouterr()
    assert main(["train", "--resume", f"run.out_dir={out}", "run.rollout_timeout_s=99"]) == 2
    assert "logged step 3 but its checkpoints folder holds no complete checkpoint" in capsys.readouterr().err
    assert train_steps(out) == [1, 2, 3]  # the log is kept


def test_a_run_saved_with_kappa_null_resumes_at_what_null_meant_then(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Runs saved before the resolved kappa was written out hold `constraint_share: null`, which
    # meant 0.5 for a constraint alone and 0.25 composed; a later default (here 0.25 alone, as for
    # about an hour of issue 13) must not change what they resume with.
    from dcmdp import config
    from dcmdp.config import COMPOSED_SHARE, SHARE_ALONE_BEFORE

    assert SHARE_ALONE_BEFORE == 0.5
    monkeypatch.setattr(config, "DEFAULT_SHARE", 0.25)
    assert load_config(None, ["loss.type=dcmdp"]).loss.share() == 0.25
    for name, loss, then in [
        ("alone", ["loss.type=dcmdp"], SHARE_ALONE_BEFORE),
        ("hinge", ["loss.type=dcmdp_hinge"], SHARE_ALONE_BEFORE),
        ("composed", ["loss.type=dcmdp", "loss.correction=tis"], COMPOSED_SHARE),
    ]:
        out = tmp_path / name
        _save_run(out, *loss)  # dump_config: null, as runs wrote it before
        assert yaml.safe_load((out / "config.yaml").read_text())["loss"]["constraint_share"] is None
        cfg, changes = load_resume_config(None, [f"run.out_dir={out}"])
        assert cfg.loss.share() == then and changes == []
        assert (
            load_resume_config(None, [f"run.out_dir={out}", f"loss.constraint_share={then}"])[0].loss.share()
            == then
        )
        if then != load_config(None, loss).loss.share():
            with pytest.raises(ConfigError, match=r"loss\.constraint_share: 0\.5 -> null"):
                load_resume_config(None, [f"run.out_dir={out}", "loss.constraint_share=null"])


def test_a_run_writes_its_resolved_kappa_so_a_later_default_cannot_change_it(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dcmdp import config

    out = tmp_path / "dcmdp"
    assert main(["train", *tiny_run(tiny_model_dir, out, **{"loss.type": "dcmdp", "run.steps": 2})]) == 0
    assert saved(out)["loss"]["constraint_share"] == config.DEFAULT_SHARE
    # resumed with null written out (today's default, the same kappa): the number stays in the file
    assert main(["train", "--resume", f"run.out_dir={out}", "run.steps=3", "loss.constraint_share=null"]) == 0
    assert saved(out)["loss"]["constraint_share"] == config.DEFAULT_SHARE
    # the default moves on; the run resumes with the kappa it trained with, and says nothing changed
    monkeypatch.setattr(config, "DEFAULT_SHARE", 0.1)
    cfg, changes = load_resume_config(None, [f"run.out_dir={out}", "run.steps=4"])
    assert cfg.loss.share() != 0.1 and cfg.loss.share() == saved(out)["loss"]["constraint_share"]
    assert [c.field for c in changes] == ["run.steps"]


def test_an_optimizer_state_under_another_kappa_is_a_config_error_not_a_bad_checkpoint(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # a config.yaml edited by hand (or lost) lets the check of the saved config pass; the
    # optimizer's own check then stops the resume, without calling the checkpoint unreadable
    from dcmdp import trainer

    out = tmp_path / "dcmdp"
    run = tiny_run(
        tiny_model_dir, out, **{"loss.type": "dcmdp", "loss.constraint_share": 0.25, "run.steps": 2}
    )
    assert main(["train", *run]) == 0
    data = saved(out)
    data["loss"]["constraint_share"] = 0.5
    data["run"]["steps"] = 3
    (out / "config.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"kappa=0\.25, and this one has kappa=0\.5") as err:
        trainer.train(load_config(out / "config.yaml"), resume=True, log=lambda _m: None)
    assert "move that folder" not in str(err.value)


def test_a_run_without_a_constraint_saved_with_null_resumes_with_null_written_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # kappa does nothing without a constraint: null read as the old 0.5 is no change for GRPO under
    # a default that differs (here 0.25); for DCMDP it is, and the refusal says which value to set
    from dcmdp import config

    monkeypatch.setattr(config, "DEFAULT_SHARE", 0.25)
    grpo, dcmdp = tmp_path / "grpo", tmp_path / "dcmdp"
    _save_run(grpo, "loss.type=grpo")
    _save_run(dcmdp, "loss.type=dcmdp")
    assert load_resume_config(None, [f"run.out_dir={grpo}", "loss.constraint_share=null"])[1] != []
    with pytest.raises(ConfigError, match=r"set loss\.constraint_share=0\.5 or leave it out"):
        load_resume_config(None, [f"run.out_dir={dcmdp}", "loss.constraint_share=null"])
