"""What a task is, the task registry, and the helpers the tasks share.

See :mod:`dcmdp.tasks` (the package) for the contract every task keeps; each task lives in its own
module beside this one, and answer grading for free-form math answers in ``grading``.
"""

from __future__ import annotations

import hashlib
import inspect
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

SPLITS = ("train", "eval")
# Completions are cut at the first EOS text in case the caller decoded special tokens.
EOS_TEXTS = ("<eos>", "<|endoftext|>", "<|im_end|>")


@dataclass(frozen=True)
class Problem:
    """One problem: the prompt given to the model, the reference answer, and a stable id."""

    prompt: str
    answer: str
    id: str


class Task(Protocol):
    """What the trainer and the warm start need from a task."""

    name: str

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]: ...

    def reward(self, problem: Problem, completion_text: str) -> float: ...

    def demonstration(self, problem: Problem) -> str: ...


# ---------------------------------------------------------------------------------------------
# Registry

TaskT = TypeVar("TaskT", bound=Callable[..., Any])
TASKS: dict[str, Callable[..., Task]] = {}


def register_task(name: str) -> Callable[[TaskT], TaskT]:
    """Class decorator: register a task factory under ``name`` (its keyword arguments are options)."""

    def deco(factory: TaskT) -> TaskT:
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered")
        TASKS[name] = factory
        return factory

    return deco


def task_options(name: str) -> dict[str, Any]:
    """Option name -> default (``inspect.Parameter.empty`` when required) of a registered task."""
    factory = _factory(name)
    params = inspect.signature(factory).parameters
    return {k: p.default for k, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}


def make_task(name: str, **options: Any) -> Task:
    """Build a registered task. Unknown names and options raise ``ValueError`` naming the valid ones."""
    valid = task_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"task {name!r} has no option(s) {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(valid) or '(none)'}"
        )
    missing = [k for k, d in valid.items() if d is inspect.Parameter.empty and k not in options]
    if missing:
        raise ValueError(f"task {name!r} needs option(s) {', '.join(map(repr, missing))}")
    return _factory(name)(**options)


def _factory(name: str) -> Callable[..., Task]:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


# ---------------------------------------------------------------------------------------------
# Shared helpers


def split_of(key: str, eval_fraction: float) -> str:
    """'eval' for a fraction ``eval_fraction`` of keys, chosen by hash (stable across runs/machines)."""
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")
    return "eval" if h / 2**64 < eval_fraction else "train"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def check_fraction(eval_fraction: float) -> float:
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    return float(eval_fraction)


def check_format_reward(format_reward: Any) -> float:
    """The reward of a well-formed wrong answer: a number in [0, 1), below a right answer's 1."""
    try:
        value = float(format_reward)
    except (TypeError, ValueError):
        raise ValueError(f"format_reward must be a number in [0, 1), got {format_reward!r}") from None
    if not 0.0 <= value < 1.0:  # NaN fails this too
        raise ValueError(f"format_reward must be in [0, 1), got {format_reward!r}")
    return value


def clean_completion(text: str) -> str:
    """Cut at the first EOS text (if the caller decoded special tokens) and strip whitespace."""
    if not isinstance(text, str):
        return ""
    for eos in EOS_TEXTS:
        cut = text.find(eos)
        if cut >= 0:
            text = text[:cut]
    return text.strip()


def int_range(value: Any, what: str, lo: int, hi: int) -> tuple[int, int]:
    """An int or a (min, max) pair -> (min, max), checked to lie within [lo, hi]."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an int or a (min, max) pair, got {value!r}")
    if isinstance(value, int):
        pair = (value, value)
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"{what} must be an int or a (min, max) pair of ints, got {value!r}")
        pair = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{what} must be an int or a (min, max) pair, got {value!r}")
    if not lo <= pair[0] <= pair[1] <= hi:
        raise ValueError(f"{what} must satisfy {lo} <= min <= max <= {hi}, got {value!r}")
    return pair


def sample_distinct(
    draw: Callable[[random.Random], tuple[str, Problem]],
    split: str,
    n: int,
    seed: int,
    eval_fraction: float,
    task: str,
) -> list[Problem]:
    """Rejection-sample up to ``n`` distinct problems of ``split`` from a generator of (key, problem).

    Problems whose split key hashes to the other split are skipped, so the splits never overlap.
    Sampling gives up after 2000 draws in a row without a new problem, so a split smaller than
    ``n`` returns (nearly) all of its problems instead of ``n``.
    """
    check_split(split)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{task}|{split}|{seed}")
    seen: set[str] = set()
    out: list[Problem] = []
    misses = 0
    while len(out) < n and misses < 2000:
        key, problem = draw(rng)
        if problem.id in seen or split_of(key, eval_fraction) != split:
            misses += 1
            continue
        misses = 0
        seen.add(problem.id)
        out.append(problem)
    if n > 0 and not out:
        raise ValueError(f"task {task!r}: the {split} split is empty for these options")
    return out
