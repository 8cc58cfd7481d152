"""`dcmdp eval` reports the accuracy an independent count gives (issue 11, item 6a).

No other test reads an accuracy value: a regression that counts every answer as correct (or a
reward error, or a partial format reward, as correct) passed the whole suite. Here the expected
count is known in advance (a task whose reward depends only on the problem) or computed by this
file (its own greedy decode of a tiny model, scored with the task's reward).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dcmdp.cli import main
from dcmdp.engines.base import EngineSpec, SamplingSettings, make_engine
from dcmdp.models import load_model, load_tokenizer
from dcmdp.tasks import TASKS, Problem, make_task, register_task

# Problem i of the oracle task scores ORACLE_REWARDS[i % 8] whatever the completion says:
# 1.0 correct, 0.5 a partial (format) reward, "raise" a reward error (counts as wrong), 0.0 wrong.
ORACLE_REWARDS: list[float | str] = [1.0, 0.0, 0.5, 1.0, "raise", 0.0, 1.0, 0.0]


class OracleTask:
    """A task whose reward depends only on the problem: the correct count is known in advance."""

    name = "mutation_oracle"

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        return [Problem(f"{i}+{seed % 7}=", str(i), f"{split}-{i}") for i in range(n)]

    def reward(self, problem: Problem, completion_text: str) -> float:
        value = ORACLE_REWARDS[int(problem.answer) % len(ORACLE_REWARDS)]
        if value == "raise":
            raise RuntimeError("reward checker crashed")
        return float(value)

    def demonstration(self, problem: Problem) -> str:
        return problem.answer


class HasLowercaseTask:
    """Reward 1 when the completion holds a lowercase letter: a random tiny model's greedy
    completions get 15 of 24 right (some, not all, as a useful check needs)."""

    name = "mutation_has_lowercase"

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        g = torch.Generator().manual_seed(seed)
        nums = torch.randint(10, 99, (n, 2), generator=g).tolist()
        return [Problem(f"{a}+{b}=", "a", f"{split}-{i}") for i, (a, b) in enumerate(nums)]

    def reward(self, problem: Problem, completion_text: str) -> float:
        return 1.0 if any(ch.islower() for ch in completion_text) else 0.0

    def demonstration(self, problem: Problem) -> str:
        return "a"


for _task in (OracleTask, HasLowercaseTask):
    if _task.name not in TASKS:
        register_task(_task.name)(_task)


def run_eval(capsys: pytest.CaptureFixture, *argv: str) -> dict[str, float]:
    capsys.readouterr()  # drop anything printed before
    assert main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_counts_only_correct_answers(tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    n = 12  # problems 0..11: rewards 1,0,.5,1,raise,0,1,0, 1,0,.5,1 -> 5 correct
    expected = sum(ORACLE_REWARDS[i % 8] == 1.0 for i in range(n)) / n
    assert expected == pytest.approx(5 / 12)
    out = run_eval(
        capsys,
        str(tiny_model_dir),
        "--engine",
        "fake",
        "--dtype",
        "float32",
        "--task",
        "mutation_oracle",
        "--problems",
        str(n),
        "--max-tokens",
        "2",
    )
    assert out["eval/problems"] == n
    assert out["eval/accuracy_greedy"] == pytest.approx(expected, abs=1e-12)
    assert out["eval/accuracy_sampled"] == pytest.approx(expected, abs=1e-12)
    assert out["eval/dropped_greedy"] == 0


def _own_greedy(model: torch.nn.Module, prompt: list[int], max_tokens: int, eos: int) -> list[int]:
    """Argmax decoding with a full forward per token (no cache, no engine)."""
    ids: list[int] = list(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            tok = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            out.append(tok)
            ids.append(tok)
            if tok == eos:
                break
    return out


def test_eval_accuracy_matches_an_independent_count(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """Transformers engine at float32: greedy accuracy equals this file's own greedy count, and the
    sampled accuracy equals a count over the same engine's samples (same seed) scored here."""
    n, max_tokens, seed = 24, 6, 10_000
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir).eval()
    task = make_task("mutation_has_lowercase")
    problems = task.problems("eval", n, seed=seed)
    prompts = [tokenizer.encode(p.prompt, add_special_tokens=False) for p in problems]
    eos = tokenizer.eos_token_id
    greedy_correct = 0
    for problem, prompt in zip(problems, prompts, strict=True):
        text = tokenizer.decode(_own_greedy(model, prompt, max_tokens, eos), skip_special_tokens=True)
        greedy_correct += task.reward(problem, text) == 1.0
    engine = make_engine(EngineSpec(type="transformers", model=str(tiny_model_dir), dtype="float32"))
    try:
        sampled = engine.generate(prompts, SamplingSettings(1.0, 1.0, 0, max_tokens, (eos,)), n=1, seed=seed)
    finally:
        engine.close()
    sampled_correct = sum(
        task.reward(problems[c.prompt_index], tokenizer.decode(c.token_ids, skip_special_tokens=True)) == 1.0
        for c in sampled.completions
    )
    print(f"independent counts: greedy {greedy_correct}/{n}, sampled {sampled_correct}/{n}")
    # a useful check needs some right and some wrong answers
    assert 0 < greedy_correct < n and 0 < sampled_correct < n

    out = run_eval(
        capsys,
        str(tiny_model_dir),
        "--engine",
        "transformers",
        "--dtype",
        "float32",
        "--task",
        "mutation_has_lowercase",
        "--problems",
        str(n),
        "--max-tokens",
        str(max_tokens),
        "--seed",
        str(seed),
    )
    assert out["eval/accuracy_greedy"] == pytest.approx(greedy_correct / n, abs=1e-12)
    assert out["eval/accuracy_sampled"] == pytest.approx(sampled_correct / n, abs=1e-12)


def test_training_run_logs_the_counted_accuracy(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The trainer's own evaluation (step 0 and the last step) on the oracle task."""
    from dcmdp.checkpoint import read_metrics
    from dcmdp.config import load_config
    from dcmdp.trainer import train

    n = 12
    values = {
        "model.path": tiny_model_dir,
        "engine.type": "transformers",
        "engine.dtype": "float32",
        "task.name": "mutation_oracle",
        "run.steps": 1,
        "run.prompts_per_step": 2,
        "run.group_size": 2,
        "run.eval_problems": n,
        "run.eval_every": 1,
        "run.checkpoint_every": 0,
        "run.tensorboard": False,
        "run.out_dir": tmp_path / "run",
        "run.threads": 1,
        "sampling.max_tokens": 2,
    }
    summary = train(load_config(overrides=[f"{k}={v}" for k, v in values.items()]), log=lambda _m: None)
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 1]
    for row in evals:
        assert row["eval/accuracy_greedy"] == pytest.approx(5 / n, abs=1e-12)
        assert row["eval/accuracy_sampled"] == pytest.approx(5 / n, abs=1e-12)
    assert summary["accuracy_before"] == summary["accuracy_after"] == pytest.approx(5 / n, abs=1e-12)
