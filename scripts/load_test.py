"""Load test of `kad serve` through real HTTP: C concurrent clients, requests back to back.

It starts the server in-process on a free loopback port (the built-in pair, --base/--proxy, or
--random-init PRESET for a random-weight preset pair on the GPU), captures the runtime's graphs,
then drives it with the official `openai` async client, streaming, and reports completion
tokens/s, time to first token (p50/p99) and whole-request latency (p50/p99). Each request's
max_tokens is drawn uniformly from [--min-tokens, --max-tokens]; --mixed gives each request its
own λ ∈ {0.3, 0.4, 0.5} and temperature ∈ {0, 0.8}; --modes runs several loads on one server
(mixed, equal: λ 0.4 and greedy for all, auto: equal with ``kad.speculative: "auto"``). --static
also decodes one static batch of
--clients rows × the mean max_tokens with the same runtime (`Aligner.generate`), the reference
of the continuous-batching target.

    python scripts/load_test.py --random-init llama3-8b --clients 64 --requests 512 \\
        --min-tokens 32 --max-tokens 256 --max-rows 64 --max-context 512 \\
        --modes mixed,equal,auto --static

--url http://host:port drives a server that is already running instead (no --static then).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
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
    parser.add_argument("--modes", help="comma-separated loads on one server: mixed,equal,auto")
    parser.add_argument("--static", action="store_true", help="also time a static batch")
    parser.add_argument(
        "--client-procs", type=int, default=1, help="processes the clients run in (GIL apart)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: as kad serve)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser.parse_args()


def build_aligner(args: argparse.Namespace) -> Any:
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


async def drive(
    args: argparse.Namespace, url: str, count: int, mode: str = "equal", part: int = 0
) -> dict[str, Any]:
    """Requests ``part``, ``part + P``, ... of ``count`` (P = --client-procs), streamed from
    ``args.clients / P`` clients under ``mode`` (mixed, equal or auto); the raw timings."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600)
    questions = prompts(count)
    rng = random.Random(0)
    mixed = mode == "mixed"
    plans = [
        {
            "max_tokens": rng.randint(args.min_tokens, args.max_tokens),
            "temperature": rng.choice((0.0, 0.8)) if mixed else 0.0,
            "seed": i,
            "extra_body": {
                "kad": {
                    "lam": rng.choice((0.3, 0.4, 0.5)) if mixed else 0.4,
                    **({"speculative": "auto"} if mode == "auto" else {}),
                }
            },
        }
        for i in range(count)
    ]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(part, count, args.client_procs):
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
        start = time.time()
        await asyncio.gather(*(worker() for _ in range(args.clients // args.client_procs)))
        end = time.time()
    return {
        "ttft": first_token,
        "latency": latencies,
        "tokens": tokens,
        "failed": failures,
        "start": start,
        "end": end,
    }


def _drive_part(job: tuple[argparse.Namespace, str, int, str, int]) -> dict[str, Any]:
    return asyncio.run(drive(*job))


def load(args: argparse.Namespace, url: str, count: int, mode: str) -> dict[str, Any]:
    """``count`` requests under ``mode`` from --client-procs processes (so that the clients'
    own Python does not share the server's); the figures of the whole run."""
    jobs = [(args, url, count, mode, part) for part in range(args.client_procs)]
    if args.client_procs == 1:
        parts = [_drive_part(jobs[0])]
    else:
        with multiprocessing.get_context("spawn").Pool(args.client_procs) as pool:
            parts = pool.map(_drive_part, jobs)
    ttft = [t for p in parts for t in p["ttft"]]
    latency = [t for p in parts for t in p["latency"]]
    wall = max(p["end"] for p in parts) - min(p["start"] for p in parts)
    tokens = sum(p["tokens"] for p in parts)
    return {
        "mode": mode,
        "requests": count,
        "completed": len(latency),
        "failed": sum(p["failed"] for p in parts),
        "wall_s": round(wall, 2),
        "completion_tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": round(statistics.median(ttft), 3),
        "ttft_p99_s": round(percentile(ttft, 0.99), 3),
        "latency_p50_s": round(statistics.median(latency), 3),
        "latency_p99_s": round(percentile(latency, 0.99), 3),
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
    modes = args.modes.split(",") if args.modes else ["mixed" if args.mixed else "equal"]
    result: dict[str, Any] = {
        "clients": args.clients,
        "tokens": [args.min_tokens, args.max_tokens],
        "speculative": args.speculative,
        "max_rows": args.max_rows,
        "client_procs": args.client_procs,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
    }
    server = thread = None
    url = args.url
    if url is None:
        aligner = build_aligner(args)
        started = time.perf_counter()
        auto = args.speculative == "auto" or "auto" in modes
        gammas = range(9) if auto else (0, int(args.speculative or 0))
        result["graphs"] = aligner.runtime.capture(sorted(set(gammas)))
        result["capture_s"] = round(time.perf_counter() - started, 1)
        if args.static:
            result["static"] = static_batch(args, aligner)
        url, server, thread = start_server(args, aligner)
    result["runs"] = []
    try:
        for mode in modes:
            load(args, url, args.clients, mode)  # warm-up pass, not counted
            run = load(args, url, args.requests, mode)
            if "static" in result:
                share = run["completion_tokens_per_s"] / result["static"]["tokens_per_s"]
                run["share_of_static"] = round(share, 3)
            result["runs"].append(run)
            print(json.dumps(run), file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.should_exit = True
            thread.join(timeout=30)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(json.dumps(result))


if __name__ == "__main__":
    main()
