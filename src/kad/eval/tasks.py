"""The evaluation tasks: where their data lives, how each model is prompted, how answers score.

``get_task(name)`` returns a task with

- ``.examples(data_dir)``: the records as dicts with their upstream field names, read from
  ``<data_dir>/<folder>/<file>`` (``data_dir`` defaults to the ``KAD_DATA_DIR`` environment
  variable) or, with no data dir, from the Hugging Face Hub (needs the ``datasets`` package);
- ``.score(prediction_text, example) -> bool``;
- ``.prompt(example) -> kad.Prompt``: few-shot chain-of-thought text for the base, one chat
  turn for the proxy.

Generation tasks also have ``.extract(text, example)`` and ``.gold(example)``. Likelihood tasks
(TruthfulQA MC1/MC2) have ``.choices(example)`` and ``.metric(logprobs, example)``: they are
scored by the log-probability of each answer under the mixture π (``Aligner.score``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, ClassVar, Literal

from kad import world
from kad.errors import KadError
from kad.eval import prompts
from kad.eval.extract import (
    extract_boxed,
    extract_choice,
    extract_number,
    latex_equal,
    numbers_equal,
)
from kad.prompt import Prompt, Raw
from kad.textfiles import parse_json, read_text

DATA_DIR_ENV = "KAD_DATA_DIR"
Example = dict[str, Any]


@dataclass(frozen=True)
class Source:
    """Where a task's records come from: a file under the data dir, or a Hub dataset."""

    local: str  # path relative to the data dir, e.g. "gsm8k/test.jsonl"
    hub_path: str
    hub_config: str | None
    hub_split: str


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path | None:
    """The data dir given, else ``$KAD_DATA_DIR``, else None (use the Hub)."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    return Path(chosen).expanduser() if chosen is not None else None


def _read_local(path: Path, fields: Sequence[str]) -> list[Example]:
    """The records of a JSON Lines file (blank lines skipped) or of a JSON array: objects with
    every one of ``fields``. A `KadError` names the file and the line (of a JSON array, the
    record) of the first one that is not."""
    text = read_text(path)
    if path.suffix == ".jsonl":
        located = [
            (f"line {number}", parse_json(line, path, number))
            for number, line in enumerate(text.split("\n"), 1)
            if line.strip()
        ]
    else:
        records = parse_json(text, path)
        if not isinstance(records, list):
            raise KadError(f"{path} should hold a JSON array of records")
        located = [(f"record {number}", record) for number, record in enumerate(records, 1)]
    for where, record in located:
        if not isinstance(record, dict):
            raise KadError(
                f"{path} {where} is not a JSON object (a record with {', '.join(fields)})"
            )
        missing = [name for name in fields if name not in record]
        if missing:
            raise KadError(f"{path} {where} lacks the field(s) {', '.join(missing)}")
    return [record for _, record in located]


def _read_hub(source: Source) -> Iterator[Example]:
    try:
        import datasets
    except ModuleNotFoundError:
        raise KadError(
            f"no data dir: give --data-dir (or set {DATA_DIR_ENV}) to a folder laid out like "
            f"shared/datasets, or pip install datasets to read {source.hub_path} from the Hub"
        ) from None
    try:
        rows = datasets.load_dataset(source.hub_path, source.hub_config, split=source.hub_split)
    except Exception as err:  # offline, unknown name, ...: one clear message
        raise KadError(
            f"could not load {source.hub_path} from the Hugging Face Hub ({err}); give --data-dir "
            f"(or set {DATA_DIR_ENV}) to use local files"
        ) from None
    yield from rows


def check_data_dir(tasks: Sequence[Task], data_dir: str | os.PathLike[str] | None) -> None:
    """`KadError` unless the data dir (``data_dir``, else ``$KAD_DATA_DIR``; neither: the Hub,
    nothing to check) is a folder that holds the file of every task, naming each one missing."""
    root = resolve_data_dir(data_dir)
    if root is None:
        return
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise KadError(f"the data dir {root} {what} (give --data-dir or set {DATA_DIR_ENV})")
    missing = [
        f"{file} (task {task.name})"
        for task in tasks
        if (file := task.data_file()) is not None and not (root / file).is_file()
    ]
    if missing:
        raise KadError(
            f"the data dir {root} lacks {', '.join(missing)}: lay it out like shared/datasets"
        )


class Task:
    """A benchmark. Subclasses set ``name``, ``source``, ``kind`` and the methods below."""

    name: ClassVar[str]
    source: ClassVar[Source]
    kind: ClassVar[Literal["generate", "likelihood"]] = "generate"
    stop: ClassVar[tuple[str, ...]] = ()
    id_field: ClassVar[str | None] = None
    fields: ClassVar[tuple[str, ...]] = ()  # what every record of a local file must hold
    exemplars: ClassVar[Sequence[Any]] = ()

    def __init__(self, shots: int | None = None) -> None:
        """``shots``: how many of the task's exemplars open the base's prompt (default all)."""
        if shots is not None and shots < 0:
            raise KadError(f"shots must be >= 0, got {shots}")
        self.fewshot = tuple(self.exemplars[:shots])

    def examples(
        self, data_dir: str | os.PathLike[str] | None = None, limit: int | None = None
    ) -> Iterator[Example]:
        """The records, in file order, as dicts with their upstream field names; a local file
        is read and checked whole (`check_data_dir`, then every record: `_read_local`)."""
        root = resolve_data_dir(data_dir)
        if root is None:
            records: Iterator[Example] = _read_hub(self.source)
        else:
            check_data_dir([self], root)
            fields = (*self.fields, *([self.id_field] if self.id_field else []))
            records = iter(_read_local(root / self.source.local, fields))
        return islice(records, limit)

    def data_file(self) -> str | None:
        """The task's file under the data dir (``gsm8k/test.jsonl``); None if it reads none."""
        return self.source.local

    def example_id(self, example: Example, index: int) -> str:
        """A stable id: the upstream id field, else the position in the file."""
        return str(example[self.id_field]) if self.id_field else str(index)

    def prompt(self, example: Example) -> Prompt:
        raise NotImplementedError

    def gold(self, example: Example) -> str:
        raise NotImplementedError

    def extract(self, text: str, example: Example) -> str | None:
        raise NotImplementedError

    def score(self, prediction_text: str, example: Example) -> bool:
        raise NotImplementedError


class GSM8K(Task):
    name = "gsm8k"
    source = Source("gsm8k/test.jsonl", "gsm8k", "main", "test")
    stop = ("\nQ:", "\n\n\n")
    fields = ("question", "answer")
    exemplars = prompts.ARITHMETIC_SHOTS

    def question(self, example: Example) -> str:
        return example["question"]

    def prompt(self, example: Example) -> Prompt:
        question = self.question(example)
        return Prompt(
            base=Raw(prompts.qa_fewshot(self.fewshot, question)),
            proxy=prompts.user_turn(prompts.ARITHMETIC_INSTRUCTION, question),
        )

    def gold(self, example: Example) -> str:
        """The number after ``####`` in the worked solution."""
        return example["answer"].rsplit("####", 1)[-1].strip()

    def extract(self, text: str, example: Example) -> str | None:
        return extract_number(text)

    def score(self, prediction_text: str, example: Example) -> bool:
        return numbers_equal(self.extract(prediction_text, example), self.gold(example))


class SVAMP(GSM8K):
    name = "svamp"
    source = Source("svamp/SVAMP.json", "ChilleD/SVAMP", None, "test")
    id_field = "ID"
    fields = ("Body", "Question", "Answer")

    def question(self, example: Example) -> str:
        return f"{example['Body'].strip()} {example['Question'].strip()}"

    def gold(self, example: Example) -> str:
        value = float(example["Answer"])
        return str(int(value)) if value.is_integer() else repr(value)


class MATH500(Task):
    name = "math500"
    source = Source("math500/test.jsonl", "HuggingFaceH4/MATH-500", None, "test")
    stop = ("\nProblem:",)
    id_field = "unique_id"
    fields = ("problem", "answer")
    exemplars = prompts.MATH_SHOTS

    def prompt(self, example: Example) -> Prompt:
        return Prompt(
            base=Raw(prompts.math_fewshot(self.fewshot, example["problem"])),
            proxy=prompts.user_turn(prompts.MATH_INSTRUCTION, example["problem"]),
        )

    def gold(self, example: Example) -> str:
        return example["answer"]

    def extract(self, text: str, example: Example) -> str | None:
        return extract_boxed(text)

    def score(self, prediction_text: str, example: Example) -> bool:
        return latex_equal(self.extract(prediction_text, example), self.gold(example))


class ARCChallenge(Task):
    name = "arc_challenge"
    source = Source("arc_challenge/test.jsonl", "allenai/ai2_arc", "ARC-Challenge", "test")
    stop = ("\nQ:", "\n\n")
    id_field = "id"
    fields = ("question", "choices", "answerKey")
    exemplars = prompts.SCIENCE_SHOTS

    def prompt(self, example: Example) -> Prompt:
        labels, texts = example["choices"]["label"], example["choices"]["text"]
        body = f"Question: {example['question']}\n{prompts.format_choices(labels, texts)}"
        return Prompt(
            base=Raw(prompts.choice_fewshot(self.fewshot, example["question"], labels, texts)),
            proxy=prompts.user_turn(prompts.CHOICE_INSTRUCTION, body),
        )

    def gold(self, example: Example) -> str:
        return example["answerKey"]

    def extract(self, text: str, example: Example) -> str | None:
        return extract_choice(text, example["choices"]["label"], example["choices"]["text"])

    def score(self, prediction_text: str, example: Example) -> bool:
        return self.extract(prediction_text, example) == self.gold(example)


class CommonsenseQA(ARCChallenge):
    name = "csqa"
    source = Source("csqa/test.jsonl", "tau/commonsense_qa", None, "validation")
    exemplars = prompts.COMMONSENSE_SHOTS


def answer_targets(targets: dict[str, Any]) -> list[tuple[str, int]]:
    """(answer, label) pairs from either layout of TruthfulQA's targets: the original
    ``{answer: 0/1}`` (mc_task.json) or the Hub's ``{"choices": [...], "labels": [...]}``."""
    if set(targets) == {"choices", "labels"}:
        return list(zip(targets["choices"], targets["labels"], strict=True))
    return list(targets.items())


class TruthfulQAMC1(Task):
    """MC1: one true answer among the choices; correct iff it has the highest log π."""

    name = "truthfulqa_mc1"
    source = Source(
        "truthfulqa/mc_task.json", "truthfulqa/truthful_qa", "multiple_choice", "validation"
    )
    kind = "likelihood"
    targets_field: ClassVar[str] = "mc1_targets"
    fields = ("question", "mc1_targets")
    exemplars = prompts.TRUTHFULQA_SHOTS

    def prompt(self, example: Example) -> Prompt:
        question = example["question"]
        return Prompt(
            base=Raw(prompts.qa_fewshot(self.fewshot, question)),
            proxy=prompts.user_turn(prompts.TRUTHFULQA_INSTRUCTION, question),
        )

    def choices(self, example: Example) -> tuple[list[str], list[int]]:
        """The continuations to score (each answer after a space) and their 0/1 labels."""
        pairs = answer_targets(example[self.targets_field])
        return [f" {answer}" for answer, _ in pairs], [int(label) for _, label in pairs]

    def gold(self, example: Example) -> str:
        return " | ".join(a for a, label in answer_targets(example[self.targets_field]) if label)

    def metric(self, logprobs: Sequence[float], example: Example) -> float:
        """1.0 if the top-scoring answer is true, else 0.0."""
        _, labels = self.choices(example)
        best = max(range(len(logprobs)), key=logprobs.__getitem__)
        return float(labels[best])

    def score(self, prediction_text: str, example: Example) -> bool:
        """Whether the chosen answer text is a true answer."""
        chosen = prediction_text.strip()
        return any(
            answer.strip() == chosen and label
            for answer, label in answer_targets(example[self.targets_field])
        )


class TruthfulQAMC2(TruthfulQAMC1):
    """MC2: the normalised probability mass on the true answers, Σ_true e^ℓ / Σ_all e^ℓ."""

    name = "truthfulqa_mc2"
    targets_field = "mc2_targets"
    fields = ("question", "mc2_targets")

    def metric(self, logprobs: Sequence[float], example: Example) -> float:
        _, labels = self.choices(example)
        top = max(logprobs)
        if not math.isfinite(top):  # every answer has probability 0 under π
            return 0.0
        weights = [math.exp(value - top) for value in logprobs]
        return sum(w for w, label in zip(weights, labels, strict=True) if label) / sum(weights)


class Toy(Task):
    """The built-in world's held-out problems (``kad.world``)."""

    name = "toy"
    default_size: ClassVar[int] = 200

    def examples(
        self, data_dir: str | os.PathLike[str] | None = None, limit: int | None = None
    ) -> Iterator[Example]:
        return iter(world.heldout_problems(limit or self.default_size, split="test"))

    def data_file(self) -> str | None:
        return None

    def prompt(self, example: Example) -> Prompt:
        """The base reads the question as web text, the proxy as a chat turn."""
        question = example["question"]
        return Prompt(
            base=Raw(world.BASE_TEMPLATE.format(prompt=question)),
            proxy=[{"role": "user", "content": question}],
        )

    def gold(self, example: Example) -> str:
        return str(example["answer"])

    def extract(self, text: str, example: Example) -> str | None:
        """The number of the ``#### <answer>`` line."""
        found = world.extract_answer(text)
        return None if found is None else str(found)

    def score(self, prediction_text: str, example: Example) -> bool:
        return bool(world.score(prediction_text, example["answer"]))


TASKS: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (
        GSM8K,
        SVAMP,
        MATH500,
        ARCChallenge,
        CommonsenseQA,
        TruthfulQAMC1,
        TruthfulQAMC2,
        Toy,
    )
}


def get_task(name: str, shots: int | None = None) -> Task:
    """The task called ``name`` (see ``TASKS``), with ``shots`` exemplars in the base's prompt
    (default: all the task has)."""
    key = name.strip().lower().replace("-", "_")
    if key not in TASKS:
        raise KadError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    return TASKS[key](shots)
