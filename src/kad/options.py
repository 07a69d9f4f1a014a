"""The options that several commands share, declared once, and the one way to load an aligner.

Light on purpose (typer and typing; torch loads inside `load_aligner`): the command line's help
and its argument errors must not wait for torch. Each alias is ``Annotated[type, typer.Option]``;
a command uses it as ``base: Base = None``.
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from functools import wraps
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from kad.errors import KadError
from kad.rules import RULE_NAMES, RULES, Param

if TYPE_CHECKING:
    from kad.aligner import Aligner

# --- the models
Base = Annotated[
    str | None,
    typer.Option(
        "--base", help="Base model p: local dir, .gguf file or Hub id (default: built-in)."
    ),
]
Proxy = Annotated[
    str | None,
    typer.Option(
        "--proxy", help="Aligned proxy q*: local dir, .gguf or Hub id (default: built-in)."
    ),
]
ProxyBase = Annotated[
    str | None,
    typer.Option(
        "--proxy-base",
        help="The proxy's unaligned base q, for implicit reward (the built-in pair has its own).",
    ),
]

# --- the rule
RuleOpt = Annotated[
    str, typer.Option("--rule", help=f"Deferral rule or baseline: {', '.join(RULE_NAMES)}.")
]
# The rule's parameters (--lam, --budget, --beta, --loss, --mu, --delta, --fractional, ...) are
# not written here: `with_rule_options` derives them from the registry of `kad.rules`.


def rule_parameters() -> dict[str, list[tuple[str, Param]]]:
    """Each parameter name of the registry -> the (rule slug, Param) of every rule taking it, in
    the registry's order (``lam`` -> dual's and nudging's)."""
    taken: dict[str, list[tuple[str, Param]]] = {}
    for slug, spec in RULES.items():
        for p in spec.params:
            taken.setdefault(p.name, []).append((slug, p))
    return taken


def _default_text(p: Param) -> str:
    if p.default is None or p.default is False:
        return ""
    return f" (default {p.default:g})" if p.kind is float else f" (default {p.default})"


def rule_option_help(name: str, grid: Mapping[str, Sequence[float]] | None = None) -> str:
    """The help of a rule parameter's option, from the help of each rule that takes it: e.g.
    ``dual: threshold λ ... (default 0.4); nudging: ...``. With ``grid`` (the sweep's default
    values by parameter): the help of the sweep's list, with its default values."""
    owners = rule_parameters()[name]
    if grid is not None:
        p = owners[0][1]
        rules = ", ".join(slug for slug, _ in owners)
        values = grid.get(name)
        default = f"default {','.join(f'{v:g}' for v in values)}" if values else "no default"
        return f"Comma-separated {p.symbol} values of {rules} ({default})."
    texts: dict[str, list[str]] = {}  # rules that say the same share it
    for slug, p in owners:
        texts.setdefault(f"{p.help}{_default_text(p)}", []).append(slug)
    parts = [f"{', '.join(slugs)}: {text}" for text, slugs in texts.items()]
    first = owners[0][1]
    if first.choices:
        parts.append(f"one of {', '.join(first.choices)}")
    elif first.kind is float and (first.low is not None or first.high is not None):
        parts.append(f"in {first.range_text()}")
    return "; ".join(parts) + "."


def rule_option(name: str, grid: Mapping[str, Sequence[float]] | None = None) -> inspect.Parameter:
    """The typer option of one rule parameter (default None: the rule's own default); with
    ``grid`` (the sweep's default values), a float parameter's ``--<name>s`` list of the sweep."""
    p = rule_parameters()[name][0][1]
    flag = "--" + name.replace("_", "-")
    if grid is not None and p.kind is float:
        option = typer.Option(flag + "s", help=rule_option_help(name, grid))
        annotation: Any = Annotated[str | None, option]
    elif p.kind is bool:
        option = typer.Option(f"{flag}/--no-{flag[2:]}", help=rule_option_help(name))
        annotation = Annotated[bool | None, option]
    else:
        option = typer.Option(flag, help=rule_option_help(name))
        annotation = Annotated[float | None if p.kind is float else str | None, option]
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Parameter(name, kind, default=None, annotation=annotation)


def with_rule_options(
    command: Callable | None = None, *, grid: Mapping[str, Sequence[float]] | None = None
) -> Any:
    """Give a command one option per parameter of the registry's rules in place of its
    ``rule_values`` argument, which receives them as a dict (None: not given); build the rule
    with ``make_rule(rule, **rule_values)``. With ``grid`` (the sweep's default values by
    parameter, which the help shows), float parameters take a comma-separated list,
    ``--lams``, ``--budgets``, ``--deltas``... A rule registered later gets its options in the
    commands decorated after it."""

    def decorate(command: Callable) -> Callable:
        hints = typing.get_type_hints(command, include_extras=True)
        signature = inspect.signature(command)
        names = list(rule_parameters())
        params: list[inspect.Parameter] = []
        for p in signature.parameters.values():
            if p.name == "rule_values":
                params += [rule_option(name, grid) for name in names]
            else:
                params.append(p.replace(annotation=hints.get(p.name, p.annotation)))

        @wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name, None) for name in names}
            return command(*args, rule_values=values, **kwargs)

        run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return decorate if command is None else decorate(command)


# --- checks of option values: typer callbacks, run while the command line is parsed (before any
# model loads); a `KadError` they raise reads ``error: ...`` with exit code 2 (`kad.cli`)
Check = Callable[[Any, Any, Any], Any]


def checked(valid: Callable[[Any], bool], wants: str) -> Check:
    """A typer callback that refuses a value given that is not ``valid``: `KadError`
    ``"--flag must be <wants>, got <value>"``. None (the option's default: auto) passes."""

    def check(ctx: Any, param: Any, value: Any) -> Any:
        if value is not None and not valid(value):
            raise KadError(f"{param.opts[0]} must be {wants}, got {value}")
        return value

    return check


def at_least(low: int) -> Check:
    """A typer callback: the value (if given) must be >= ``low``."""
    return checked(lambda value: value >= low, f">= {low}")


def _seed_fits(seed: int) -> bool:
    from kad.sampling import SEED_LIMIT  # torch: only once a seed is given

    return 0 <= seed < SEED_LIMIT


def check_device(ctx: Any, param: Any, value: str | None) -> str | None:
    """A typer callback: a torch device string that names a device of this machine (``cuda``
    needs a GPU, ``cuda:3`` four of them); ``auto`` (or nothing) is None, the best one here."""
    if value is None or value == "auto":
        return None
    import torch

    flag = param.opts[0]
    try:
        device = torch.device(value)
    except RuntimeError:
        raise KadError(f"{flag} {value!r} is not a device: use cpu, cuda, cuda:1 or auto") from None
    if device.type == "cpu":
        return value
    backend = getattr(torch, device.type, None)
    if not getattr(backend, "is_available", lambda: False)():
        raise KadError(f"{flag} {value!r}: this machine has no {device.type} device")
    count = backend.device_count()
    if device.index is not None and device.index >= count:
        raise KadError(
            f"{flag} {value!r}: this machine has {count} {device.type} device(s), "
            f"{device.type}:0 to {device.type}:{count - 1}"
        )
    return value


def check_dtype(ctx: Any, param: Any, value: str | None) -> str | None:
    """A typer callback: a dtype name of `kad.models.DTYPES`, or ``auto`` (or nothing)."""
    if value is None or value == "auto":
        return value
    from kad.models import DTYPES  # torch: only once a dtype is given

    if value not in DTYPES:
        raise KadError(f"{param.opts[0]} must be auto or one of {', '.join(DTYPES)}, got {value}")
    return value


# --- decoding
check_top_p = checked(lambda p: 0 < p <= 1, "in (0, 1]")
MaxNewTokens = Annotated[
    int, typer.Option("--max-new-tokens", callback=at_least(1), help="Most tokens per answer.")
]
Temperature = Annotated[
    float,
    typer.Option(
        "--temperature",
        callback=checked(lambda t: math.isfinite(t) and t >= 0, "a finite number >= 0"),
        help="0 is greedy.",
    ),
]
TopP = Annotated[
    float,
    typer.Option(
        "--top-p",
        callback=check_top_p,
        help="Nucleus sampling mass, in (0, 1] (1: off).",
    ),
]
TopK = Annotated[
    int,
    typer.Option("--top-k", callback=at_least(0), help="Keep the k most likely tokens (0: off)."),
]
Stop = Annotated[
    list[str] | None,
    typer.Option(
        "--stop",
        callback=checked(lambda stops: all(stops), "non-empty text"),
        help="Stop string (repeatable).",
    ),
]
Seed = Annotated[
    int | None,
    typer.Option("--seed", callback=checked(_seed_fits, "in [0, 2^63)"), help="Seed for sampling."),
]
Speculative = Annotated[
    str | None,
    typer.Option(
        "--speculative", help="Draft length γ ≥ 1 for lossless speculative decoding, or 'auto'."
    ),
]

# --- the runtime
Device = Annotated[
    str | None,
    typer.Option("--device", callback=check_device, help="cpu, cuda, cuda:1 (default: auto)."),
]
Dtype = Annotated[
    str | None,
    typer.Option(
        "--dtype", callback=check_dtype, help="float32, bfloat16 or float16 (default: auto)."
    ),
]
Fast = Annotated[
    bool | None,
    typer.Option(
        "--fast/--no-fast",
        help="Static KV caches, compiled steps, CUDA graphs (default: on a GPU, for Llama, "
        "Qwen2/3 and OLMo2 models).",
    ),
]
MaxRows = Annotated[
    int | None,
    typer.Option(
        "--max-rows", callback=at_least(1), help="Most sequences decoded at once (default: auto)."
    ),
]
MaxContext = Annotated[
    int | None,
    typer.Option(
        "--max-context",
        callback=at_least(1),
        help="Most tokens per sequence, prompt + output (default: the model's).",
    ),
]
MemoryFraction = Annotated[
    float | None,
    typer.Option(
        "--memory-fraction",
        callback=checked(lambda share: 0 < share <= 1, "in (0, 1]"),
        help="Share of GPU memory for the weights and the KV pool (default: auto).",
    ),
]

TensorParallelOpt = Annotated[
    int | None,
    typer.Option(
        "--tensor-parallel",
        callback=at_least(1),
        help="Shard the base over N ranks (GPUs, or CPU processes): launch with torchrun "
        "--nproc-per-node N, or alone to spawn the ranks (default: 1).",
    ),
]

# --- weight-only quantization, per model (`kad.fast.quant`, which pins these names)
QuantFormat = Literal["none", "int8", "int4"]
QUANT_FORMATS: tuple[str, ...] = typing.get_args(QuantFormat)
QuantizeBase = Annotated[
    QuantFormat,
    typer.Option(
        "--quantize-base",
        help="Weight-only quantization of the base's decoder projections: int8 per channel, "
        "int4 in groups of 128 (compact forward only; changes p).",
    ),
]
QuantizeProxy = Annotated[
    QuantFormat,
    typer.Option(
        "--quantize-proxy",
        help="Weight-only quantization of the proxy's decoder projections (changes q*).",
    ),
]


def quantize_of(base: str = "none", proxy: str = "none") -> dict[str, str] | None:
    """The ``quantize`` argument of `load_aligner` for --quantize-base/--quantize-proxy (None
    when neither model is quantized)."""
    chosen = {role: fmt for role, fmt in (("base", base), ("proxy", proxy)) if fmt != "none"}
    return chosen or None


def check_pair(base: str | None, proxy: str | None) -> None:
    """`KadError` for half a pair: both models, or neither (the built-in pair)."""
    if (base is None) != (proxy is None):
        raise KadError("give both --base and --proxy, or neither for the built-in pair")


def model_paths(
    base: str | None, proxy: str | None, proxy_base: str | None = None
) -> tuple[str, str, str | None]:
    """The models `load_aligner` loads for these options, as paths or Hub ids: the given pair,
    or the built-in one (with its own proxy base unless ``proxy_base`` is given)."""
    check_pair(base, proxy)
    if base is not None and proxy is not None:
        return base, proxy, proxy_base
    from kad.world import builtin_paths

    paths = builtin_paths()
    return str(paths.base), str(paths.proxy), proxy_base or str(paths.proxy_base)


def load_aligner(
    base: str | None,
    proxy: str | None,
    proxy_base: str | None = None,
    *,
    dtype: str | None = None,
    device: str | None = None,
    fast: bool | None = None,
    max_rows: int | None = None,
    max_context: int | None = None,
    memory_fraction: float | None = None,
    tensor_parallel: int | None = None,
    quantize: dict[str, str] | None = None,
) -> Aligner:
    """The given pair (with ``proxy_base`` if given), or, when neither ``base`` nor ``proxy`` is
    given, the built-in pair (with ``proxy_base``, else its own proxy base). Half a pair is a
    `KadError`. The other arguments go to `Aligner.from_pretrained` (under tensor parallelism,
    only rank 0 returns: see `kad.parallel.group.launch`)."""
    check_pair(base, proxy)
    runtime = {
        "quantize": quantize,
        "dtype": dtype,
        "device": device,
        "fast": fast,
        "max_rows": max_rows,
        "max_context": max_context,
        "memory_fraction": memory_fraction,
        "tensor_parallel": tensor_parallel,
    }
    if base is None:
        from kad.world import builtin_aligner

        return builtin_aligner(proxy_base=proxy_base or True, **runtime)
    from kad.aligner import Aligner

    return Aligner.from_pretrained(base, proxy, proxy_base, **runtime)
