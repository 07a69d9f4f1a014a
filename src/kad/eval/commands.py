"""The CLI commands of the harness: `kad eval`, `kad sweep`, `kad report`, `kad lm-eval`.

Plain functions with typer annotations; `kad.cli` registers them. Bad input raises `KadError`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from kad.errors import KadError
from kad.eval.runner import method_name, run_eval
from kad.eval.sweep import (
    DEFAULT_BETAS,
    DEFAULT_BUDGETS,
    DEFAULT_LAMS,
    DEFAULT_RULES,
    grid,
    run_sweep,
)
from kad.eval.tasks import DATA_DIR_ENV, TASKS, get_task
from kad.rules import RULE_NAMES, Rule, make_rule, rule_params

err_console = Console(stderr=True, highlight=False)

TaskList = Annotated[
    list[str],
    typer.Option("--task", help=f"Task (repeatable or comma-separated): {', '.join(TASKS)}."),
]
BaseOpt = Annotated[
    str | None,
    typer.Option("--base", help="Base model: local dir, .gguf or Hub id (default: built-in)."),
]
ProxyOpt = Annotated[
    str | None,
    typer.Option("--proxy", help="Aligned proxy: local dir, .gguf or Hub id (default: built-in)."),
]
ProxyBaseOpt = Annotated[
    str | None, typer.Option("--proxy-base", help="The proxy's unaligned base (implicit reward).")
]
LossOpt = Annotated[str, typer.Option("--loss", help="nll, squared, margin or zero_one.")]
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
MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", help="Most tokens per answer.")]
Temperature = Annotated[float, typer.Option("--temperature", help="0 is greedy.")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass.")]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed for sampling.")]
Speculative = Annotated[
    str | None, typer.Option("--speculative", help="Draft length γ ≥ 1, or 'auto' (lossless).")
]
OutDir = Annotated[Path, typer.Option("--out", help="Results root: one folder per method inside.")]
Device = Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 (default: auto).")]
Dtype = Annotated[str | None, typer.Option("--dtype", help="float32, bfloat16 or float16.")]


def split_list(values: list[str] | None) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``."""
    return [item.strip() for value in values or [] for item in value.split(",") if item.strip()]


def split_floats(value: str, option: str) -> list[float]:
    try:
        return [float(item) for item in split_list([value])]
    except ValueError:
        raise KadError(f"{option} takes comma-separated numbers, got {value!r}") from None


def model_paths(
    base: str | None, proxy: str | None, proxy_base: str | None
) -> tuple[str, str, str | None]:
    """The models given, or the built-in family (base, proxy, proxy base) when neither base nor
    proxy is."""
    if base is not None and proxy is not None:
        return base, proxy, proxy_base
    if base is not None or proxy is not None:
        raise KadError("give both --base and --proxy, or neither for the built-in pair")
    from kad.world import builtin_paths

    paths = builtin_paths()
    return str(paths.base), str(paths.proxy), proxy_base or str(paths.proxy_base)


def check_proxy_base(rules: list[Rule], proxy_base: str | None) -> None:
    needing = sorted({rule.name for rule in rules if rule.needs_proxy_base})
    if needing and proxy_base is None:
        raise KadError(
            f"the {', '.join(needing)} rule needs the proxy's base model: give --proxy-base"
        )


def load_aligner(
    base: str, proxy: str, proxy_base: str | None, device: str | None, dtype: str | None
) -> Any:
    from kad.aligner import Aligner

    return Aligner.from_pretrained(base, proxy, proxy_base, dtype=dtype, device=device)


def run_record(
    base: str,
    proxy: str,
    proxy_base: str | None,
    rule: Rule,
    decoding: dict[str, Any],
    shots: int | None,
) -> dict[str, Any]:
    """The settings that define a method, as kept in ``run.json`` and every summary."""
    return {
        "base": base,
        "proxy": proxy,
        "proxy_base": proxy_base if rule.needs_proxy_base else None,
        "rule": rule.name,
        "params": rule_params(rule),
        "shots": shots,
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


def eval_command(
    task: TaskList,
    base: BaseOpt = None,
    proxy: ProxyOpt = None,
    proxy_base: ProxyBaseOpt = None,
    rule: Annotated[str, typer.Option("--rule", help=f"One of {', '.join(RULE_NAMES)}.")] = "dual",
    lam: Annotated[float | None, typer.Option("--lam", help="λ of dual / nudging.")] = None,
    budget: Annotated[float | None, typer.Option("--budget", help="b of primal.")] = None,
    beta: Annotated[float | None, typer.Option("--beta", help="β of implicit reward.")] = None,
    loss: LossOpt = "nll",
    mu: Annotated[float | None, typer.Option("--mu", help="μ of dual, non-nll loss.")] = None,
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
) -> None:
    """Evaluate one method on tasks: a JSONL line per example and a summary, resumable."""
    tasks = [get_task(name, shots) for name in split_list(task)]
    if not tasks:
        raise KadError("give at least one --task")
    rule_obj = make_rule(rule, lam=lam, budget=budget, beta=beta, loss=loss, mu=mu)
    base, proxy, proxy_base = model_paths(base, proxy, proxy_base)
    check_proxy_base([rule_obj], proxy_base)
    decoding = decoding_options(max_new_tokens, temperature, top_p, seed, speculative)
    run = run_record(base, proxy, proxy_base, rule_obj, decoding, shots)
    aligner = load_aligner(base, proxy, run["proxy_base"], device, dtype)
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
            progress=sys.stderr.isatty(),
        )
        print_summary(summary, folder)


def sweep_command(
    task: TaskList,
    base: BaseOpt = None,
    proxy: ProxyOpt = None,
    proxy_base: ProxyBaseOpt = None,
    rules: Annotated[
        str | None,
        typer.Option(
            "--rules",
            help=f"Comma-separated rules (default: {','.join(DEFAULT_RULES)}; implicit-reward "
            "only with a proxy base).",
        ),
    ] = None,
    lams: Annotated[str, typer.Option("--lams", help="λ values of dual and nudging.")] = ",".join(
        f"{v:g}" for v in DEFAULT_LAMS
    ),
    budgets: Annotated[str, typer.Option("--budgets", help="b values of primal.")] = ",".join(
        f"{v:g}" for v in DEFAULT_BUDGETS
    ),
    betas: Annotated[str, typer.Option("--betas", help="β values of implicit reward.")] = ",".join(
        f"{v:g}" for v in DEFAULT_BETAS
    ),
    loss: LossOpt = "nll",
    mus: Annotated[str, typer.Option("--mus", help="μ values of dual with a non-nll loss.")] = "",
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
) -> None:
    """Run the paper's comparison: every task at every grid point, one folder per point."""
    tasks = [get_task(name, shots) for name in split_list(task)]
    if not tasks:
        raise KadError("give at least one --task")
    base, proxy, proxy_base = model_paths(base, proxy, proxy_base)
    if rules is not None:
        rule_names = split_list([rules])
    elif proxy_base is None:
        rule_names = [name for name in DEFAULT_RULES if name != "implicit-reward"]
        err_console.print("no --proxy-base: skipping the implicit-reward baseline")
    else:
        rule_names = list(DEFAULT_RULES)
    points = grid(
        rule_names,
        split_floats(lams, "--lams"),
        split_floats(budgets, "--budgets"),
        split_floats(betas, "--betas"),
        loss,
        split_floats(mus, "--mus"),
    )
    check_proxy_base(points, proxy_base)
    decoding = decoding_options(max_new_tokens, temperature, top_p, seed, speculative)
    aligner = load_aligner(base, proxy, proxy_base, device, dtype)
    summaries = run_sweep(
        aligner,
        tasks,
        points,
        out,
        lambda r: run_record(base, proxy, proxy_base, r, decoding, shots),
        data_dir=data_dir,
        limit=limit,
        batch_size=batch_size,
        decoding=decoding,
        progress=sys.stderr.isatty(),
    )
    for summary in summaries:
        print_summary(summary, out / method_name(summary["rule"], summary["params"]))


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
    from kad.eval.lm_eval_model import run_lm_eval_cli

    run_lm_eval_cli(list(ctx.args))
