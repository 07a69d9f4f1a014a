"""End to end: `kad eval`, `kad sweep` and `kad report` on the tiny model family.

The tiny models hold 256 tokens, so the data is a small file per task in the layout of
shared/datasets with short questions, and the base's prompt is zero-shot (--shots 0).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer
from typer.testing import CliRunner

from kad.errors import KadError
from kad.eval.commands import eval_command, report_command, sweep_command
from kad.eval.runner import read_records

QUESTIONS = [
    ("Tom has 3 apples and buys 5 more. How many?", 8),
    ("What is 7 times 6?", 42),
    ("12 + 34 = ?", 46),
    ("Anna had 9 pens and lost 4. How many are left?", 5),
    ("What is 2 plus 2?", 4),
    ("What is 10 minus 3?", 7),
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("datasets")
    (root / "gsm8k").mkdir()
    with (root / "gsm8k" / "test.jsonl").open("w") as handle:
        for question, answer in QUESTIONS:
            handle.write(json.dumps({"question": question, "answer": f"so\n#### {answer}"}) + "\n")
    (root / "truthfulqa").mkdir()
    mc = [
        {
            "question": "Is the sky green?",
            "mc1_targets": {"No.": 1, "Yes.": 0},
            "mc2_targets": {"No.": 1, "No, it is blue.": 1, "Yes.": 0},
        },
        {
            "question": "Do fish fly?",
            "mc1_targets": {"Most do not.": 1, "All do.": 0, "Yes.": 0},
            "mc2_targets": {"Most do not.": 1, "All do.": 0},
        },
    ]
    (root / "truthfulqa" / "mc_task.json").write_text(json.dumps(mc))
    return root


@pytest.fixture(scope="module")
def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("sweep")(sweep_command)
    app.command("report")(report_command)
    return app


def invoke(cli: typer.Typer, args: list[str]):
    return CliRunner().invoke(cli, [str(a) for a in args])


def common(tiny_dirs: SimpleNamespace, data_dir: Path, out: Path) -> list:
    return [
        "--base",
        tiny_dirs.base,
        "--proxy",
        tiny_dirs.proxy,
        "--data-dir",
        data_dir,
        "--shots",
        0,
        "--max-new-tokens",
        6,
        "--batch-size",
        2,
        "--out",
        out,
    ]


def test_eval_writes_records_and_summary_and_resumes(
    cli: typer.Typer, tiny_dirs: SimpleNamespace, data_dir: Path, tmp_path: Path
) -> None:
    args = ["eval", "--task", "gsm8k", *common(tiny_dirs, data_dir, tmp_path), "--rule", "dual"]
    result = invoke(cli, [*args, "--limit", 3])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "dual-lam0.4"
    records = read_records(folder / "gsm8k.jsonl")
    assert [r["id"] for r in records] == ["0", "1", "2"]
    for record, (_, answer) in zip(records, QUESTIONS[:3], strict=True):
        assert record["gold"] == str(answer)
        assert 1 <= len(record["output_ids"]) <= 6
        for role in ("base", "proxy"):  # the token ids each model read
            ids = record["prompt_ids"][role]
            assert ids and all(isinstance(t, int) for t in ids)
        assert record["correct"] == (
            record["extracted"] is not None
            and float(record["extracted"].replace(",", "")) == answer
        )
        assert 0.0 <= record["stats"]["deferral_rate"] <= 1.0
    summary = json.loads((folder / "gsm8k.summary.json").read_text())
    assert summary["n"] == 3 and summary["rule"] == "dual" and summary["params"]["lam"] == 0.4
    assert summary["accuracy"] == pytest.approx(sum(r["correct"] for r in records) / 3)
    assert json.loads((folder / "run.json").read_text())["max_new_tokens"] == 6

    # An interrupted run: a torn last line, and a record we can recognise if it were redone.
    lines = (folder / "gsm8k.jsonl").read_text().splitlines(keepends=True)
    kept = json.loads(lines[0]) | {"output": "SENTINEL"}
    (folder / "gsm8k.jsonl").write_text(json.dumps(kept) + "\n" + lines[1] + lines[2][:20])
    result = invoke(cli, [*args, "--limit", 5])
    assert result.exit_code == 0, result.output
    records = read_records(folder / "gsm8k.jsonl")
    assert [r["id"] for r in records] == ["0", "1", "2", "3", "4"]
    assert records[0]["output"] == "SENTINEL"  # done examples are skipped, not redone
    assert json.loads((folder / "gsm8k.summary.json").read_text())["n"] == 5

    # The same folder with other settings is refused.
    result = invoke(cli, [*args, "--limit", 5, "--max-new-tokens", 7])
    assert isinstance(result.exception, KadError) and "other settings" in str(result.exception)


def test_eval_truthfulqa_scores_every_answer(
    cli: typer.Typer, tiny_dirs: SimpleNamespace, data_dir: Path, tmp_path: Path
) -> None:
    args = [
        "eval",
        "--task",
        "truthfulqa_mc1,truthfulqa_mc2",
        *common(tiny_dirs, data_dir, tmp_path),
    ]
    result = invoke(cli, [*args, "--rule", "nudging", "--lam", 0.3])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "nudging-lam0.3"
    for task in ("truthfulqa_mc1", "truthfulqa_mc2"):
        records = read_records(folder / f"{task}.jsonl")
        assert len(records) == 2
        for record in records:
            assert len(record["logprobs"]) == len(record["labels"])
            assert all(lp < 0 for lp in record["logprobs"])
            best = max(range(len(record["logprobs"])), key=record["logprobs"].__getitem__)
            assert record["correct"] == bool(record["labels"][best])
            assert 0.0 <= record["score"] <= 1.0
    mc1 = read_records(folder / "truthfulqa_mc1.jsonl")
    assert all(r["score"] == float(r["correct"]) for r in mc1)


def test_sweep_then_report(
    cli: typer.Typer, tiny_dirs: SimpleNamespace, data_dir: Path, tmp_path: Path
) -> None:
    result = invoke(
        cli,
        [
            "sweep",
            "--task",
            "gsm8k",
            *common(tiny_dirs, data_dir, tmp_path),
            "--limit",
            2,
            "--rules",
            "base,proxy,dual,primal,nudging",
            "--lams",
            "0.2,0.5",
            "--budgets",
            "0.9",
        ],
    )
    assert result.exit_code == 0, result.output
    folders = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert folders == [
        "base",
        "dual-lam0.2",
        "dual-lam0.5",
        "nudging-lam0.2",
        "nudging-lam0.5",
        "primal-b0.9",
        "proxy",
    ]
    base = json.loads((tmp_path / "base" / "gsm8k.summary.json").read_text())
    assert base["deferral_rate"] == 0.0  # the base alone never defers
    proxy = json.loads((tmp_path / "proxy" / "gsm8k.summary.json").read_text())
    assert proxy["deferral_rate"] == 1.0

    result = invoke(cli, ["report", tmp_path])
    assert result.exit_code == 0, result.output
    table = [line for line in result.output.splitlines() if line.startswith("|")]
    assert table[0].startswith("| Method | GSM8K (n=2)")
    labels = [line.split("|")[1].strip() for line in table[2:]]
    assert labels == [
        "Base alone",
        "Proxy alone",
        "Nudging λ=0.2",
        "Nudging λ=0.5",
        "KAD dual λ=0.2",
        "KAD dual λ=0.5",
        "KAD primal b=0.9",
    ]
    assert table[2].split("|")[2].strip() == f"{100 * base['accuracy']:.1f}"
    for name in ("accuracy_vs_lambda", "accuracy_vs_budget", "deferral_vs_lambda"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "report.md").read_text().startswith("### base")


def test_implicit_reward_needs_the_proxy_base(
    cli: typer.Typer, tiny_dirs: SimpleNamespace, data_dir: Path, tmp_path: Path
) -> None:
    args = ["sweep", "--task", "gsm8k", *common(tiny_dirs, data_dir, tmp_path), "--limit", 1]
    result = invoke(cli, [*args, "--rules", "implicit-reward"])
    assert isinstance(result.exception, KadError) and "--proxy-base" in str(result.exception)
    result = invoke(
        cli, [*args, "--rules", "implicit-reward", "--proxy-base", tiny_dirs.proxy_base]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "implicit-reward-beta1" / "gsm8k.summary.json").read_text())
    assert summary["proxy_base"] == str(tiny_dirs.proxy_base)
    assert summary["deferral_rate"] is None  # implicit reward has no α


def test_speculative_eval_reports_acceptance(
    cli: typer.Typer, tiny_dirs: SimpleNamespace, data_dir: Path, tmp_path: Path
) -> None:
    args = ["eval", "--task", "gsm8k", *common(tiny_dirs, data_dir, tmp_path), "--limit", 2]
    result = invoke(cli, [*args, "--rule", "primal", "--speculative", 3])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "primal-b0.9"
    records = read_records(folder / "gsm8k.jsonl")
    drafted = sum(r["stats"]["drafted"] for r in records)
    accepted = sum(r["stats"]["accepted"] for r in records)
    summary = json.loads((folder / "gsm8k.summary.json").read_text())
    assert summary["speculative"] == 3
    assert summary["acceptance"] == pytest.approx(accepted / drafted)
    result = invoke(cli, ["report", tmp_path])
    row = next(line for line in result.output.splitlines() if "KAD primal" in line)
    assert row.split("|")[-2].strip() == f"{100 * accepted / drafted:.1f}"
