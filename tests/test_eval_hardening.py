"""`kad eval`, `kad sweep` and `kad lm-eval` on what a new user hits (issue 22): bad data files
and options are one line before any model loads, Ctrl-C says what is saved, sweep progress and
help name the grid's points, --top-k and --stop reach the generation, one definition of mean α.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from kad.cli import app
from kad.errors import KadError
from kad.eval import commands, runner
from kad.eval.runner import pooled_stats, read_records, summarize
from kad.eval.sweep import DEFAULT_GRIDS
from kad.eval.tasks import check_data_dir, get_task


def run_cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result, *phrases: str) -> None:
    """Exit code 2 and a single ``error: ...`` line holding ``phrases``, no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for phrase in phrases:
        assert phrase in lines[0]


@pytest.fixture
def no_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the models fails the test: what is checked must be checked first."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the models loaded before the input was checked")

    monkeypatch.setattr(commands, "load_aligner", refuse)


GSM8K_LINE = b'{"question": "What is 2 plus 2?", "answer": "so\\n#### 4"}\n'


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (GSM8K_LINE + b'{"question": "caf\xe9", "answer": "#### 1"}\n', "line 2 is not UTF-8"),
        (GSM8K_LINE + b"\n" + b'{"question": "a", "answer": #### 1}\n', "line 3 is not valid JSON"),
        (GSM8K_LINE + b"[1, 2]\n", "line 2 is not a JSON object"),
        (b'{"question": "a"}\n', "line 1 lacks the field(s) answer"),
    ],
)
def test_a_bad_data_file_names_the_file_and_the_line(
    tmp_path: Path, content: bytes, message: str
) -> None:
    (tmp_path / "gsm8k").mkdir()
    path = tmp_path / "gsm8k" / "test.jsonl"
    path.write_bytes(content)
    with pytest.raises(KadError, match=f"^{re.escape(f'{path} {message}')}"):
        list(get_task("gsm8k").examples(tmp_path))


def test_data_files_read_with_a_bom_crlf_and_json_arrays(tmp_path: Path) -> None:
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_bytes(b"\xef\xbb\xbf" + GSM8K_LINE[:-1] + b"\r\n")
    assert len(list(get_task("gsm8k").examples(tmp_path))) == 1
    (tmp_path / "svamp").mkdir()
    array = tmp_path / "svamp" / "SVAMP.json"
    array.write_text('[\n  {"ID": "a", "Body": "x", "Question": "y", "Answer": 1.0},\n  {"ID": ]')
    with pytest.raises(KadError, match=f"^{array} line 3 is not valid JSON"):
        list(get_task("svamp").examples(tmp_path))
    array.write_text('[{"ID": "a", "Body": "x", "Question": "y"}]')
    with pytest.raises(KadError, match="record 1 lacks the field\\(s\\) Answer"):
        list(get_task("svamp").examples(tmp_path))


def test_the_data_dir_names_every_missing_file(tmp_path: Path) -> None:
    tasks = [get_task(name) for name in ("gsm8k", "csqa", "toy", "truthfulqa_mc1")]
    with pytest.raises(KadError, match="the data dir /nonexistent does not exist"):
        check_data_dir(tasks, "/nonexistent")
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_bytes(GSM8K_LINE)
    with pytest.raises(KadError) as missing:
        check_data_dir(tasks, tmp_path)
    assert str(missing.value) == (
        f"the data dir {tmp_path} lacks csqa/test.jsonl (task csqa), truthfulqa/mc_task.json "
        "(task truthfulqa_mc1): lay it out like shared/datasets"
    )
    check_data_dir(tasks[:1] + tasks[2:3], tmp_path)  # gsm8k's file, and toy reads none


def test_eval_checks_its_input_before_any_model_loads(tmp_path: Path, no_models: None) -> None:
    data = tmp_path / "data"
    (data / "gsm8k").mkdir(parents=True)
    (data / "gsm8k" / "test.jsonl").write_bytes(GSM8K_LINE + b'{"question": "\xff"}\n')
    out = tmp_path / "out"
    eval_args = ["eval", "--task", "gsm8k", "--data-dir", data, "--out", out]
    one_error_line(run_cli(*eval_args, "--limit", 0), "--limit must be >= 1, got 0")
    one_error_line(run_cli(*eval_args, "--batch-size", 0), "--batch-size must be >= 1")
    one_error_line(run_cli(*eval_args, "--top-k", -1), "--top-k must be >= 0")
    one_error_line(run_cli(*eval_args, "--stop", ""), "--stop must be non-empty text")
    one_error_line(
        run_cli(*eval_args, "--limit", 1),  # the whole file is read, not just --limit lines
        f"{data / 'gsm8k' / 'test.jsonl'} line 2 is not UTF-8 text: byte 0xff",
    )
    one_error_line(
        run_cli("sweep", "--task", "gsm8k,csqa", "--data-dir", tmp_path / "none", "--out", out),
        f"the data dir {tmp_path / 'none'} does not exist",
    )
    one_error_line(
        run_cli("sweep", "--task", "gsm8k,csqa", "--data-dir", data, "--rules", "base"),
        "lacks csqa/test.jsonl (task csqa)",
    )
    (data / "gsm8k" / "test.jsonl").write_bytes(GSM8K_LINE)
    (tmp_path / "file").write_text("")
    one_error_line(
        run_cli("eval", "--task", "toy", "--out", tmp_path / "file"), "is a file, not a folder"
    )
    folder = out / "dual-lam0.4"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"rule": "dual", "max_new_tokens": 7}))
    one_error_line(run_cli(*eval_args), "holds results of a run with other settings")


def test_top_k_and_stop_reach_the_generation_and_the_run_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kad.aligner import Aligner

    options = []
    start = Aligner.start

    def spy(self, prompts, **kwargs):
        options.append(kwargs)
        return start(self, prompts, **kwargs)

    monkeypatch.setattr(Aligner, "start", spy)
    args = ["eval", "--task", "toy", "--limit", 2, "--max-new-tokens", 8, "--out", tmp_path]
    result = run_cli(*args, "--top-k", 3, "--stop", "\n", "--stop", "=")
    assert result.exit_code == 0, result.output
    assert options[0]["top_k"] == 3
    assert options[0]["stop"] == [*get_task("toy").stop, "\n", "="]
    folder = tmp_path / "dual-lam0.4"
    run = json.loads((folder / "run.json").read_text())
    assert run["top_k"] == 3 and run["stop"] == ["\n", "="]
    records = read_records(folder / "toy.jsonl")
    assert any(record["finish_reason"] == "stop" for record in records)  # "7 * 382 = 2674"
    for record in records:
        assert "\n" not in record["output"] and "=" not in record["output"]
    result = run_cli(*args, "--top-k", 3, "--stop", "\n")  # other settings: refused
    one_error_line(result, "stop: ['\\n', '='] -> ['\\n']")

    # A folder written before --stop existed (no "stop" key) resumes a run without --stop.
    unset = {**run, "stop": None}
    del run["stop"]
    (folder / "run.json").write_text(json.dumps(run))
    runner.check_same_run(folder, unset)
    with pytest.raises(KadError, match="other settings"):
        runner.check_same_run(folder, {**unset, "stop": ["\n"]})


def test_ctrl_c_says_what_is_saved_and_a_rerun_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = runner._generation_record
    made = []

    def interrupted_at_the_third(*args, **kwargs):
        if len(made) == 2:
            raise KeyboardInterrupt
        made.append(record(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(runner, "_generation_record", interrupted_at_the_third)
    args = ["eval", "--task", "toy", "--limit", 3, "--max-new-tokens", 8, "--out", tmp_path]
    result = run_cli(*args)
    assert result.exit_code == 130, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"interrupted: 2 records saved in {tmp_path} (dual-lam0.4/toy: 2); "
        "run the same command again to resume"
    )
    assert "Traceback" not in result.output
    monkeypatch.setattr(runner, "_generation_record", record)
    result = run_cli(*args)
    assert result.exit_code == 0 and "resuming, 2 of 3 examples" in result.output


def test_sweep_progress_names_each_point(tmp_path: Path) -> None:
    result = run_cli(
        "sweep", "--task", "toy", "--rules", "dual", "--lams", "0.2,0.4", "--limit", 1,
        "--max-new-tokens", 4, "--out", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for point in ("KAD dual λ=0.2 (1/2) · toy: 1/1 examples", "KAD dual λ=0.4 (2/2) · toy: 1/1"):
        assert any(line.startswith(point) for line in lines), result.output


def test_sweep_help_shows_the_default_grids() -> None:
    sweep = typer.main.get_command(app).get_command(None, "sweep")  # type: ignore[union-attr]
    helps = {param.name: param.help for param in sweep.params}
    assert (
        helps["lam"] == "Comma-separated λ values of dual, nudging (default 0.1,0.2,0.3,0.4,0.5)."
    )
    for name, values in DEFAULT_GRIDS.items():
        assert f"(default {','.join(f'{v:g}' for v in values)})" in helps[name]
    assert helps["mu"].endswith("(no default).")


def test_mean_alpha_is_token_weighted_in_eval_and_demo() -> None:
    """A 1-token answer all deferred and a 3-token one kept: 1 of 4 tokens, mean α 0.25 (a mean
    of the two answers' means would say 0.5), in eval's summary and in the demo's row."""
    from kad.demo import summarize as demo_row
    from kad.outputs import Generation, GenerationStats

    stats = [
        GenerationStats(tokens=1, deferral_rate=1.0, mean_alpha=1.0, mean_tv=0.4, base_forwards=1),
        GenerationStats(tokens=3, deferral_rate=0.0, mean_alpha=0.0, mean_tv=0.0, base_forwards=3),
    ]
    pooled = pooled_stats([s.to_dict() for s in stats])
    assert pooled["mean_alpha"] == pytest.approx(0.25)
    assert pooled["deferral_rate"] == pytest.approx(0.25)
    assert pooled["mean_tv"] == pytest.approx(0.1)
    assert pooled["tokens_per_base_forward"] == pytest.approx(1.0)
    records = [{"stats": s.to_dict(), "correct": True, "score": 1.0, "seconds": 1.0} for s in stats]
    summary = summarize(records, {}, "toy")
    assert summary["mean_alpha"] == pytest.approx(0.25)
    generations = [Generation("#### 1", [0] * s.tokens, "stop", s) for s in stats]
    row = demo_row("m", generations, [{"answer": 1}, {"answer": 1}])
    assert row.mean_alpha == pytest.approx(0.25) and row.deferral_rate == pytest.approx(0.25)


def test_lm_eval_offline_names_the_missing_dataset_before_the_models_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("lm_eval")
    import datasets
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from kad.aligner import Aligner
    from kad.eval.lm_eval_model import missing_datasets_named

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the models loaded before the data")

    monkeypatch.setattr(Aligner, "from_pretrained", refuse)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    (tmp_path / "never.yaml").write_text(
        "task: kad_never_cached\ndataset_path: kad-test/never-cached\ndataset_name: main\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: exact_match\n"
    )
    with pytest.raises(KadError) as missing, missing_datasets_named():
        simple_evaluate(
            model="kad",
            model_args="base=B,proxy=Q",
            tasks=["kad_never_cached"],
            task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
            device="cpu",
        )
    message = str(missing.value)
    assert message.startswith("lm-eval's dataset kad-test/never-cached (main) is not in the")
    assert "HF_HUB_OFFLINE=1" in message
    assert "datasets.load_dataset('kad-test/never-cached', 'main')" in message
    assert datasets.load_dataset.__name__ == "load_dataset"  # put back


def test_report_names_a_broken_summary_and_an_unwritable_out(tmp_path: Path) -> None:
    summary = tmp_path / "dual-lam0.4" / "toy.summary.json"
    summary.parent.mkdir()
    summary.write_text('{"task": "toy"')
    one_error_line(run_cli("report", tmp_path), f"{summary} is not a kad summary (Expecting")
    summary.write_text('{"task": "toy"}')
    one_error_line(run_cli("report", tmp_path), "not a kad summary (no base, proxy, rule")
    (tmp_path / "file").write_text("")
    summary.write_text(
        json.dumps({"base": "B", "proxy": "Q", "rule": "base", "params": {}, "task": "toy"})[:-1]
        + ', "n": 1, "accuracy": 1.0}'
    )
    one_error_line(run_cli("report", tmp_path, "--out", tmp_path / "file"), "cannot write there")


def test_kad_lm_eval_is_one_line_for_a_dataset_missing_offline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The command line's wiring: lm-eval's CLI (here a stand-in that loads what a task would)
    runs with the missing dataset named; exit code 2."""
    pytest.importorskip("lm_eval")
    import datasets
    import lm_eval.__main__

    def lm_eval_cli() -> None:
        datasets.load_dataset("kad-test/never-cached", "main", split="test")

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lm_eval_cli)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    result = run_cli("lm-eval", "--model", "kad", "--tasks", "never")
    one_error_line(result, "lm-eval's dataset kad-test/never-cached (main) is not in the")
