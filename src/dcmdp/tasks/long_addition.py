"""The long_addition task: multi-digit addition solved in a written, column-by-column scratchpad.

Prompt ``"48213+937=\\n"``; the demonstration spells both operands digit by digit (the shorter one
padded with leading zeros), adds one column per line from the units up, and ends with the answer::

    a: 4 8 2 1 3
    b: 0 0 9 3 7
    units: 3+7+carry 0=10, write 0 carry 1
    tens: 1+3+carry 1=5, write 5 carry 0
    ...
    answer: 49150

Only the final answer is graded (the trace is free during RL): the text after the **last**
``answer:`` must be the sum, written plainly. The demonstration is long on purpose (about 64-256
tokens under the subword tokenizer of ``dcmdp.subword``): a task for studying long responses.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from dcmdp.tasks.base import (
    Problem,
    check_format_reward,
    check_fraction,
    clean_completion,
    int_range,
    register_task,
    sample_distinct,
)

COLUMN_NAMES = (
    "units",
    "tens",
    "hundreds",
    "thousands",
    "ten-thousands",
    "hundred-thousands",
    "millions",
    "ten-millions",
    "hundred-millions",
    "billions",
    "ten-billions",
    "hundred-billions",
    "trillions",
)
MAX_DIGITS = len(COLUMN_NAMES) - 1  # the sum may need one column more than the operands
ANSWER_TAG = "answer:"
_MAX_COMPLETION_CHARS = 100_000  # longer completions score 0.0 without being searched


def column_name(i: int) -> str:
    """Name of column ``i`` counted from 0 = units."""
    return COLUMN_NAMES[i]


def scratchpad(a: int, b: int) -> str:
    """The written column addition of ``a + b`` (non-negative ints), ending in ``answer: <sum>``."""
    if a < 0 or b < 0:
        raise ValueError(f"scratchpad adds non-negative integers, got {a} and {b}")
    width = max(len(str(a)), len(str(b)))
    da, db = str(a).zfill(width), str(b).zfill(width)
    lines = [f"a: {' '.join(da)}", f"b: {' '.join(db)}"]
    carry = 0
    for i in range(width):
        x, y = int(da[-1 - i]), int(db[-1 - i])
        total = x + y + carry
        lines.append(
            f"{column_name(i)}: {x}+{y}+carry {carry}={total}, write {total % 10} carry {total // 10}"
        )
        carry = total // 10
    if carry:
        lines.append(f"{column_name(width)}: carry 1, write 1")
    lines.append(f"{ANSWER_TAG} {a + b}")
    return "\n".join(lines)


def final_answer(text: str) -> str | None:
    """The text after the last ``answer:`` of a cleaned completion (stripped), or None."""
    cut = text.rfind(ANSWER_TAG)
    if cut < 0:
        return None
    return text[cut + len(ANSWER_TAG) :].strip()


@register_task("long_addition")
class LongAdditionTask:
    """Multi-digit addition with a long written scratchpad, graded on the final answer only.

    Options:
        digits: digits per operand, an int or a (min, max) pair within 1..12 (each operand
            draws its own count; 1 digit includes 0, more digits exclude leading zeros).
        eval_fraction: share of problems held out for eval (by hash of the unordered pair).
        format_reward: reward of a wrong answer that is still a plain integer after ``answer:``
            (0.0 = off).

    Reward: 1.0 iff the completion (cut at EOS, stripped) holds ``answer:`` and the text after
    its last occurrence is exactly the decimal sum (no sign, no leading zeros, nothing after it).
    The lines before it are not checked.
    """

    name = "long_addition"

    def __init__(
        self,
        digits: int | Sequence[int] = (4, 6),
        eval_fraction: float = 0.1,
        format_reward: float = 0.0,
    ) -> None:
        self.digits = int_range(digits, "long_addition digits", 1, MAX_DIGITS)
        self.eval_fraction = check_fraction(eval_fraction)
        self.format_reward = check_format_reward(format_reward)

    def _operand(self, rng: random.Random) -> int:
        d = rng.randint(*self.digits)
        return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)

    def _draw(self, rng: random.Random) -> tuple[str, Problem]:
        a, b = self._operand(rng), self._operand(rng)
        # Addition commutes: key on the unordered pair so a swapped problem cannot cross splits.
        key = f"long+:{min(a, b)},{max(a, b)}"
        return key, Problem(prompt=f"{a}+{b}=\n", answer=str(a + b), id=f"long_addition:{a}+{b}")

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        return sample_distinct(self._draw, split, n, seed, self.eval_fraction, self.name)

    def reward(self, problem: Problem, completion_text: str) -> float:
        try:
            text = clean_completion(completion_text)
            if len(text) > _MAX_COMPLETION_CHARS:
                return 0.0
            answer = final_answer(text)
            if answer is None:
                return 0.0
            if answer == problem.answer:
                return 1.0
            if self.format_reward and 0 < len(answer) <= 64 and answer.isascii() and answer.isdigit():
                return self.format_reward
        except Exception:  # the checker must never raise
            pass
        return 0.0

    def demonstration(self, problem: Problem) -> str:
        a_text, b_text = problem.prompt.strip().rstrip("=").split("+")
        return scratchpad(int(a_text), int(b_text))
