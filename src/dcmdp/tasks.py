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
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol, TypeVar

SPLITS = ("train", "eval")
# Completions are cut at the first EOS text in case the caller decoded special tokens.
_EOS_TEXTS = ("<eos>", "<|endoftext|>", "<|im_end|>")
# Longest digit string turned into an int or Fraction: far below Python's 4300-digit limit and
# cheap, so a completion such as "9" * 5000 is rejected instead of converted.
MAX_NUMBER_DIGITS = 400


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


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _check_fraction(eval_fraction: float) -> float:
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    return float(eval_fraction)


def _clean_completion(text: str) -> str:
    """Cut at the first EOS text (if the caller decoded special tokens) and strip whitespace."""
    if not isinstance(text, str):
        return ""
    for eos in _EOS_TEXTS:
        cut = text.find(eos)
        if cut >= 0:
            text = text[:cut]
    return text.strip()


def _int_range(value: Any, what: str, lo: int, hi: int) -> tuple[int, int]:
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


def _sample_distinct(
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
    _check_split(split)
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


# ---------------------------------------------------------------------------------------------
# arithmetic

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
        self.digits = _int_range(digits, "arithmetic digits", 1, 30)
        self.eval_fraction = _check_fraction(eval_fraction)
        self.format_reward = float(format_reward)
        if isinstance(shots, bool) or not isinstance(shots, int) or not 0 <= shots <= 64:
            raise ValueError(f"arithmetic shots must be an int in [0, 64], got {shots!r}")
        self.shots = shots
        self._prefix = ""
        if shots:
            demos = _sample_distinct(self._draw, "train", shots, -1, self.eval_fraction, self.name)
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
        return _sample_distinct(self._draw, split, n, seed, self.eval_fraction, self.name)

    def reward(self, problem: Problem, completion_text: str) -> float:
        try:
            text = _clean_completion(completion_text)
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


# ---------------------------------------------------------------------------------------------
# countdown

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
        self.count = _int_range(count, "countdown count", 2, 8)
        if not isinstance(max_number, int) or not 1 <= max_number <= 10_000:
            raise ValueError(f"countdown max_number must be an int in [1, 10000], got {max_number!r}")
        self.max_number = max_number
        if not ops or any(o not in "+-*/" for o in ops):
            raise ValueError(f"countdown ops must be a non-empty subset of '+-*/', got {ops!r}")
        self.ops = "".join(dict.fromkeys(ops))
        self.use_all = bool(use_all)
        self.eval_fraction = _check_fraction(eval_fraction)
        self.format_reward = float(format_reward)

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
        return _sample_distinct(self._draw, split, n, seed, self.eval_fraction, self.name)

    def reward(self, problem: Problem, completion_text: str) -> float:
        try:
            m = _COUNTDOWN_PROMPT.fullmatch(problem.prompt)
            if m is None:
                return 0.0
            numbers = [int(x) for x in m.group(1).split(",")]
            target = int(m.group(2))
            value = countdown_value(_clean_completion(completion_text), numbers, self.use_all, self.ops)
            if value is None:
                return 0.0
            return 1.0 if value == target else self.format_reward
        except Exception:
            return 0.0

    def demonstration(self, problem: Problem) -> str:
        return problem.answer


# ---------------------------------------------------------------------------------------------
# Math answer checking (used by the jsonl task)

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(
    r"[-+]?(?:\\[dt]?frac\{\s*-?\d+\s*\}\{\s*-?\d+\s*\}|\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|\.\d+)%?"
)
_FRAC = re.compile(r"([-+]?)\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}")
_FRAC_SHORT = re.compile(r"([-+]?)\\[dt]?frac(\d)(\d)")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_RATIO = re.compile(r"([-+]?\d+)/(-?\d+)")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (balanced braces), or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    # Only the last few: each unclosed one costs a scan to the end (quadratic on adversarial text).
    for start in reversed(starts[-20:]):
        depth = 1
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i]
    return None


def _segment_answer(segment: str) -> str:
    """The answer inside a segment after a marker: the whole line if it parses, else its first number."""
    line = segment.strip().split("\n", 1)[0].strip()
    if _to_number(normalize_answer(line)) is not None:
        return line
    m = _NUMBER.search(line)
    return m.group(0) if m else line


def extract_final_answer(text: str) -> str | None:
    """The final answer in a completion.

    In order: the last ``\\boxed{...}``; else the text after the last "####", "answer is" or "="
    (the first line of it, or the first number in that line); else the last number in the text.
    None when nothing is found.
    """
    text = _clean_completion(text)
    if not text:
        return None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    for marker in ("####", "answer is", "="):
        pos = text.lower().rfind(marker)
        if pos >= 0:
            seg = _segment_answer(text[pos + len(marker) :])
            if seg:
                return seg
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize_answer(answer: str) -> str:
    """Canonical text of an answer: no spaces, $, \\text{}, \\left/\\right, trailing period,
    leading +, thousands commas or percent signs ("50%" and "50" compare equal)."""
    s = answer.strip()
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    for junk in ("$", "\\!", "\\,", "\\;", "\\left", "\\right", "\\%", "%", "^\\circ", "^{\\circ}"):
        s = s.replace(junk, "")
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    if s.startswith("+"):
        s = s[1:]
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s


def _to_number(s: str) -> Fraction | None:
    """A normalised answer as an exact Fraction (int, decimal, a/b, \\frac{a}{b}), else None."""
    if sum(c.isdigit() for c in s) > MAX_NUMBER_DIGITS:
        return None
    try:
        if _PLAIN_NUMBER.fullmatch(s):
            return Fraction(s)
        m = _RATIO.fullmatch(s)
        if m and int(m.group(2)) != 0:
            return Fraction(int(m.group(1)), int(m.group(2)))
        for pattern in (_FRAC, _FRAC_SHORT):
            m = pattern.fullmatch(s)
            if m and int(m.group(3)) != 0:
                value = Fraction(int(m.group(2)), int(m.group(3)))
                return -value if m.group(1) == "-" else value
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return None


def math_answers_equal(pred: str, gold: str) -> bool:
    """Whether a completion's final answer equals the gold answer.

    The prediction's answer comes from ``extract_final_answer``; the gold answer is taken whole
    unless it holds a ``\\boxed{}`` or "####" (GSM8K style), which are extracted the same way.
    Both are normalised (``normalize_answer``); numbers compare exactly as fractions, so "0.5",
    "1/2" and "\\frac{1}{2}" agree; anything else compares as normalised text. Never raises.
    """
    try:
        found = extract_final_answer(pred)
        if found is None:
            return False
        gold_text = _clean_completion(gold)
        if "\\boxed" in gold_text or "\\fbox" in gold_text or "####" in gold_text:
            gold_text = extract_final_answer(gold_text) or gold_text
        a, b = normalize_answer(found), normalize_answer(gold_text)
        if not a or not b:
            return False
        na, nb = _to_number(a), _to_number(b)
        if na is not None and nb is not None:
            return na == nb
        return a == b
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------
# jsonl


@dataclass(frozen=True)
class SkippedRow:
    """A row of a JSONL file that the loader left out, and why."""

    line: int
    reason: str


@register_task("jsonl")
class JsonlTask:
    """Math problems from a user JSONL file: one JSON object per line with a question and an answer.

    Options:
        path: the .jsonl file (required).
        question_field, answer_field: field names (default "question", "answer"); string or
            number values.
        prompt_template: format string with ``{question}`` building the prompt.
        eval_fraction: share of questions held out for eval (by hash of the question text, so
            duplicate questions always share a split).

    Rows that are blank, not JSON, not objects, missing a field, of the wrong type, empty, or exact
    duplicates are skipped; ``skipped_rows`` lists them (``skipped_counts`` by reason). A file
    with no usable row raises ``ValueError``. The reward is ``math_answers_equal(completion,
    answer)``; the demonstration is the answer text itself (a full worked solution ending in
    "#### 42" works, since the checker extracts the final answer).
    """

    name = "jsonl"

    def __init__(
        self,
        path: str | Path,
        question_field: str = "question",
        answer_field: str = "answer",
        prompt_template: str = "{question}\nAnswer: ",
        eval_fraction: float = 0.1,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"jsonl task: no file at {self.path}")
        if "{question}" not in prompt_template:
            raise ValueError(f"jsonl prompt_template must contain '{{question}}', got {prompt_template!r}")
        self.question_field, self.answer_field = question_field, answer_field
        self.prompt_template = prompt_template
        self.eval_fraction = _check_fraction(eval_fraction)
        self.skipped_rows: list[SkippedRow] = []
        self._rows: dict[str, list[Problem]] = {s: [] for s in SPLITS}
        self._load()

    @property
    def skipped_counts(self) -> Counter[str]:
        return Counter(r.reason for r in self.skipped_rows)

    def _parse_line(self, line: str) -> tuple[str, str] | str:
        """(question, answer) of a line, or the reason to skip it."""
        if not line.strip():
            return "blank line"
        try:
            row = json.loads(line)
        except ValueError:
            return "invalid JSON"
        if not isinstance(row, dict):
            return "not a JSON object"
        texts = []
        for name in (self.question_field, self.answer_field):
            if name not in row:
                return f"missing field {name!r}"
            value = row[name]
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                return f"field {name!r} is not a string or number"
            text = str(value).strip()
            if not text:
                return f"field {name!r} is empty"
            texts.append(text)
        return texts[0], texts[1]

    def _load(self) -> None:
        seen: set[tuple[str, str]] = set()
        with self.path.open(encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, start=1):
                parsed = self._parse_line(line)
                if isinstance(parsed, tuple) and parsed in seen:
                    parsed = "duplicate row"
                if isinstance(parsed, str):
                    self.skipped_rows.append(SkippedRow(lineno, parsed))
                    continue
                seen.add(parsed)
                q, a = parsed
                digest = hashlib.sha256(f"{q}\x00{a}".encode()).hexdigest()[:16]
                problem = Problem(
                    prompt=self.prompt_template.format(question=q), answer=a, id=f"jsonl:{digest}"
                )
                # Split by the question (whitespace-normalised): duplicates share a split.
                self._rows[split_of(" ".join(q.split()), self.eval_fraction)].append(problem)
        if not any(self._rows.values()):
            raise ValueError(f"jsonl task: no usable rows in {self.path} ({self.skipped_summary()})")

    def skipped_summary(self, lines_shown: int = 3) -> str:
        """One line: how many rows were skipped and why, with the first line numbers per reason."""
        if not self.skipped_rows:
            return "no rows skipped"
        parts = []
        for reason, count in self.skipped_counts.most_common():
            lines = [r.line for r in self.skipped_rows if r.reason == reason]
            shown = ", ".join(map(str, lines[:lines_shown])) + (", ..." if len(lines) > lines_shown else "")
            parts.append(f"{reason}: {count} (line{'s' if len(lines) > 1 else ''} {shown})")
        return f"skipped {len(self.skipped_rows)} row(s): " + "; ".join(parts)

    def split_size(self, split: str) -> int:
        _check_split(split)
        return len(self._rows[split])

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        """Up to ``n`` distinct rows of ``split`` in a seeded order (fewer if the split is smaller)."""
        _check_split(split)
        rows = list(self._rows[split])
        if not rows:
            train, evals = len(self._rows["train"]), len(self._rows["eval"])
            raise ValueError(
                f"jsonl task: the {split} split of {self.path} is empty: {train + evals} usable row(s), "
                f"{train} train / {evals} eval (eval_fraction={self.eval_fraction} holds out questions "
                f"by hash; add rows or change eval_fraction); {self.skipped_summary()}"
            )
        random.Random(f"jsonl|{split}|{seed}").shuffle(rows)
        return rows[: max(n, 0)]

    def reward(self, problem: Problem, completion_text: str) -> float:
        return 1.0 if math_answers_equal(completion_text, problem.answer) else 0.0

    def demonstration(self, problem: Problem) -> str:
        return problem.answer
