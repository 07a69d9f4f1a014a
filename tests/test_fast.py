"""The compact forward's runner choice, a round's uniforms, the roofline arithmetic, the presets,
and `kad bench` on CPU (no compilation, no CUDA graphs)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

import kad
from kad.bench import bench_command
from kad.bench.check import agreement, float32_check
from kad.bench.command import parse_ints
from kad.bench.loading import chat_prompts, random_prompts, runtime_for
from kad.bench.measure import decision_seconds, decode_alone, time_runtime
from kad.bench.run import BenchConfig, run_bench
from kad.fast import StaticRunner, unsupported_reason
from kad.fast.presets import PRESETS, parameter_count, parse_pair, random_model
from kad.fast.roofline import (
    ModelBytes,
    mean_context,
    model_bytes,
    plain_roofline,
    speculative_roofline,
    tokens_per_second_at,
)
from kad.runtime.runner import TransformersRunner
from kad.runtime.scheduler import make_runner
from kad.sampling import Warp, counter_uniform

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
ARCHS = {
    "llama": dict(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
    ),
    "qwen2": {},
    "qwen3": dict(head_dim=32),
    "olmo2": {},
}


def tiny_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(1)
    config = AutoConfig.for_model(kind, **TINY, **ARCHS[kind])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model


def test_a_rounds_uniforms_are_one_table_of_the_counter_hash():
    """A round draws its 3γ + 3 uniforms per row at once, as the table counter_uniform(seed,
    step, stream) over ``[B, 1]``, ``[B, 1]``, ``[S]``; each entry is that row's draw alone."""
    seeds = torch.tensor([[0], [5], [2**40 + 3]])
    steps = torch.tensor([[7], [0], [123]])
    streams = torch.arange(9)  # γ = 2
    table = counter_uniform(seeds, steps, streams)
    assert table.shape == (3, 9)
    for k in range(9):
        for b in range(3):
            assert table[b, k] == counter_uniform(seeds[b], steps[b], k)[0]
    assert ((table >= 0) & (table < 1)).all()
    assert table.unique().numel() == table.numel()


def test_float32_check_of_two_different_models(monkeypatch):
    """`kad bench`'s identity check (the runtime over the compact forward vs over transformers'
    forward) on a pair whose models differ, so that mixing and speculative acceptance have work
    to do; and the check fails when the compact forward is wrong."""
    base, proxy = tiny_model("llama"), tiny_model("qwen2")
    check = float32_check(base, proxy, new_tokens=24)
    assert check["runner"] == "StaticRunner" and not check["graphed"]
    assert all(case["equal"] for case in check["cases"].values()), check
    assert check["max_logprob_diff_decode"] < 1e-4
    import kad.fast.runner

    monkeypatch.setattr(kad.fast.runner, "log_probs", lambda x: torch.log_softmax(x.flip(-1), -1))
    broken = float32_check(base, proxy, new_tokens=24)
    assert not any(case["equal"] for case in broken["cases"].values()), broken
    assert broken["max_logprob_diff_decode"] > 1e-2


def test_make_runner_picks_the_path():
    """The compact forward for the architectures it supports (unless fast=False), transformers'
    forward for the others (GPT-2) and for models spread over several devices."""
    llama, gpt2 = (
        tiny_model("llama"),
        AutoModelForCausalLM.from_config(
            AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=50)
        ),
    )
    assert type(make_runner(llama, 300, 2, 64, None)) is StaticRunner
    assert type(make_runner(llama, 300, 2, 64, False)) is TransformersRunner
    assert type(make_runner(gpt2, 50, 2, 64, None)) is TransformersRunner
    assert "gpt2" in unsupported_reason(gpt2)
    with pytest.raises(kad.KadError):
        make_runner(gpt2, 50, 2, 64, True)  # insisting on the compact forward
    llama.model.norm.to("meta")  # as if a device_map had offloaded part of it
    assert "several devices" in unsupported_reason(llama)
    assert type(make_runner(llama, 300, 2, 64, None)) is TransformersRunner


# ----- roofline arithmetic
def test_model_bytes_count_what_a_forward_reads():
    model = tiny_model("llama")  # untied: the input table is not read, the head is
    bytes_ = model_bytes(model)
    params = sum(p.numel() for p in model.parameters())
    assert bytes_.weights == (params - 300 * 64) * 4
    assert bytes_.kv_per_token == 2 * 2 * 2 * 16 * 4  # K and V × layers × KV heads × head dim × 4 B
    tied = random_model("llama3.2-1b", device="meta", dtype=torch.bfloat16)
    assert model_bytes(tied).weights == parameter_count(tied) * 2


def test_roofline_formulas():
    base, proxy = ModelBytes(weights=1000, kv_per_token=2), ModelBytes(weights=100, kv_per_token=1)
    context = mean_context(50, 100)
    assert context == 100
    # B · bandwidth / Σ (weights + B · context · kv)
    assert plain_roofline(1e6, [base, proxy], 2, context) == pytest.approx(2e6 / (1400 + 300))
    # γ = 3: the base once, the proxy 4 times, 2.5 tokens per row per round
    round_bytes = 1400 + 4 * 300
    assert speculative_roofline(1e6, base, proxy, 2, context, 3, 2.5) == pytest.approx(
        2 * 2.5 * 1e6 / round_bytes
    )
    # (1 − a^{γ+1}) / (1 − a) tokens per round
    assert tokens_per_second_at(0.5, 2, 0.01, 1) == pytest.approx(1.75 / 0.01)
    assert tokens_per_second_at(1.0, 3, 0.02, 4) == pytest.approx(4 * 4 / 0.02)


# ----- presets
PUBLISHED = {  # parameters as published on the model cards (billions)
    "llama3-70b": 70.6,
    "llama3-8b": 8.03,
    "llama3.2-1b": 1.24,
    "olmo2-13b": 13.7,
    "olmo2-1b": 1.48,
    "qwen3-14b": 14.8,
    "qwen3-1.7b": 1.72,  # "1.7B", 1.4B without embeddings
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_have_the_published_sizes(name):
    model = random_model(name, device="meta", dtype=torch.bfloat16)
    assert unsupported_reason(model) is None
    assert parameter_count(model) / 1e9 == pytest.approx(PUBLISHED[name], rel=0.01)


def test_pair_specs():
    assert parse_pair("llama3-8b") == ("llama3-8b", "llama3.2-1b")
    assert parse_pair("olmo2-13b:olmo2-1b") == ("olmo2-13b", "olmo2-1b")
    for bad in ("gpt5", "llama3-8b:nope", "llama3.2-1b"):
        with pytest.raises(kad.KadError):
            parse_pair(bad)
    assert parse_ints("1,8-10", "--batch") == [1, 8, 9, 10]
    for bad in ("", "0", "a,b"):
        with pytest.raises(kad.KadError):
            parse_ints(bad, "--batch")


# ----- kad bench on CPU
def test_bench_runs_on_tiny_models(tiny_dirs):
    config = BenchConfig(
        base=str(tiny_dirs.base),
        proxy=str(tiny_dirs.base),  # one vocabulary: transformers' assisted generation runs too
        batches=[1, 2],
        prompt_tokens=6,
        new_tokens=5,
        gammas=[1],
        assisted_gammas=[2],
        repeats=1,
        device="cpu",
        acceptance_tokens=4,
        profile=True,
    )
    steps = []
    results = run_bench(config, steps.append)
    one, two = results["batches"]
    paths = {r["path"] for r in one["rows"]}
    assert {"base alone", "proxy alone", "KAD dual λ=0.4", "KAD primal b=0.9"} <= paths
    assert {"spec KAD γ=1", "spec KAD γ=auto", "spec base γ=2"} <= paths
    assert {"transformers generate, eager (base)", "transformers assisted γ=2 (eager)"} <= paths
    assert not any("static" in p for p in paths)  # compiled generate runs on CUDA only
    assert all(r["tokens_per_s"] > 0 and r["roofline_pct"] > 0 for r in one["rows"] + two["rows"])
    assert all(r["tokens_per_round"] >= 1 for r in one["rows"] if "spec" in r["path"])
    checks = one["checks"]
    assert checks["transformers runner vs compact (dual)"] == 5 + 9  # the timed budget
    assert checks["base alone vs transformers generate eager"] == 5
    assert checks["spec base γ=2 vs transformers assisted"] == 5
    assert set(one["split"]["round_s"]) == {0, 1}
    assert one["split"]["mix_s"][0] > 0 and one["split"]["base_step_s"][1] > 0
    assert one["profile"]["top"] and one["profile"]["kernels_per_call"] > 0
    assert {t["target"] for t in results["targets"]} >= {"plain KAD % of roofline (B=1)"}
    assert results["acceptance"] and results["meta"]["bandwidth_bytes_per_s"] > 0
    check = results["float32_check"]  # a float32 copy of the proxy in both roles
    assert set(check["cases"]) == {"dual", "primal", "base γ=3", "dual γ=3"}
    assert all(c["equal"] and c["agree"] == [48, 48] for c in check["cases"].values())
    identity = next(t for t in results["targets"] if "float32" in t["target"])
    assert identity["value"] == identity["goal"] == 4 and identity["met"]
    assert "B=2: base alone" in steps


def test_bench_command_prints_json(tiny_dirs, tmp_path):
    import typer

    app = typer.Typer()
    app.command()(bench_command)
    out = tmp_path / "bench.json"
    args = [str(tiny_dirs.base), str(tiny_dirs.proxy), "--batch", "1", "--prompt-tokens", "4"]
    args += ["--new-tokens", "3", "--gammas", "1", "--assisted-gammas", "1", "--repeats", "1"]
    args += ["--acceptance-tokens", "2"]
    args += ["--device", "cpu", "--no-transformers", "--no-check", "--json", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output[result.output.index("{") :])
    assert printed["batches"][0]["batch"] == 1
    prompts = len(chat_prompts())  # acceptance on the real pair: 2 tokens a prompt at most
    assert all(0 < a["tokens"] <= 2 * prompts for a in printed["acceptance"])
    assert json.loads(out.read_text())["batches"] == printed["batches"]
    assert "] B=1: base alone" in result.output  # no terminal: a line per step
    tables = CliRunner().invoke(app, args[:-3])
    assert tables.exit_code == 0 and "decode tokens/s" in tables.output, tables.output
    bad = CliRunner().invoke(app, ["--random-init", "llama3-8b", "--batch", "0"])
    assert bad.exit_code != 0
    bad = CliRunner().invoke(app, ["--random-init", "llama3-8b", "--acceptance-tokens", "0"])
    assert bad.exit_code != 0 and "acceptance tokens" in str(bad.exception or bad.output)


def test_timing_the_runtime_and_one_model(tiny_aligner):
    """Timed rounds have every row, the parts of a round time what they say, and agreement is
    the common prefix."""
    vocab = tiny_aligner.vocab_size
    models = {r: m.model for r, m in tiny_aligner.members.items() if r != "proxy_base"}
    runtime = runtime_for(models, vocab, 2, 32)
    prompts = random_prompts(2, 5, vocab, seed=3)
    run = time_runtime(runtime, prompts, kad.Dual(), 2, 6, 1)
    assert run.batch == 2 and run.rounds >= 2 and run.tokens >= 2 * 6
    assert 1 <= run.tokens_per_round <= 3 and run.gamma_mean == 2
    assert runtime.idle  # the rows past the timed rounds were cancelled
    seconds, ids = decode_alone(runtime.runners["base"], prompts, 4, 1)
    alone = kad.BaseOnly()
    assert seconds > 0 and ids == time_runtime(runtime, prompts, alone, None, 4, 0).ids[:4]
    assert (
        decision_seconds(kad.Dual(), Warp(temperature=1.0, top_p=0.9), 2, 3, vocab, runtime.device)
        > 0
    )
    assert agreement([1, 2, 3], [1, 2, 4]) == 2 and agreement([1, 2], [1, 2, 3]) == 2
