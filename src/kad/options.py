"""The options that several commands share, declared once, and the one way to load an aligner.

Light on purpose (typer and typing; torch loads inside `load_aligner`): the command line's help
and its argument errors must not wait for torch. Each alias is ``Annotated[type, typer.Option]``;
a command uses it as ``base: Base = None``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from kad.errors import KadError
from kad.rules import LOSSES, RULE_NAMES

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
Lam = Annotated[
    float | None, typer.Option("--lam", help="Threshold λ of dual (default 0.4) and nudging.")
]
Budget = Annotated[float | None, typer.Option("--budget", help="Budget b of primal (default 0.9).")]
Beta = Annotated[float | None, typer.Option("--beta", help="β of implicit reward (default 1).")]
Loss = Annotated[str, typer.Option("--loss", help=f"Loss of dual and primal: {', '.join(LOSSES)}.")]
Mu = Annotated[float | None, typer.Option("--mu", help="Threshold μ of dual with a non-nll loss.")]

# --- decoding
MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", help="Most tokens per answer.")]
Temperature = Annotated[float, typer.Option("--temperature", help="0 is greedy.")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass.")]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed for sampling.")]
Speculative = Annotated[
    str | None,
    typer.Option(
        "--speculative", help="Draft length γ ≥ 1 for lossless speculative decoding, or 'auto'."
    ),
]

# --- the runtime
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
MaxRows = Annotated[
    int | None, typer.Option("--max-rows", help="Most sequences decoded at once (default: auto).")
]
MaxContext = Annotated[
    int | None,
    typer.Option(
        "--max-context", help="Most tokens per sequence, prompt + output (default: the model's)."
    ),
]
MemoryFraction = Annotated[
    float | None,
    typer.Option(
        "--memory-fraction",
        help="Share of GPU memory for the weights and the KV pool (default: auto).",
    ),
]


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
) -> Aligner:
    """The given pair (with ``proxy_base`` if given), or, when neither ``base`` nor ``proxy`` is
    given, the built-in pair (with ``proxy_base``, else its own proxy base). Half a pair is a
    `KadError`. The other arguments go to `Aligner.from_pretrained`."""
    check_pair(base, proxy)
    runtime = {
        "dtype": dtype,
        "device": device,
        "fast": fast,
        "max_rows": max_rows,
        "max_context": max_context,
        "memory_fraction": memory_fraction,
    }
    if base is None:
        from kad.world import builtin_aligner

        return builtin_aligner(proxy_base=proxy_base or True, **runtime)
    from kad.aligner import Aligner

    return Aligner.from_pretrained(base, proxy, proxy_base, **runtime)
