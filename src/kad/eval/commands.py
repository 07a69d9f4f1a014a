"""The CLI commands of the harness: `kad eval`, `kad sweep`, `kad report`, `kad lm-eval`.

Plain functions with typer annotations; `kad.cli` registers them. Bad input raises `KadError`.
Light at import (the help must not wait for torch): the runner, the rules and the models load
inside the commands.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from kad.errors import KadError
from kad.eval.sweep import DEFAULT_GRIDS
from kad.eval.tasks import DATA_DIR_ENV, TASKS, check_data_dir, get_task
from kad.options import (
    Base,
    Device,
    Dtype,
    Fast,
    MaxContext,
    MaxNewTokens,
    MaxRows,
    MemoryFraction,
    Proxy,
    ProxyBase,
    QuantizeBase,
    QuantizeProxy,
    RuleOpt,
    Seed,
    Speculative,
    Stop,
    Temperature,
    TopK,
    TopP,
    at_least,
    load_aligner,
    model_paths,
    quantize_of,
    with_rule_options,
)

if TYPE_CHECKING:
    from kad.eval.tasks import Task
    from kad.rules import Rule

err_console = Console(stderr=True, highlight=False)

TaskList = Annotated[
    list[str],
    typer.Option("--task", help=f"Task (repeatable or comma-separated): {', '.join(TASKS)}."),
]
DataDir = Annotated[
    str | None,
    typer.Option(
        "--data-dir",
        envvar=DATA_DIR_ENV,
        help="Folder laid out like shared/datasets (default: the Hugging Face Hub).",
    ),
]
Shots = Annotated[
    int | None,
    typer.Option("--shots", help="Few-shot exemplars in the base's prompt (default: all, 3-6)."),
]
Limit = Annotated[
    int | None, typer.Option("--limit", callback=at_least(1), help="Only the first N examples.")
]
BatchSize = Annotated[
    int,
    typer.Option(
        "--batch-size", callback=at_least(1), help="Prompts scored together (likelihood tasks)."
    ),
]
OutDir = Annotated[Path, typer.Option("--out", help="Results root: one folder per method inside.")]
DataParallel = Annotated[
    int | None,
    typer.Option(
        "--data-parallel",
        help="Ranks that share the examples, each with its own copy of the models (a GPU each "
        "on CUDA); spawned here, or leave it out under torchrun --nproc-per-node N.",
    ),
]


def split_list(values: list[str] | None) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``."""
    return [item.strip() for value in values or [] for item in value.split(",") if item.strip()]


def split_floats(value: str, option: str) -> list[float]:
    try:
        return [float(item) for item in split_list([value])]
    except ValueError:
        raise KadError(f"{option} takes comma-separated numbers, got {value!r}") from None


def check_proxy_base(rules: list[Rule], proxy_base: str | None) -> None:
    needing = sorted({rule.name for rule in rules if rule.needs_proxy_base})
    if needing and proxy_base is None:
        raise KadError(
            f"the {', '.join(needing)} rule needs the proxy's base model: give --proxy-base"
        )


def run_record(
    base: str,
    proxy: str,
    proxy_base: str | None,
    rule: Rule,
    decoding: dict[str, Any],
    shots: int | None,
    quantize: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The settings that define a method, as kept in ``run.json`` and every summary
    (``quantize`` only when a model is quantized: it changes p or q*)."""
    from kad.rules import rule_params

    return {
        "base": base,
        "proxy": proxy,
        "proxy_base": proxy_base if rule.needs_proxy_base else None,
        "rule": rule.name,
        "params": rule_params(rule),
        "shots": shots,
        **({"quantize": quantize} if quantize else {}),
        **decoding,
    }


def decoding_options(
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop: list[str] | None,
    speculative: str | None,
) -> dict[str, Any]:
    """The keyword arguments of `Aligner.generate` that a method fixes; ``stop``: the strings
    given, which end a generation besides the task's own (None when none is given)."""
    from kad.speculative import parse_speculative

    return {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "seed": seed,
        "stop": list(stop) if stop else None,
        "speculative": parse_speculative(speculative),
    }


def print_summary(summary: dict[str, Any], folder: Path) -> None:
    deferral = summary.get("deferral_rate")
    line = (
        f"{summary['task']}: accuracy {summary['accuracy']:.3f} "
        f"({summary['correct']}/{summary['n']})"
    )
    if deferral is not None:
        line += f", deferral rate {deferral:.3f}"
    if summary.get("acceptance") is not None:
        line += f", acceptance {summary['acceptance']:.3f}"
    err_console.print(f"{line} -> {folder}", soft_wrap=True)


@dataclass(frozen=True)
class EvalPlan:
    """What `kad eval` and `kad sweep` run once their options are checked: every task under
    every rule, one folder per rule under ``out``. Picklable: spawned ranks receive it."""

    tasks: list[Task]
    rules: list[Rule]
    paths: tuple[str, str, str | None]  # base, proxy and proxy base as run.json names them
    models: dict[str, Any]  # the arguments of `load_aligner`
    decoding: dict[str, Any]  # `decoding_options`
    shots: int | None
    out: Path
    data_dir: str | None
    limit: int | None
    batch_size: int

    def run_for(self, rule: Rule) -> dict[str, Any]:
        """The method record of ``rule``'s folder."""
        return run_record(*self.paths, rule, self.decoding, self.shots, self.models.get("quantize"))

    def folder(self, rule: Rule) -> Path:
        """Where ``rule``'s results go."""
        from kad.rules import rule_slug

        return self.out / rule_slug(rule)


def check_plan(plan: EvalPlan) -> None:
    """What can be checked before any model loads: the data dir holds every task's file, whose
    records read as the task's (a `KadError` names the file and the line), every task has
    examples, and each folder of ``plan.out`` can be written and holds no results of other
    settings."""
    from kad.eval.runner import check_same_run

    check_data_dir(plan.tasks, plan.data_dir)
    for task in plan.tasks:
        if next(task.examples(plan.data_dir, plan.limit), None) is None:
            raise KadError(f"task {task.name} has no examples")
    for folder in (plan.out, *map(plan.folder, plan.rules)):
        if folder.exists() and not folder.is_dir():
            raise KadError(f"--out: {folder} is a file, not a folder")
    for rule in plan.rules:
        check_same_run(plan.folder(rule), plan.run_for(rule))
    try:
        plan.out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=plan.out).close()
    except OSError as err:
        raise KadError(f"--out {plan.out}: cannot write there ({err.strerror})") from None


def saved_records(plan: EvalPlan) -> dict[str, int]:
    """``{"dual-lam0.4/gsm8k": 37, ...}``: the records on disk of each (point, task) of ``plan``
    that has some, whatever rank wrote them (read without mending: ranks may still write)."""
    from kad.eval.runner import read_done

    counts: dict[str, int] = {}
    for rule in plan.rules:
        for task in plan.tasks:
            found = len(read_done(plan.folder(rule), task.name, mend=False))
            if found:
                counts[f"{plan.folder(rule).name}/{task.name}"] = found
    return counts


def interrupted_message(plan: EvalPlan) -> str:
    """What Ctrl-C leaves: ``interrupted: 37 records saved in results (dual-lam0.4/gsm8k: 37);
    run the same command again to resume``."""
    counts = saved_records(plan)
    total = sum(counts.values())
    where = f"{total} record{'s' * (total != 1)} saved in {plan.out}"
    if 0 < len(counts) <= 3:
        where += " (" + ", ".join(f"{name}: {n}" for name, n in counts.items()) + ")"
    return f"interrupted: {where}; run the same command again to resume"


def run_plan(plan: EvalPlan) -> None:
    """Load the models and run ``plan``: all of it in a single process, this rank's share of
    every task in a data-parallel one (whose rank 0 merges the files). Rank 0 prints the
    summaries."""
    from kad.eval.data_parallel import joined_ranks, rank_device
    from kad.eval.runner import method_name
    from kad.eval.sweep import run_sweep

    with joined_ranks(plan.models["device"]) as ranks:
        models = {**plan.models, "device": rank_device(plan.models["device"], ranks)}
        aligner = load_aligner(**models)
        summaries = run_sweep(
            aligner,
            plan.tasks,
            plan.rules,
            plan.out,
            plan.run_for,
            data_dir=plan.data_dir,
            limit=plan.limit,
            batch_size=plan.batch_size,
            decoding=plan.decoding,
            progress=True,
            ranks=ranks,
        )
    if ranks.main:
        for summary in summaries:
            print_summary(summary, plan.out / method_name(summary["rule"], summary["params"]))


def launch(plan: EvalPlan, data_parallel: int | None) -> None:
    """Run ``plan`` here (a single process, or a rank torchrun started), or on
    ``data_parallel`` ranks spawned for it. Bad numbers of ranks and what `check_plan` checks
    fail before weights load. Ctrl-C says how many records are saved (`interrupted_message`,
    rank 0 only) and exits with code 130."""
    from kad.eval.data_parallel import INTERRUPTED, check_data_parallel, launched_world, spawn

    world = check_data_parallel(data_parallel, plan.models["device"])
    check_plan(plan)
    try:
        if world > 1 and launched_world() is None:
            spawn(world, run_plan, plan)
        else:
            run_plan(plan)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            err_console.print(interrupted_message(plan), soft_wrap=True)
        raise typer.Exit(INTERRUPTED) from None


@with_rule_options
def eval_command(
    task: TaskList,
    base: Base = None,
    proxy: Proxy = None,
    proxy_base: ProxyBase = None,
    rule: RuleOpt = "dual",
    rule_values: dict[str, Any] | None = None,
    data_dir: DataDir = None,
    shots: Shots = None,
    limit: Limit = None,
    batch_size: BatchSize = 8,
    max_new_tokens: MaxNewTokens = 256,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    seed: Seed = None,
    stop: Stop = None,
    speculative: Speculative = None,
    out: OutDir = Path("results"),
    device: Device = None,
    dtype: Dtype = None,
    fast: Fast = None,
    max_rows: MaxRows = None,
    max_context: MaxContext = None,
    memory_fraction: MemoryFraction = None,
    data_parallel: DataParallel = None,
    quantize_base: QuantizeBase = "none",
    quantize_proxy: QuantizeProxy = "none",
) -> None:
    """Evaluate one method on tasks: a JSONL line per example and a summary, resumable."""
    from kad.rules import make_rule

    tasks = [get_task(name, shots) for name in split_list(task)]
    if not tasks:
        raise KadError("give at least one --task")
    rule_obj = make_rule(rule, **(rule_values or {}))
    paths = model_paths(base, proxy, proxy_base)
    check_proxy_base([rule_obj], paths[2])
    quantize = quantize_of(quantize_base, quantize_proxy)
    plan = EvalPlan(
        tasks=tasks,
        rules=[rule_obj],
        paths=paths,
        models={
            "base": base,
            "proxy": proxy,
            "proxy_base": proxy_base if rule_obj.needs_proxy_base else None,
            "dtype": dtype,
            "device": device,
            "fast": fast,
            "max_rows": max_rows,
            "max_context": max_context,
            "memory_fraction": memory_fraction,
            "quantize": quantize,
        },
        decoding=decoding_options(
            max_new_tokens, temperature, top_p, top_k, seed, stop, speculative
        ),
        shots=shots,
        out=out,
        data_dir=data_dir,
        limit=limit,
        batch_size=batch_size,
    )
    launch(plan, data_parallel)


@with_rule_options(grid=DEFAULT_GRIDS)
def sweep_command(
    task: TaskList,
    base: Base = None,
    proxy: Proxy = None,
    proxy_base: ProxyBase = None,
    rules: Annotated[
        str | None,
        typer.Option(
            "--rules",
            help="Comma-separated rules (default: sweep.DEFAULT_RULES; implicit-reward only "
            "with a proxy base).",
        ),
    ] = None,
    rule_values: dict[str, Any] | None = None,
    data_dir: DataDir = None,
    shots: Shots = None,
    limit: Limit = None,
    batch_size: BatchSize = 8,
    max_new_tokens: MaxNewTokens = 256,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    seed: Seed = None,
    stop: Stop = None,
    speculative: Speculative = None,
    out: OutDir = Path("results"),
    device: Device = None,
    dtype: Dtype = None,
    fast: Fast = None,
    max_rows: MaxRows = None,
    max_context: MaxContext = None,
    memory_fraction: MemoryFraction = None,
    data_parallel: DataParallel = None,
    quantize_base: QuantizeBase = "none",
    quantize_proxy: QuantizeProxy = "none",
) -> None:
    """Run the paper's comparison: every task at every grid point, one folder per point.

    Each rule is swept over its parameter of `sweep.swept_param` (λ, b, β, δ...): grids left out
    are those of `sweep.DEFAULT_GRIDS`."""
    from kad.eval import sweep

    tasks = [get_task(name, shots) for name in split_list(task)]
    if not tasks:
        raise KadError("give at least one --task")
    paths = model_paths(base, proxy, proxy_base)
    if rules is not None:
        rule_names = split_list([rules])
    elif paths[2] is None:
        rule_names = [name for name in sweep.DEFAULT_RULES if name != "implicit-reward"]
        err_console.print("no --proxy-base: skipping the implicit-reward baseline")
    else:
        rule_names = list(sweep.DEFAULT_RULES)
    grids, loss, fixed = sweep_settings(rule_values or {})
    points = sweep.grid(rule_names, grids, loss, **fixed)
    check_proxy_base(points, paths[2])
    quantize = quantize_of(quantize_base, quantize_proxy)
    plan = EvalPlan(
        tasks=tasks,
        rules=points,
        paths=paths,
        models={
            "base": base,
            "proxy": proxy,
            "proxy_base": proxy_base,
            "dtype": dtype,
            "device": device,
            "fast": fast,
            "max_rows": max_rows,
            "max_context": max_context,
            "memory_fraction": memory_fraction,
            "quantize": quantize,
        },
        decoding=decoding_options(
            max_new_tokens, temperature, top_p, top_k, seed, stop, speculative
        ),
        shots=shots,
        out=out,
        data_dir=data_dir,
        limit=limit,
        batch_size=batch_size,
    )
    launch(plan, data_parallel)


def sweep_settings(values: dict[str, Any]) -> tuple[dict[str, list[float]], str, dict[str, Any]]:
    """The sweep's options as `sweep.grid` takes them: the grids given (``--lams 0.2,0.5`` ->
    ``{"lam": [0.2, 0.5]}``), the loss, and the other parameters given (``fractional``)."""
    from kad.options import rule_parameters

    owners = rule_parameters()
    grids: dict[str, list[float]] = {}
    fixed: dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        if owners[name][0][1].kind is float:
            grids[name] = split_floats(value, f"--{name}s")
        else:
            fixed[name] = value
    return grids, fixed.pop("loss", None) or "nll", fixed


def report_command(
    results: Annotated[Path, typer.Argument(help="Folder of kad eval / kad sweep results.")] = Path(
        "results"
    ),
    out: Annotated[
        Path | None, typer.Option("--out", help="Where to write report.md and the PNG plots.")
    ] = None,
) -> None:
    """Print the table (methods × tasks, deferral, acceptance) and write the plots."""
    from kad.eval.report import write_report

    markdown, plots = write_report(results, out)
    typer.echo(markdown)
    for path in plots:
        err_console.print(f"wrote {path}")


# Register with app.command("lm-eval", context_settings=LM_EVAL_CONTEXT, add_help_option=False):
# every argument, --help included, goes to lm-eval.
LM_EVAL_CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}


def lm_eval_command(ctx: typer.Context) -> None:
    """Run lm-evaluation-harness with the `kad` model registered: same arguments as `lm_eval`,
    e.g. kad lm-eval --model kad --model_args base=B,proxy=Q,rule=dual,lam=0.4 --tasks gsm8k."""
    from kad.eval.lm_eval_model import KadLM, run_lm_eval_cli

    if {"-h", "--help"} & set(ctx.args):
        typer.echo(model_args_help(KadLM))
    run_lm_eval_cli(list(ctx.args))


def model_args_help(model: type) -> str:
    """The kad section of ``kad lm-eval --help``: the model args (``model``'s constructor
    arguments, with their defaults), before lm-eval's own help."""
    import inspect

    from kad.rules import RULE_NAMES

    params = [p for p in inspect.signature(model).parameters.values() if p.name != "self"]
    width = max(len(p.name) for p in params) + 2
    lines = [
        "kad lm-eval: lm-eval's command line with the kad model registered.",
        "  kad lm-eval --model kad --model_args base=B,proxy=Q,rule=dual,lam=0.4 --tasks gsm8k",
        "",
        "kad model args (--model_args key=value,...):",
    ]
    for p in params:
        default = "required" if p.default is inspect.Parameter.empty else f"default {p.default!r}"
        lines.append(f"  {p.name.ljust(width)}{default}")
    lines += [f"rules: {', '.join(RULE_NAMES)}", "", "lm-eval's own help:", ""]
    return "\n".join(lines)
