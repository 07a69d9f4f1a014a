"""Arithmetic word problems and the two kinds of text the world's models learn from.

A problem is a short story (one to three arithmetic steps on a quantity of things) and a
question; its solution is the chain of equations ``a op b = c`` that answers it.

- **Web text** (pre-training of the base ``p`` and the proxy base ``q``): problems followed by
  worked solutions in several surface forms (equation lines, inline equations, words), worksheets
  of arithmetic facts, and exercise lists without answers. Each surface choice (question prefix,
  solution intro, equation style, ending) is drawn from a Zipf law over its options, as styles are
  on the web: one dominant form and a tail. Web text never contains the instruction format.
- **Instruction data** (fine-tuning ``q`` into ``q*``): the question as a chat turn, the answer as
  the equations one per line and a final line ``#### <answer>``.

Every problem is assigned to one split (train, dev, test) by a stable hash of its question, so
the held-out problems can never appear in the training text, whatever the seeds.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

from kad.errors import KadError

SPLITS: tuple[str, ...] = ("train", "dev", "test")
# The split of a question: its hash modulo 100 falls in [lo, hi).
_SPLIT_RANGES: dict[str, tuple[int, int]] = {"train": (0, 90), "dev": (90, 95), "test": (95, 100)}
# Base seeds of the held-out generators; any seed works, the hash decides the split.
_HELDOUT_SEEDS: dict[str, int] = {"train": 1_000, "dev": 2_000, "test": 3_000}

_SHE: tuple[str, ...] = (
    *("Maria", "Anna", "Sofia", "Emma", "Lucy", "Grace", "Chloe", "Nora", "Mia", "Zoe", "Ella"),
    *("Lily", "Ruby", "Ava", "Julia", "Sara", "Nina", "Clara", "Alice", "Rosa", "Hana", "Leila"),
    *("Priya", "Mei", "Amara", "Ines", "Olga", "Fatima", "Keiko", "Tara"),
)
_HE: tuple[str, ...] = (
    *("Omar", "Liam", "Noah", "Ben", "Leo", "Jack", "Sam", "Tom", "Max", "Hugo", "Ivan", "Luca"),
    *("Adam", "Ravi", "Kenji", "Diego", "Felix", "Oscar", "Paul", "Marco", "Ali", "Yusuf"),
    *("Tariq", "Chen", "Pedro", "Karl", "Emil", "Jonas", "Arjun", "Kofi"),
)
_NAMES: tuple[tuple[str, str], ...] = (
    *((name, "she") for name in _SHE),
    *((name, "he") for name in _HE),
)
_PRONOUNS: dict[str, tuple[str, str, str]] = {  # subject, object, possessive
    "she": ("she", "her", "her"),
    "he": ("he", "him", "his"),
}
_THINGS: tuple[str, ...] = (
    *("apples", "stickers", "marbles", "books", "pencils", "cards", "coins", "stamps", "shells"),
    *("cookies", "beads", "candies", "flowers", "eggs", "toys", "balloons", "crayons", "buttons"),
    *("rocks", "tickets", "nuts", "cups", "plates", "oranges", "peaches", "lemons", "muffins"),
    *("bottles", "candles", "ribbons", "feathers", "seeds", "bricks", "nails", "tiles", "keys"),
    *("spoons", "socks", "shirts"),
)
_GROUPS: tuple[str, ...] = (
    "boxes",
    "bags",
    "packs",
    "jars",
    "baskets",
    "crates",
    "trays",
    "bundles",
)
_FRIENDS: tuple[str, ...] = ("friends", "cousins", "classmates", "neighbours", "teammates")

_TITLE_WORDS: tuple[str, ...] = (
    *("Exercises", "Practice", "Homework", "Review", "Notes", "Answers", "Solutions", "Examples"),
    *("Warm-up", "Quiz", "Lesson", "Worksheet", "Challenge", "Puzzles", "Drill", "Revision"),
    *("Summary", "Tasks", "Classwork", "Sums"),
)
# How a worked solution ends on the web: a long tail of forms ("" = no ending line).
_ENDINGS: tuple[str, ...] = (
    "The answer is {answer}.",
    "So the answer is {answer}.",
    "",
    "Answer: {answer}",
    "Final answer: {answer}",
    "That makes {answer}.",
    "Therefore the answer is {answer}.",
    "The result is {answer}.",
    "Result: {answer}",
    "We get {answer}.",
    "Done: {answer}.",
    "It comes to {answer}.",
)
_OP_WORDS: dict[str, str] = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}
_ANSWER_LINE = re.compile(r"####\s*(-?[\d,]+)")


@dataclass(frozen=True)
class Step:
    """One equation of a solution: ``a op b = result``."""

    a: int
    op: str
    b: int
    result: int

    def equation(self) -> str:
        return f"{self.a} {self.op} {self.b} = {self.result}"


@dataclass(frozen=True)
class Problem:
    """A word problem, its solution steps and its answer (the last step's result)."""

    question: str
    steps: tuple[Step, ...]

    @property
    def answer(self) -> int:
        return self.steps[-1].result

    def solution(self) -> str:
        """The instruction format's answer: the equations one per line, then ``#### <answer>``."""
        return "\n".join(step.equation() for step in self.steps) + f"\n#### {self.answer}"


def split_of(question: str) -> str:
    """The split a question belongs to, from a stable hash of its text."""
    bucket = int.from_bytes(hashlib.blake2b(question.encode(), digest_size=8).digest(), "big") % 100
    return next(name for name, (lo, hi) in _SPLIT_RANGES.items() if lo <= bucket < hi)


def _zipf(rng: random.Random, options: tuple[str, ...] | list[str]) -> str:
    """One option, with probability ∝ 1 / rank (the first option is the most common)."""
    return rng.choices(options, weights=[1.0 / (rank + 1) for rank in range(len(options))])[0]


def _amount(rng: random.Random, low: int, high: int = 999) -> int:
    """A quantity in [low, high] (low < 100): three digits 70% of the time, two digits 15%, four
    digits 15% when ``high`` allows it (else two)."""
    draw = rng.random()
    if draw < 0.7:
        return rng.randint(100, min(high, 999))
    if draw < 0.85 or high < 1000:
        return rng.randint(low, 99)
    return rng.randint(1000, high)


def _apply(a: int, op: str, b: int) -> Step:
    result = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    return Step(a, op, b, result)


def make_problem(rng: random.Random) -> Problem:
    """A random problem of one to three equations: sums and differences of 2- to 4-digit numbers,
    products of a digit and a 2- or 3-digit number, exact divisions by a digit."""
    name, gender = rng.choice(_NAMES)
    subj, obj, poss = _PRONOUNS[gender]
    other = rng.choice([n for n, _ in _NAMES if n != name])
    things = rng.choice(_THINGS)
    n_equations = rng.choice((1, 2, 2, 3, 3))
    sentences: list[str] = []
    steps: list[Step] = []

    starts_with_groups = rng.random() < (0.3 if n_equations == 1 else 0.25)
    if starts_with_groups:
        k, b, group = rng.randint(2, 9), _amount(rng, 12), rng.choice(_GROUPS)
        steps.append(_apply(k, "*", b))
        sentences.append(
            rng.choice(
                (
                    f"{name} has {k} {group} with {b} {things} in each.",
                    f"{name} buys {k} {group} of {things}, and each one holds {b} {things}.",
                    f"There are {k} {group} in {name}'s room, each with {b} {things}.",
                )
            )
        )
        total = steps[-1].result
    else:
        total = _amount(rng, 20, 2999)
        sentences.append(
            rng.choice(
                (
                    f"{name} has {total} {things}.",
                    f"{name} collected {total} {things}.",
                    f"There are {total} {things} in {name}'s room.",
                    f"{name} starts the day with {total} {things}.",
                )
            )
        )
    Subj = subj.capitalize()  # the pronoun at the start of a sentence
    scope = "in total" if n_equations == 1 and starts_with_groups else "now"
    final_question = f"How many {things} does {name} have {scope}?"
    while len(steps) < n_equations:
        room = n_equations - len(steps)
        kinds = ["add", "sub"] + (["group_add", "group_sub"] if room >= 2 else []) + ["share"]
        kind = rng.choice(kinds)
        if kind == "share":
            divisors = [k for k in range(2, 10) if total % k == 0]
            if room != 1 or not divisors:
                kind = "add"
        if kind == "sub" and total < 20:
            kind = "add"
        if kind == "add":
            b = _amount(rng, 10)
            steps.append(_apply(total, "+", b))
            sentences.append(
                rng.choice(
                    (
                        f"{Subj} buys {b} more {things}.",
                        f"{other} gives {obj} {b} more {things}.",
                        f"Then {subj} finds {b} {things}.",
                        f"{Subj} gets {b} more {things} from {other}.",
                    )
                )
            )
        elif kind == "sub":
            b = rng.randint(10, total - 1)
            steps.append(_apply(total, "-", b))
            sentences.append(
                rng.choice(
                    (
                        f"{Subj} gives {b} {things} to {other}.",
                        f"{Subj} sells {b} of them.",
                        f"Then {subj} loses {b} {things}.",
                        f"{Subj} uses {b} {things}.",
                    )
                )
            )
        elif kind in ("group_add", "group_sub"):
            k, b, group = rng.randint(2, 9), _amount(rng, 12, 499), rng.choice(_GROUPS)
            if kind == "group_sub" and k * b >= total:
                kind = "group_add"
            steps.append(_apply(k, "*", b))
            if kind == "group_add":
                steps.append(_apply(total, "+", k * b))
                sentences.append(f"{Subj} buys {k} more {group} with {b} {things} in each.")
            else:
                steps.append(_apply(total, "-", k * b))
                sentences.append(f"{Subj} gives away {k} {group} of {b} {things}.")
        else:
            k = rng.choice(divisors)
            friends = rng.choice(_FRIENDS)
            steps.append(_apply(total, "/", k))
            sentences.append(f"{Subj} shares them equally among {k} {friends}.")
            final_question = f"How many {things} does each of {poss} {friends} get?"
        total = steps[-1].result
    question = " ".join([*sentences, final_question])
    return Problem(question=question, steps=tuple(steps))


def problems(seed: int, split: str) -> Iterator[Problem]:
    """An endless, seeded stream of problems of one split."""
    if split not in SPLITS:
        raise KadError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    rng = random.Random(seed)
    while True:
        problem = make_problem(rng)
        if split_of(problem.question) == split:
            yield problem


def heldout_problems(n: int, split: str = "test") -> list[dict[str, object]]:
    """The first n problems of a split: ``{"question", "answer" (int), "solution"}`` each.

    Deterministic: the same n and split always give the same problems. ``test`` is for reporting
    only; make choices on ``dev``.
    """
    if n < 0:
        raise KadError(f"n must be >= 0, got {n}")
    stream = problems(_HELDOUT_SEEDS[split] if split in SPLITS else 0, split)
    out = []
    for _ in range(n):
        problem = next(stream)
        out.append(
            {"question": problem.question, "answer": problem.answer, "solution": problem.solution()}
        )
    return out


def extract_answer(text: str) -> int | None:
    """The number on the first ``#### <answer>`` line of a generation, or None."""
    match = _ANSWER_LINE.search(text)
    if match is None:
        return None
    digits = match.group(1).replace(",", "")
    return int(digits) if digits.lstrip("-") else None


def score(text: str, answer: int | str) -> bool:
    """Exact match: the ``#### <answer>`` line of ``text`` holds ``answer``."""
    found = extract_answer(text)
    return found is not None and found == int(str(answer).replace(",", ""))


# ---- the instruction format -------------------------------------------------------------------


def instruction_example(problem: Problem) -> tuple[str, str]:
    """(user message, assistant answer) for fine-tuning the aligned proxy."""
    return problem.question, problem.solution()


# ---- web text ---------------------------------------------------------------------------------


def _render_steps(rng: random.Random, steps: tuple[Step, ...]) -> tuple[str, str]:
    """The steps in one web surface form, and the separator that follows them."""
    style = _zipf(rng, ("lines", "inline", "narrative", "words"))
    if style == "lines":
        return "\n".join(step.equation() for step in steps), "\n"
    if style == "inline":
        return " ".join(f"{step.equation()}." for step in steps), " "
    if style == "narrative":
        links = ["First,", "Then", "Next,", "After that,"]
        if len(steps) == 1:
            return f"We get {steps[0].equation()}.", " "
        parts = [f"{links[min(i, 3)]} {step.equation()}." for i, step in enumerate(steps)]
        return " ".join(parts), " "
    parts = [f"{s.a} {_OP_WORDS[s.op]} {s.b} is {s.result}." for s in steps]
    return " ".join(parts), " "


def _title(rng: random.Random) -> str:
    """A page or section title, from a long tail of words, names, things and numbers."""
    word, name, things, n = (
        rng.choice(_TITLE_WORDS),
        rng.choice(_NAMES)[0],
        rng.choice(_THINGS),
        rng.randint(2, 999),
    )
    return rng.choice(
        (
            word,
            f"{name}'s {things}",
            f"{word} on {things}",
            f"{things.capitalize()} and {rng.choice(_THINGS)}",
            f"{n} {things}",
            f"{n} facts about {things}",
            f"{n} sums to practise",
        )
    )


def _heading(rng: random.Random, title: str) -> str:
    """A title line in one web form: none, ``Title:``, or a markdown heading ``#`` to ``####``."""
    form = _zipf(rng, ("none", "colon", "####", "###", "##", "#"))
    if form == "none":
        return ""
    return f"{title}:\n" if form == "colon" else f"{form} {title}\n"


def web_problem(rng: random.Random, problem: Problem, index: int) -> str:
    """A problem with a worked solution, as found on a web page (never the instruction format)."""
    prefix = _zipf(rng, ("", "Question: ", "Problem: ", "Q: ", f"Exercise {index}: "))
    after_question = _zipf(rng, ("\n", " ", "\n\n"))
    intro = _zipf(
        rng, ("", "Solution:", "Answer:", "A:", "Let's work it out.", "We compute step by step.")
    )
    body, sep = _render_steps(rng, problem.steps)
    ending = _zipf(rng, _ENDINGS).format(answer=problem.answer)
    text = prefix + problem.question + after_question
    if intro:
        text += intro + ("\n" if sep == "\n" else " ")
    text += body
    if ending:
        text += sep + ending
    return text


def web_page(rng: random.Random, stream: Iterator[Problem]) -> str:
    """A page of two or three worked problems, each under a markdown heading."""
    form = _zipf(rng, ("####", "###", "##"))
    parts = [
        f"{form} {_title(rng)}\n" + web_problem(rng, next(stream), i + 1)
        for i in range(rng.randint(2, 3))
    ]
    return "\n\n".join(parts)


def _fact(rng: random.Random) -> Step:
    """A random arithmetic fact from the ranges the problems use."""
    op = rng.choice("++--*/")
    if op == "+":
        return _apply(_amount(rng, 10, 2999), "+", _amount(rng, 10))
    if op == "-":
        a = _amount(rng, 20, 3999)
        return _apply(a, "-", rng.randint(10, a - 1))
    if op == "*":
        k, b = rng.randint(2, 9), _amount(rng, 2)
        return _apply(k, "*", b) if rng.random() < 0.7 else _apply(b, "*", k)
    k = rng.randint(2, 9)
    return _apply(k * _amount(rng, 2, 999), "/", k)


def web_facts(rng: random.Random) -> str:
    """A worksheet of arithmetic facts in one surface form."""
    facts = [_fact(rng) for _ in range(rng.randint(3, 10))]
    style = _zipf(rng, ("lines", "words", "sentences", "commas"))
    heading = _heading(rng, _title(rng))
    if style == "lines":
        return heading + "\n".join(f.equation() for f in facts)
    if style == "commas":
        return heading + ", ".join(f.equation() for f in facts) + "."
    if style == "words":
        return heading + " ".join(f"{f.a} {_OP_WORDS[f.op]} {f.b} is {f.result}." for f in facts)
    names = {"+": "sum", "-": "difference", "*": "product", "/": "quotient"}
    return heading + " ".join(f"The {names[f.op]} of {f.a} and {f.b} is {f.result}." for f in facts)


def web_exercises(rng: random.Random, stream: Iterator[Problem]) -> str:
    """A list of exercises without answers."""
    heading = _heading(rng, _title(rng))
    questions = [next(stream).question for _ in range(rng.randint(2, 4))]
    return heading + "\n".join(f"{i + 1}. {q}" for i, q in enumerate(questions))


def web_documents(seed: int, n: int) -> list[str]:
    """n web documents: 45% worked problems, 10% pages of them under headings, 30% fact
    worksheets, 15% exercise lists."""
    rng = random.Random(seed)
    stream = problems(seed, "train")
    docs = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.45:
            docs.append(web_problem(rng, next(stream), rng.randint(1, 40)))
        elif kind < 0.55:
            docs.append(web_page(rng, stream))
        elif kind < 0.85:
            docs.append(web_facts(rng))
        else:
            docs.append(web_exercises(rng, stream))
    return docs


def instruction_examples(seed: int, n: int) -> list[tuple[str, str]]:
    """n (question, answer) pairs of the train split in the instruction format."""
    stream = problems(seed, "train")
    return [instruction_example(next(stream)) for _ in range(n)]
