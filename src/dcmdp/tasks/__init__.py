"""Verifiable-reward tasks behind a registry: problems, a reward checker and demonstrations.

A task hands the trainer typed ``Problem`` records and scores completions with a pure checker:

- ``problems(split, n, seed)``: up to ``n`` distinct problems of ``split`` ("train" or "eval"),
  the same list for the same arguments. Train and eval never share a problem: every task assigns
  a problem to a split by a hash of its canonical key (``split_of``), not by sampling order.
- ``reward(problem, completion_text)``: 1.0 when correct, else 0.0 (or a small documented format
  reward). It never raises, whatever the completion holds.
- ``demonstration(problem)``: a target completion for warm starts, without the EOS (the caller
  appends it).

Tasks are built by name: ``make_task("arithmetic", digits=2)``. An unknown name or option fails
with a message that lists the valid ones. See docs/tasks.md for formats and how to add a task.

One module per task (``arithmetic``, ``countdown``, ``jsonl``, ``long_addition``); the protocol, the registry and the
shared helpers in ``base``; free-form math answer grading in ``grading``. Importing this package
registers the built-in tasks.
"""

from dcmdp.tasks.arithmetic import ArithmeticTask
from dcmdp.tasks.base import (
    SPLITS,
    TASKS,
    Problem,
    Task,
    TaskT,
    make_task,
    register_task,
    split_of,
    task_options,
)
from dcmdp.tasks.countdown import CountdownTask, countdown_value
from dcmdp.tasks.grading import MAX_NUMBER_DIGITS, extract_final_answer, math_answers_equal, normalize_answer
from dcmdp.tasks.jsonl import JsonlTask, SkippedRow
from dcmdp.tasks.long_addition import LongAdditionTask

__all__ = [
    "MAX_NUMBER_DIGITS",
    "SPLITS",
    "TASKS",
    "ArithmeticTask",
    "CountdownTask",
    "JsonlTask",
    "LongAdditionTask",
    "Problem",
    "SkippedRow",
    "Task",
    "TaskT",
    "countdown_value",
    "extract_final_answer",
    "make_task",
    "math_answers_equal",
    "normalize_answer",
    "register_task",
    "split_of",
    "task_options",
]
