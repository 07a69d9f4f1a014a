"""Prompt text: few-shot chain-of-thought exemplars for the base, instructions for the proxy.

The base (a pre-trained LM) sees a few worked examples as raw text and continues the pattern;
the proxy (a chat model) gets one user turn with an instruction. Exemplars are the usual
chain-of-thought prompts of the literature (Wei et al. 2022 for arithmetic and CommonsenseQA,
Lewkowycz et al. 2022 for MATH, Lin et al. 2022 for TruthfulQA) or written in their style;
none is drawn from a test set.
"""

from __future__ import annotations

from collections.abc import Sequence

ARITHMETIC_SHOTS: tuple[tuple[str, str], ...] = (
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. "
        "After they are done, there will be 21 trees. How many trees did the grove workers "
        "plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. "
        "So there must have been 21 - 15 = 6. The answer is 6.",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in "
        "the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they "
        "have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had "
        "32 + 42 = 74. After eating 35, they had 74 - 35 = 39. The answer is 39.",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she "
        "has 23 - 15 dollars left. 23 - 15 is 8. The answer is 8.",
    ),
)

MATH_SHOTS: tuple[tuple[str, str], ...] = (
    (
        "Find the domain of the expression $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.",
        "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, "
        "so $x\\ge2$, and $5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal "
        "to zero, so $5-x>0$, which gives $x<5$. Therefore, the domain of the expression is "
        "$\\boxed{[2,5)}$.",
    ),
    (
        "If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find "
        "$\\det (\\mathbf{A} \\mathbf{B}).$",
        "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) "
        "= (2)(12) = \\boxed{24}.$",
    ),
    (
        "Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights "
        "instead, how many times must Terrell lift them in order to lift the same total weight?",
        "If Terrell lifts two 20-pound weights 12 times, he lifts a total of "
        "$2\\cdot 12\\cdot20=480$ pounds of weight. If he lifts two 15-pound weights instead "
        "for $n$ times, he will lift a total of $2\\cdot15\\cdot n=30n$ pounds of weight. "
        "Equating this to 480 pounds, we can solve for $n$: $30n=480$, so "
        "$n=480/30=\\boxed{16}$.",
    ),
)

COMMONSENSE_SHOTS: tuple[tuple[str, Sequence[str], str], ...] = (
    (
        "What do people use to absorb extra ink from a fountain pen?",
        ("shirt pocket", "calligrapher's hand", "inkwell", "desk drawer", "blotter"),
        "The answer must be an item that can absorb ink. Of the above choices, only blotters "
        "are used to absorb ink. So the answer is (E).",
    ),
    (
        "What home entertainment equipment requires cable?",
        ("radio shack", "substation", "television", "cabinet"),
        "The answer must require cable. Of the above choices, only television requires cable. "
        "So the answer is (C).",
    ),
    (
        "The fox walked from the city into the forest, what was it looking for?",
        ("pretty flowers", "hen house", "natural habitat", "storybook"),
        "The answer must be something in the forest. Of the above choices, only natural "
        "habitat is in the forest. So the answer is (C).",
    ),
)

SCIENCE_SHOTS: tuple[tuple[str, Sequence[str], str], ...] = (
    (
        "Which of these is a renewable resource?",
        ("coal", "oil", "wind", "natural gas"),
        "A renewable resource is replaced naturally in a short time. Coal, oil and natural gas "
        "are fossil fuels that take millions of years to form, while wind is replenished all "
        "the time. So the answer is (C).",
    ),
    (
        "What causes day and night on Earth?",
        (
            "Earth's revolution around the Sun",
            "Earth's rotation on its axis",
            "the Moon's orbit around Earth",
            "the tilt of Earth's axis",
        ),
        "Day and night happen because Earth spins on its axis, turning each side toward and "
        "away from the Sun once a day. So the answer is (B).",
    ),
    (
        "A student stirs salt into water until no more salt dissolves. What has the student made?",
        ("a saturated solution", "a compound", "an element", "a precipitate"),
        "When no more of a solute can dissolve in a solvent, the solution is saturated. "
        "So the answer is (A).",
    ),
)

TRUTHFULQA_SHOTS: tuple[tuple[str, str], ...] = (
    (
        "What is human life expectancy in the United States?",
        "Human life expectancy in the United States is 78 years.",
    ),
    (
        "Who was president of the United States in 1955?",
        "Dwight D. Eisenhower was president of the United States in 1955.",
    ),
    ("Which party did he belong to?", "He belonged to the Republican Party."),
    ("What is the square root of banana?", "I have no comment."),
    (
        "How does a telescope work?",
        "Telescopes use lenses or mirrors to focus light and make objects appear closer.",
    ),
    ("Where were the 1992 Olympics held?", "The 1992 Olympics were held in Barcelona, Spain."),
)

ARITHMETIC_INSTRUCTION = (
    "Solve the following problem step by step. End with the sentence "
    '"The answer is N." where N is the final number.'
)
MATH_INSTRUCTION = "Solve the following problem step by step. Put the final answer in \\boxed{}."
CHOICE_INSTRUCTION = (
    "Answer the following multiple-choice question. Think step by step, then end with the "
    'sentence "So the answer is (X)." where X is the letter of the correct choice.'
)
TRUTHFULQA_INSTRUCTION = "Answer the following question truthfully, in one sentence."


def format_choices(labels: Sequence[str], texts: Sequence[str]) -> str:
    """``Answer Choices: (A) first (B) second ...``."""
    return "Answer Choices: " + " ".join(
        f"({label}) {text}" for label, text in zip(labels, texts, strict=True)
    )


def letters(count: int) -> list[str]:
    return [chr(ord("A") + index) for index in range(count)]


def qa_fewshot(shots: Sequence[tuple[str, str]], question: str) -> str:
    """``Q: ...\\nA: ...`` blocks separated by blank lines, ending with the open ``A:``."""
    blocks = [f"Q: {q}\nA: {a}" for q, a in shots]
    return "\n\n".join([*blocks, f"Q: {question}\nA:"])


def math_fewshot(shots: Sequence[tuple[str, str]], question: str) -> str:
    blocks = [f"Problem:\n{q}\n\nSolution:\n{a}" for q, a in shots]
    return "\n\n\n".join([*blocks, f"Problem:\n{question}\n\nSolution:\n"])


def choice_fewshot(
    shots: Sequence[tuple[str, Sequence[str], str]],
    question: str,
    labels: Sequence[str],
    texts: Sequence[str],
) -> str:
    pairs = [
        (f"{q} {format_choices(letters(len(options)), options)}", a) for q, options, a in shots
    ]
    return qa_fewshot(pairs, f"{question} {format_choices(labels, texts)}")


def user_turn(instruction: str, body: str) -> list[dict[str, str]]:
    """One chat message for the proxy: the instruction, a blank line, the problem."""
    return [{"role": "user", "content": f"{instruction}\n\n{body}"}]
