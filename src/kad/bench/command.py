"""The `kad bench` command: options, the progress display, and where the results go."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from kad.bench.render import render, to_json
from kad.bench.run import BenchConfig, acceptance_run, run_bench
from kad.errors import KadError
from kad.fast.presets import PRESETS
from kad.options import QuantizeBase, QuantizeProxy, check_device, check_dtype, quantize_of


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


# The sizes of a quick run (`--quick`), and of a run (`BenchConfig`'s); an option given wins.
QUICK: dict[str, Any] = dict(
    batches=[1, 4],
    prompt_tokens=64,
    new_tokens=32,
    gammas=[1, 2, 4],
    assisted_gammas=[2],
    repeats=1,
    transformers=False,
)
FULL: dict[str, Any] = {name: getattr(BenchConfig(), name) for name in QUICK}


def _defaults(name: str) -> str:
    """The end of an option's help: its value in a run, and in a quick one."""

    def shown(value: Any) -> str:
        if isinstance(value, bool):
            return "on" if value else "off"
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)

    return f"(default {shown(FULL[name])}; --quick {shown(QUICK[name])})"


def _print_step() -> Callable[[str], None]:
    """One line per step on stderr, with the seconds since the start."""
    start = time.perf_counter()
    return lambda label: print(
        f"[{time.perf_counter() - start:7.1f} s] {label}", file=sys.stderr, flush=True
    )


@contextmanager
def progress_steps() -> Iterator[Callable[[str], None]]:
    """A function to be told what runs next: a spinner's text on a terminal, else a line on
    stderr (`_print_step`)."""
    if not sys.stderr.isatty():
        yield _print_step()
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("bench", total=None)
        yield lambda label: bar.update(task, description=label)


def bench_command(
    base: Annotated[str | None, typer.Argument(help="Base model: dir, .gguf or Hub id.")] = None,
    proxy: Annotated[
        str | None, typer.Argument(help="Aligned proxy: dir, .gguf or Hub id.")
    ] = None,
    random_init: Annotated[
        str | None,
        typer.Option(
            "--random-init",
            help=f"BASE[:PROXY] presets with random weights: {', '.join(PRESETS)} (the proxy "
            "defaults to the family's small model). Checked against the free memory first.",
        ),
    ] = None,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help="A quick run (about a minute on a CPU): the built-in pair unless models or "
            "--random-init are given, and the smaller sizes marked --quick below.",
        ),
    ] = False,
    batch: Annotated[
        str | None, typer.Option(help=f"Batch sizes, a list or a range {_defaults('batches')}.")
    ] = None,
    prompt_tokens: Annotated[
        int | None, typer.Option(help=f"Prompt length in tokens {_defaults('prompt_tokens')}.")
    ] = None,
    new_tokens: Annotated[
        int | None, typer.Option(help=f"Tokens generated per row {_defaults('new_tokens')}.")
    ] = None,
    gammas: Annotated[
        str | None, typer.Option(help=f"Draft lengths γ {_defaults('gammas')}.")
    ] = None,
    assisted_gammas: Annotated[
        str | None,
        typer.Option(
            help="γs compared with transformers' assisted generation "
            f"{_defaults('assisted_gammas')}."
        ),
    ] = None,
    repeats: Annotated[
        int | None,
        typer.Option(help=f"Timed repeats (median), after a warm-up {_defaults('repeats')}."),
    ] = None,
    device: Annotated[
        str | None, typer.Option(callback=check_device, help="cuda, cuda:1 or cpu.")
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(callback=check_dtype, help="bfloat16 (GPU default) or float32."),
    ] = None,
    transformers_baselines: Annotated[
        bool | None,
        typer.Option(
            "--transformers/--no-transformers",
            help=f"Time transformers too {_defaults('transformers')}.",
        ),
    ] = None,
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

    def ints(text: str | None, flag: str) -> list[int] | None:
        return None if text is None else parse_ints(text, flag)

    given = dict(
        batches=ints(batch, "--batch"),
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        gammas=ints(gammas, "--gammas"),
        assisted_gammas=ints(assisted_gammas, "--assisted-gammas"),
        repeats=repeats,
        transformers=transformers_baselines,
    )
    sizes = (QUICK if quick else FULL) | {k: v for k, v in given.items() if v is not None}
    if (
        min(sizes["repeats"], acceptance_tokens) < 1
        or min(sizes["prompt_tokens"], sizes["new_tokens"]) < 2
    ):
        raise KadError("repeats and acceptance tokens must be >= 1, prompt and new tokens >= 2")
    if quick and not (base or proxy or random_init):
        from kad.world import builtin_paths

        base, proxy = (str(path) for path in builtin_paths()[:2])
    config = BenchConfig(
        base=base,
        proxy=proxy,
        random_init=random_init,
        **sizes,
        device=device,
        dtype=dtype,
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
    with progress_steps() as step:
        if acceptance:
            results = {"acceptance": acceptance_run(config, step)}
        else:
            write = (lambda so_far: out.write_text(to_json(so_far))) if out is not None else None
            results = run_bench(config, step, write)
    if out is not None:
        out.write_text(to_json(results))
    if as_json:
        print(to_json(results))
    else:
        render(results, Console() if sys.stdout.isatty() else Console(width=160))
