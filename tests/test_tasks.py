"""Tasks: rewards on known problems, split disjointness, determinism, safe checkers, JSONL loading."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

from dcmdp.tasks import (
    TASKS,
    CountdownTask,
    JsonlTask,
    Problem,
    countdown_value,
    extract_final_answer,
    make_task,
    math_answers_equal,
    register_task,
)

WEIRD_COMPLETIONS = [
    "",
    "   ",
    "\x00\x01",
    "ünïcödé ✓ 𝔘",
    "9" * 5000,
    "1" * 100_000,
    "(" * 5000 + ")" * 5000,
    "__import__('os').system('echo hi')",
    "\\boxed{" * 300,
    "-" * 1000 + "1",
    "1/0",
    "1e999999",
    "<eos>",
]


# --------------------------------------------------------------------------- registry


def test_registry_names_and_errors() -> None:
    assert {"arithmetic", "countdown", "jsonl"} <= set(TASKS)
    with pytest.raises(ValueError, match=r"unknown task 'nope'.*arithmetic.*countdown.*jsonl"):
        make_task("nope")
    with pytest.raises(ValueError, match=r"no option\(s\) 'digts'.*valid options: ops, digits"):
        make_task("arithmetic", digts=2)
    with pytest.raises(ValueError, match="needs option"):
        make_task("jsonl")
    with pytest.raises(ValueError, match="ops"):
        make_task("arithmetic", ops="-")
    with pytest.raises(ValueError, match="digits"):
        make_task("arithmetic", digits=(3, 2))


def test_register_task_rejects_duplicates() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_task("arithmetic")(CountdownTask)


# --------------------------------------------------------------------------- arithmetic


def test_arithmetic_known_rewards() -> None:
    task = make_task("arithmetic", ops="+*", digits=2)
    add = Problem(prompt="37+85=", answer="122", id="arithmetic:37+85")
    mul = Problem(prompt="12*34=", answer="408", id="arithmetic:12*34")
    assert task.reward(add, "122") == 1.0
    assert task.reward(add, " 122\n") == 1.0
    assert task.reward(add, "122<eos>garbage") == 1.0  # decoded special tokens are cut
    assert task.reward(add, "123") == 0.0
    assert task.reward(add, "0122") == 0.0  # canonical form only
    assert task.reward(add, "1223") == 0.0
    assert task.reward(mul, "408") == 1.0
    assert task.demonstration(add) == "122"
    fmt = make_task("arithmetic", format_reward=0.1)
    assert fmt.reward(add, "123") == 0.1
    assert fmt.reward(add, "abc") == 0.0
    assert fmt.reward(add, "122") == 1.0


def test_arithmetic_problems_are_correct_and_formatted() -> None:
    task = make_task("arithmetic", ops="+*", digits=(1, 3))
    problems = task.problems("train", 300, seed=3)
    assert len({p.id for p in problems}) == 300
    ops_seen = set()
    for p in problems:
        text = p.prompt[:-1]
        assert p.prompt.endswith("=")
        op = "+" if "+" in text else "*"
        ops_seen.add(op)
        a, b = (int(x) for x in text.split(op))
        assert len(str(a)) <= 3 and len(str(b)) <= 3
        assert int(p.answer) == (a + b if op == "+" else a * b)
        assert task.reward(p, task.demonstration(p)) == 1.0
    assert ops_seen == {"+", "*"}


@pytest.mark.parametrize("options", [{"digits": 2}, {"digits": 1}, {"ops": "+*", "digits": (1, 3)}])
def test_arithmetic_splits_never_overlap(options: dict) -> None:
    task = make_task("arithmetic", **options)
    train = task.problems("train", 8_000, seed=0) + task.problems("train", 2_000, seed=1)
    evals = task.problems("eval", 3_000, seed=0) + task.problems("eval", 1_000, seed=1)

    def unordered(p: Problem) -> tuple[str, frozenset[str]]:
        op = "+" if "+" in p.prompt else "*"
        return op, frozenset(p.prompt[:-1].split(op))

    assert evals and train
    assert not {p.prompt for p in train} & {p.prompt for p in evals}
    # Stronger: a commuted eval problem (85+37 vs 37+85) never appears in training either.
    assert not {unordered(p) for p in train} & {unordered(p) for p in evals}


def test_arithmetic_two_digit_split_sizes() -> None:
    # 90*90 ordered 2-digit pairs; about 10% held out for eval, the rest for train.
    task = make_task("arithmetic", digits=2)
    n_eval = len(task.problems("eval", 5_000, seed=0))
    assert 400 < n_eval < 1_300
    assert len(task.problems("train", 500, seed=0)) == 500


def test_problems_deterministic_and_seed_dependent() -> None:
    for name in ("arithmetic", "countdown"):
        task = make_task(name)
        assert task.problems("train", 50, seed=7) == make_task(name).problems("train", 50, seed=7)
        assert task.problems("train", 50, seed=7) != task.problems("train", 50, seed=8)
        assert task.problems("eval", 20, seed=7) == task.problems("eval", 20, seed=7)


def test_bad_split_name() -> None:
    with pytest.raises(ValueError, match="split"):
        make_task("arithmetic").problems("test", 3, seed=0)


# --------------------------------------------------------------------------- countdown


def test_countdown_generated_problems_are_solvable() -> None:
    task = make_task("countdown", count=(2, 4), max_number=12)
    for split in ("train", "eval"):
        for p in task.problems(split, 200, seed=0):
            numbers, target = p.prompt[:-1].split("->")
            assert 2 <= len(numbers.split(",")) <= 4
            assert int(target) > 0
            assert task.reward(p, task.demonstration(p)) == 1.0


def test_countdown_known_rewards_and_rules() -> None:
    task = make_task("countdown")
    p = Problem(prompt="3,5,7->26:", answer="3*7+5", id="countdown:3,5,7->26")
    assert task.reward(p, "3*7+5") == 1.0
    assert task.reward(p, "5+7*3") == 1.0  # any correct solution counts
    assert task.reward(p, " (7*3)+5 ") == 1.0
    assert task.reward(p, "3*7+5<eos>") == 1.0
    assert task.reward(p, "3*7+3+2") == 0.0  # 3 reused, 2 not given
    assert task.reward(p, "7*3+5+0") == 0.0  # 0 is not a given number
    assert task.reward(p, "3*7") == 0.0  # use_all: 5 unused (and wrong value)
    assert task.reward(p, "3*7+5.0") == 0.0  # forbidden char
    assert task.reward(p, "3*7+5 # x") == 0.0
    assert task.reward(p, "3**7+5") == 0.0
    assert task.reward(p, "-3+7*5-6") == 0.0
    assert task.reward(p, "__import__('os')") == 0.0
    assert task.reward(p, "3*7+5=26") == 0.0
    for weird in WEIRD_COMPLETIONS:
        assert task.reward(p, weird) == 0.0
    q = Problem(prompt="6,3,9->11:", answer="6/3+9", id="x")
    assert task.reward(q, "6/3+9") == 1.0
    r = Problem(prompt="7,2,5->10:", answer="", id="x")
    assert task.reward(r, "5*2*7/7") == 0.0  # 7 reused
    assert task.reward(r, "7/2*5-7") == 0.0  # inexact division is not allowed


def test_countdown_use_all_false_and_format_reward() -> None:
    task = make_task("countdown", use_all=False, format_reward=0.1)
    p = Problem(prompt="3,5,7->21:", answer="3*7", id="x")
    assert task.reward(p, "3*7") == 1.0  # 5 may stay unused
    assert task.reward(p, "3*5") == 0.1  # valid but wrong value
    assert task.reward(p, "3*3*7") == 0.0  # reuse is still an error


@pytest.mark.parametrize("task", ["arithmetic", "countdown", "long_addition"])
@pytest.mark.parametrize("value", ["nan", float("nan"), float("inf"), -0.1, 1.0, "lots"])
def test_a_format_reward_outside_zero_to_one_is_refused(task: str, value: object) -> None:
    # a config passes task options through untyped: "nan" reached the reward as a NaN
    with pytest.raises(ValueError, match="format_reward must be"):
        make_task(task, format_reward=value)
    assert make_task(task, format_reward="0.25").format_reward == 0.25  # type: ignore[attr-defined]


def test_countdown_value_is_exact() -> None:
    assert countdown_value("8/4*3", [8, 4, 3]) == Fraction(6)
    assert countdown_value("8/(4*3)", [8, 4, 3]) is None
    assert countdown_value("3-8", [3, 8]) == Fraction(-5)
    assert countdown_value("4/(2-2)", [4, 2, 2]) is None
    assert countdown_value("(1+2)*3", [1, 2, 3], ops="+") is None


# --------------------------------------------------------------------------- math answers


@pytest.mark.parametrize(
    ("pred", "gold", "equal"),
    [
        ("42", "42", True),
        ("The answer is 42.", "42", True),
        ("the answer is: 42 apples", "42", True),
        ("so x = 17", "17", True),
        ("Step 1: 2+3=5. Step 2: 5*4=20", "20", True),
        ("reasoning...\n#### 1,234", "1234", True),
        ("#### 1,234", "1,234", True),
        ("We get \\boxed{\\frac{1}{2}}.", "0.5", True),
        ("\\boxed{0.5}", "1/2", True),
        ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", True),
        ("\\boxed{\\frac12}", "0.5", True),
        ("\\boxed{-\\frac{3}{4}}", "-0.75", True),
        ("\\boxed{\\frac{6}{8}}", "3/4", True),
        ("$\\boxed{12}$ but later 13", "12", True),
        ("first \\boxed{3} then \\boxed{4}", "4", True),
        ("\\boxed{\\text{(B)}}", "(B)", True),
        ("\\boxed{x^{2}+1}", "x^{2} + 1", True),
        ("answer is $+7$", "7", True),
        ("The answer is 50%", "50", True),
        ("The answer is 50\\%", "50%", True),
        ("it costs $1,000,000.", "1000000", True),
        ("1.50", "1.5", True),
        ("0.333", "1/3", False),
        ("The answer is 41", "42", False),
        ("no number here", "42", False),
        ("", "42", False),
        ("42", "", False),
        ("I think 3 and 7", "7", True),
        ("9" * 5000, "9", False),
        ("1/0", "1", False),
        ("ünïcödé ✓", "42", False),
        ("the answer is 3.0", "3", True),
        ("The answer is 2/4", "\\frac{1}{2}", True),
        ("-5", "-5", True),
        ("-5", "5", False),
    ],
)
def test_math_answers_equal(pred: str, gold: str, equal: bool) -> None:
    assert math_answers_equal(pred, gold) is equal


def test_extract_final_answer() -> None:
    assert extract_final_answer("a \\boxed{x{y}z} b") == "x{y}z"
    assert extract_final_answer("#### 7") == "7"
    assert extract_final_answer("numbers 1 2 3") == "3"
    assert extract_final_answer("nothing") is None
    assert extract_final_answer("") is None


def test_math_answers_equal_never_raises() -> None:
    for weird in WEIRD_COMPLETIONS:
        for gold in ("42", "\\frac{1}{2}", "#### 9", "", weird):
            assert math_answers_equal(weird, gold) in (True, False)


# --------------------------------------------------------------------------- jsonl


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_skips_bad_rows_and_counts(tmp_path: Path) -> None:
    good = [json.dumps({"question": f"What is {i}+{i}?", "answer": str(2 * i)}) for i in range(60)]
    bad = [
        "",
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"question": "no answer"}),
        json.dumps({"answer": "3"}),
        json.dumps({"question": "q", "answer": ""}),
        json.dumps({"question": "q", "answer": None}),
        json.dumps({"question": "q", "answer": True}),
        good[0],  # exact duplicate
    ]
    path = _write_jsonl(tmp_path / "data.jsonl", good[:30] + bad + good[30:])
    task = make_task("jsonl", path=str(path))
    assert isinstance(task, JsonlTask)
    counts = task.skipped_counts
    assert sum(counts.values()) == len(bad) == len(task.skipped_rows)
    assert counts["missing field 'answer'"] == 1
    assert counts["missing field 'question'"] == 1
    assert counts["invalid JSON"] == 1
    assert counts["not a JSON object"] == 1
    assert counts["duplicate row"] == 1
    assert counts["blank line"] == 1
    assert counts["field 'answer' is empty"] == 1
    assert counts["field 'answer' is not a string or number"] == 2
    assert [r.line for r in task.skipped_rows][:2] == [31, 32]
    assert task.split_size("train") + task.split_size("eval") == 60
    train = task.problems("train", 1000, seed=0)
    evals = task.problems("eval", 1000, seed=0)
    assert len(train) + len(evals) == 60 and evals  # ~10% held out; all rows somewhere
    assert not {p.id for p in train} & {p.id for p in evals}
    assert task.problems("train", 5, seed=1) == task.problems("train", 5, seed=1)
    p = train[0]
    assert p.prompt.startswith("What is ") and p.prompt.endswith("\nAnswer: ")
    assert task.reward(p, task.demonstration(p)) == 1.0
    assert task.reward(p, f"The answer is {int(p.answer) + 1}") == 0.0
    for weird in WEIRD_COMPLETIONS:
        assert task.reward(p, weird) == 0.0


def test_jsonl_custom_fields_numbers_and_gsm8k_style(tmp_path: Path) -> None:
    rows = [
        json.dumps({"problem": "Half of 1?", "solution": "1/2 of 1 is 0.5.\n#### 0.5"}),
        json.dumps({"problem": "Twice 21?", "solution": 42}),
        json.dumps({"question": "wrong fields", "answer": "1"}),
    ]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    task = make_task("jsonl", path=path, question_field="problem", answer_field="solution", eval_fraction=0.5)
    assert isinstance(task, JsonlTask)
    assert task.skipped_counts == {"missing field 'problem'": 1}
    problems = {
        p.prompt.split("\n")[0]: p
        for split in ("train", "eval")
        if task.split_size(split)
        for p in task.problems(split, 10, 0)
    }
    half, twice = problems["Half of 1?"], problems["Twice 21?"]
    assert task.reward(half, "\\boxed{\\frac{1}{2}}") == 1.0
    assert task.reward(half, task.demonstration(half)) == 1.0
    assert task.reward(twice, "The answer is 42.") == 1.0


def test_jsonl_nothing_left_is_an_error(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", ["{oops", json.dumps({"q": 1}), ""])
    with pytest.raises(ValueError, match=r"no usable rows.*invalid JSON: 1"):
        make_task("jsonl", path=path)
    with pytest.raises(ValueError, match="no file"):
        make_task("jsonl", path=tmp_path / "missing.jsonl")


def test_jsonl_duplicate_questions_share_a_split(tmp_path: Path) -> None:
    rows = [json.dumps({"question": f"Q{i % 40}", "answer": str(i)}) for i in range(400)]
    task = make_task("jsonl", path=_write_jsonl(tmp_path / "d.jsonl", rows), eval_fraction=0.3)
    train = {p.prompt for p in task.problems("train", 10_000, 0)}
    evals = {p.prompt for p in task.problems("eval", 10_000, 0)}
    assert train and evals and not train & evals


def test_arithmetic_shots_prefix_and_first_line_grading() -> None:
    task = make_task("arithmetic", digits=[1, 2], shots=2)
    plain = make_task("arithmetic", digits=[1, 2])
    problems = task.problems("eval", 20, seed=3)
    # Same problems as without shots, each behind the same two solved train problems.
    assert [p.id for p in problems] == [p.id for p in plain.problems("eval", 20, seed=3)]
    prefixes = {p.prompt.rsplit("\n", 1)[0] for p in problems}
    assert len(prefixes) == 1
    demos = prefixes.pop().split("\n")
    assert len(demos) == 2
    for line in demos:
        question, answer = line.split("=")
        a, b = question.split("+")
        assert int(a) + int(b) == int(answer)
        assert f"arithmetic:{question}" not in {p.id for p in plain.problems("eval", 10_000, seed=0)}
    p = problems[0]
    assert task.reward(p, p.answer + "\n3+4=7\n") == 1.0
    assert task.reward(p, " " + p.answer + " \n") == 1.0
    assert task.reward(p, "9" + p.answer) == 0.0
    assert plain.reward(p, p.answer + "\n3+4=7") == 0.0  # without shots the whole text counts
    with pytest.raises(ValueError, match="shots"):
        make_task("arithmetic", shots=-1)
