"""Load test of `kad serve`: C concurrent clients, each sending requests back to back.

By default it starts the server in-process on a free loopback port with the built-in pair (or
--base/--proxy), then drives it with the official `openai` async client and reports requests/s,
completion tokens/s and the p50/p99 latency of whole (non-streamed) requests:

    python scripts/load_test.py --clients 64 --requests 256 --max-tokens 32

--url http://host:port points it at a server that is already running instead. The clients run
in the same process as an in-process server and share its CPUs: the figures are for the whole
machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
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
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=256, help="requests in all")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request")
    parser.add_argument("--max-rows", type=int, default=16, help="the server's --max-rows")
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    parser.add_argument(
        "--speculative", default=None, help="draft length γ or 'auto' (default off)"
    )
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: as kad serve)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser.parse_args()


def start_server(args: argparse.Namespace) -> tuple[str, uvicorn.Server, threading.Thread]:
    """The app on a free 127.0.0.1 port, in a background thread."""
    from kad.serve.app import create_app
    from kad.serve.command import load_aligner, set_cpu_threads
    from kad.speculative import parse_speculative

    aligner = load_aligner(args.base, args.proxy, max_rows=args.max_rows)
    set_cpu_threads(aligner, args.threads)
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


async def drive(args: argparse.Namespace, url: str) -> dict[str, Any]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600)
    questions = prompts(args.requests)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(args.requests):
        queue.put_nowait(i)
    latencies: list[float] = []
    tokens = 0
    failures = 0

    async def one(i: int) -> None:
        nonlocal tokens
        common = {"model": "kad", "max_tokens": args.max_tokens, "temperature": args.temperature}
        if args.endpoint == "chat":
            messages = [{"role": "user", "content": questions[i]}]
            response = await client.chat.completions.create(messages=messages, **common)
        else:
            response = await client.completions.create(prompt=questions[i], **common)
        tokens += response.usage.completion_tokens

    async def worker() -> None:
        nonlocal failures
        while not queue.empty():
            i = queue.get_nowait()
            start = time.perf_counter()
            try:
                await one(i)
            except openai.OpenAIError as error:
                failures += 1
                print(f"request {i} failed: {error}", file=sys.stderr)
                continue
            latencies.append(time.perf_counter() - start)

    async with client:
        await one(0)  # warm-up, not counted
        tokens = 0
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.clients)))
        wall = time.perf_counter() - start
        load_after = os.getloadavg()[0]
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    return {
        "clients": args.clients,
        "requests": args.requests,
        "completed": len(latencies),
        "failed": failures,
        "max_tokens": args.max_tokens,
        "endpoint": args.endpoint,
        "speculative": args.speculative,
        "max_rows": args.max_rows,
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 3),
        "completion_tokens_per_s": round(tokens / wall, 1),
        "p50_latency_s": round(statistics.median(latencies), 3),
        "p99_latency_s": round(p99, 3),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "load_average_1min": [load_before, load_after],
    }


def main() -> None:
    args = parse_args()
    if (args.base is None) != (args.proxy is None):
        sys.exit("give both --base and --proxy, or neither (the built-in pair)")
    server = None
    url = args.url
    if url is None:
        url, server, thread = start_server(args)
    try:
        result = asyncio.run(drive(args, url))
    finally:
        if server is not None:
            server.should_exit = True
            thread.join(timeout=30)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{result['completed']}/{result['requests']} requests from {result['clients']} concurrent "
        f"clients ({result['endpoint']}, max_tokens {result['max_tokens']}, max rows "
        f"{result['max_rows']}, speculative {result['speculative']}) in {result['wall_s']} s"
    )
    print("| requests/s | completion tokens/s | p50 latency (s) | p99 latency (s) |")
    print("|---|---|---|---|")
    print(
        f"| {result['requests_per_s']} | {result['completion_tokens_per_s']} | "
        f"{result['p50_latency_s']} | {result['p99_latency_s']} |"
    )
    before, after = result["load_average_1min"]
    print(f"machine: {result['machine']}; 1-min load average {before:.1f} -> {after:.1f}")


if __name__ == "__main__":
    main()
