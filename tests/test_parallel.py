"""Tensor parallelism on CPU: 2 gloo ranks (this process is rank 0 and spawns rank 1) give the
greedy tokens of one process for every rule, plain and speculative, with rows joining, leaving
and being cancelled mid-flight; a bad N is a clear error before any weights load. Uneven shards
(the built-in pair's 5 heads): test_parallel_uneven.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import kad
import kad.aligner
from kad.errors import KadError
from kad.parallel.group import check_size, free_port
from kad.rules import RULES as REGISTRY
from kad.rules import spec_of
from tests.test_engine import PROMPTS, RULES

os.environ.setdefault("KAD_TP_TIMEOUT", "120")  # a diverging rank fails the test, never hangs


@pytest.fixture(scope="module")
def tp_aligner(tiny_dirs):
    """The tiny family with its base (4 heads, 2 KV heads) sharded over 2 CPU ranks."""
    aligner = kad.Aligner.from_pretrained(
        str(tiny_dirs.base),
        str(tiny_dirs.proxy),
        str(tiny_dirs.proxy_base),
        device="cpu",
        tensor_parallel=2,
    )
    yield aligner
    aligner.close()


def tokens(aligner, **kwargs):
    return [g.token_ids for g in aligner.generate(PROMPTS, max_new_tokens=8, **kwargs)]


def test_every_rule_gives_the_single_process_tokens_plain_and_speculative(tiny_aligner, tp_aligner):
    assert {spec_of(r).slug for r in RULES} == set(REGISTRY)  # every rule of the registry
    assert tp_aligner.runtime.runners["base"].net.arch.kv_heads == 1  # each rank: 1 of 2
    for rule in RULES:
        alone = tokens(tiny_aligner, rule=rule)
        for gamma in (None, 1, 3, "auto"):
            assert tokens(tp_aligner, rule=rule, speculative=gamma) == alone, (rule, gamma)


def run_plan(aligner, plan, cancel_at: dict[int, int]):
    """Start session i at step plan[i][0]; cancel session i at step cancel_at[i]; step until
    all are done. Returns each session's token ids."""
    sessions = [None] * len(plan)
    step = 0
    while None in sessions or not all(s.done for s in sessions):
        for i, (at, kwargs) in enumerate(plan):
            if sessions[i] is None and at <= step:
                sessions[i] = aligner.start(**kwargs)
            if cancel_at.get(i) == step and sessions[i] is not None:
                sessions[i].cancel(0)
        live = [s for s in sessions if s is not None and not s.done]
        if live:
            live[0].step()
        step += 1
    return [[g.token_ids for g in s.results()] for s in sessions]


@pytest.mark.parametrize("gamma", [None, 3])
def test_rows_joining_leaving_and_cancelled_mid_flight(tiny_aligner, tp_aligner, gamma):
    plan = [
        (0, {"prompts": PROMPTS, "rule": kad.Dual(lam=0.2), "max_new_tokens": [2, 5, 9]}),
        (2, {"prompts": PROMPTS[1], "rule": kad.Primal(budget=0.8), "max_new_tokens": 12}),
        (3, {"prompts": PROMPTS[0], "rule": kad.ImplicitReward(), "max_new_tokens": 12}),
        (4, {"prompts": PROMPTS[2::-2], "rule": kad.Nudging(lam=0.4), "max_new_tokens": 7}),
    ]
    for _, kwargs in plan:
        kwargs["speculative"] = gamma
    cancel_at = {2: 9}  # after its prefill (joining prompts wait up to PREFILL_DELAY rounds)
    expected = run_plan(tiny_aligner, plan, cancel_at)
    assert run_plan(tp_aligner, plan, cancel_at) == expected
    assert 0 < len(expected[2][0]) < 12  # the cancelled row stopped early


def test_a_bad_tensor_parallel_size_is_a_clear_error_before_loading(tiny_dirs, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(kad.aligner, "load_causal_lm", no_loading)
    pair = (str(tiny_dirs.base), str(tiny_dirs.proxy))
    with pytest.raises(KadError, match=r"tensor_parallel=3 is more than .*KV heads \(2\)"):
        kad.Aligner.from_pretrained(*pair, device="cpu", tensor_parallel=3)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(KadError, match="tensor_parallel must be an integer >= 1"):
            kad.Aligner.from_pretrained(*pair, device="cpu", tensor_parallel=bad)
    with pytest.raises(KadError, match="fast path"):
        kad.Aligner.from_pretrained(*pair, device="cpu", tensor_parallel=2, fast=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(KadError, match="needs 2 GPUs, and 1 are present"):
        check_size(2, torch.device("cuda"))


def kad_command(*args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "KAD_TP_TIMEOUT": "120"}
    command = launcher or [sys.executable, "-m"]
    return subprocess.run(
        [*command, "kad", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_cli_bad_size_exits_2_with_one_line(tiny_dirs):
    result = kad_command(
        "generate", "Hi", "--base", str(tiny_dirs.base), "--proxy", str(tiny_dirs.proxy),
        "--device", "cpu", "--tensor-parallel", "3",
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "tensor_parallel=3 is more than" in result.stderr


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_torchrun_generate_gives_the_single_process_tokens(tiny_dirs, tiny_aligner):
    result = kad_command(
        "generate", *PROMPTS[:2], "--base", str(tiny_dirs.base), "--proxy", str(tiny_dirs.proxy),
        "--device", "cpu", "--max-new-tokens", "6", "--speculative", "2", "--json",
        "--tensor-parallel", "2",
        launcher=["torchrun", "--nproc-per-node", "2", "--master-port", str(free_port()), "-m"],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(result.stdout)
    expected = tiny_aligner.generate(PROMPTS[:2], max_new_tokens=6)
    assert [r["token_ids"] for r in rows] == [g.token_ids for g in expected]


def test_bench_reports_rank_bytes_the_roofline_of_n_and_allreduce_time(tiny_dirs):
    result = kad_command(
        "bench", str(tiny_dirs.base), str(tiny_dirs.proxy), "--tensor-parallel", "2",
        "--device", "cpu", "--batch", "2", "--gammas", "1", "--new-tokens", "4",
        "--prompt-tokens", "6", "--repeats", "1", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads(result.stdout)
    par = results["parallel"]
    assert par["tensor_parallel"] == 2
    assert par["base_bytes_per_rank"] < par["base_bytes_whole"]
    (batch,) = results["batches"]
    assert [r["path"] for r in batch["rows"]] == [
        "KAD dual λ=0.4",
        "spec KAD γ=1",
        "spec KAD γ=auto",
    ]
    assert all(r["roofline_tokens_per_s"] > 0 for r in batch["rows"])
    assert set(batch["allreduce_s_per_forward"]) == {"1", "2"}
