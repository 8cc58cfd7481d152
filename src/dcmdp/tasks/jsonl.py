"""The jsonl task: math problems from a user JSONL file, graded by :mod:`dcmdp.tasks.grading`."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from dcmdp.tasks.base import SPLITS, Problem, check_fraction, check_split, register_task, split_of
from dcmdp.tasks.grading import math_answers_equal


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
        self.eval_fraction = check_fraction(eval_fraction)
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
        check_split(split)
        return len(self._rows[split])

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        """Up to ``n`` distinct rows of ``split`` in a seeded order (fewer if the split is smaller)."""
        check_split(split)
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
