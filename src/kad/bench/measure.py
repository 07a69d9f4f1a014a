"""Timing the runtime, one model alone, and the parts of a round (decode only: no prefill).

- `time_runtime`: B requests are admitted and prefilled (untimed, with the round that follows);
  then the runtime's rounds are timed until the first row reaches its budget, so every timed
  round has all B rows (a budget of ``new_tokens`` plus the largest round leaves ``new_tokens``
  or more per row to time). The first repetition compiles and captures, and is not timed.
- `decode_alone`: one model's greedy decoding as its runner's forward loop (one graph replay a
  token where the runner is graphable), not the runtime (whose rounds always run both models).
- `decision_seconds`: a round whose models are `FixedRunner`s, so that it times the round's own
  work (uniforms, warping the drafts, mixing, warping π, acceptance, commits, its output).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from kad.fast.graphs import Graph, compiled_uniforms, restored, seconds
from kad.rules import Rule, rule_row
from kad.runtime.pool import SlotTable
from kad.runtime.round import ALL, Work, decode_round
from kad.runtime.runner import Runner
from kad.runtime.scheduler import Runtime
from kad.runtime.sequence import Request, Sequence
from kad.sampling import Warp, counter_uniform
from kad.speculative import AutoGamma

GREEDY = Warp()
GAMMA_MAX = AutoGamma.gamma_max  # the longest round "auto" may choose


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def requests(
    runtime: Runtime,
    prompts: list[list[int]],
    rule: Rule,
    speculative: int | str | None,
    new_tokens: int,
    warp: Warp = GREEDY,
    seeds: list[int] | None = None,
) -> list[Sequence]:
    """Add one request per prompt (the same ids for both models); row b's seed defaults to b."""
    seeds = seeds or list(range(len(prompts)))
    return [
        runtime.add(
            Request(
                {role: ids for role in runtime.runners},
                rule,
                warp,
                seeds[b],
                new_tokens,
                speculative=speculative,
            )
        )
        for b, ids in enumerate(prompts)
    ]


def decode_ids(runtime: Runtime, prompts: list[list[int]], *args: Any, **kwargs: Any):
    """Decode the prompts to the end (arguments as `requests`): each row's token ids."""
    sequences = requests(runtime, prompts, *args, **kwargs)
    with torch.inference_mode():
        while not all(s.finished for s in sequences):
            runtime.step()
    return [s.token_ids for s in sequences]


@dataclass
class DecodeRun:
    """The timed rounds of a runtime run (medians over repetitions; counts of the first)."""

    seconds: float  # the timed rounds
    tokens: int  # emitted by all rows in the timed rounds
    rounds: int  # timed rounds
    batch: int
    acceptance: float | None
    gamma_mean: float | None
    ids: list[int]  # row 0's tokens (its whole generation)

    @property
    def round_seconds(self) -> float:
        return self.seconds / self.rounds

    @property
    def tokens_per_round(self) -> float:
        """Tokens per row per round."""
        return self.tokens / (self.rounds * self.batch)


def time_runtime(
    runtime: Runtime,
    prompts: list[list[int]],
    rule: Rule,
    speculative: int | str | None,
    new_tokens: int,
    repeats: int,
    warp: Warp = GREEDY,
) -> DecodeRun:
    """The module doc's timing, ``repeats`` times after an untimed first run (0: one timed)."""
    runs = [
        _timed_rounds(runtime, prompts, rule, speculative, new_tokens, warp)
        for _ in range(repeats + 1)
    ]
    timed = runs[1:] or runs
    return replace(timed[0], seconds=statistics.median(r.seconds for r in timed))


def _timed_rounds(
    runtime: Runtime,
    prompts: list[list[int]],
    rule: Rule,
    speculative: int | str | None,
    new_tokens: int,
    warp: Warp,
) -> DecodeRun:
    budget = new_tokens + GAMMA_MAX + 1  # the untimed round cannot finish a row
    rows = requests(runtime, prompts, rule, speculative, budget, warp)
    device = runtime.device
    with torch.inference_mode():
        while any(s.status in ("waiting", "prefilling") for s in rows):
            runtime.step()
        before = [(len(s.token_ids), s.drafted, s.accepted, len(s.gammas)) for s in rows]
        sync(device)
        start, rounds = time.perf_counter(), 0
        while not any(s.finished for s in rows):
            runtime.step()
            rounds += 1
        sync(device)
        elapsed = time.perf_counter() - start
        for s in rows:
            runtime.cancel(s)
    tokens = sum(len(s.token_ids) - b[0] for s, b in zip(rows, before, strict=True))
    drafted = sum(s.drafted - b[1] for s, b in zip(rows, before, strict=True))
    accepted = sum(s.accepted - b[2] for s, b in zip(rows, before, strict=True))
    gammas = [g for s, b in zip(rows, before, strict=True) for g in s.gammas[b[3] :]]
    return DecodeRun(
        seconds=elapsed,
        tokens=tokens,
        rounds=rounds,
        batch=len(rows),
        acceptance=accepted / drafted if drafted else None,
        gamma_mean=statistics.mean(gammas) if gammas else None,
        ids=rows[0].token_ids,
    )


def decode_alone(
    runner: Runner, prompts: list[list[int]], new_tokens: int, repeats: int
) -> tuple[float, list[int]]:
    """Greedy decoding with one model: (median seconds of ``new_tokens`` steps after an
    untimed run, row 0's ids). A step is forward, argmax, commit; prompts of one length."""
    batch, device = len(prompts), runner.device
    ids = torch.tensor(prompts, device=device)  # [B, L]
    tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
    history = torch.zeros(batch, new_tokens, dtype=torch.long, device=device)
    count = torch.zeros(1, dtype=torch.long, device=device)
    ones = torch.ones(batch, dtype=torch.long, device=device)

    def prefill() -> None:
        for slot in range(batch):
            runner.clear(slot)
        runner.forward(0, ids[:, :-1], heads=False)
        runner.advance(0, ones * (ids.shape[1] - 1))
        tokens.copy_(ids[:, -1:])
        count.zero_()

    def step() -> None:
        chosen = runner.forward(0, tokens)[:, 0].argmax(dim=-1, keepdim=True)  # [B, 1]
        runner.advance(0, ones)
        tokens.copy_(chosen)
        history.index_copy_(1, count, chosen)
        count.add_(1)

    times = []
    with torch.inference_mode():
        prefill()
        run = step
        if runner.graphable:

            def warmup() -> None:
                with restored([runner.lengths, tokens, count, history]):
                    step()

            run = Graph(step, warmup, device).replay
        for _ in range(repeats + 1):
            prefill()
            sync(device)
            start = time.perf_counter()
            for _ in range(new_tokens):
                run()
            sync(device)
            times.append(time.perf_counter() - start)
        for slot in range(batch):
            runner.clear(slot)
    return statistics.median(times[1:]), history[0].tolist()


class FixedRunner:
    """A `Runner` whose forward returns fixed log-probs ``[B, n, V]`` (the first n of its
    ``[B, N, V]``): a round over it does everything but the models' work."""

    def __init__(self, logp: torch.Tensor, graphable: bool) -> None:
        self.logp = logp
        self.rows, _, self.vocab_size = logp.shape
        self.context = 1 << 30
        self.device = logp.device
        self.lengths = torch.zeros(self.rows, dtype=torch.long, device=self.device)
        self.graphable = graphable

    def forward(self, start, tokens, *, width=None, live=None, heads=True):
        return self.logp[start : start + tokens.shape[0], : tokens.shape[1]]

    def advance(self, start, counts):
        self.lengths[start : start + counts.shape[0]] += counts


def random_log_probs(batch: int, positions: int, vocab: int, device: torch.device, seed: int):
    """log softmax of normal logits ``[B, positions, V]``, the same for the same seed."""
    generator = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(batch, positions, vocab, generator=generator, device=device)
    return torch.log_softmax(logits, dim=-1)


def decision_round(
    rule: Rule,
    warp: Warp,
    batch: int,
    gamma: int,
    vocab: int,
    device: torch.device,
    every: bool = False,
) -> Callable[[], torch.Tensor]:
    """One round of ``batch`` rows of ``rule`` and ``warp`` over fixed random p and q (module
    doc), called as the runtime calls it for a batch of that rule: its own formula, and the cut
    only if the warp cuts (``every``: every rule's formula and the cut, as for a batch of mixed
    rules); with the compiled uniforms on a GPU."""
    graphed = device.type == "cuda"
    runners: dict[str, Any] = {
        role: FixedRunner(random_log_probs(batch, gamma + 1, vocab, device, seed), graphed)
        for seed, role in enumerate(("base", "proxy"))
    }
    table = SlotTable(batch, list(runners), device)
    for slot in range(batch):
        table.write(slot, rule_row(rule), warp.row(), slot, False)
        table.start(slot, {role: 0 for role in runners})
    uniforms = compiled_uniforms() if graphed else counter_uniform
    work = ALL if every else Work.of([rule], [warp])
    return lambda: decode_round(runners, table, batch, gamma, work=work, uniforms=uniforms)


def decision_seconds(
    rule: Rule, warp: Warp, batch: int, gamma: int, vocab: int, device: torch.device
) -> float:
    """Median time of `decision_round` (a graph replay on a GPU)."""
    return seconds_of(decision_round(rule, warp, batch, gamma, vocab, device), device)


def seconds_of(run: Callable[[], Any], device: torch.device) -> float:
    """Median time of ``run``, captured and replayed as a CUDA graph on a GPU."""
    with torch.inference_mode():
        if device.type == "cuda":
            return seconds(Graph(run, run, device).replay, device)
        return seconds(run, device, 5)


def kernel_profile(fn: Callable[[], Any], device: torch.device, calls: int = 3) -> dict[str, Any]:
    """Device time per call of ``fn`` by kernel, from torch.profiler (host time on a CPU): the
    top kernels and the totals of matrix products (cuBLAS/CUTLASS), Triton kernels (Inductor's
    fused norms, RoPE, softmax, SiLU, uniforms) and the rest."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    fn()
    sync(device)
    with profile(activities=[activity]) as prof:
        for _ in range(calls):
            fn()
        sync(device)
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
