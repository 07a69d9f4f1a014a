"""`kad serve`: load a pair (or build a random-weight one) and serve it with uvicorn."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kad.errors import KadError
from kad.options import (
    Device,
    Dtype,
    MaxContext,
    MemoryFraction,
    QuantizeBase,
    QuantizeProxy,
    TensorParallelOpt,
    at_least,
    check_top_p,
    checked,
    load_aligner,
    quantize_of,
    with_rule_options,
)
from kad.rules import RULE_NAMES, make_rule
from kad.sampling import Warp
from kad.serve.app import MAX_BODY_BYTES, MAX_PROMPT_CHARS, create_app
from kad.speculative import parse_speculative


def set_cpu_threads(aligner: Any, threads: int | None = None) -> None:
    """Torch's CPU threads: ``threads``, or all cores but one when the base runs on the CPU.

    Torch's OpenMP threads spin while they wait; on every core they starve the event loop
    thread that serves HTTP (on 2 cores with 64 clients, 2 threads served 5-20x fewer
    requests/s than 1; scripts/load_test.py --threads measures it)."""
    import torch

    if threads is None:
        if aligner.members["base"].model.device.type != "cpu":
            return
        threads = max(1, (os.cpu_count() or 1) - 1)
    torch.set_num_threads(threads)


def server_speculative(value: str | None) -> int | str | None:
    """--speculative of the server: N ≥ 1, 'auto', or 0 / none (off), as a request's field."""
    if value is None or value.strip() == "0":
        return None
    return parse_speculative(value)


class PortInUseError(KadError):
    """The port `kad serve` would listen on is taken: exit code 3 rather than bad input's 2."""

    exit_code = 3


def check_port_free(host: str, port: int) -> None:
    """`PortInUseError` when something listens on ``host``:``port`` already, `KadError` when
    this machine cannot listen there (no such address). The sockets are bound as uvicorn binds
    them, by asyncio's `create_server` (SO_REUSEADDR: a port whose last connections linger in
    TIME_WAIT is free), and closed before listening."""

    async def bind() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(asyncio.Protocol, host, port, start_serving=False)
        server.close()
        await server.wait_closed()

    try:
        asyncio.run(bind())
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise PortInUseError(
                f"port {port} is in use (on {host}): stop what listens there or pick another --port"
            ) from None
        reason = os.strerror(err.errno) if err.errno and err.errno > 0 else err.strerror
        raise KadError(f"cannot listen on {host}:{port}: {reason}") from None


check_port = checked(lambda port: 1 <= port <= 65535, "in 1..65535")


@with_rule_options
def serve_command(
    base: Annotated[
        str | None,
        typer.Option(help="Base model: local dir, .gguf file or Hub id (default: built-in pair)."),
    ] = None,
    proxy: Annotated[
        str | None, typer.Option(help="Aligned proxy model (default: built-in pair).")
    ] = None,
    proxy_base: Annotated[
        str | None, typer.Option(help="The proxy's unaligned base (implicit reward).")
    ] = None,
    random_init: Annotated[
        str | None,
        typer.Option(
            "--random-init",
            help="Serve BASE[:PROXY] presets with random weights, for load tests (e.g. "
            "llama3-8b; the built-in pair's tokenizer; the text is noise).",
        ),
    ] = None,
    rule: Annotated[str, typer.Option(help=f"Default rule: {', '.join(RULE_NAMES)}.")] = "dual",
    rule_values: dict[str, Any] | None = None,
    speculative: Annotated[
        str | None,
        typer.Option(help="Default draft length γ (proxy as drafter), 'auto', or 0 (off)."),
    ] = None,
    temperature: Annotated[
        float,
        typer.Option(
            callback=checked(lambda t: 0 <= t <= 2, "in [0, 2]"),
            help="Temperature of requests that set none (OpenAI's default 1; 0 is greedy).",
        ),
    ] = 1.0,
    top_p: Annotated[
        float,
        typer.Option(callback=check_top_p, help="top_p of requests that set none, in (0, 1]."),
    ] = 1.0,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(callback=check_port, help="Port to listen on.")] = 8000,
    max_rows: Annotated[
        int,
        typer.Option(
            callback=at_least(1),
            help="Most sequences decoded at once (also a request's limit: prompts × n).",
        ),
    ] = 16,
    max_context: MaxContext = None,
    memory_fraction: MemoryFraction = None,
    max_body_bytes: Annotated[
        int, typer.Option(callback=at_least(1), help="Largest request body in bytes (413 above).")
    ] = MAX_BODY_BYTES,
    max_prompt_chars: Annotated[
        int,
        typer.Option(
            callback=at_least(1), help="Longest prompt (a chat's text) in characters (400 above)."
        ),
    ] = MAX_PROMPT_CHARS,
    model_name: Annotated[str, typer.Option(help="The model id clients send.")] = "kad",
    dtype: Dtype = None,
    device: Device = None,
    fast: Annotated[
        bool | None,
        typer.Option(
            "--fast/--no-fast", help="Static KV caches and CUDA graphs (default: on a GPU)."
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            callback=at_least(1),
            help="Torch CPU threads (default on CPU: all cores but one, for HTTP).",
        ),
    ] = None,
    tensor_parallel: TensorParallelOpt = None,
    quantize_base: QuantizeBase = "none",
    quantize_proxy: QuantizeProxy = "none",
) -> None:
    """Serve a KAD-aligned pair behind an OpenAI-compatible API (completions and chat)."""
    import uvicorn

    if random_init is not None and (base or proxy or proxy_base):
        raise KadError("give either --random-init or model paths, not both")
    if (base is None) != (proxy is None):
        raise KadError("give both --base and --proxy, or neither (to serve the built-in pair)")
    chosen = make_rule(rule, **(rule_values or {}))
    gamma = server_speculative(speculative)
    quantize = quantize_of(quantize_base, quantize_proxy)
    if chosen.needs_proxy_base and proxy_base is None and base is not None:
        raise KadError(f"the {chosen.name} rule needs the proxy's unaligned base: add --proxy-base")
    if random_init is not None and chosen.needs_proxy_base:
        raise KadError(f"--random-init builds no proxy base for the {chosen.name} rule")
    check_port_free(host, port)
    if random_init is not None:
        from kad.fast.presets import random_aligner
        from kad.models import resolve_device, resolve_dtype

        target = resolve_device(device)
        aligner = random_aligner(
            random_init,
            device=target,
            dtype=resolve_dtype(dtype, target),
            fast=fast,
            max_rows=max_rows,
            max_context=max_context,
            memory_fraction=memory_fraction,
            tensor_parallel=tensor_parallel,
            quantize=quantize,
        )
        pair = f"random-weight {random_init}"
    else:
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
            quantize=quantize,
        )
        pair = (
            "the built-in pair"
            if base is None
            else f"{Path(proxy).name} steering {Path(base).name}"
        )
    if aligner.parallel is None:  # the ranks share the cores already (kad.parallel.group)
        set_cpu_threads(aligner, threads)
    app = create_app(
        aligner,
        rule=chosen,
        speculative=gamma,
        model_id=model_name,
        max_rows=max_rows,
        default_temperature=temperature,
        default_top_p=top_p,
        max_body_bytes=max_body_bytes,
        max_prompt_chars=max_prompt_chars,
    )
    capture_graphs(aligner.runtime, gamma, chosen, Warp(temperature=temperature, top_p=top_p))
    typer.echo(f"serving {model_name!r} ({pair}) at http://{host}:{port}/v1")
    if aligner.parallel is not None:
        # uvicorn shuts down on SIGTERM, then raises it again: exit through Python then, so
        # that `Aligner.close` (at exit) stops the follower ranks rather than orphaning them
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    uvicorn.run(app, host=host, port=port, log_level="info")
    aligner.close()


def capture_graphs(runtime: Any, speculative: int | str | None, rule: Any, warp: Warp) -> None:
    """On a GPU, capture the rounds and prefills the server's default request uses before the
    first request (as vLLM does), so that no early request waits for a capture: plain rounds and
    the default γ (every γ when it is "auto"), for the default rule and warp (`kad serve
    --temperature`, --top-p; a greedy request computes what T = 1 does); other γs, rules,
    temperatures and cuts are captured on first use."""
    if not runtime.graphed:
        return
    from kad.runtime.round import Work

    works = [Work.of([rule], [warp])]
    gammas = {0}
    if speculative == "auto":
        gammas |= set(range(1, runtime.auto.gamma_max + 1))
    elif speculative:
        gammas.add(int(speculative))
    started = time.perf_counter()
    with Progress(
        TextColumn(f"capturing CUDA graphs (γ {sorted(gammas)}, once)"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task("capture", total=None)
        count = runtime.capture(
            sorted(gammas), lambda done, total: bar.update(task, completed=done, total=total), works
        )
    typer.echo(f"captured {count} CUDA graphs in {time.perf_counter() - started:.0f} s")
