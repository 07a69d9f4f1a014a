"""The CLI commands of the harness: `kad eval`, `kad sweep`, `kad report`, `kad lm-eval`.

Plain functions with typer annotations; `kad.cli` registers them. Bad input raises `KadError`.
Light at import (the help must not wait for torch): the runner, the rules and the models load
inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from kad.errors import KadError
from kad.eval.tasks import DATA_DIR_ENV, TASKS, get_task
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
    Temperature,
    TopP,
    load_aligner,
    model_paths,
    quantize_of,
    with_rule_options,
)

if TYPE_CHECKING:
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
Limit = Annotated[int | None, typer.Option("--limit", help="Only the first N examples.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Prompts decoded together.")]
OutDir = Annotated[Path, typer.Option("--out", help="Results root: one folder per method inside.")]


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
    max_new_tokens: int, temperature: float, top_p: float, seed: int | None, speculative: str | None
) -> dict[str, Any]:
    """The keyword arguments of `Aligner.generate` that a method fixes."""
    from kad.speculative import parse_speculative

    return {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": 0,
        "seed": seed,
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
    seed: Seed = None,
    speculative: Speculative = None,
    out: OutDir = Path("results"),
    device: Device = None,
    dtype: Dtype = None,
    fast: Fast = None,
    max_rows: MaxRows = None,
    max_context: MaxContext = None,
    memory_fraction: MemoryFraction = None,
    quantize_base: QuantizeBase = "none",
    quantize_proxy: QuantizeProxy = "none",
) -> None:
    """Evaluate one method on tasks: a JSONL line per example and a summary, resumable."""
    from kad.eval.runner import method_name, run_eval
    from kad.rules import make_rule

    tasks = [get_task(name, shots) for name in split_list(task)]
    if not tasks:
        raise KadError("give at least one --task")
    rule_obj = make_rule(rule, **(rule_values or {}))
    paths = model_paths(base, proxy, proxy_base)
    check_proxy_base([rule_obj], paths[2])
    decoding = decoding_options(max_new_tokens, temperature, top_p, seed, speculative)
    quantize = quantize_of(quantize_base, quantize_proxy)
    run = run_record(*paths, rule_obj, decoding, shots, quantize)
    aligner = load_aligner(
        base,
        proxy,
        proxy_base if rule_obj.needs_proxy_base else None,
        dtype=dtype,
        device=device,
        fast=fast,
        max_rows=max_rows,
        max_context=max_context,
        memory_fraction=memory_fraction,
        quantize=quantize,
    )
    folder = out / method_name(rule_obj.name, run["params"])
    for one in tasks:
        summary = run_eval(
            aligner,
            one,
            rule_obj,
            folder,
            run,
            data_dir=data_dir,
            limit=limit,
            batch_size=batch_size,
            decoding=decoding,
            progress=True,
        )
        print_summary(summary, folder)


@with_rule_options(grid=True)
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
    seed: Seed = None,
    speculative: Speculative = None,
    out: OutDir = Path("results"),
    device: Device = None,
    dtype: Dtype = None,
    fast: Fast = None,
    max_rows: MaxRows = None,
    max_context: MaxContext = None,
    memory_fraction: MemoryFraction = None,
    quantize_base: QuantizeBase = "none",
    quantize_proxy: QuantizeProxy = "none",
) -> None:
    """Run the paper's comparison: every task at every grid point, one folder per point.

    Each rule is swept over its parameter of `sweep.swept_param` (λ, b, β, δ...): grids left out
    are those of `sweep.DEFAULT_GRIDS`."""
    from kad.eval import sweep
    from kad.eval.runner import method_name

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
    decoding = decoding_options(max_new_tokens, temperature, top_p, seed, speculative)
    quantize = quantize_of(quantize_base, quantize_proxy)
    aligner = load_aligner(
        base,
        proxy,
        proxy_base,
        dtype=dtype,
        device=device,
        fast=fast,
        max_rows=max_rows,
        max_context=max_context,
        memory_fraction=memory_fraction,
        quantize=quantize,
    )
    summaries = sweep.run_sweep(
        aligner,
        tasks,
        points,
        out,
        lambda r: run_record(*paths, r, decoding, shots, quantize),
        data_dir=data_dir,
        limit=limit,
        batch_size=batch_size,
        decoding=decoding,
        progress=True,
    )
    for summary in summaries:
        print_summary(summary, out / method_name(summary["rule"], summary["params"]))


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
