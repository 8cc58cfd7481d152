"""The countdown task: reach a target from given numbers with + - * / (exact division).

Completions are checked by walking their ``ast`` with ``Fraction``; nothing is ever ``eval``-ed.
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction

from dcmdp.tasks.base import (
    Problem,
    check_format_reward,
    check_fraction,
    clean_completion,
    int_range,
    register_task,
    sample_distinct,
)

_COUNTDOWN_PROMPT = re.compile(r"(\d+(?:,\d+)*)->(\d+):")
_COUNTDOWN_CHARS = re.compile(r"[0-9+\-*/() ]*")
_COUNTDOWN_MAX_LEN = 200
_AST_OPS: dict[type, str] = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _apply(op: str, left: Fraction, right: Fraction) -> Fraction | None:
    """left op right; None for a division that is not exact (or by zero)."""
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    if right == 0 or (left / right).denominator != 1:
        return None
    return left / right


def countdown_value(
    expression: str, numbers: Sequence[int], use_all: bool = True, ops: str = "+-*/"
) -> Fraction | None:
    """Value of a countdown expression, or None when it breaks a rule.

    Rules: only digits, ``ops``, parentheses and spaces; at most 200 characters; each number
    used is one of ``numbers`` and no number is used more often than given (``use_all``: each
    exactly once); no unary minus; a division must be exact (b divides a, b != 0). Parsed with
    ``ast`` and evaluated by walking the tree with ``Fraction``; nothing is ever ``eval``-ed.
    """
    try:
        if not isinstance(expression, str) or len(expression) > _COUNTDOWN_MAX_LEN:
            return None
        if not expression.strip() or not _COUNTDOWN_CHARS.fullmatch(expression):
            return None
        tree = ast.parse(expression.strip(), mode="eval")
        used: list[int] = []

        def walk(node: ast.AST) -> Fraction:
            if isinstance(node, ast.Constant) and type(node.value) is int:
                used.append(node.value)
                return Fraction(node.value)
            if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
                op = _AST_OPS[type(node.op)]
                if op not in ops:
                    raise ValueError(f"operator {op} not allowed")
                value = _apply(op, walk(node.left), walk(node.right))
                if value is None:
                    raise ValueError("inexact division")
                return value
            raise ValueError(f"node {type(node).__name__} not allowed")

        value = walk(tree.body)
        have, want = Counter(used), Counter(numbers)
        if any(have[k] > want[k] for k in have) or (use_all and have != want):
            return None
        return value
    except Exception:  # SyntaxError, RecursionError, MemoryError, ValueError ...
        return None


@register_task("countdown")
class CountdownTask:
    """Reach a target from given numbers with + - * / : prompt ``"3,5,7->26:"``, completion ``"3*7+5"``.

    Options:
        count: how many numbers, an int or a (min, max) pair.
        max_number: numbers are drawn from 1..max_number.
        ops: allowed operators, a subset of "+-*/" (division must be exact).
        use_all: True (default): every given number exactly once; False: each at most once.
        eval_fraction: share of problems held out for eval (by hash of sorted numbers + target).
        format_reward: reward of a rule-abiding expression that misses the target (0.0 = off).

    Each problem is built from a random expression tree over all its numbers, so it is solvable;
    ``Problem.answer`` holds that reference expression (any other solution also earns 1.0).
    """

    name = "countdown"

    def __init__(
        self,
        count: int | Sequence[int] = 3,
        max_number: int = 10,
        ops: str = "+-*/",
        use_all: bool = True,
        eval_fraction: float = 0.1,
        format_reward: float = 0.0,
    ) -> None:
        self.count = int_range(count, "countdown count", 2, 8)
        if not isinstance(max_number, int) or not 1 <= max_number <= 10_000:
            raise ValueError(f"countdown max_number must be an int in [1, 10000], got {max_number!r}")
        self.max_number = max_number
        if not ops or any(o not in "+-*/" for o in ops):
            raise ValueError(f"countdown ops must be a non-empty subset of '+-*/', got {ops!r}")
        self.ops = "".join(dict.fromkeys(ops))
        self.use_all = bool(use_all)
        self.eval_fraction = check_fraction(eval_fraction)
        self.format_reward = check_format_reward(format_reward)

    def _expression(self, rng: random.Random, numbers: list[int]) -> tuple[str, Fraction] | None:
        # Items are (text, value, precedence); leaves have precedence 3 (never parenthesised).
        items: list[tuple[str, Fraction, int]] = [(str(x), Fraction(x), 3) for x in numbers]
        while len(items) > 1:
            i, j = rng.sample(range(len(items)), 2)
            (lt, lv, lp), (rt, rv, rp) = items[i], items[j]
            op = rng.choice(self.ops)
            value = _apply(op, lv, rv)
            if value is None:  # inexact division: use another operator, or give up on this draw
                others = [o for o in self.ops if o != "/"]
                if not others:
                    return None
                op = rng.choice(others)
                value = _apply(op, lv, rv)
            assert value is not None
            p = _PREC[op]
            left = f"({lt})" if lp < p else lt
            right = f"({rt})" if rp < p or (rp == p and op in "-/") else rt
            items = [it for k, it in enumerate(items) if k not in (i, j)]
            items.append((f"{left}{op}{right}", value, p))
        return items[0][0], items[0][1]

    def _draw(self, rng: random.Random) -> tuple[str, Problem]:
        for _ in range(100_000):
            numbers = [rng.randint(1, self.max_number) for _ in range(rng.randint(*self.count))]
            built = self._expression(rng, numbers)
            if built is None:
                continue
            expr, value = built
            # Positive integer targets only; re-check with the reward's own checker.
            if value.denominator != 1 or value <= 0:
                continue
            if countdown_value(expr, numbers, self.use_all, self.ops) != value:
                continue
            target = int(value)
            shown = ",".join(map(str, numbers))
            key = ",".join(map(str, sorted(numbers))) + f"->{target}"
            return key, Problem(prompt=f"{shown}->{target}:", answer=expr, id=f"countdown:{shown}->{target}")
        raise ValueError(f"countdown: cannot build a positive-target problem with ops {self.ops!r}")

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        return sample_distinct(self._draw, split, n, seed, self.eval_fraction, self.name)

    def reward(self, problem: Problem, completion_text: str) -> float:
        try:
            m = _COUNTDOWN_PROMPT.fullmatch(problem.prompt)
            if m is None:
                return 0.0
            numbers = [int(x) for x in m.group(1).split(",")]
            target = int(m.group(2))
            value = countdown_value(clean_completion(completion_text), numbers, self.use_all, self.ops)
            if value is None:
                return 0.0
            return 1.0 if value == target else self.format_reward
        except Exception:
            return 0.0

    def demonstration(self, problem: Problem) -> str:
        return problem.answer
