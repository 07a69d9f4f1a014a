"""Answer extraction and equality: hand-written hard cases and properties."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kad.eval.extract import (
    extract_boxed,
    extract_choice,
    extract_number,
    latex_equal,
    normalize_latex,
    numbers_equal,
    parse_number,
)
from tests.conftest import DATA_DIR, needs_data


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
        ("#### 1,000", "1,000"),
        ("So the total is 5 + 3 = 8. The answer is 8.", "8"),
        ("The answer is $1,080.50.", "$1,080.50"),
        ("The answer is: 42 apples, not 7.", "42"),
        ("The answer is −3.", "−3"),
        ("First 3 + 4 = 7. The answer is 7.\n\nQ: If 5 cars ...", "7"),
        ("Thus the total is \\boxed{126} dollars", "126"),
        ("He has 12 apples left, 3 fewer than 15", "15"),
        ("It costs 20% more: 1,234 dollars.", "1,234"),
        ("no number here", None),
    ],
)
def test_extract_number_hard_cases(text: str, expected: str | None) -> None:
    assert extract_number(text) == expected


@pytest.mark.parametrize(
    ("written", "gold", "equal"),
    [
        ("1,000", "1000", True),
        ("$18.00", "18", True),
        ("−3", "-3", True),
        ("3/4", 0.75, True),
        ("0.333", 1 / 3, False),
        ("0.3333333", 1 / 3, True),
        ("51", 51.0, True),
        ("18", "81", False),
        (None, "1", False),
    ],
)
def test_numbers_equal(written: str | None, gold: str | float, equal: bool) -> None:
    assert numbers_equal(written, gold) is equal


@given(st.integers(min_value=-(10**9), max_value=10**9), st.booleans(), st.booleans())
def test_extract_number_reads_back_any_integer(value: int, commas: bool, dollars: bool) -> None:
    written = f"{value:,}" if commas else str(value)
    if dollars:
        written = written.replace("-", "-$") if value < 0 else f"${written}"
    text = f"Some work: 3 + 4 = 7, so 12 remain. The answer is {written}. Next, 99."
    assert parse_number(extract_number(text) or "") == value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        (
            "\\boxed{1} then \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}",
            "\\left( 3, \\frac{\\pi}{2} \\right)",
        ),
        ("\\boxed 5$.", "5"),
        ("\\fbox{x^{2}}", "x^{2}"),
        ("\\boxed{unclosed", None),
        ("no box", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


_balanced = st.recursive(
    st.text(alphabet="0123456789+-x^\\ab ", max_size=6),
    lambda inner: st.builds(lambda a, b: f"{a}{{{b}}}", inner, inner),
    max_leaves=6,
)


@given(_balanced)
def test_extract_boxed_reads_back_balanced_content(content: str) -> None:
    assert extract_boxed(f"We get \\boxed{{{content}}}. Done.") == content


@pytest.mark.parametrize(
    ("prediction", "gold", "equal"),
    [
        ("\\dfrac{3}{4}", "\\frac34", True),
        ("0.75", "\\frac{3}{4}", True),
        ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
        ("90^\\circ", "90", True),
        ("x = 5", "5", True),
        ("10000", "10,\\!000", True),
        ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}", True),
        ("5\\%", "5", True),
        ("\\text{(B)}", "\\text{(B)}", True),
        ("-\\frac{1}{2}", "\\frac{-1}{2}", True),
        ("2", "3", False),
        ("[2,5)", "[2,5]", False),
        ("\\frac{1}{3}", "0.33", False),
        (None, "1", False),
    ],
)
def test_latex_equal(prediction: str | None, gold: str, equal: bool) -> None:
    assert latex_equal(prediction, gold) is equal


def test_normalize_latex_strips_presentation() -> None:
    assert normalize_latex("\\left( 3, \\dfrac{\\pi}{2} \\right).") == "(3,\\frac{\\pi}{2})"
    assert normalize_latex("\\frac12") == "\\frac{1}{2}"
    assert normalize_latex("2.50") == "2.5"


CSQA_TEXTS = ["bank", "library", "department store", "mall", "new york"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Banks keep money safe. So the answer is (A).", "A"),
        ("The answer is (c).", "C"),
        ("So the answer is: D", "D"),
        ("Answer: E", "E"),
        ("C", "C"),
        ("(B) library", "B"),
        ("B. It is quiet there.", "B"),
        ("A revolving door is found at a mall.", "D"),  # the article "A" is no answer
        ("I think (A) is wrong, it is (B)", "B"),
        ("It could be a bank or a library.", None),
        ("hmm", None),
    ],
)
def test_extract_choice_hard_cases(text: str, expected: str | None) -> None:
    assert extract_choice(text, list("ABCDE"), CSQA_TEXTS) == expected


def test_extract_choice_numeric_labels() -> None:
    assert extract_choice("So the answer is (3).", ["1", "2", "3", "4"]) == "3"
    assert extract_choice("So the answer is (E).", ["1", "2", "3", "4"]) is None


PHRASINGS = (
    "The correct option is {label}.",
    "Option {label}",
    "{label}) {text}",
    "({label})",
    "the answer is ({label})",
    "So the answer is {label}.",
    "Answer: {label}",
    "**{label}**",
    "The answer is **{label}**: {text}.",
    "I choose {label}.",
    "{label}. {text}",
    "I considered {other} and {another}, but the answer is {label}.",
    "Option {other} is wrong. The best choice is option {label}, {text}.",
)


@pytest.mark.parametrize("task", ["arc_challenge", "csqa"])
@needs_data
def test_every_gold_answer_extracts_from_common_phrasings(task: str) -> None:
    path = DATA_DIR / task / "test.jsonl"
    examples = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(examples) > 1000
    misses = []
    for example in examples:
        labels, texts = example["choices"]["label"], example["choices"]["text"]
        gold = example["answerKey"]
        others = [label for label in labels if label != gold]
        values = {
            "label": gold,
            "text": texts[labels.index(gold)],
            "other": others[0],
            "another": others[-1],
        }
        for phrasing in PHRASINGS:
            output = phrasing.format(**values)
            if extract_choice(output, labels, texts) != gold:
                misses.append(output)
    assert not misses, f"{len(misses)} misses, e.g. {misses[:5]}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("C++ is a language", None),
        ("I considered A and B, but the answer is D", "D"),
        ("A good answer needs care. The answer is B.", "B"),
        ("Option A is wrong; option C is right.", "C"),
        ("The answer is C. Option A is wrong because banks are closed.", "C"),
        ("I think the answer is E, a new york store.", "E"),
        ("Answer choices are hard. I'd pick B.", "B"),
        ("**B. library**", "B"),
    ],
)
def test_extract_choice_negative_and_mixed_cases(text: str, expected: str | None) -> None:
    assert extract_choice(text, list("ABCDE"), CSQA_TEXTS) == expected
