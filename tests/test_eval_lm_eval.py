"""The lm-eval model `kad`: loglikelihood against Aligner.score, and a run of local task YAMLs
(tests/data/lm_eval) over a few short rows of shipped datasets."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("lm_eval")

import kad
from kad.eval.lm_eval_model import KadLM
from tests.conftest import DATA_DIR, REPO_ROOT, needs_data

TASKS_DIR = REPO_ROOT / "tests" / "data" / "lm_eval"


@pytest.fixture(scope="module")
def kad_lm(tiny_dirs: SimpleNamespace) -> KadLM:
    return KadLM(base=str(tiny_dirs.base), proxy=str(tiny_dirs.proxy), rule="dual", lam=0.4)


def test_kad_is_registered() -> None:
    from lm_eval.api.registry import get_model

    assert get_model("kad") is KadLM


def _greedy_case(kad_lm: KadLM) -> tuple[str, str]:
    """A context whose greedy continuation under π re-tokenizes to its own ids (a random tiny
    model often emits stray UTF-8 bytes or splits a merge, which would not)."""
    words = [
        "The",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "Tom",
        "has",
        "apples",
        "Hello",
        "world",
    ]
    for shift in range(len(words)):
        context = " ".join(words[shift:] + words[:shift])
        prompt = kad.Prompt(base=kad.Raw(context), proxy=kad.Raw(context))
        out = kad_lm.aligner.generate(prompt, rule=kad_lm.rule, max_new_tokens=2)[0]
        ids = kad_lm.aligner.tokenizer(out.text, add_special_tokens=False)["input_ids"]
        if ids == out.token_ids:
            return context, out.text
    pytest.skip("no greedy continuation re-tokenizes to its own ids")


def test_loglikelihood_is_the_mixture_score_and_knows_greedy(kad_lm: KadLM) -> None:
    context, greedy = _greedy_case(kad_lm)
    other = greedy[:-1] + ("a" if greedy[-1] != "a" else "b")
    requests = [SimpleNamespace(args=(context, greedy)), SimpleNamespace(args=(context, other))]
    (lp_greedy, is_greedy), (lp_other, other_greedy) = kad_lm.loglikelihood(requests)
    prompt = kad.Prompt(base=kad.Raw(context), proxy=kad.Raw(context))
    expected = kad_lm.aligner.score([prompt, prompt], [greedy, other], rule=kad_lm.rule)
    assert [lp_greedy, lp_other] == pytest.approx(expected, rel=1e-5)
    assert lp_greedy > lp_other
    assert is_greedy and not other_greedy


def _short_rows(path: Path, text_of, count: int) -> list[dict]:
    """The ``count`` shortest rows of a shipped file (the tiny models hold 256 tokens)."""
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        rows = json.loads(path.read_text())
    return sorted(rows, key=lambda row: len(text_of(row)))[:count]


@needs_data
def test_lm_eval_runs_local_tasks(
    tiny_dirs: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """generate_until and loglikelihood through lm-eval's evaluator, the model named "kad"
    with a model_args string as on the command line (only the local tasks are indexed)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    svamp = _short_rows(DATA_DIR / "svamp" / "SVAMP.json", lambda r: r["Body"] + r["Question"], 3)
    arc = _short_rows(
        DATA_DIR / "arc_challenge" / "test.jsonl",
        lambda r: r["question"] + "".join(r["choices"]["text"]),
        3,
    )
    for name, rows in (("svamp_mini.jsonl", svamp), ("arc_mini.jsonl", arc)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)  # the YAMLs name their data files relative to the working dir
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    output = simple_evaluate(
        model="kad",
        model_args=f"base={tiny_dirs.base},proxy={tiny_dirs.proxy},rule=primal,budget=0.9",
        tasks=["kad_svamp_mini", "kad_arc_mini"],
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
        batch_size=2,
        device="cpu",
        log_samples=True,
    )
    results = output["results"]
    assert 0.0 <= results["kad_svamp_mini"]["exact_match,none"] <= 1.0
    assert 0.0 <= results["kad_arc_mini"]["acc,none"] <= 1.0
    generations = output["samples"]["kad_svamp_mini"]
    assert len(generations) == 3
    assert all("\n" not in s["resps"][0][0] for s in generations)  # cut at the until string
    choices = output["samples"]["kad_arc_mini"]
    assert [len(s["resps"]) for s in choices] == [len(r["choices"]["text"]) for r in arc]
    for sample in choices:
        logprob, is_greedy = sample["resps"][0][0]
        assert logprob < 0 and isinstance(is_greedy, bool)
