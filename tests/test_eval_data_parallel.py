"""Data-parallel `kad eval` on gloo with 2 CPU processes: the files equal a single process's,
and a run with a rank killed mid-way resumes with nothing lost or duplicated.

The built-in pair on its own task (``toy``): it loads with no download and needs no data dir.
A single-process run in this process is the reference; the multi-rank runs are subprocesses,
launched by torchrun or by ``--data-parallel 2``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kad.cli import app
from kad.errors import KadError
from kad.eval.data_parallel import MULTICAST_OFF, check_data_parallel, keep_multicast_off
from kad.eval.report import write_report
from kad.eval.runner import read_records
from tests.conftest import REPO_ROOT

N = 5  # examples: rank 0 takes 0, 2, 4 and rank 1 takes 1, 3
ARGS = ["eval", "--task", "toy", "--limit", str(N), "--max-new-tokens", "16", "--device", "cpu"]
FOLDER = "dual-lam0.4"
TIMED = {"seconds", "tokens_per_second"}  # wall time: the one thing that differs
# Imported at start-up by every process of a run (PYTHONPATH): rank 1 (RANK, set once the rank
# starts) dies by SIGKILL once it has written KILL_AFTER records.
KILL_HOOK = """
import os, signal
if "KILL_AFTER" in os.environ:
    from kad.eval import runner

    stream = runner._stream_generations

    def killed_mid_run(*args, **kwargs):
        for n, record in enumerate(stream(*args, **kwargs)):
            if n == int(os.environ["KILL_AFTER"]) and os.environ.get("RANK") == "1":
                os.kill(os.getpid(), signal.SIGKILL)
            yield record

    runner._stream_generations = killed_mid_run
"""


def kad(args: list[str], env: dict[str, str] | None = None, torchrun: bool = False):
    """``python -m kad ARGS`` (or under torchrun with 2 ranks) in a subprocess."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command = [sys.executable, *(launcher if torchrun else []), "-m", "kad", *args]
    full_env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT / "src"),
        "HF_HUB_OFFLINE": "1",
        **(env or {}),
    }
    return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=120)


def same_up_to_rounding(got: Any, want: Any) -> bool:
    """Equal, floats to float32 rounding: a batch of other rows sums in another order (1e-4
    relative: a mean of total variations, sums of differences over the vocabulary, moved by
    1.5e-5 on one CPU; the tokens themselves are compared exactly)."""
    if isinstance(want, dict):
        return got.keys() == want.keys() and all(same_up_to_rounding(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return len(got) == len(want) and all(map(same_up_to_rounding, got, want))
    if isinstance(want, float) and isinstance(got, float):
        return got == pytest.approx(want, rel=1e-4, abs=1e-7)
    return got == want


def untimed(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in TIMED}


def assert_same_records(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    """The same examples in the same order with the same tokens and stats, wall times aside."""
    assert [r["id"] for r in got] == [r["id"] for r in want]
    for a, b in zip(got, want, strict=True):
        assert a["output_ids"] == b["output_ids"] and a["prompt_ids"] == b["prompt_ids"]
        assert same_up_to_rounding(untimed(a), untimed(b)), (a, b)


def assert_same_summary(got: Path, want: Path) -> None:
    """The same summary and run.json, wall times aside; no rank files left."""
    summaries = [json.loads((d / "toy.summary.json").read_text()) for d in (got, want)]
    assert same_up_to_rounding(*map(untimed, summaries))
    assert (got / "run.json").read_text() == (want / "run.json").read_text()
    assert not list(got.glob("*.rank*.jsonl"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder a single process writes."""
    out = tmp_path_factory.mktemp("single")
    result = CliRunner().invoke(app, [*ARGS, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [r["id"] for r in read_records(out / FOLDER / "toy.jsonl")] == list("01234")
    return out / FOLDER


def test_torchrun_eval_writes_the_files_of_a_single_process(
    reference: Path, tmp_path: Path
) -> None:
    done = kad([*ARGS, "--out", str(tmp_path)], torchrun=True)
    assert done.returncode == 0, done.stderr
    assert "toy (rank 0 of 2)" in done.stderr and "rank 1 of 2" not in done.stderr
    folder = tmp_path / FOLDER
    assert_same_records(read_records(folder / "toy.jsonl"), read_records(reference / "toy.jsonl"))
    assert_same_summary(folder, reference)
    assert write_report(tmp_path, tmp_path / "r")[0] == write_report(reference.parent)[0]


def test_a_killed_rank_resumes_with_nothing_lost_or_duplicated(
    reference: Path, tmp_path: Path
) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_HOOK)
    args = [*ARGS, "--out", str(tmp_path / "out"), "--data-parallel", "2"]
    pythonpath = f"{hook}{os.pathsep}{REPO_ROOT / 'src'}"
    killed = kad(args, env={"PYTHONPATH": pythonpath, "KILL_AFTER": "1"})
    assert killed.returncode == 2, killed.stderr
    assert "rank 1 of 2 was killed by SIGKILL" in killed.stderr
    folder = tmp_path / "out" / FOLDER
    (first,) = read_records(folder / "toy.rank1.jsonl")  # example 1, then rank 1 died
    assert first["id"] == "1" and not (folder / "toy.summary.json").exists()
    marked = first | {"output": "SENTINEL"}  # redoing example 1 would overwrite it
    (folder / "toy.rank1.jsonl").write_text(json.dumps(marked) + "\n")

    done = {r["id"] for path in folder.glob("toy*.jsonl") for r in read_records(path)}
    rerun = kad(args)  # (how far rank 0 got before it was stopped varies)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming, {len(done)} of 5 examples" in rerun.stderr
    records = read_records(folder / "toy.jsonl")
    assert records[1] == marked  # found, not redone
    records[1] = first
    assert_same_records(records, read_records(reference / "toy.jsonl"))
    assert_same_summary(folder, reference)


def test_a_single_process_resumes_the_files_of_any_number_of_ranks(
    reference: Path, tmp_path: Path
) -> None:
    """Records in the merged file and in the rank files of a 3-rank run (a torn line, and an
    example in two files, as after a kill during the merge) count once; the rest are done."""
    folder = tmp_path / FOLDER
    folder.mkdir()
    (folder / "run.json").write_text((reference / "run.json").read_text())
    lines = (reference / "toy.jsonl").read_text().splitlines(keepends=True)
    by_id = {json.loads(line)["id"]: json.loads(line) for line in lines}
    sentinel = {i: json.dumps(by_id[i] | {"output": f"SENTINEL{i}"}) + "\n" for i in by_id}
    (folder / "toy.jsonl").write_text(sentinel["3"])
    (folder / "toy.rank0.jsonl").write_text(sentinel["0"] + sentinel["3"] + sentinel["1"][:30])
    (folder / "toy.rank2.jsonl").write_text(sentinel["2"])
    result = CliRunner().invoke(app, [*ARGS, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "resuming, 3 of 5 examples" in result.output
    records = read_records(folder / "toy.jsonl")
    assert [r["output"] for r in records][:4] == [
        "SENTINEL0",
        by_id["1"]["output"],
        "SENTINEL2",
        "SENTINEL3",
    ]
    assert [r["id"] for r in records] == list("01234")
    assert not list(folder.glob("*.rank*.jsonl"))

    again = CliRunner().invoke(app, [*ARGS, "--out", str(tmp_path)])  # nothing left to decode
    assert again.exit_code == 0 and "all 5 examples already in" in again.output, again.output
    assert read_records(folder / "toy.jsonl") == records


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data-parallel", "0"], "--data-parallel takes a number of ranks >= 1, got 0"),
        (["--data-parallel", "3"], "3 data-parallel ranks on CUDA, but 2 GPU(s) are present"),
        (["--data-parallel", "2", "--device", "cuda:1"], "--device cuda:1 names one GPU"),
    ],
)
def test_bad_numbers_of_ranks_fail_before_weights_load(
    monkeypatch: pytest.MonkeyPatch, extra: list[str], message: str
) -> None:
    import torch

    import kad.eval.commands

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(kad.eval.commands, "load_aligner", lambda *a, **k: pytest.fail("loaded"))
    args = [a for a in ARGS if a not in ("--device", "cpu")]
    result = CliRunner().invoke(app, [*args, *extra], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_torchrun_ranks_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert check_data_parallel(None, "cpu") == 2
    with pytest.raises(KadError, match="leave --data-parallel out under torchrun"):
        check_data_parallel(3, "cpu")


def test_nvlink_multicast_stays_off_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in MULTICAST_OFF:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")  # the user's choice stays
    keep_multicast_off()
    assert os.environ["NCCL_NVLS_ENABLE"] == "1"
    assert os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert os.environ["NVSHMEM_DISABLE_NVLS"] == "1"
