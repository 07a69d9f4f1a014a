"""The built-in world: problem generator, scorer, tokenizer, training script, shipped assets."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

import kad
from kad.demo import one_cpu_thread
from kad.errors import KadError
from kad.world import builtin_paths, extract_answer, heldout_problems, score
from kad.world import generator as gen
from kad.world.probe import char_classes, token_classes
from kad.world.tokenizer import END_OF_TEXT, END_OF_TURN, render_turn


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models decode faster on one thread, and far faster when other jobs share the cores."""
    with one_cpu_thread():
        yield


EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def recompute(solution: str) -> int:
    """Check every equation line of a gold solution by recomputing it; return the #### answer."""
    *equations, final = solution.split("\n")
    previous = None
    for line in equations:
        a, op, b, c = EQUATION.fullmatch(line).groups()  # type: ignore[union-attr]
        a, b, c = int(a), int(b), int(c)
        if op == "/":
            assert b * c == a, line  # exact division
        else:
            assert OPS[op](a, b) == c, line
        previous = c
    assert final == f"#### {previous}"
    return previous


@given(seed=st.integers(0, 2**32))
@settings(max_examples=60, deadline=None)
def test_generated_problems_are_solved_correctly(seed: int) -> None:
    problem = gen.make_problem(random.Random(seed))
    assert 1 <= len(problem.steps) <= 3
    assert recompute(problem.solution()) == problem.answer >= 0
    assert problem.question.endswith("?")
    # every number the first step reads from the story is in the question
    first = problem.steps[0]
    for number in (first.a, first.b):
        assert str(number) in problem.question


def test_heldout_problems_are_seeded_and_disjoint() -> None:
    test = heldout_problems(50, "test")
    assert test == heldout_problems(50, "test")
    assert test[:10] == heldout_problems(10, "test")
    dev = heldout_problems(50, "dev")
    assert {p["question"] for p in test}.isdisjoint(p["question"] for p in dev)
    for split, problems in (("test", test), ("dev", dev)):
        for p in problems:
            assert gen.split_of(str(p["question"])) == split
            assert recompute(str(p["solution"])) == p["answer"]


def test_training_text_never_holds_heldout_problems_or_the_instruction_format() -> None:
    heldout = {p["question"] for p in heldout_problems(300, "test") + heldout_problems(300, "dev")}
    docs = gen.web_documents(seed=7, n=3000)
    for doc in docs:
        assert not any(q in doc for q in heldout)
        assert not re.search(r"^#### -?\d+$", doc, re.MULTILINE), doc  # no answer line
        assert "<|" not in doc  # no chat markers
    questions = [q for q, _ in gen.instruction_examples(seed=8, n=2000)]
    assert heldout.isdisjoint(questions)
    assert all(gen.split_of(q) == "train" for q in questions)


def test_bad_split_and_count_are_errors() -> None:
    with pytest.raises(KadError, match="unknown split"):
        heldout_problems(3, "validation")
    with pytest.raises(KadError, match="n must be"):
        heldout_problems(-1)


@given(answer=st.integers(-(10**6), 10**6), noise=st.text(alphabet="abc =+\n", max_size=30))
def test_score_reads_the_answer_line(answer: int, noise: str) -> None:
    text = f"{noise}\n#### {answer}"
    assert score(text, answer)
    assert score(text, str(answer))
    assert not score(text, answer + 1)
    assert not score(f"{noise} The answer is {answer}.", answer)  # no #### line: wrong


def test_score_takes_the_first_answer_line() -> None:
    assert extract_answer("1 + 2 = 3\n#### 3\n#### 4") == 3
    assert extract_answer("#### 1,234") == 1234
    assert extract_answer("no answer here") is None
    assert not score("####", 0)


def test_shipped_tokenizers_and_chat_template() -> None:
    paths = builtin_paths()
    proxy = AutoTokenizer.from_pretrained(paths.proxy)
    base = AutoTokenizer.from_pretrained(paths.base)
    assert proxy.get_vocab() == base.get_vocab()
    assert base.chat_template is None
    assert proxy.eos_token == END_OF_TURN and base.eos_token == END_OF_TEXT
    chat = [{"role": "user", "content": "Maria has 347 stickers. How many?"}]
    rendered = proxy.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert rendered == render_turn(chat[0]["content"])
    for special in ("<|user|>", "<|assistant|>", END_OF_TURN, END_OF_TEXT):
        assert len(proxy(special, add_special_tokens=False)["input_ids"]) == 1
    ids = proxy("347 + 1205 = 1552", add_special_tokens=False)["input_ids"]
    digits = [t for t in proxy.convert_ids_to_tokens(ids) if t.isdigit()]
    assert "".join(digits) == "34712051552" and all(len(t) == 1 for t in digits)


@given(text=st.text(max_size=80))
@settings(max_examples=50, deadline=None)
def test_tokenizer_round_trips_text(text: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(builtin_paths().proxy)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_assets_load_offline_as_float32_within_size() -> None:
    paths = builtin_paths()
    total = sum(f.stat().st_size for f in Path(paths.base).parent.rglob("*") if f.is_file())
    assert total <= 30 * 2**20
    models = {}
    for name in ("base", "proxy", "proxy_base"):
        model = AutoModelForCausalLM.from_pretrained(getattr(paths, name))
        assert model.dtype.is_floating_point and str(model.dtype) == "torch.float32"
        models[name] = model

    def non_embedding(model) -> int:
        embedding = model.get_input_embeddings().weight.numel()
        return sum(p.numel() for p in model.parameters()) - embedding  # tied head

    assert non_embedding(models["base"]) >= 4 * non_embedding(models["proxy"])
    aligner = kad.Aligner.from_pretrained(paths.base, paths.proxy, paths.proxy_base)
    out = aligner.generate("Tom has 12 apples. How many apples does Tom have?", max_new_tokens=4)
    assert len(out) == 1 and out[0].stats.tokens >= 1


def test_probe_classes_follow_the_answer_layout() -> None:
    solution = "9 * 71 = 639\n#### 639"
    tokenizer = AutoTokenizer.from_pretrained(builtin_paths().proxy)
    encoded = tokenizer(solution, return_offsets_mapping=True, add_special_tokens=False)
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    labels = token_classes(encoded["offset_mapping"], char_classes(solution))
    assert list(zip(tokens, labels, strict=True)) == [
        ("9", "setup"), ("Ġ*", "setup"), ("Ġ", "layout"), ("7", "setup"), ("1", "setup"),
        ("Ġ=", "layout"), ("Ġ", "layout"), ("6", "arithmetic"), ("3", "arithmetic"),
        ("9", "arithmetic"), ("Ċ", "layout"), ("####", "format"), ("Ġ", "format"),
        ("6", "answer"), ("3", "answer"), ("9", "answer"),
    ]  # fmt: skip


def test_training_script_runs_end_to_end(tmp_path: Path) -> None:
    from kad.world.train import Recipe, train_world

    recipe = Recipe(
        web_docs=400, instruction_examples=60, tokenizer_docs=400, vocab_size=400, seq_len=128,
        batch=4, base_steps=2, proxy_steps=2, sft_steps=2, probe_problems=4,
    )  # fmt: skip
    metrics = train_world(recipe, tmp_path, torch.device("cpu"), workers=1)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["probe"] == metrics["probe"] and set(saved["losses"]) == {
        "base",
        "proxy_base",
        "proxy",
    }
    proxy = AutoTokenizer.from_pretrained(tmp_path / "proxy")
    assert proxy.chat_template is not None
    aligner = kad.Aligner.from_pretrained(tmp_path / "base", tmp_path / "proxy")
    assert aligner.generate("Tom has 3 apples?", max_new_tokens=2)[0].stats.tokens >= 1
