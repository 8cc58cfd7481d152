"""The arithmetic task: integer addition / multiplication, e.g. ``"37+85="`` -> ``"122"``."""

from __future__ import annotations

import random
import re
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

_ARITH_OPS = ("+", "*")
_INT_RE = re.compile(r"-?\d+")


@register_task("arithmetic")
class ArithmeticTask:
    """Integer addition / multiplication, e.g. prompt ``"37+85="``, answer ``"122"``.

    Options:
        ops: "+", "*", or "+*" (each problem picks one uniformly); a list of them also works.
        digits: digits per operand, an int or a (min, max) pair (each operand draws its own
            count uniformly; 1 digit includes 0, more digits exclude leading zeros).
        eval_fraction: share of problems held out for eval (by hash of the problem).
        format_reward: reward of a wrong answer that is still a plain integer (0.0 = off).
        shots: solved training problems put before each prompt, one per line
            (``"12+5=17\n3+40=43\n"``), for pretrained models that need the format shown;
            the same fixed demonstrations for every problem, drawn from the train split.

    Reward: 1.0 iff the completion (cut at EOS, stripped) equals the decimal answer exactly,
    without leading zeros or sign. With ``shots`` the completion is first cut at its first line
    break (a pretrained model goes on writing more problems). The split key is the unordered operand pair with the operator,
    so "85+37" lands in the same split as "37+85".
    """

    name = "arithmetic"

    def __init__(
        self,
        ops: str | Sequence[str] = "+",
        digits: int | Sequence[int] = 2,
        eval_fraction: float = 0.1,
        format_reward: float = 0.0,
        shots: int = 0,
    ) -> None:
        chosen = tuple(ops) if isinstance(ops, str) else tuple(str(o) for o in ops)
        if not chosen or any(o not in _ARITH_OPS for o in chosen):
            raise ValueError(f"arithmetic ops must be drawn from {_ARITH_OPS}, got {ops!r}")
        self.ops = tuple(dict.fromkeys(chosen))
        self.digits = int_range(digits, "arithmetic digits", 1, 30)
        self.eval_fraction = check_fraction(eval_fraction)
        self.format_reward = check_format_reward(format_reward)
        if isinstance(shots, bool) or not isinstance(shots, int) or not 0 <= shots <= 64:
            raise ValueError(f"arithmetic shots must be an int in [0, 64], got {shots!r}")
        self.shots = shots
        self._prefix = ""
        if shots:
            demos = sample_distinct(self._draw, "train", shots, -1, self.eval_fraction, self.name)
            self._prefix = "".join(f"{d.prompt}{d.answer}\n" for d in demos)

    def _operand(self, rng: random.Random) -> int:
        d = rng.randint(*self.digits)
        return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)

    def _draw(self, rng: random.Random) -> tuple[str, Problem]:
        op = rng.choice(self.ops)
        a, b = self._operand(rng), self._operand(rng)
        answer = a + b if op == "+" else a * b
        text = f"{a}{op}{b}"
        # Both ops commute: key on the unordered pair so a swapped problem cannot cross splits.
        key = f"{op}:{min(a, b)},{max(a, b)}"
        return key, Problem(prompt=f"{self._prefix}{text}=", answer=str(answer), id=f"arithmetic:{text}")

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        return sample_distinct(self._draw, split, n, seed, self.eval_fraction, self.name)

    def reward(self, problem: Problem, completion_text: str) -> float:
        try:
            text = clean_completion(completion_text)
            if self.shots:
                text = text.split("\n", 1)[0].strip()
            if text == problem.answer:
                return 1.0
            if self.format_reward and len(text) <= 64 and _INT_RE.fullmatch(text):
                return self.format_reward
        except Exception:  # the checker must never raise; see the module docstring
            pass
        return 0.0

    def demonstration(self, problem: Problem) -> str:
        return problem.answer
