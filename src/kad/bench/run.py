"""What one `kad bench` run measures, batch size by batch size, and the targets it is judged by.

For each batch size: transformers' peers first (`kad.bench.peers`; their caches are freed before
the runtime's pools are made), then one runtime of B slots over the pair: base alone and proxy
alone (`decode_alone` on its runners), plain KAD (dual λ = 0.4, primal b = 0.9, and dual sampled
at T = 1, top-p 0.9), speculative KAD (dual) for each γ and ``auto``, speculative ``rule=base``
at the γs compared with assisted generation, each as decode tokens/s next to its roofline
(`kad.fast.roofline`); the split of a round into proxy steps, base verify and the round's own
work; tokens/s as a function of the acceptance rate (random weights make the measured acceptance
meaningless); and greedy agreement with transformers and with the transformers-runner runtime.
"""

from __future__ import annotations

import copy
import datetime
import gc
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from kad.bench.check import agreement, float32_check
from kad.bench.loading import (
    Pair,
    chat_prompts,
    check_fits,
    load_pair,
    random_float32_pair,
    random_prompts,
    real_pairs,
    runtime_for,
)
from kad.bench.measure import (
    GAMMA_MAX,
    GREEDY,
    DecodeRun,
    decision_seconds,
    decode_alone,
    kernel_profile,
    time_runtime,
)
from kad.bench.peers import hf_generate
from kad.fast.graphs import compiled_uniforms, restored
from kad.fast.presets import parameter_count
from kad.fast.quant import parse_quantize
from kad.fast.roofline import (
    ModelBytes,
    copy_bandwidth,
    mean_context,
    model_bytes,
    plain_roofline,
    speculative_roofline,
    tokens_per_second_at,
)
from kad.models import resolve_device, resolve_dtype
from kad.rules import BaseOnly, Dual, Primal, Rule
from kad.runtime.round import Work, decode_round
from kad.runtime.scheduler import Runtime
from kad.sampling import Warp, counter_uniform

ACCEPTANCE_GRID: tuple[float, ...] = (0.5, 0.6, 0.7, 0.75, 0.8, 0.9)
DUAL, PRIMAL = Dual(lam=0.4), Primal(0.9)
SAMPLED = Warp(temperature=1.0, top_p=0.9)  # the sampled plain-KAD row
DUAL_LABEL, PRIMAL_LABEL = "KAD dual λ=0.4", "KAD primal b=0.9"
SAMPLED_LABEL = "KAD dual λ=0.4 sampled (T=1, top-p 0.9)"
STATIC_LABEL = "transformers generate, static cache + torch.compile (base)"
EAGER_LABEL = "transformers generate, eager (base)"
CHECK_TARGET = "compact forward = transformers forward, greedy cases equal (float32)"


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
    quantize: dict[str, str] | None = None  # per role, as `Aligner.from_pretrained`'s


def pool_tokens(config: BenchConfig) -> int:
    """Tokens of a runtime's slot: the prompt, the timed budget and the last round's drafts."""
    return config.prompt_tokens + config.new_tokens + 2 * (max(*config.gammas, GAMMA_MAX) + 1)


@dataclass
class Rows:
    """The rows of one batch size's table: tokens/s next to the roofline."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, path: str, seconds: float, tokens: int, roofline: float, **extra: Any) -> float:
        rate = tokens / seconds
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


def peers(
    pair: Pair, prompts: list[list[int]], config: BenchConfig, table: Rows, roof: float, step
) -> tuple[dict[str, list[int]], dict[int, dict[str, float]]]:
    """transformers' rows (`kad.bench.peers`): (row 0's ids by peer, assisted rates by γ)."""
    batch, n = len(prompts), config.new_tokens
    ids: dict[str, list[int]] = {}
    assisted: dict[int, dict[str, float]] = {}
    kinds = [("generate eager", EAGER_LABEL, False)]
    if pair.base.device.type == "cuda":
        kinds.append(("generate static", STATIC_LABEL, True))
    for key, label, static in kinds:
        step(f"B={batch}: {label}")
        seconds, ids[key] = hf_generate(pair.base, prompts, n, static=static)
        table.add(label, seconds, batch * (n - 1), roof)
    if batch == 1 and pair.base.config.vocab_size == pair.proxy.config.vocab_size:
        for gamma in config.assisted_gammas:  # transformers assists only with one tokenizer
            step(f"B={batch}: transformers assisted γ={gamma}")
            seconds, ids[f"assisted γ={gamma}"] = hf_generate(
                pair.base, prompts, n, assistant=pair.proxy, gamma=gamma
            )
            rate = table.add(f"transformers assisted γ={gamma} (eager)", seconds, n - 1, roof)
            assisted[gamma] = {"transformers_tokens_per_s": rate}
    return ids, assisted


def add_speculative_rows(
    table: Rows,
    runtime: Runtime,
    prompts: list[list[int]],
    gammas: Sequence[int],
    new_tokens: int,
    repeats: int,
    roofline: tuple[float, ModelBytes, ModelBytes, int, float],
    step: Callable[[str], None],
) -> dict[int, DecodeRun]:
    """Speculative KAD (dual, greedy) at each γ of ``gammas`` and at "auto", a row each, beside
    `speculative_roofline` (``roofline``: bandwidth, base and proxy bytes, batch, context) at
    the run's mean γ; returns the fixed-γ runs."""
    runs: dict[int, DecodeRun] = {}
    for gamma in [*gammas, "auto"]:
        step(f"B={roofline[3]}: speculative KAD γ={gamma}")
        run = time_runtime(runtime, prompts, DUAL, gamma, new_tokens, repeats)
        table.add(
            f"spec KAD γ={gamma}",
            run.seconds,
            run.tokens,
            speculative_roofline(*roofline, round(run.gamma_mean or 1.0), run.tokens_per_round),
            acceptance=run.acceptance,
            tokens_per_round=run.tokens_per_round,
        )
        if isinstance(gamma, int):
            runs[gamma] = run
    return runs


def bench_batch(
    pair: Pair, batch: int, config: BenchConfig, bandwidth: float, step: Callable[[str], None]
) -> dict[str, Any]:
    """Every measurement at one batch size (module doc)."""
    device = pair.base.device
    _free(device)  # the last batch size's runtime and graphs (which refer to each other)
    n, prompt_len = config.new_tokens, config.prompt_tokens
    prompts = random_prompts(batch, prompt_len, pair.vocab_size, config.seed + batch)
    context = mean_context(prompt_len, n)
    base_bytes, proxy_bytes = model_bytes(pair.base), model_bytes(pair.proxy)
    plain = plain_roofline(bandwidth, [base_bytes, proxy_bytes], batch, context)
    base_roof = plain_roofline(bandwidth, [base_bytes], batch, context)
    table = Rows()
    checks: dict[str, Any] = {"new_tokens": n}
    hf_ids, assisted = {}, {}
    if config.transformers:
        hf_ids, assisted = peers(pair, prompts, config, table, base_roof, step)
        _free(device)
    pool = pool_tokens(config)
    slow_ids = None
    if config.check and batch == 1:
        step(f"B={batch}: runtime over transformers' forward (dual)")
        slow = runtime_for(
            pair.models, pair.vocab_size, 1, pool, tokenizer=pair.tokenizer, fast=False
        )
        slow_run = time_runtime(slow, prompts, DUAL, None, n, 0)
        checks["transformers runner dual tokens/s"] = slow_run.tokens / slow_run.seconds
        slow_ids = slow_run.ids
        del slow
        _free(device)
    runtime = runtime_for(pair.models, pair.vocab_size, batch, pool, tokenizer=pair.tokenizer)

    def timed(rule: Rule, spec: int | str | None, warp: Warp = GREEDY) -> DecodeRun:
        return time_runtime(runtime, prompts, rule, spec, n, config.repeats, warp)

    alone_ids: list[int] = []
    for role, model_bytes_ in (("base", base_bytes), ("proxy", proxy_bytes)):
        step(f"B={batch}: {role} alone")
        seconds, ids = decode_alone(runtime.runners[role], prompts, n, config.repeats)
        alone_ids = alone_ids or ids
        roof = plain_roofline(bandwidth, [model_bytes_], batch, context)
        table.add(f"{role} alone", seconds, batch * n, roof)
    for name, ids in hf_ids.items():
        checks[f"base alone vs transformers {name}"] = agreement(alone_ids, ids)

    plain_runs: dict[str, DecodeRun] = {}
    for label, rule, warp in (
        (DUAL_LABEL, DUAL, GREEDY),
        (PRIMAL_LABEL, PRIMAL, GREEDY),
        (SAMPLED_LABEL, DUAL, SAMPLED),
    ):
        step(f"B={batch}: {label}")
        run = plain_runs[label] = timed(rule, None, warp)
        table.add(label, run.seconds, run.tokens, plain, tokens_per_round=1.0)
    if slow_ids is not None:
        checks["transformers runner vs compact (dual)"] = agreement(
            slow_ids, plain_runs[DUAL_LABEL].ids
        )

    roofline = (bandwidth, base_bytes, proxy_bytes, batch, context)
    spec_runs = add_speculative_rows(
        table, runtime, prompts, config.gammas, n, config.repeats, roofline, step
    )
    if batch == 1:
        for gamma in config.assisted_gammas:
            step(f"B={batch}: speculative rule=base γ={gamma}")
            run = timed(BaseOnly(), gamma)
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
    rounds = {0: plain_runs[DUAL_LABEL]} | spec_runs
    split = time_split(runtime, batch, list(rounds), pair.vocab_size)
    split["round_s"] = {g: r.round_seconds for g, r in rounds.items()}
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
        profile = round_profile(runtime, batch)
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


def time_split(runtime: Runtime, batch: int, gammas: list[int], vocab: int) -> dict[str, Any]:
    """The parts of a round, each timed alone (graph replays on a GPU): one proxy step, the base
    over γ + 1 tokens, and the round's own work (`decision_seconds`: dual greedy at each γ,
    primal greedy and dual T=1 top-p 0.9 at γ = 0)."""
    base, proxy = runtime.runners["base"], runtime.runners["proxy"]
    device = runtime.device
    with torch.inference_mode():
        return {
            "proxy_step_s": proxy.step_seconds(batch, 1),  # type: ignore[attr-defined]
            "base_step_s": {g: base.step_seconds(batch, g + 1) for g in gammas},  # type: ignore[attr-defined]
            "mix_s": {g: decision_seconds(DUAL, GREEDY, batch, g, vocab, device) for g in gammas},
            "mix_primal_s": decision_seconds(PRIMAL, GREEDY, batch, 0, vocab, device),
            "mix_sample_s": decision_seconds(DUAL, SAMPLED, batch, 0, vocab, device),
        }


def round_profile(runtime: Runtime, batch: int) -> dict[str, Any]:
    """`kernel_profile` of a plain round of dual greedy rows over the runtime's pools, launched
    eagerly (as its graph would replay it, with the compiled uniforms); the pools are left as
    found."""
    runners, table = runtime.runners, runtime.table
    state = [r.lengths for r in runners.values()] + table.tensors()
    uniforms = compiled_uniforms() if runtime.graphed else counter_uniform
    work = Work.of([DUAL], [GREEDY])
    with torch.inference_mode(), restored(state):
        return kernel_profile(
            lambda: decode_round(runners, table, batch, 0, work=work, uniforms=uniforms),
            runtime.device,
        )


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----- acceptance on real pairs
ACCEPTANCE_CASES: tuple[tuple[Rule, int], ...] = tuple(
    (rule, gamma) for rule in (DUAL, BaseOnly()) for gamma in (1, 4)
)


def measure_acceptance(
    aligner: Any, name: str, config: BenchConfig, prompts: list[Any], step: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Acceptance end to end: speculative greedy KAD (dual λ=0.4) and rule=base, γ 1 and 4
    (`ACCEPTANCE_CASES`); ``step`` is told each case, "n of m"."""
    out = []
    for i, (rule, gamma) in enumerate(ACCEPTANCE_CASES, 1):
        step(
            f"{name}: acceptance of rule={rule.name} γ={gamma} on {len(prompts)} prompts "
            f"({i} of {len(ACCEPTANCE_CASES)})"
        )
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
                "tokens": sum(g.stats.tokens for g in gens),
                "tokens_per_base_forward": sum(g.stats.tokens for g in gens) / forwards,
            }
        )
    return out


def acceptance_run(config: BenchConfig, step: Callable[[str], None]) -> list[dict[str, Any]]:
    """Real acceptance on the real pairs found offline (`real_pairs`); ``step`` is told what
    runs next."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    out = []
    pairs = real_pairs()
    for k, (name, load) in enumerate(pairs, 1):
        step(f"loading {name} (pair {k} of {len(pairs)})")
        aligner = load(device, dtype)
        prompts = chat_prompts()
        if name == "built-in pair":
            from kad.world import heldout_problems

            prompts = [str(p["question"]) for p in heldout_problems(8, "dev")]
        out.extend(measure_acceptance(aligner, name, config, prompts, step))
    return out


# ----- the whole run
def float32_models(
    config: BenchConfig, pair: Pair, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedModel]:
    """The pair of `float32_check`: with presets, the proxy preset with two random seeds; with
    real models, a float32 copy of the proxy in both roles."""
    if config.random_init is not None:
        return random_float32_pair(pair.proxy_name, device)
    proxy = copy.deepcopy(pair.proxy).float()
    return proxy, proxy


def run_bench(
    config: BenchConfig, step: Callable[[str], None], out: Callable[[dict], None] | None = None
) -> dict[str, Any]:
    """Every measurement of the config; ``step`` is told what runs next; ``out`` gets the
    results so far after each batch size."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if config.random_init is not None and not (config.base or config.proxy):
        rows, tokens = max(config.batches), pool_tokens(config)
        formats = parse_quantize(config.quantize)
        check_fits(config.random_init, device, dtype, formats, rows, tokens, config.check)
    pair = load_pair(
        config.base, config.proxy, config.random_init, config.seed, device, dtype, config.quantize
    )
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
    if config.check:
        step("float32 check: compact forward vs transformers forward")
        results["float32_check"] = float32_check(*float32_models(config, pair, device))
        _free(device)
    for batch in config.batches:
        results["batches"].append(bench_batch(pair, batch, config, bandwidth, step))
        if out is not None:
            out(results)
    if pair.aligner is not None:
        name = f"{pair.base_name} | {pair.proxy_name}"
        results["acceptance"] = measure_acceptance(pair.aligner, name, config, chat_prompts(), step)
    results["targets"] = targets(results)
    return results


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
        "quantize": config.quantize or {},
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
        add(CHECK_TARGET, sum(c["equal"] for c in cases), len(cases))
    one = by_batch.get(1)
    if one is not None:
        dual = row(one, DUAL_LABEL)
        add("plain KAD % of roofline (B=1)", dual["roofline_pct"], 75.0)
        split = one["split"]
        add(
            "mixing+sampling % of a plain step (B=1)",
            100 * split["mix_s"][0] / split["round_s"][0],
            3.0,
            higher=False,
        )
        sampled = row(one, SAMPLED_LABEL)
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
            row(by_batch[32], DUAL_LABEL)["tokens_per_s"]
            / row(by_batch[1], DUAL_LABEL)["tokens_per_s"]
        )
        add("plain KAD tokens/s, batch 32 / batch 1", ratio, 20.0)
    return out
