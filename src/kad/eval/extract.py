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


# A choice label as models write it: C, (C), [C], **C**, *C*; bare labels are upper case (so
# that the article "a" is no answer) and end at a non-word character ("C++" is no label).
_LABEL = (
    r"(?:\*\*|\*|__)?(?:\(([A-Za-z0-9])\)|\[([A-Za-z0-9])\]|([A-Z0-9]))(?:\*\*|\*|__)?"
    r"(?![A-Za-z0-9+#'’-])"
)
# Phrases that commit to a label: "the answer is", "answer:", "the correct option is",
# "the best choice would be", "I choose" / "I'd pick" / "I will go with", then the label, maybe
# after "option" or "choice": "the answer is option C".
_COMMIT_RE = re.compile(
    r"(?i:\b(?:answer|option|choice)\s+(?:is|would\s+be|will\s+be|should\s+be|=)\s*:?"
    r"|\banswer\s*[:=]"
    r"|\bI(?:\s+would|\s+will|'d|'ll|’d|’ll)?\s+(?:choose|pick|select|go\s+with))"
    r"\s*(?i:(?:option|choice)\s+)?" + _LABEL
)
_BOLD_LABEL_RE = re.compile(r"\*\*\(?([A-Z0-9])\)?(?:[.):]\s*[^*]*)?\*\*")
_LEADING_LABEL_RE = re.compile(r"^\s*(?:\*\*|\*)?(?:\(([A-Za-z0-9])\)|([A-Z0-9])(?=[.):]|\*|\s*$))")
_OPTION_LABEL_RE = re.compile(r"(?i:\b(?:option|choice))\s+" + _LABEL)
_PAREN_LABEL_RE = re.compile(r"\(([A-Za-z0-9])\)")


def _labels_found(pattern: re.Pattern[str], text: str) -> list[tuple[int, str]]:
    """(position, upper-cased label) of every match of ``pattern``, in order."""
    return [(m.start(), next(g for g in m.groups() if g).upper()) for m in pattern.finditer(text)]


def extract_choice(
    text: str, labels: Sequence[str], choice_texts: Sequence[str] = ()
) -> str | None:
    """The choice label the text commits to (one of ``labels``, e.g. A-E or 1-4).

    In order: the first commitment ("the answer is (C)", "Answer: C", "The correct option is C",
    "I choose C", a bold "**C**"); a label opening the text ("C", "(C)", "C) ...", "C. ...");
    the last "Option C"; the last parenthesised label; else the one choice whose text alone
    appears in the output. Bare letters count only in upper case, parenthesised ones in any.
    """
    by_upper = {label.upper(): label for label in labels}
    ranked = (  # (matches in text order, which one to take)
        (sorted(_labels_found(_COMMIT_RE, text) + _labels_found(_BOLD_LABEL_RE, text)), 0),
        (_labels_found(_LEADING_LABEL_RE, text), 0),
        (_labels_found(_OPTION_LABEL_RE, text), -1),
        (_labels_found(_PAREN_LABEL_RE, text), -1),
    )
    for found, pick in ranked:
        known = [label for _, label in found if label in by_upper]
        if known:
            return by_upper[known[pick]]
    lowered = text.lower()
    present = [
        label
        for label, choice in zip(labels, choice_texts, strict=False)
        if choice and re.search(r"\b" + re.escape(choice.lower()) + r"\b", lowered)
    ]
    return present[0] if len(present) == 1 else None
