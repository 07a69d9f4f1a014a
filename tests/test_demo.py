"""`kad demo`: its evaluation scores real generations of the shipped world."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import kad
from kad import demo
from kad.demo import (
    METHODS,
    Row,
    evaluate,
    load_world,
    one_cpu_thread,
    render_table,
    run_demo,
    summarize,
)
from kad.errors import KadError
from kad.outputs import Generation, GenerationStats
from kad.world import heldout_problems

ANSWER_LINE = re.compile(r"####\s*(-?\d+)")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models decode faster on one thread, and far faster when other jobs share the cores."""
    with one_cpu_thread():
        yield


@pytest.fixture(scope="module")
def world() -> kad.Aligner:
    return load_world()


def manual_accuracy(generations: list[Generation], problems: list[dict]) -> float:
    """Score by hand: the first ``#### N`` of each text against the answer."""
    hits = 0
    for generation, problem in zip(generations, problems, strict=True):
        match = ANSWER_LINE.search(generation.text)
        hits += match is not None and int(match.group(1)) == problem["answer"]
    return hits / len(problems)


def fake(text: str, tokens: int, deferral: float | None, drafted: int | None = None) -> Generation:
    stats = GenerationStats(
        tokens=tokens,
        deferral_rate=deferral,
        mean_alpha=None if deferral is None else deferral / 2,
        base_forwards=tokens // 2,
        drafted=drafted,
        accepted=None if drafted is None else drafted - 1,
    )
    return Generation(text, list(range(tokens)), "stop", stats)


def test_summarize_pools_scores_and_statistics() -> None:
    problems = [{"answer": 5}, {"answer": 7}, {"answer": 9}]
    gens = [
        fake("2 + 3 = 5\n#### 5", 10, 1.0, drafted=8),
        fake("#### 8", 30, 0.0, drafted=12),
        fake("The answer is 9.", 20, 0.5, drafted=10),
    ]
    row = summarize("m", gens, problems)
    assert row.accuracy == pytest.approx(1 / 3)
    assert row.deferral_rate == pytest.approx((10 * 1.0 + 20 * 0.5) / 60)  # token-weighted
    assert row.mean_alpha == pytest.approx(row.deferral_rate / 2)
    assert row.acceptance == pytest.approx((7 + 11 + 9) / 30)
    assert row.tokens_per_base_forward == pytest.approx(60 / 30)
    plain = summarize("m", [fake("#### 5", 4, None)], problems[:1])
    assert plain.accuracy == 1 and plain.deferral_rate is None and plain.acceptance is None
    with pytest.raises(KadError):
        summarize("m", gens[:2], problems)


def test_accuracy_is_computed_from_real_generations(world: kad.Aligner) -> None:
    problems = heldout_problems(40, "test")
    accuracy = {}
    for method, rule in METHODS:
        if method not in ("base", "proxy", "KAD dual λ=0.4"):
            continue
        row, gens = evaluate(world, problems, rule, method)
        assert row.accuracy == pytest.approx(manual_accuracy(gens, problems))
        assert row.problems == 40 and row.acceptance is not None
        wrong = [{**p, "answer": int(p["answer"]) + 1} for p in problems]
        assert summarize(method, gens, wrong).accuracy <= 1 - row.accuracy
        accuracy[method] = row.accuracy
        if method == "base":  # the base computes but never writes the answer line
            assert not any("####" in g.text for g in gens)
            solved = [str(p["answer"]) in g.text for g, p in zip(gens, problems, strict=True)]
            assert sum(solved) >= 30
    assert accuracy["base"] == 0
    assert accuracy["KAD dual λ=0.4"] > accuracy["proxy"] > 0.5


def test_speculative_and_plain_give_the_same_generations(world: kad.Aligner) -> None:
    problems = heldout_problems(6, "test")
    rule = kad.Dual(lam=0.4)
    spec_row, spec = evaluate(world, problems, rule, "dual", speculative=4)
    plain_row, plain = evaluate(world, problems, rule, "dual", speculative=None)
    assert [g.token_ids for g in spec] == [g.token_ids for g in plain]
    assert spec_row.accuracy == plain_row.accuracy
    assert plain_row.acceptance is None and 0 < spec_row.acceptance <= 1
    for row, shown in ((spec_row, True), (plain_row, False)):
        headers = [column.header for column in render_table([row], "t").columns]
        assert ("acceptance" in headers) is shown


def test_demo_json_lists_every_method(capsys: pytest.CaptureFixture[str]) -> None:
    rows = run_demo(as_json=True, n=4)
    report = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in report["rows"]] == [m for m, _ in METHODS]
    assert report["rows"] == [r.to_dict() for r in rows]
    for r in report["rows"]:
        assert {"method", "accuracy", "deferral_rate", "mean_alpha", "acceptance"} <= set(r)
        assert "deferred_mass" not in r  # one name for mean α, as in kad eval's summaries
        assert 0 <= r["accuracy"] <= 1 and r["problems"] == 4


def test_demo_table_examples_and_sweep_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo, "SWEEP_LAMBDAS", (0.2, 0.4))  # a short sweep keeps the test fast
    monkeypatch.setattr(demo, "SWEEP_BUDGETS", (0.9,))
    plot = tmp_path / "sweep.png"
    rows = run_demo(sweep=str(plot), n=2)
    captured = capsys.readouterr()
    out = captured.out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # stderr is no terminal here: a plain line as each method finishes, none repeated
    progress = captured.err.splitlines()
    assert len(progress) == len(METHODS) + 2  # the sweep's new points: dual, nudging λ=0.2
    for number, (method, _) in enumerate(METHODS, 1):
        line = f"kad demo, 2 problems: {number}/{len(METHODS)} methods, {method}: accuracy "
        assert progress[number - 1].startswith(line)
    assert progress[-1].startswith("kad demo, 2 problems, sweep: 2/2 methods, nudging λ=0.2:")
    assert all(isinstance(r, Row) for r in rows)
    for text in ("base (", "proxy (", "KAD dual λ=0.4 (", "KAD primal b=0.9", "λ and b sweep"):
        assert text in out


def test_demo_rejects_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_loading() -> None:
        raise AssertionError("the models loaded before the arguments were checked")

    monkeypatch.setattr(demo, "load_world", no_loading)
    with pytest.raises(KadError, match="--n"):
        run_demo(n=0)
    with pytest.raises(KadError, match="png"):
        run_demo(sweep="plot.jpg", n=1)
    with pytest.raises(KadError, match="the folder /nonexistent/dir does not exist"):
        run_demo(sweep="/nonexistent/dir/s.png", n=1)
    (tmp_path / "file").write_text("")
    with pytest.raises(KadError, match="file is not a folder"):
        run_demo(sweep=str(tmp_path / "file" / "s.png"), n=1)
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(KadError, match="is a folder"):
        run_demo(sweep=str(tmp_path / "dir.png"), n=1)
    with pytest.raises(KadError, match="cannot write there"):
        run_demo(sweep="/proc/s.png", n=1)  # /proc takes no new files, even from root
    assert demo.check_plot_path(str(tmp_path / "ok.png")) == tmp_path / "ok.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.png", "file"]  # the try is gone
