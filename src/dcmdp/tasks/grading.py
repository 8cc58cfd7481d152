"""Grading free-form math answers: find the final answer in a completion and compare it exactly.

Used by the jsonl task; usable by any task whose answers are numbers or short LaTeX
(``\\boxed{}``, ``\\frac{a}{b}``, "#### 42", "the answer is 0.5"). Never raises on a completion.
"""

from __future__ import annotations

import re
from fractions import Fraction

from dcmdp.tasks.base import clean_completion

# Longest digit string turned into an int or Fraction: far below Python's 4300-digit limit and
# cheap, so a completion such as "9" * 5000 is rejected instead of converted.
MAX_NUMBER_DIGITS = 400

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
    text = clean_completion(text)
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
        gold_text = clean_completion(gold)
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
