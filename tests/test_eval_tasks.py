"""The tasks on their gold data: every gold answer scores correct against itself."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import kad
from kad.errors import KadError
from kad.eval import get_task
from kad.eval.extract import normalize_latex
from kad.eval.tasks import TASKS, answer_targets
from tests.conftest import DATA_DIR, needs_data

SIZES = {
    "gsm8k": 1319,
    "svamp": 1000,
    "math500": 500,
    "arc_challenge": 1172,
    "csqa": 1221,
    "truthfulqa_mc1": 817,
    "truthfulqa_mc2": 817,
}


@needs_data
@pytest.mark.parametrize("name", list(SIZES))
def test_examples_have_upstream_fields_and_unique_ids(name: str) -> None:
    task = get_task(name)
    examples = list(task.examples(DATA_DIR))
    assert len(examples) == SIZES[name]
    ids = [task.example_id(example, i) for i, example in enumerate(examples)]
    assert len(set(ids)) == len(ids)
    assert list(task.examples(DATA_DIR, limit=3)) == examples[:3]


@needs_data
def test_every_gold_gsm8k_solution_scores_correct() -> None:
    task = get_task("gsm8k")
    for example in task.examples(DATA_DIR):
        assert task.score(example["answer"], example), example["answer"]


@needs_data
def test_gsm8k_scores_a_wrong_final_number_incorrect() -> None:
    task = get_task("gsm8k")
    for example in task.examples(DATA_DIR, limit=50):
        wrong = float(task.gold(example).replace(",", "")) + 1
        assert not task.score(f"The answer is {wrong:g}.", example)


@needs_data
def test_every_svamp_answer_equals_itself() -> None:
    task = get_task("svamp")
    for example in task.examples(DATA_DIR):
        assert task.score(
            f"So {task.gold(example)} is left. The answer is {task.gold(example)}.", example
        )
        assert not task.score(f"The answer is {example['Answer'] + 1}.", example)


def _variant(answer: str) -> str:
    """The same LaTeX answer written differently: dfrac, padding, display spacing."""
    return " " + answer.replace("\\frac", "\\dfrac").replace(",", ", ") + " "


@needs_data
def test_every_math500_answer_equals_itself_after_normalisation() -> None:
    task = get_task("math500")
    for example in task.examples(DATA_DIR):
        assert task.score(f"Hence $\\boxed{{{_variant(example['answer'])}}}$.", example), example[
            "answer"
        ]


@needs_data
def test_math500_rejects_another_problems_answer() -> None:
    task = get_task("math500")
    examples = list(task.examples(DATA_DIR, limit=40))
    for example, other in itertools.pairwise(examples):
        if normalize_latex(other["answer"]) != normalize_latex(example["answer"]):
            assert not task.score(f"\\boxed{{{other['answer']}}}", example)


@needs_data
@pytest.mark.parametrize("name", ["arc_challenge", "csqa"])
def test_every_gold_letter_scores_correct(name: str) -> None:
    task = get_task(name)
    for example in task.examples(DATA_DIR):
        gold = example["answerKey"]
        assert task.score(f"Let me think. So the answer is ({gold}).", example)
        others = [label for label in example["choices"]["label"] if label != gold]
        assert not task.score(f"So the answer is ({others[0]}).", example)


@needs_data
@pytest.mark.parametrize("name", ["truthfulqa_mc1", "truthfulqa_mc2"])
def test_truthfulqa_metrics(name: str) -> None:
    task = get_task(name)
    for example in task.examples(DATA_DIR, limit=100):
        continuations, labels = task.choices(example)
        assert len(continuations) == len(labels) >= 2 and 1 in labels and 0 in labels
        favour_true = [0.0 if label else -50.0 for label in labels]
        favour_false = [-50.0 if label else 0.0 for label in labels]
        assert task.metric(favour_true, example) == pytest.approx(1.0)
        assert task.metric(favour_false, example) == pytest.approx(0.0, abs=1e-12)
        assert task.score(continuations[labels.index(1)], example)
        assert not task.score(continuations[labels.index(0)], example)


def test_truthfulqa_mc2_is_the_normalised_true_mass() -> None:
    task = get_task("truthfulqa_mc2")
    example = {"question": "q", "mc2_targets": {"a": 1, "b": 1, "c": 0}}
    logprobs = [-1.0, -2.0, -0.5]
    import math

    weights = [math.exp(v) for v in logprobs]
    assert task.metric(logprobs, example) == pytest.approx(sum(weights[:2]) / sum(weights))


def test_answer_targets_reads_both_layouts() -> None:
    original = {"yes": 1, "no": 0}
    hub = {"choices": ["yes", "no"], "labels": [1, 0]}
    assert answer_targets(original) == answer_targets(hub) == [("yes", 1), ("no", 0)]


@needs_data
@pytest.mark.parametrize("name", [n for n in TASKS if n != "toy"])
def test_prompts_give_each_model_its_own_rendering(name: str) -> None:
    task = get_task(name)
    example = next(iter(task.examples(DATA_DIR)))
    prompt = task.prompt(example)
    assert isinstance(prompt, kad.Prompt) and isinstance(prompt.base, kad.Raw)
    assert prompt.base.text.count("Q:") + prompt.base.text.count("Problem:") >= 3  # few-shot
    assert isinstance(prompt.proxy, list) and prompt.proxy[0]["role"] == "user"


def test_unknown_task_and_missing_data_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(KadError, match="unknown task"):
        get_task("gsm9k")
    with pytest.raises(KadError, match=r"lacks gsm8k/test\.jsonl"):
        list(get_task("gsm8k").examples(tmp_path))
    with pytest.raises(KadError, match="does not exist"):
        list(get_task("gsm8k").examples(tmp_path / "none"))


def test_toy_task_reads_the_builtin_world() -> None:
    task = get_task("toy")
    examples = list(task.examples(limit=5))
    assert len(examples) == 5
    for example in examples:
        assert task.score(example["solution"], example)
        assert task.extract(example["solution"], example) == task.gold(example)
        assert not task.score(f"#### {int(example['answer']) + 1}", example)


def test_without_a_data_dir_the_hub_names_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(path, config, split):
        calls.append((path, config, split))
        return [{"question": "q", "answer": "so\n#### 3"}, {"question": "r", "answer": "#### 4"}]

    monkeypatch.delenv("KAD_DATA_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    examples = list(get_task("gsm8k").examples(limit=1))
    assert examples == [{"question": "q", "answer": "so\n#### 3"}]
    list(get_task("arc_challenge").examples())
    list(get_task("truthfulqa_mc2").examples())
    assert calls == [
        ("gsm8k", "main", "test"),
        ("allenai/ai2_arc", "ARC-Challenge", "test"),
        ("truthfulqa/truthful_qa", "multiple_choice", "validation"),
    ]


def test_hub_failure_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_dataset(path, config, split):
        raise ConnectionError("offline")

    monkeypatch.delenv("KAD_DATA_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(KadError, match="--data-dir"):
        list(get_task("svamp").examples())
