"""The `kad` command line: generate, demo, and the commands of the eval, bench and serve modules.

Bad input (a `KadError`) prints its message and exits with code 2.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from enum import Enum
from functools import wraps
from typing import Annotated, Any

import typer
from rich.console import Console

from kad.display import DEFERRAL_LEGEND, deferral_text
from kad.errors import KadError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="KAD: steer a large base LM with a small aligned proxy, token by token.",
)
err_console = Console(stderr=True)


class RuleName(str, Enum):
    dual = "dual"
    primal = "primal"
    nudging = "nudging"
    implicit_reward = "implicit-reward"
    base = "base"
    proxy = "proxy"


def exits_on_bad_input(command: Callable) -> Callable:
    """Turn a KadError into its message on stderr and exit code 2."""

    @wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except KadError as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return run


# Options shared by every command that loads a model family.
Base = Annotated[str, typer.Option("--base", help="Base model: local dir, .gguf file or Hub id.")]
Proxy = Annotated[str, typer.Option("--proxy", help="Aligned proxy: local dir, .gguf or Hub id.")]
ProxyBase = Annotated[
    str | None, typer.Option("--proxy-base", help="The proxy's unaligned base (implicit reward).")
]
RuleOpt = Annotated[RuleName, typer.Option("--rule", help="Deferral rule or baseline.")]
Lam = Annotated[
    float | None, typer.Option("--lam", help="Threshold λ of dual (default 0.4) and nudging.")
]
Budget = Annotated[float | None, typer.Option("--budget", help="Budget b of primal (default 0.9).")]
Beta = Annotated[float | None, typer.Option("--beta", help="β of implicit reward (default 1).")]
LossOpt = Annotated[str, typer.Option("--loss", help="nll, squared, margin or zero_one.")]
Mu = Annotated[float | None, typer.Option("--mu", help="Threshold μ of dual with a non-nll loss.")]
Device = Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 (default: auto).")]
Dtype = Annotated[
    str | None, typer.Option("--dtype", help="float32, bfloat16 or float16 (default: auto).")
]
Fast = Annotated[
    bool | None,
    typer.Option(
        "--fast/--no-fast",
        help="Static KV caches, compiled steps, CUDA graphs (default: on a GPU, for Llama, "
        "Qwen2/3 and OLMo2 models).",
    ),
]
Speculative = Annotated[
    str | None,
    typer.Option(
        "--speculative", help="Draft length γ ≥ 1 for lossless speculative decoding, or 'auto'."
    ),
]


def build_rule(rule: RuleName, lam, budget, beta, loss: str, mu):
    from kad.rules import make_rule

    return make_rule(rule.value, lam=lam, budget=budget, beta=beta, loss=loss, mu=mu)


def check_before_loading(rule, proxy_base: str | None, prompts: list[str]) -> None:
    """Catch bad input before spending time on loading models."""
    if rule.needs_proxy_base and proxy_base is None:
        raise KadError(f"the {rule.name} rule needs the proxy's unaligned base: add --proxy-base")
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise KadError(f"prompt {i} is empty")


@app.command()
@exits_on_bad_input
def generate(
    prompts: Annotated[list[str], typer.Argument(help="One or more prompts (user text).")],
    base: Base,
    proxy: Proxy,
    proxy_base: ProxyBase = None,
    rule: RuleOpt = RuleName.dual,
    lam: Lam = None,
    budget: Budget = None,
    beta: Beta = None,
    loss: LossOpt = "nll",
    mu: Mu = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens (0: off).")] = 0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    speculative: Speculative = None,
    device: Device = None,
    dtype: Dtype = None,
    fast: Fast = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print texts with their stats.")] = False,
    show_deferral: Annotated[
        bool, typer.Option("--show-deferral", help="Colour tokens: kept from the base or deferred.")
    ] = False,
) -> None:
    """Generate from a base model aligned at test time by a small proxy."""
    from kad.aligner import Aligner
    from kad.speculative import parse_speculative

    rule_obj = build_rule(rule, lam, budget, beta, loss, mu)
    check_before_loading(rule_obj, proxy_base, prompts)
    parse_speculative(speculative)
    aligner = Aligner.from_pretrained(
        base, proxy, proxy_base, dtype=dtype, device=device, fast=fast
    )
    outputs = aligner.generate(
        prompts,
        rule=rule_obj,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=stop,
        speculative=speculative,
        progress=sys.stderr.isatty(),
    )
    print_generations(aligner, prompts, outputs, as_json=as_json, show_deferral=show_deferral)


def print_generations(aligner, prompts, outputs, *, as_json: bool, show_deferral: bool) -> None:
    console = Console(highlight=False)
    if as_json:
        rows = [{"prompt": p, **o.to_dict()} for p, o in zip(prompts, outputs, strict=True)]
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
        return
    for prompt, out in zip(prompts, outputs, strict=True):
        if len(prompts) > 1:
            console.rule(prompt[:60], style="dim")
        if show_deferral:
            console.print(deferral_text(aligner.tokenizer, out.token_ids, out.proxy_share))
        else:
            console.print(out.text, markup=False)
    if show_deferral:
        err_console.print(DEFERRAL_LEGEND)


@app.command()
@exits_on_bad_input
def demo(
    as_json: Annotated[bool, typer.Option("--json", help="Print the table as JSON.")] = False,
    sweep: Annotated[
        str | None, typer.Option("--sweep", help="Also sweep λ and b; save the plot to this PNG.")
    ] = None,
    n: Annotated[int, typer.Option("--n", help="Held-out problems in the table.")] = 200,
) -> None:
    """KAD on the built-in model pair: three generations and an accuracy table, offline."""
    from kad.demo import run_demo

    run_demo(as_json=as_json, sweep=sweep, n=n)


def main() -> None:  # pragma: no cover - console entry for `python -m kad`
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


def _register_module_commands() -> None:
    """Commands that live beside the code they drive (evaluation, benchmarks, server)."""
    from kad.eval.commands import (
        LM_EVAL_CONTEXT,
        eval_command,
        lm_eval_command,
        report_command,
        sweep_command,
    )

    app.command("eval")(exits_on_bad_input(eval_command))
    app.command("sweep")(exits_on_bad_input(sweep_command))
    app.command("report")(exits_on_bad_input(report_command))
    app.command("lm-eval", context_settings=LM_EVAL_CONTEXT, add_help_option=False)(lm_eval_command)

    from kad.serve.command import serve_command

    app.command("serve")(exits_on_bad_input(serve_command))
    from kad.bench import bench_command

    app.command("bench")(exits_on_bad_input(bench_command))


_register_module_commands()
