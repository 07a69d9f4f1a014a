"""The `kad` command line: generate, demo, and the commands of the eval, bench and serve modules.

Bad input (a `KadError`) prints its message and exits with code 2. Torch and transformers load
only when a command runs: `kad --help`, `kad <command> --help` of the light commands and argument
errors answer at once. Commands whose module is heavy (`LAZY_COMMANDS`) import it only when they
run or show their own help.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import wraps
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup, TyperOption

from kad.errors import KadError
from kad.eval.commands import (
    LM_EVAL_CONTEXT,
    eval_command,
    lm_eval_command,
    report_command,
    sweep_command,
)
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
    TensorParallelOpt,
    TopP,
    load_aligner,
    quantize_of,
    with_rule_options,
)

err_console = Console(stderr=True)


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


@dataclass(frozen=True)
class LazyCommand:
    """A command whose module imports torch: ``target`` is ``"module:function"``, ``short_help``
    its line in ``kad --help`` (a test checks it against the function's docstring)."""

    target: str
    short_help: str
    settings: dict[str, Any] = field(default_factory=dict)

    def load(self, name: str) -> click.Command:
        """Import the module and build the click command, `KadError`s exiting with code 2."""
        module, function = self.target.split(":")
        callback = getattr(importlib.import_module(module), function)
        single = typer.Typer(add_completion=False)
        single.command(name, **self.settings)(exits_on_bad_input(callback))
        return plain_metavars(typer.main.get_command(single))


LAZY_COMMANDS: dict[str, LazyCommand] = {
    "serve": LazyCommand(
        "kad.serve.command:serve_command",
        "Serve a KAD-aligned pair behind an OpenAI-compatible API (completions and chat).",
    ),
    "bench": LazyCommand(
        "kad.bench:bench_command",
        "Decode speed of base, proxy, plain and speculative KAD next to the memory roofline and "
        "transformers, on real models or random-weight presets.",
    ),
}
_TYPE_METAVARS = {"str": "TEXT", "list[str]": "TEXT", "int": "INTEGER", "path": "PATH"}


def plain_metavars(command: click.Command) -> click.Command:
    """Help without typer's ``<bool>``/``<str>`` labels: flags show none, other options an
    upper-case type (``TEXT``, ``FLOAT``) or their choices. Returns ``command``. Typer before
    0.29 has no such labels (nor `display_type`): its help shows click's metavars already."""
    if not hasattr(TyperOption, "display_type"):
        return command
    ctx = click.Context(command)
    for param in command.get_params(ctx):
        if isinstance(param, TyperOption) and param.metavar is None:
            if param.is_flag:
                param.metavar = ""
            else:
                label = param.display_type(ctx).strip("<>")
                param.metavar = _TYPE_METAVARS.get(label, label.upper())
    return command


class KadGroup(TyperGroup):
    """`kad`'s command group: `LAZY_COMMANDS` listed from their short help and imported only
    when resolved; every command's help without typer's type labels."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in LAZY_COMMANDS:
            return TyperCommand(cmd_name, help=LAZY_COMMANDS[cmd_name].short_help)
        return command if command is None else plain_metavars(command)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        if name in LAZY_COMMANDS and name not in self.commands:
            command = self.commands[name] = LAZY_COMMANDS[name].load(name)
        return name, command, rest


app = typer.Typer(
    cls=KadGroup,
    add_completion=False,
    no_args_is_help=True,
    help="KAD: steer a large base LM with a small aligned proxy, token by token.",
)


def check_before_loading(rule: Any, has_proxy_base: bool, prompts: Sequence[str]) -> None:
    """Catch bad input before spending time on loading models: a rule that needs a proxy base
    the family lacks, an empty prompt, text that is not valid Unicode."""
    from kad.prompt import check_text

    if rule.needs_proxy_base and not has_proxy_base:
        raise KadError(f"the {rule.name} rule needs the proxy's unaligned base: add --proxy-base")
    for i, prompt in enumerate(prompts):
        check_text(prompt, f"prompt {i}")
        if not prompt.strip():
            raise KadError(f"prompt {i} is empty")


@app.command()
@exits_on_bad_input
@with_rule_options
def generate(
    prompts: Annotated[list[str], typer.Argument(help="One or more prompts (user text).")],
    base: Base = None,
    proxy: Proxy = None,
    proxy_base: ProxyBase = None,
    rule: RuleOpt = "dual",
    rule_values: dict[str, Any] | None = None,
    max_new_tokens: MaxNewTokens = 256,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens (0: off).")] = 0,
    seed: Seed = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    speculative: Speculative = None,
    device: Device = None,
    dtype: Dtype = None,
    fast: Fast = None,
    max_rows: MaxRows = None,
    max_context: MaxContext = None,
    memory_fraction: MemoryFraction = None,
    tensor_parallel: TensorParallelOpt = None,
    quantize_base: QuantizeBase = "none",
    quantize_proxy: QuantizeProxy = "none",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON list: each prompt with text and stats.")
    ] = False,
    show_deferral: Annotated[
        bool, typer.Option("--show-deferral", help="Colour tokens: kept from the base or deferred.")
    ] = False,
) -> None:
    """Generate from a base model aligned at test time by a small proxy (default: built-in)."""
    from kad.rules import make_rule
    from kad.speculative import parse_speculative

    rule_obj = make_rule(rule, **(rule_values or {}))
    check_before_loading(rule_obj, proxy_base is not None or base is None, prompts)
    parse_speculative(speculative)
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
        tensor_parallel=tensor_parallel,
        quantize=quantize_of(quantize_base, quantize_proxy),
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
    aligner.close()


def print_generations(aligner, prompts, outputs, *, as_json: bool, show_deferral: bool) -> None:
    """The texts (or tokens coloured by deferral); with ``as_json``, a JSON list with one object
    per prompt, however many prompts: ``{"prompt", "text", "token_ids", ..., "stats"}``."""
    from kad.display import DEFERRAL_LEGEND, deferral_text

    console = Console(highlight=False)
    if as_json:
        rows = [{"prompt": p, **o.to_dict()} for p, o in zip(prompts, outputs, strict=True)]
        print(json.dumps(rows, indent=2))
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


app.command("eval")(exits_on_bad_input(eval_command))
app.command("sweep")(exits_on_bad_input(sweep_command))
app.command("report")(exits_on_bad_input(report_command))
app.command("lm-eval", context_settings=LM_EVAL_CONTEXT, add_help_option=False)(lm_eval_command)


def main() -> None:  # pragma: no cover - console entry for `python -m kad`
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
