"""Answer extraction and equality: a number, a boxed LaTeX answer, or a choice letter.

Extractors take a model's output text and return the answer it commits to, or None. Equality
is by value: numbers compare as numbers (``1,000.00`` == ``1000``); LaTeX answers compare with
math-verify (sympy) after a string normalisation that also serves as its fallback.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

_NUMBER = r"[-−]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_HASHES_RE = re.compile(r"####\s*(" + _NUMBER + ")")
_ANSWER_IS_RE = re.compile(r"answer\s+is\s*:?\s*(?:\\boxed\{)?\s*(" + _NUMBER + ")", re.IGNORECASE)


def parse_number(text: str) -> float | None:
    """The value of a number as written: ``$1,080.50`` -> 1080.5, ``−3`` -> -3, ``3/4`` -> 0.75."""
    cleaned = text.replace(",", "").replace("$", "").replace("−", "-").replace(" ", "")
    try:
        if "/" in cleaned:
            numerator, denominator = cleaned.split("/")
            return float(numerator) / float(denominator)
        return float(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def extract_number(text: str) -> str | None:
    """The final numeric answer of a worked solution.

    In order: the number after ``####``; after the first "The answer is"; inside the last
    ``\\boxed{}``; else the last number in the text. Returns it as written (commas kept).
    """
    for pattern in (_HASHES_RE, _ANSWER_IS_RE):
        match = pattern.search(text)
        if match:
            return match.group(1).strip()
    boxed = extract_boxed(text)
    if boxed is not None:
        inner = _NUMBER_RE.search(boxed)
        if inner:
            return inner.group(0).strip()
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1].strip() if numbers else None


def numbers_equal(prediction: str | None, gold: str | float, tol: float = 1e-6) -> bool:
    """Whether a written number has the gold value, within ``tol`` (absolute, and relative to
    the gold's size for large numbers: 1e-9 · |gold|)."""
    if prediction is None:
        return False
    value = parse_number(prediction)
    target = parse_number(gold) if isinstance(gold, str) else float(gold)
    if value is None or target is None:
        return False
    return math.isclose(value, target, rel_tol=1e-9, abs_tol=tol)


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; also the
    brace-less form ``\\boxed 5``. None if there is none or it is unclosed."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:].removeprefix("\\boxed").removeprefix("\\fbox")
    if rest.startswith(" "):
        token = rest.split()[0] if rest.split() else ""
        return token.rstrip("$.") or None
    if not rest.startswith("{"):
        return None
    depth = 0
    for index, char in enumerate(rest):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return rest[1:index]
    return None


_LATEX_REPLACEMENTS: tuple[tuple[str, str], ...] = (
    ("\\left", ""),
    ("\\right", ""),
    ("\\dfrac", "\\frac"),
    ("\\tfrac", "\\frac"),
    ("\\!", ""),
    ("\\,", ""),
    ("\\;", ""),
    ("\\:", ""),
    ("\\ ", ""),
    ("^\\circ", ""),
    ("^{\\circ}", ""),
    ("\\circ", ""),
    ("\\%", ""),
    ("%", ""),
    ("\\$", ""),
    ("$", ""),
    ("\\displaystyle", ""),
)
_TEXT_RE = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}")
_FRAC_SHORT_RE = re.compile(r"\\frac(\d)(\d)")
_FRAC_HALF_SHORT_RE = re.compile(r"\\frac\{([^{}]*)\}(\d)")
_SQRT_SHORT_RE = re.compile(r"\\sqrt(\w)")


def normalize_latex(answer: str) -> str:
    """A canonical string for a LaTeX answer: no spacing, ``\\left``/``\\right``, ``\\dfrac``,
    degrees, percent or dollar signs, ``\\text{}`` wrappers, a leading ``x =`` or trailing period;
    ``\\frac12`` -> ``\\frac{1}{2}``, ``\\sqrt2`` -> ``\\sqrt{2}``, ``0.50`` -> ``0.5``."""
    text = answer.strip()
    for old, new in _LATEX_REPLACEMENTS:
        text = text.replace(old, new)
    text = _TEXT_RE.sub(r"\1", text)
    text = _FRAC_SHORT_RE.sub(r"\\frac{\1}{\2}", text)
    text = _FRAC_HALF_SHORT_RE.sub(r"\\frac{\1}{\2}", text)
    text = _SQRT_SHORT_RE.sub(r"\\sqrt{\1}", text)
    text = re.sub(r"\s+", "", text).rstrip(".")
    if re.fullmatch(r"[a-zA-Z]=[^=]+", text):
        text = text[2:]
    if re.fullmatch(r"-?\d+\.\d*", text):
        text = text.rstrip("0").rstrip(".")
    return text.removeprefix("+")


def latex_equal(prediction: str | None, gold: str) -> bool:
    """Whether two LaTeX answers are equal: same normalised string, or equal by math-verify."""
    if prediction is None:
        return False
    if normalize_latex(prediction) == normalize_latex(gold):
        return True
    from math_verify import parse, verify

    try:
        gold_parsed = parse(f"${gold}$")
        pred_parsed = parse(f"${prediction}$")
        return bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed))
    except Exception:  # math-verify/sympy raise many types on odd input: treat as unequal
        return False


_LABEL = r"(?:\(([A-Za-z0-9])\)|([A-Z0-9]))(?![A-Za-z0-9])"
_ANSWER_LETTER_RE = re.compile(r"(?i:answer\s+is)\s*:?\s*" + _LABEL)
_ANSWER_COLON_RE = re.compile(r"(?i:answer)\s*:\s*" + _LABEL)
_LEADING_LETTER_RE = re.compile(r"^\s*(?:\(([A-Za-z0-9])\)|([A-Z0-9])(?=[.):]|\s*$))")
_PAREN_LETTER_RE = re.compile(r"\(([A-Za-z0-9])\)")


def extract_choice(
    text: str, labels: Sequence[str], choice_texts: Sequence[str] = ()
) -> str | None:
    """The choice label the text commits to (one of ``labels``, e.g. A-E).

    In order: "the answer is (C)"; "Answer: C"; a label opening the text ("C", "(C)", "C. ...");
    the last parenthesised label; else the one choice whose text alone appears in the output.
    Letters match case-insensitively only in these explicit forms.
    """
    by_upper = {label.upper(): label for label in labels}
    for pattern in (_ANSWER_LETTER_RE, _ANSWER_COLON_RE, _LEADING_LETTER_RE):
        match = pattern.search(text)
        found = match and (match.group(1) or match.group(2)).upper()
        if found and found in by_upper:
            return by_upper[found]
    for candidate in reversed(_PAREN_LETTER_RE.findall(text)):
        if candidate.upper() in by_upper:
            return by_upper[candidate.upper()]
    lowered = text.lower()
    present = [
        label
        for label, choice in zip(labels, choice_texts, strict=False)
        if choice and re.search(r"\b" + re.escape(choice.lower()) + r"\b", lowered)
    ]
    return present[0] if len(present) == 1 else None
