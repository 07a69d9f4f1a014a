"""The `kad bench` command: options, the progress display, and where the results go."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from kad.bench.render import render, to_json
from kad.bench.run import BenchConfig, acceptance_run, run_bench
from kad.errors import KadError
from kad.options import QuantizeBase, QuantizeProxy, quantize_of


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


def bench_with_progress(config: BenchConfig, out: Path | None) -> dict[str, Any]:
    """`run_bench` with a spinner on a terminal, else one line per step on stderr with the
    seconds since the start; with ``out``, the results so far are written after each batch."""
    tty = sys.stderr.isatty()
    start = time.perf_counter()
    with _progress(tty) as bar:
        task = bar.add_task("bench", total=None) if bar else None

        def step(label: str) -> None:
            if bar is not None:
                bar.update(task, description=label)
            else:
                print(
                    f"[{time.perf_counter() - start:7.1f} s] {label}", file=sys.stderr, flush=True
                )

        write = (lambda results: out.write_text(to_json(results))) if out is not None else None
        return run_bench(config, step, write)


def _print_step() -> Callable[[str], None]:
    """One line per step on stderr, with the seconds since the start."""
    start = time.perf_counter()
    return lambda label: print(
        f"[{time.perf_counter() - start:7.1f} s] {label}", file=sys.stderr, flush=True
    )


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


def bench_command(
    base: Annotated[str | None, typer.Argument(help="Base model: dir, .gguf or Hub id.")] = None,
    proxy: Annotated[
        str | None, typer.Argument(help="Aligned proxy: dir, .gguf or Hub id.")
    ] = None,
    random_init: Annotated[
        str | None,
        typer.Option(
            "--random-init",
            help="BASE[:PROXY] presets with random weights: llama3-70b, llama3-8b, llama3.2-1b, olmo2-13b, "
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
            help="Check in float32 (on the proxy's architecture) that the runtime over the "
            "compact forward gives the greedy tokens of the runtime over transformers' forward; "
            "report their agreement at batch 1 in the run's dtype."
        ),
    ] = True,
    acceptance: Annotated[
        bool,
        typer.Option(
            "--acceptance", help="Only measure acceptance on the real pairs found offline."
        ),
    ] = False,
    acceptance_tokens: Annotated[
        int,
        typer.Option(help="Tokens per prompt when measuring acceptance on real models."),
    ] = 128,
    profile: Annotated[
        bool, typer.Option("--profile", help="Kernel time profile of a plain KAD round.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the JSON results here.")] = None,
    tensor_parallel: Annotated[
        int,
        typer.Option(
            "--tensor-parallel",
            help="Shard the base over N ranks (torchrun --nproc-per-node N, or spawned): "
            "runtime rows, the N-GPU roofline, per-rank bytes and the all-reduce time only.",
        ),
    ] = 1,
    quantize_base: QuantizeBase = "none",
    quantize_proxy: QuantizeProxy = "none",
) -> None:
    """Decode speed of base, proxy, plain and speculative KAD next to the memory roofline and
    transformers, on real models or random-weight presets.

    The transformers peers: eager and static-cache compiled generate, assisted generation."""
    if repeats < 1 or prompt_tokens < 2 or new_tokens < 2 or acceptance_tokens < 1:
        raise KadError("repeats and acceptance tokens must be >= 1, prompt and new tokens >= 2")
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
        acceptance_tokens=acceptance_tokens,
        profile=profile,
        quantize=quantize_of(quantize_base, quantize_proxy),
    )
    if tensor_parallel != 1:
        from kad.bench.parallel import parallel_bench, render_parallel

        results: dict[str, Any] = parallel_bench(config, tensor_parallel, _print_step())
        if out is not None:
            out.write_text(to_json(results))
        if as_json:
            print(to_json(results))
        else:
            render_parallel(results, Console() if sys.stdout.isatty() else Console(width=160))
        return
    if acceptance:
        results = {"acceptance": acceptance_run(config)}
    else:
        results = bench_with_progress(config, out)
    if out is not None:
        out.write_text(to_json(results))
    if as_json:
        print(to_json(results))
    else:
        render(results, Console() if sys.stdout.isatty() else Console(width=160))
