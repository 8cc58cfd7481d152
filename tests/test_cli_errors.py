"""Command-line mistakes end in one clear line on stderr and exit status 2, never a traceback,
and data problems are found before any model is loaded (issue 10, item 4)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dcmdp.cli import main
from dcmdp.config import ConfigError, build_task, load_config
from dcmdp.tasks import split_of


def one_line_error(capsys: pytest.CaptureFixture, *needles: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model, warm-starting one or starting an engine fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model was loaded or an engine started")

    monkeypatch.setattr("dcmdp.trainer.resolve_base_model", refuse)
    monkeypatch.setattr("dcmdp.trainer.load_model", refuse)
    monkeypatch.setattr("dcmdp.trainer.make_engine", refuse)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["task.name=nope"], ["task.name: 'nope' is not allowed", "arithmetic"]),
        (["task.options.digitz=3"], ["task.options", "'digitz'", "valid options"]),
        (["task.name=jsonl"], ["task.options", "needs option", "path"]),
        (["task.options.digits=[5, 2]"], ["task.options", "digits"]),
        (["loss.tis_cap=-1"], ["loss.tis_cap must be > 0"]),
        (["loss.icepop_low=6"], ["loss.icepop_low"]),
        (["loss.agg=constant"], ["loss.agg_constant must be > 0"]),
        (["optim.betas=[0.9,"], ["not valid YAML"]),
    ],
)
def test_train_config_mistakes(
    args: list[str], needles: list[str], capsys: pytest.CaptureFixture, tmp_path: Path, no_model: None
) -> None:
    out = tmp_path / "run"
    assert main(["train", *args, f"run.out_dir={out}", "engine.type=fake"]) == 2
    one_line_error(capsys, "config error:", *needles)
    assert not out.exists()


def test_task_name_is_checked_when_the_config_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"task\.name: 'nope' is not allowed"):
        load_config(overrides=["task.name=nope"])


def test_missing_or_broken_config_file(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    assert main(["train", "--config", str(missing)]) == 2
    one_line_error(capsys, "config error:", str(missing), "cannot read the config file")
    broken = tmp_path / "broken.yaml"
    broken.write_text("loss: {type: grpo\nrun: [\n")
    assert main(["train", "--config", str(broken)]) == 2
    one_line_error(capsys, "config error: not valid YAML")
    assert main(["train", "--config", str(tmp_path)]) == 2  # a directory
    one_line_error(capsys, "cannot read the config file")


def test_empty_section_in_config_file_takes_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("loss:\ntask:\n  options:\n")
    cfg = load_config(path, ["loss.type=grpo", "task.options.digits=3"])
    assert cfg.loss.type == "grpo" and cfg.task.options == {"digits": 3}


def test_model_path_that_does_not_exist(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "model.path=/nonexistent/model", "engine.type=fake", f"run.out_dir={out}"]
    assert main([*args, "run.tensorboard=false"]) == 2
    one_line_error(capsys, "config error: model.path:", "/nonexistent/model")
    assert not out.exists(), "a failed start leaves no run directory behind"


# ----------------------------------------------------------------------------- dcmdp eval


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["/nonexistent"], ["'/nonexistent' is neither a local Hugging Face model directory"]),
        (["tiny-qwen3", "--engine", "vlm"], ["--engine 'vlm' is unknown", "vllm"]),
        (["tiny-qwen3", "--dtype", "int8"], ["--dtype 'int8'"]),
        (["tiny-qwen3", "--task", "nope"], ["--task nope: unknown task"]),
        (["tiny-qwen3", "--task-option", "digits"], ["expected KEY=VALUE"]),
        (["tiny-qwen3", "--task-option", "digitz=3"], ["no option(s) 'digitz'"]),
        (["tiny-qwen3", "--problems", "0"], ["--problems must be >= 1"]),
    ],
)
def test_eval_mistakes(
    args: list[str], needles: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*a: Any, **k: Any) -> Any:
        raise AssertionError("an engine was started")

    monkeypatch.setattr("dcmdp.evaluate.make_engine", refuse)
    assert main(["eval", *args]) == 2
    one_line_error(capsys, "dcmdp eval:", *needles)


# ----------------------------------------------------------------------------- JSONL data


def _rows_all_in_train(n: int) -> list[dict[str, str]]:
    rows, i = [], 0
    while len(rows) < n:
        q = f"What is {i} + 1?"
        if split_of(q, 0.1) == "train":
            rows.append({"question": q, "answer": str(i + 1)})
        i += 1
    return rows


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_jsonl_empty_eval_split_is_found_before_any_model(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_model: None
) -> None:
    rows = [json.dumps(r) for r in _rows_all_in_train(3)]
    data = _write(
        tmp_path / "data.jsonl", [rows[0], "{oops", rows[1], '{"question": "x"}', "[1]", rows[2], "{"]
    )
    out = tmp_path / "run"
    args = ["task.name=jsonl", f"task.options.path={data}", "engine.type=fake", f"run.out_dir={out}"]
    assert main(["train", *args]) == 2
    line = one_line_error(
        capsys,
        "config error:",
        "the eval split of",
        "is empty",
        "3 usable row(s), 3 train / 0 eval",
        "skipped 4 row(s)",
        "invalid JSON: 2 (lines 2, 7)",
        "missing field 'answer': 1 (line 4)",
        "not a JSON object: 1 (line 5)",
    )
    assert "eval_fraction=0.1" in line
    assert not out.exists(), "nothing is written before the data is checked"


def test_jsonl_without_usable_rows(tmp_path: Path, capsys: pytest.CaptureFixture, no_model: None) -> None:
    data = _write(tmp_path / "data.jsonl", ["{oops", "", '{"question": "q", "answer": ""}'])
    assert (
        main(["train", "task.name=jsonl", f"task.options.path={data}", f"run.out_dir={tmp_path / 'r'}"]) == 2
    )
    one_line_error(
        capsys,
        "no usable rows",
        "invalid JSON: 1 (line 1)",
        "blank line: 1",
        "field 'answer' is empty: 1 (line 3)",
    )


def test_jsonl_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture, no_model: None) -> None:
    missing = tmp_path / "nope.jsonl"
    assert (
        main(["train", "task.name=jsonl", f"task.options.path={missing}", f"run.out_dir={tmp_path / 'r'}"])
        == 2
    )
    one_line_error(capsys, "config error: task.options: jsonl task: no file at")


def test_build_task_accepts_a_good_file(tmp_path: Path) -> None:
    rows = [json.dumps({"question": f"Q{i}?", "answer": str(i)}) for i in range(200)]
    data = _write(tmp_path / "ok.jsonl", rows)
    task = build_task(load_config(overrides=["task.name=jsonl", f"task.options.path={data}"]))
    assert task.problems("eval", 5, seed=0)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["sampling.top_k=-1"], ["sampling.top_k"]),
        (["optim.betas=[0.9,2]"], ["optim.betas"]),
        (["optim.weight_decay=-1"], ["optim.weight_decay"]),
        (["multiplier.ema=2"], ["multiplier.ema"]),
        (["multiplier.tolerance=null", "multiplier.auto_quantile=5"], ["multiplier.auto_quantile"]),
        (["multiplier.tolerance=null", "multiplier.auto_warmup_steps=0"], ["multiplier.auto_warmup_steps"]),
        (["run.eval_problems=0"], ["run.eval_problems"]),
        (["engine.max_model_len=4"], ["engine.max_model_len"]),
        (["engine.kv_cache_gb=-1"], ["engine.kv_cache_gb"]),
        (["engine.type=transformers", "engine.quantization=int2"], ["engine.quantization", "int4"]),
        (["engine.type=llamacpp", "engine.quantization=Q2_K"], ["engine.quantization", "Q4_0"]),
        # NaN, even in a field the run does not read (the PID gains of a dual-ascent run): saved,
        # it would never equal itself and the run could not be resumed
        (["multiplier.kp=nan"], ["multiplier.kp: must be a number, got nan"]),
        (["multiplier.type=pid", "multiplier.kd=.nan"], ["multiplier.kd: must be a number"]),
        (["multiplier.init=nan"], ["multiplier.init: must be a number"]),
        (["optim.betas=[0.9, .NaN]"], ["optim.betas[1]: must be a number"]),
        (["loss.clip_low=nan"], ["loss.clip_low: must be a number"]),
        # infinite or negative PID gains in a dual-ascent run: checked as if the run read them
        (["multiplier.kp=.inf"], ["multiplier: kp must be finite"]),
        (["multiplier.kd=-1"], ["multiplier: kd must be >= 0"]),
        # null for a setting that cannot be null: was a TypeError traceback
        (["multiplier.kp=null"], ["multiplier.kp: expected float, got None"]),
        (["optim.lr=null"], ["optim.lr: expected float, got None"]),
    ],
)
def test_more_train_config_mistakes_fail_before_any_work(
    args: list[str], needles: list[str], capsys: pytest.CaptureFixture, tmp_path: Path, no_model: None
) -> None:
    out = tmp_path / "run"
    assert main(["train", "engine.type=fake", *args, f"run.out_dir={out}"]) == 2
    one_line_error(capsys, "config error:", *needles)
    assert not out.exists()


def test_other_commands_mistakes(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert main(["report", str(tmp_path / "nothing")]) == 2
    one_line_error(capsys, "dcmdp report", "metrics.jsonl")
    assert not (tmp_path / "nothing").exists()
    assert main(["pretrain", "--task", "nope"]) == 2
    one_line_error(capsys, "dcmdp pretrain", "unknown task")
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe\x00")
    assert main(["train", "--config", str(bad)]) == 2
    one_line_error(capsys, "not UTF-8")
    assert main(["train", "engine.type=fake", "run.out_dir=/dev/null/x", "model.path=nowhere"]) == 2
    one_line_error(capsys, "config error:")
