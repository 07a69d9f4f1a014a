"""The fast path on CPU (no compilation, no CUDA graphs): the static-cache runner and the fused
greedy round give the engine's tokens; the roofline arithmetic; the presets; `kad bench`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from kad.engine import DecodeSession, ModelRunner
from kad.fast.session import Draws
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

import kad
from kad.bench import (
    BenchConfig,
    agreement,
    bench_command,
    float32_check,
    parse_ints,
    random_prompts,
    run_bench,
    time_session,
)
from kad.fast import FastSession, StaticRunner, make_runner, unsupported_reason
from kad.fast.presets import PRESETS, parameter_count, parse_pair, random_model
from kad.fast.roofline import (
    ModelBytes,
    mean_context,
    model_bytes,
    plain_roofline,
    speculative_roofline,
    tokens_per_second_at,
)
from kad.sampling import Warp, counter_uniform

NEW = 12


@pytest.fixture(scope="module")
def aligner(tiny_dirs):
    return kad.Aligner.from_pretrained(str(tiny_dirs.base), str(tiny_dirs.proxy))


@pytest.fixture(scope="module")
def prompt_ids(aligner):
    """Three prompts of different lengths (left padding differs per model)."""
    return aligner.encode_prompts(["Tom has 3 apples", "Hello world, this is a tiny", "Q"])


def decode(aligner, prompt_ids, session_class, make, rule, speculative, warp=None, room=None):
    runners = {role: make(m.model) for role, m in aligner.members.items()}
    if room is not None:
        for runner in runners.values():
            runner.reserve(room)
    with torch.inference_mode():
        session = session_class(
            runners,
            prompt_ids,
            rule=rule,
            warp=warp or Warp(),
            max_new_tokens=[NEW, NEW - 5, NEW],  # rows finish at different rounds
            seeds=[0, 1, 2],
            tokenizer=aligner.tokenizer,
            eos_ids=set(),
            speculative=speculative,
        )
        while not session.done:
            session.step()
    return session


def engine_runner(aligner):
    return lambda model: ModelRunner(model, aligner.vocab_size)


def static_runner(aligner):
    return lambda model: StaticRunner(model, aligner.vocab_size)


@pytest.mark.parametrize(
    ("rule", "speculative"),
    [
        (kad.Dual(lam=0.4), None),
        (kad.Dual(lam=0.4), 1),
        (kad.Dual(lam=0.4), 3),
        (kad.Dual(lam=0.4), "auto"),
        (kad.Primal(0.9), None),
        (kad.Primal(0.9), 3),
        (kad.BaseOnly(), 2),
        (kad.ProxyOnly(), 3),
    ],
)
def test_fused_greedy_rounds_match_the_engine(aligner, prompt_ids, rule, speculative):
    engine = decode(aligner, prompt_ids, DecodeSession, engine_runner(aligner), rule, speculative)
    fast = decode(aligner, prompt_ids, FastSession, static_runner(aligner), rule, speculative)
    assert fast.fused
    for ref, got in zip(engine.results(), fast.results(), strict=True):
        assert got.token_ids == ref.token_ids
        assert got.text == ref.text
        if speculative == "auto":  # γ follows measured costs: only the tokens must agree
            continue
        a, b = ref.stats.to_dict(), got.stats.to_dict()
        for key, value in a.items():
            if isinstance(value, float):
                assert math.isclose(b[key], value, rel_tol=1e-4, abs_tol=1e-6), key
            else:
                assert b[key] == value, key
        assert got.proxy_share == pytest.approx(ref.proxy_share, rel=1e-4, abs=1e-6)


def test_cache_growth_keeps_the_tokens(aligner, prompt_ids):
    """A cache reserved too small grows (copying its slots) without changing the output."""
    engine = decode(aligner, prompt_ids, DecodeSession, engine_runner(aligner), kad.Dual(), 2)
    small = decode(
        aligner, prompt_ids, DecodeSession, static_runner(aligner), kad.Dual(), 2, room=1
    )
    assert [g.token_ids for g in small.results()] == [g.token_ids for g in engine.results()]


def same_tokens_on_both_paths(tiny_dirs, prompts, budgets, speculative_values) -> kad.Aligner:
    """Assert that Aligner(fast=True) decodes the engine's greedy tokens; return that aligner."""
    engine = kad.Aligner.from_pretrained(str(tiny_dirs.base), str(tiny_dirs.proxy))
    fast = kad.Aligner.from_pretrained(str(tiny_dirs.base), str(tiny_dirs.proxy), fast=True)
    for speculative in speculative_values:
        want = engine.generate(prompts, max_new_tokens=budgets, speculative=speculative)
        got = fast.generate(prompts, max_new_tokens=budgets, speculative=speculative)
        assert [g.token_ids for g in got] == [g.token_ids for g in want], speculative
    return fast


def test_finished_rows_stay_in_the_batch_until_half_are_done(tiny_dirs):
    """Rows that finish early stay in the runners' batch (outputs ignored) until half of it is
    finished, then the batch shrinks: tokens stay the engine's (greedy), and a sampled row
    draws what it draws alone."""
    prompts = ["Tom has 3 apples", "Q", "Hello world, this is a tiny", "a b"]
    budgets = [3, 5, NEW, NEW]
    fast = same_tokens_on_both_paths(tiny_dirs, prompts, budgets, (None, 2))
    session = fast.start(prompts, max_new_tokens=budgets)
    batches = []
    with torch.inference_mode():
        while not session.done:
            session.step()
            batches.append(session.runners["base"].batch)
    assert batches[0] == 4 and 4 in batches[3:] and batches[-1] == 2  # shrank once, at half
    warp = {"temperature": 1.0, "top_k": 20}
    batched = fast.generate(prompts, max_new_tokens=budgets, seed=[1, 2, 3, 4], **warp)
    for i, prompt in enumerate(prompts):
        alone = fast.generate([prompt], max_new_tokens=budgets[i], seed=[i + 1], **warp)[0]
        assert batched[i].token_ids == alone.token_ids


def test_sampled_rounds_are_fused_and_a_rows_draws_ignore_its_batch(tiny_dirs):
    """Sampled rounds run fused (counter-based uniforms): a seeded row draws the same tokens
    alone or in a batch, plain or after a different row joins, and again on a second call."""
    fast = kad.Aligner.from_pretrained(str(tiny_dirs.base), str(tiny_dirs.proxy), fast=True)
    warp = {"temperature": 1.0, "top_k": 20}
    session = fast.start(["Q"], max_new_tokens=2, **warp)
    assert session.fused
    for speculative in (None, 2):
        kw = {"max_new_tokens": NEW, "speculative": speculative, **warp}
        alone = fast.generate(["Tom has 3 apples"], seed=[5], **kw)[0].token_ids
        batched = fast.generate(["Tom has 3 apples", "Q"], seed=[5, 9], **kw)[0].token_ids
        again = fast.generate(["Tom has 3 apples"], seed=[5], **kw)[0].token_ids
        other = fast.generate(["Tom has 3 apples"], seed=[6], **kw)[0].token_ids
        assert alone == again
        assert other != alone  # the seed matters (300 tokens, 12 draws: a clash is negligible)
        if speculative is None:  # speculative rows share the batch's γ, so only plain is exact
            assert batched == alone


def test_a_rounds_uniforms_are_one_table_of_the_counter_hash():
    """`Draws` computes a round's 3γ + 3 uniforms per row at once; each entry is the counter
    hash of that row's (seed, position) and the stream, as drawn one at a time."""
    seeds = torch.tensor([0, 5, 2**40 + 3])
    positions = torch.tensor([7, 0, 123])
    draws = Draws(seeds, positions, gamma=2)
    assert draws.table.shape == (3, 9)
    for k in range(9):
        for b in range(3):
            alone = counter_uniform(seeds[b : b + 1], positions[b : b + 1], k)
            assert draws.uniform(k)[b] == alone[0]
    assert ((draws.table >= 0) & (draws.table < 1)).all()
    assert draws.table.unique().numel() == draws.table.numel()


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


def test_float32_check_of_two_different_models():
    """`kad bench`'s identity check (fast path vs engine) on a pair whose models differ, so that
    mixing and speculative acceptance have work to do."""
    check = float32_check(tiny_model("llama"), tiny_model("qwen2"), new_tokens=24)
    assert all(case["equal"] for case in check["cases"].values()), check
    assert check["max_logprob_diff_decode"] < 1e-4


@pytest.mark.parametrize("kind", sorted(ARCHS))
def test_logits_match_a_full_recompute(kind):
    """Prefill, decode and verify steps over left-padded rows give transformers' logits."""
    model = tiny_model(kind)
    assert unsupported_reason(model) is None
    rows = [[5, 17, 42, 7, 99, 3, 250, 1, 2, 3, 4, 5, 6, 7, 8], [8, 9, 10]]
    runner = StaticRunner(model, 300)
    runner.reserve(1)  # 16 slots: the cache grows on the way
    with torch.inference_mode():
        last = runner.prefill(rows)
        assert runner.slots == 16
        first = runner.forward(last.unsqueeze(-1))  # [B, 1, V]
        more = torch.tensor([[11, 12, 13], [14, 15, 16]])
        verify = runner.forward(more)  # [B, 3, V]
        runner.rollback(torch.tensor([1, 3]), 3)  # row 0 keeps 11, row 1 keeps all
        after = runner.forward(torch.tensor([[20], [21]]))
        assert runner.slots > 16
        full = [[*rows[0], 11, 12, 13], [*rows[1], 14, 15, 16]]
        kept = [[*rows[0], 11, 20], [*rows[1], 14, 15, 16, 21]]
        for b in range(2):
            ref = torch.log_softmax(model(torch.tensor([full[b]])).logits[0].float(), -1)
            n = len(rows[b])
            torch.testing.assert_close(first[b, 0], ref[n - 1], atol=2e-4, rtol=1e-4)
            torch.testing.assert_close(verify[b], ref[n : n + 3], atol=2e-4, rtol=1e-4)
            ref = torch.log_softmax(model(torch.tensor([kept[b]])).logits[0, -1].float(), -1)
            torch.testing.assert_close(after[b, 0], ref, atol=2e-4, rtol=1e-4)


def test_make_runner_picks_the_path():
    llama, gpt2 = (
        tiny_model("llama"),
        AutoModelForCausalLM.from_config(
            AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=50)
        ),
    )
    assert type(make_runner(llama, 300)) is ModelRunner  # CPU: the engine's path by default
    assert type(make_runner(llama, 300, fast=True)) is StaticRunner
    assert type(make_runner(gpt2, 50, fast=True)) is ModelRunner
    assert "gpt2" in unsupported_reason(gpt2)
    llama.model.norm.to("meta")  # as if a device_map had offloaded part of it
    assert "several devices" in unsupported_reason(llama)
    assert type(make_runner(llama, 300, fast=True)) is ModelRunner


def test_aligner_fast_path_matches_and_reuses_its_runners(tiny_dirs):
    """Aligner(fast=True) decodes through static runners (eager on CPU) with the engine's
    tokens; a finished session's runners serve the next call, a live one's are not shared."""
    prompts = ["Tom has 3 apples", "Q"]
    fast = same_tokens_on_both_paths(tiny_dirs, prompts, NEW, (None, 3))
    first = fast.start(prompts, max_new_tokens=NEW)
    assert first.fused and all(isinstance(r, StaticRunner) for r in first.runners.values())
    second = fast.start(prompts, max_new_tokens=NEW)  # `first` is live: fresh runners
    assert all(second.runners[r] is not first.runners[r] for r in first.runners)
    with torch.inference_mode():
        while not first.done:
            first.step()
    third = fast.start(prompts, max_new_tokens=NEW)
    assert all(third.runners[r] is first.runners[r] for r in first.runners)
    live = [fast.start(prompts, max_new_tokens=NEW) for _ in range(6)]  # beside second, third
    bases = {id(x.runners["base"]) for x in [second, third, *live]}
    assert len(bases) == 8  # no two live sessions share runners
    assert len(fast._runner_sets) == kad.aligner.MAX_RUNNER_SETS  # the others are not kept
    assert (
        kad.Aligner.from_pretrained(str(tiny_dirs.base), str(tiny_dirs.proxy))
        .start(prompts)
        .runners["base"]
        .__class__
        is ModelRunner
    )  # CPU default: the engine's runners


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
    results = run_bench(config, progress=False)
    one, two = results["batches"]
    paths = {r["path"] for r in one["rows"]}
    assert {"base alone", "KAD dual λ=0.4", "spec KAD γ=auto", "spec base γ=2"} <= paths
    assert "transformers assisted γ=2" in paths
    assert all(r["tokens_per_s"] > 0 and r["roofline_pct"] > 0 for r in one["rows"] + two["rows"])
    checks = one["checks"]
    assert checks["engine vs fast path (dual)"] == 5
    assert checks["base alone vs transformers generate"] == 5
    assert checks["spec base γ=2 vs transformers assisted"] == 5
    assert set(one["split"]["round_s"]) == {0, 1}
    assert one["profile"]["top"] and one["profile"]["kernels_per_call"] > 0
    assert {t["target"] for t in results["targets"]} >= {"plain KAD % of roofline (B=1)"}
    assert results["acceptance"] and results["meta"]["bandwidth_bytes_per_s"] > 0
    check = results["float32_check"]  # a float32 copy of the proxy in both roles
    assert set(check["cases"]) == {"dual", "primal", "base γ=3", "dual γ=3"}
    assert all(c["equal"] and c["agree"] == [48, 48] for c in check["cases"].values())
    assert check["max_logprob_diff_decode"] < 1e-4
    identity = next(t for t in results["targets"] if "float32" in t["target"])
    assert identity["value"] == identity["goal"] == 4 and identity["met"]


def test_bench_command_prints_json(tiny_dirs):
    import typer

    app = typer.Typer()
    app.command()(bench_command)
    out = CliRunner().invoke(
        app,
        [
            str(tiny_dirs.base),
            str(tiny_dirs.proxy),
            "--batch",
            "1",
            "--prompt-tokens",
            "4",
            "--new-tokens",
            "3",
            "--gammas",
            "1",
            "--assisted-gammas",
            "1",
            "--repeats",
            "1",
            "--device",
            "cpu",
            "--no-transformers",
            "--no-check",
            "--json",
        ],
    )
    assert out.exit_code == 0, out.output
    results = json.loads(out.output[out.output.index("{") :])
    assert results["batches"][0]["batch"] == 1
    bad = CliRunner().invoke(app, ["--random-init", "llama3-8b", "--batch", "0"])
    assert bad.exit_code != 0


def test_time_session_and_agreement(aligner):
    runners = {
        role: StaticRunner(m.model, aligner.vocab_size) for role, m in aligner.members.items()
    }
    prompts = random_prompts(2, 5, aligner.vocab_size, seed=3)
    run = time_session(runners, prompts, kad.Dual(), 2, 6, 1, aligner.tokenizer)
    assert run.tokens == 12 and run.rounds >= 2 and run.tokens_per_round >= 1
    assert agreement([1, 2, 3], [1, 2, 4]) == 2 and agreement([1, 2], [1, 2, 3]) == 2
