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
    TopK,
    TopP,
    load_aligner,
    quantize_of,
    with_rule_options,
)
from kad.textfiles import STDIN, parse_json, read_text, source_name

err_console = Console(stderr=True)


def exits_on_bad_input(command: Callable) -> Callable:
    """Turn a KadError into its message on stderr and exit code 2 (or the error's own
    ``exit_code``, e.g. 3 for a port in use)."""

    @wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except KadError as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(getattr(err, "exit_code", 2)) from None

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
        single.command(name, **self.settings)(callback)
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
    when resolved; every command's help without typer's type labels; a `KadError`, whether an
    option's check raises it while the command line is parsed or the command while it runs,
    exits through `exits_on_bad_input`."""

    def invoke(self, ctx: click.Context) -> Any:
        return exits_on_bad_input(super().invoke)(ctx)

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


def read_lines(source: str) -> list[str]:
    """The lines of file ``source`` (``-``: stdin) as `read_text` decodes them, without their
    line ends; its `KadError` for a missing file or bytes that are not UTF-8."""
    return [line.removesuffix("\r") for line in read_text(source).split("\n")]


def read_prompts_file(source: str) -> list[str]:
    """The prompts of ``--prompts-file``: one per line (blank lines skipped), or for a ``.jsonl``
    file one JSON object per line with a ``"prompt"`` string (as vLLM's and OpenAI's batch files
    hold one request per line). ``-`` reads stdin, one prompt per line."""
    name = source_name(source)
    prompts = []
    for number, line in enumerate(read_lines(source), 1):
        if not line.strip():
            continue
        if not source.endswith(".jsonl"):
            prompts.append(line)
            continue
        record = parse_json(line, source, number)
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise KadError(f'{name} line {number} is not an object with a "prompt" string')
        prompts.append(record["prompt"])
    if not prompts:
        raise KadError(f"{name} holds no prompts")
    return prompts


def gather_prompts(given: Sequence[str], prompts_file: str | None) -> list[str]:
    """The prompts of `kad generate`: its arguments (``-``: all of stdin, one prompt), or the
    lines of ``--prompts-file``; `KadError` for neither or both."""
    if prompts_file is not None:
        if given:
            raise KadError("give prompts as arguments or with --prompts-file, not both")
        return read_prompts_file(prompts_file)
    if not given:
        raise KadError("no prompt: give one or more, - to read one from stdin, or --prompts-file")
    if list(given).count(STDIN) > 1:
        raise KadError("- (stdin) can be given once")
    return [read_stdin_prompt() if prompt == STDIN else prompt for prompt in given]


def read_stdin_prompt() -> str:
    """All of stdin as one prompt, without its final line end; `KadError` if it is empty."""
    text = "\n".join(read_lines(STDIN)).rstrip("\n")
    if not text.strip():
        raise KadError("- reads the prompt from stdin, but stdin is empty")
    return text


@app.command()
@with_rule_options
def generate(
    prompts: Annotated[
        list[str] | None,
        typer.Argument(help="One or more prompts (user text); - reads one from stdin."),
    ] = None,
    prompts_file: Annotated[
        str | None,
        typer.Option(
            "--prompts-file",
            help="Read the prompts from this file (- for stdin): one per line, or a .jsonl "
            'file of {"prompt": ...} objects.',
        ),
    ] = None,
    base: Base = None,
    proxy: Proxy = None,
    proxy_base: ProxyBase = None,
    rule: RuleOpt = "dual",
    rule_values: dict[str, Any] | None = None,
    max_new_tokens: MaxNewTokens = 256,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
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

    texts = gather_prompts(prompts or [], prompts_file)
    rule_obj = make_rule(rule, **(rule_values or {}))
    check_before_loading(rule_obj, proxy_base is not None or base is None, texts)
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
        texts,
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
    print_generations(aligner, texts, outputs, as_json=as_json, show_deferral=show_deferral)
    aligner.close()


def print_generations(aligner, prompts, outputs, *, as_json: bool, show_deferral: bool) -> None:
    """The texts verbatim (or tokens coloured by deferral), under a rule naming the prompt when
    there are several; with ``as_json``, a JSON list with one object per prompt, however many
    prompts: ``{"prompt", "text", "token_ids", "finish_reason", "proxy_share", "stats"}``."""
    from kad.display import DEFERRAL_LEGEND, deferral_text

    console = Console(highlight=False)
    if as_json:
        rows = [{"prompt": p, **o.to_dict()} for p, o in zip(prompts, outputs, strict=True)]
        print(json.dumps(rows, indent=2))
        return
    for prompt, out in zip(prompts, outputs, strict=True):
        if len(prompts) > 1:
            console.rule(" ".join(prompt.split())[:60], style="dim")
        if show_deferral:
            text = deferral_text(aligner.tokenizer, out.token_ids, out.proxy_share)
            console.print(text, soft_wrap=True)
        else:
            print(out.text, flush=True)  # as generated: not wrapped at the terminal's width
    if show_deferral:
        err_console.print(DEFERRAL_LEGEND)


@app.command()
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


app.command("eval")(eval_command)
app.command("sweep")(sweep_command)
app.command("report")(report_command)
app.command("lm-eval", context_settings=LM_EVAL_CONTEXT, add_help_option=False)(lm_eval_command)


def main() -> None:  # pragma: no cover - console entry for `python -m kad`
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
