"""Load test of `kad serve` through real HTTP: C concurrent clients, requests back to back.

It starts the server in-process on a free loopback port (the built-in pair, --base/--proxy, or
--random-init PRESET for a random-weight preset pair on the GPU), captures the runtime's graphs,
then drives it with the official `openai` async client, streaming, and reports completion
tokens/s, time to first token (p50/p99) and whole-request latency (p50/p99). Each request's
max_tokens is drawn uniformly from [--min-tokens, --max-tokens]; --mixed gives each request its
own λ ∈ {0.3, 0.4, 0.5} and temperature ∈ {0, 0.8}. --static also decodes one static batch of
--clients rows × the mean max_tokens with the same runtime (`Aligner.generate`), the reference
of the continuous-batching target.

    python scripts/load_test.py --random-init llama3-8b --clients 64 --requests 512 \\
        --min-tokens 32 --max-tokens 256 --max-rows 64 --max-context 512 --mixed --static

--url http://host:port drives a server that is already running instead (no --static then).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import sys
import threading
import time
from typing import Any

import openai
import torch
import uvicorn


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an already running server (default: start one here)")
    parser.add_argument("--base", help="base model (default: the built-in pair)")
    parser.add_argument("--proxy", help="aligned proxy (default: the built-in pair)")
    parser.add_argument("--random-init", help="a random-weight preset pair, e.g. llama3-8b")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=256, help="requests in all")
    parser.add_argument("--min-tokens", type=int, default=32, help="least max_tokens")
    parser.add_argument("--max-tokens", type=int, default=32, help="most max_tokens")
    parser.add_argument("--max-rows", type=int, default=16, help="the server's --max-rows")
    parser.add_argument("--max-context", type=int, help="the server's --max-context")
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="completions")
    parser.add_argument("--speculative", default=None, help="γ or 'auto' (default off)")
    parser.add_argument("--mixed", action="store_true", help="each request its own λ and T")
    parser.add_argument("--static", action="store_true", help="also time a static batch")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: as kad serve)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser.parse_args()


def load(args: argparse.Namespace) -> Any:
    from kad.serve.command import load_aligner, set_cpu_threads

    pool = {"max_rows": args.max_rows, "max_context": args.max_context}
    if args.random_init:
        from kad.fast.presets import random_aligner

        aligner = random_aligner(args.random_init, device="cuda", dtype=torch.bfloat16, **pool)
    else:
        aligner = load_aligner(args.base, args.proxy, **pool)
    set_cpu_threads(aligner, args.threads)
    return aligner


def start_server(args: argparse.Namespace, aligner: Any) -> tuple[str, Any, threading.Thread]:
    """The app on a free 127.0.0.1 port, in a background thread."""
    from kad.serve.app import create_app
    from kad.speculative import parse_speculative

    app = create_app(
        aligner, speculative=parse_speculative(args.speculative), max_rows=args.max_rows
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            sys.exit("the server did not start")
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread


def prompts(count: int) -> list[str]:
    """Distinct questions: held-out word problems of the built-in world (dev split)."""
    from kad.world import heldout_problems

    return [str(problem["question"]) for problem in heldout_problems(count, "dev")]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def drive(args: argparse.Namespace, url: str, count: int) -> dict[str, Any]:
    """``count`` streamed requests from ``args.clients`` clients; figures of the whole run."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600)
    questions = prompts(count)
    rng = random.Random(0)
    plans = [
        {
            "max_tokens": rng.randint(args.min_tokens, args.max_tokens),
            "temperature": rng.choice((0.0, 0.8)) if args.mixed else 0.0,
            "seed": i,
            "extra_body": {"kad": {"lam": rng.choice((0.3, 0.4, 0.5))}} if args.mixed else {},
        }
        for i in range(count)
    ]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)
    first_token: list[float] = []
    latencies: list[float] = []
    tokens = failures = 0

    async def one(i: int) -> None:
        nonlocal tokens
        start = time.perf_counter()
        common = {"model": "kad", "stream": True, "stream_options": {"include_usage": True}}
        if args.endpoint == "chat":
            messages = [{"role": "user", "content": questions[i]}]
            stream = await client.chat.completions.create(messages=messages, **common, **plans[i])
        else:
            stream = await client.completions.create(prompt=questions[i], **common, **plans[i])
        seen = False
        async for chunk in stream:
            if not seen and chunk.choices:
                first_token.append(time.perf_counter() - start)
                seen = True
            if chunk.usage is not None:
                tokens += chunk.usage.completion_tokens
        latencies.append(time.perf_counter() - start)

    async def worker() -> None:
        nonlocal failures
        while not queue.empty():
            i = queue.get_nowait()
            try:
                await one(i)
            except openai.OpenAIError as error:
                failures += 1
                print(f"request {i} failed: {error}", file=sys.stderr)

    async with client:
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.clients)))
        wall = time.perf_counter() - start
    return {
        "requests": count,
        "completed": len(latencies),
        "failed": failures,
        "wall_s": round(wall, 2),
        "completion_tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": round(statistics.median(first_token), 3),
        "ttft_p99_s": round(percentile(first_token, 0.99), 3),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_p99_s": round(percentile(latencies, 0.99), 3),
    }


def static_batch(args: argparse.Namespace, aligner: Any) -> dict[str, Any]:
    """One static batch of ``clients`` rows × the mean max_tokens through the same runtime."""
    tokens = (args.min_tokens + args.max_tokens) // 2
    questions = prompts(args.clients)
    aligner.generate(questions, max_new_tokens=8)  # warm
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = aligner.generate(questions, max_new_tokens=tokens, speculative=None)
    wall = time.perf_counter() - start
    made = sum(len(g.token_ids) for g in out)
    return {"rows": args.clients, "tokens": made, "tokens_per_s": round(made / wall, 1)}


def main() -> None:
    args = parse_args()
    result: dict[str, Any] = {
        "clients": args.clients,
        "tokens": [args.min_tokens, args.max_tokens],
        "mixed": args.mixed,
        "speculative": args.speculative,
        "max_rows": args.max_rows,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
    }
    server = thread = None
    url = args.url
    if url is None:
        aligner = load(args)
        started = time.perf_counter()
        gammas = range(9) if args.speculative == "auto" else (0, int(args.speculative or 0))
        result["graphs"] = aligner.runtime.capture(sorted(set(gammas)))
        result["capture_s"] = round(time.perf_counter() - started, 1)
        if args.static:
            result["static"] = static_batch(args, aligner)
        url, server, thread = start_server(args, aligner)
    try:
        asyncio.run(drive(args, url, args.clients))  # warm-up pass, not counted
        result.update(asyncio.run(drive(args, url, args.requests)))
    finally:
        if server is not None:
            server.should_exit = True
            thread.join(timeout=30)
    if "static" in result:
        result["share_of_static"] = round(
            result["completion_tokens_per_s"] / result["static"]["tokens_per_s"], 3
        )
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(json.dumps(result))


if __name__ == "__main__":
    main()
