"""Load test of `kad serve` through real HTTP: C concurrent clients, requests back to back.

It starts the server in-process on a free loopback port (the built-in pair, --base/--proxy, or
--random-init PRESET for a random-weight preset pair on the GPU), captures the runtime's graphs,
then drives it with the official `openai` async client, streaming, and reports completion
tokens/s, time to first token (p50/p99) and whole-request latency (p50/p99). Each request's
max_tokens is drawn uniformly from [--min-tokens, --max-tokens]; --mixed gives each request its
own λ ∈ {0.3, 0.4, 0.5} and temperature ∈ {0, 0.8}; --modes runs several loads on one server
(mixed, equal: λ 0.4 and greedy for all, auto: equal with ``kad.speculative: "auto"``). "rules" gives each request its own rule (dual, primal, proxy-referenced or nudging) and
either greedy decoding or T = 0.8 with top_p = 0.9. --static also decodes one static batch of
--clients rows × the mean max_tokens with the same runtime (`Aligner.generate`), the reference
of the continuous-batching target. --profile splits the worker thread's time per round (admit,
prefill, decode, the rest) with the GPU's busy time in each (CUDA events).

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

import kad.fast.runner


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
    parser.add_argument(
        "--modes", help="comma-separated loads on one server: mixed,equal,rules,auto"
    )
    parser.add_argument("--profile", action="store_true", help="split the worker's time")
    parser.add_argument("--static", action="store_true", help="also time a static batch")
    parser.add_argument(
        "--client-procs", type=int, default=1, help="processes the clients run in (GIL apart)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: as kad serve)")
    parser.add_argument(
        "--prefill-delays",
        default="0",
        help="comma-separated runtime prefill_delay values; every mode runs under each",
    )
    parser.add_argument(
        "--variants",
        default="1:16",
        help="comma-separated OVERLAP:PIECE pairs, every mode runs under each: the runtime's "
        "round overlap on (1) or off (0), and kad.fast.runner.PREFILL_PIECE (a prefill piece's "
        "tokens; 512: whole chunks)",
    )
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


RULES = (
    {"rule": "dual", "lam": 0.4},
    {"rule": "primal", "budget": 0.9},
    {"rule": "proxy-referenced", "delta": 0.1},
    {"rule": "nudging", "lam": 0.4},
)


def plan(rng: random.Random, mode: str, i: int, args: argparse.Namespace) -> dict[str, Any]:
    """Request i's parameters under ``mode`` (module doc)."""
    request: dict[str, Any] = {
        "max_tokens": rng.randint(args.min_tokens, args.max_tokens),
        "temperature": 0.0,
        "seed": i,
    }
    kad: dict[str, Any] = {"lam": 0.4}
    if mode == "mixed":
        request["temperature"] = rng.choice((0.0, 0.8))
        kad["lam"] = rng.choice((0.3, 0.4, 0.5))
    elif mode == "rules":
        kad = dict(rng.choice(RULES))
        if rng.random() < 0.5:
            request |= {"temperature": 0.8, "top_p": 0.9}
    elif mode == "auto":
        kad["speculative"] = "auto"
    return request | {"extra_body": {"kad": kad}}


async def drive(
    args: argparse.Namespace, url: str, count: int, mode: str = "equal", part: int = 0
) -> dict[str, Any]:
    """Requests ``part``, ``part + P``, ... of ``count`` (P = --client-procs), streamed from
    ``args.clients / P`` clients under ``mode`` (mixed, equal or auto); the raw timings."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600)
    questions = prompts(count)
    rng = random.Random(0)
    plans = [plan(rng, mode, i, args) for i in range(count)]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(part, count, args.client_procs):
        queue.put_nowait(i)
    first_token: list[float] = []
    latencies: list[float] = []
    spans: list[tuple[int, float, float, int]] = []  # (client, first token, end, tokens)
    tokens = failures = 0

    async def one(i: int, who: int) -> None:
        nonlocal tokens
        start = time.perf_counter()
        first = made = 0
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
                first, seen = time.time(), True
            if chunk.usage is not None:
                made = chunk.usage.completion_tokens
                tokens += made
        latencies.append(time.perf_counter() - start)
        spans.append((who, first, time.time(), made))

    async def worker(who: int) -> None:
        nonlocal failures
        while not queue.empty():
            i = queue.get_nowait()
            try:
                await one(i, who)
            except openai.OpenAIError as error:
                failures += 1
                print(f"request {i} failed: {error}", file=sys.stderr)

    async with client:
        start = time.time()
        clients = args.clients // args.client_procs
        await asyncio.gather(*(worker(part * clients + c) for c in range(clients)))
        end = time.time()
    return {
        "spans": spans,
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
    steady = steady_rate([span for p in parts for span in p["spans"]])
    return {
        **steady,
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


def steady_rate(spans: list[tuple[int, float, float, int]]) -> dict[str, float]:
    """Completion tokens/s while every client is busy: from the moment the last client gets
    its first token to the moment the first client has sent its last request and got it back
    (before it, the run ramps up; after it, fewer requests remain than clients, the tail).
    A request's tokens count in proportion to the part of its decoding (first token to end)
    that lies in the window."""
    clients: dict[int, list[tuple[float, float, int]]] = {}
    for who, first, end, made in spans:
        clients.setdefault(who, []).append((first, end, made))
    start = max(min(first for first, _, _ in reqs) for reqs in clients.values())
    stop = min(max(end for _, end, _ in reqs) for reqs in clients.values())
    if stop <= start:
        return {"steady_s": 0.0, "steady_tokens_per_s": 0.0}
    inside = 0.0
    for first, end, made in (r for reqs in clients.values() for r in reqs):
        if end > first:
            overlap = max(0.0, min(end, stop) - max(first, start))
            inside += made * overlap / (end - first)
    return {
        "steady_s": round(stop - start, 2),
        "steady_tokens_per_s": round(inside / (stop - start), 1),
    }


def static_batch(args: argparse.Namespace, aligner: Any) -> dict[str, Any]:
    """One static batch of ``clients`` rows × the mean max_tokens through the same runtime,
    timed on its second run (the first captures the rounds of every width it reaches)."""
    tokens = (args.min_tokens + args.max_tokens) // 2
    questions = prompts(args.clients)
    aligner.generate(questions, max_new_tokens=tokens, speculative=None)  # warm
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = aligner.generate(questions, max_new_tokens=tokens, speculative=None)
    wall = time.perf_counter() - start
    made = sum(len(g.token_ids) for g in out)
    return {"rows": args.clients, "tokens": made, "tokens_per_s": round(made / wall, 1)}


class Profile:
    """The worker thread's wall time per phase of `Runtime.step` (admit, prefill, decode) and
    outside it (the worker's inbox and routing), with the GPU's busy time of each phase's graph
    replays (CUDA events around every `Graph.replay`). Installed by patching the classes, so a
    run without --profile is untouched; a prefill is followed by a synchronisation so that its
    GPU time is not charged to the decode that follows."""

    def __init__(self) -> None:
        from kad.fast.graphs import Graph
        from kad.runtime.scheduler import Runtime
        from kad.serve.worker import Worker

        self.wall: dict[str, float] = {}
        self.gpu: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.phase = "other"
        self._events: list[tuple[str, Any, Any]] = []
        for cls, name in (
            (Runtime, "_admit"),
            (Runtime, "_prefill"),
            (Runtime, "_decode"),
            (Worker, "_take_inbox"),
            (Worker, "_route"),
        ):
            setattr(cls, name, self._timed(getattr(cls, name), name.strip("_")))
        replay = Graph.replay

        def timed_replay(graph: Any) -> Any:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = replay(graph)
            end.record()
            self._events.append((self.phase, start, end))
            return out

        Graph.replay = timed_replay

    def _timed(self, method: Any, name: str) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            outer, self.phase = self.phase, name
            begin = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                if name == "prefill" and torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - begin
                self.counts[name] = self.counts.get(name, 0) + 1
                self.phase = outer
                if name == "decode":
                    self._collect()

        return run

    def _collect(self) -> None:
        """Sum the replays' GPU times (after the decode's synchronisation)."""
        for phase, start, end in self._events:
            self.gpu[phase] = self.gpu.get(phase, 0.0) + start.elapsed_time(end) / 1e3
        self._events.clear()

    def reset(self) -> None:
        self.wall, self.gpu, self.counts = {}, {}, {}

    def summary(self, rounds: int) -> dict[str, Any]:
        """Per decode round: ms of wall time and of GPU time of each phase, and the counts."""
        per = max(rounds, 1) / 1e3
        return {
            "wall_ms_per_round": {k: round(v / per, 3) for k, v in self.wall.items()},
            "gpu_ms_per_round": {k: round(v / per, 3) for k, v in self.gpu.items()},
            "calls": dict(self.counts),
        }


def _counters(runtime: Any) -> tuple[int, int, int]:
    """The runtime's rounds, rows decoded and prefills so far (zeros for a remote server)."""
    if runtime is None:
        return (0, 0, 0)
    return (runtime.rounds, runtime.row_rounds, runtime.prefills)


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
    profile = Profile() if args.profile else None
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
            if (
                any(v.startswith("0:") for v in args.variants.split(","))
                and aligner.runtime.graphed
            ):
                aligner.runtime.pipelined = False
                result["static_synchronous"] = static_batch(args, aligner)
                aligner.runtime.pipelined = True
            statics = {k: v for k, v in result.items() if k.startswith("static")}
            print(json.dumps(statics), file=sys.stderr, flush=True)
        url, server, thread = start_server(args, aligner)
    result["runs"] = []
    runtime = aligner.runtime if args.url is None else None
    try:
        loads = [
            (m, int(d), v.split(":"))
            for v in args.variants.split(",")
            for d in args.prefill_delays.split(",")
            for m in modes
        ]
        for mode, delay, (overlap, piece) in loads:
            if runtime is not None:
                runtime.prefill_delay = delay
                runtime.pipelined = overlap == "1" and runtime.graphed
                kad.fast.runner.PREFILL_PIECE = int(piece)
            load(args, url, args.clients, mode)  # warm-up pass, not counted
            before = _counters(runtime)
            if profile is not None:
                profile.reset()
            run = load(args, url, args.requests, mode)
            if runtime is not None:
                rounds, rows, prefills = (
                    a - b for a, b in zip(_counters(runtime), before, strict=True)
                )
                run |= {
                    "prefill_delay": delay,
                    "pipelined": runtime.pipelined,
                    "prefill_piece": kad.fast.runner.PREFILL_PIECE,
                    "rounds_per_s": round(rounds / run["wall_s"], 1),
                    "mean_rows": round(rows / max(rounds, 1), 1),
                    "prefills_per_round": round(prefills / max(rounds, 1), 3),
                }
                if profile is not None:
                    run["profile"] = profile.summary(rounds)
            if "static" in result:
                static = result["static"]["tokens_per_s"]
                run["share_of_static"] = round(run["completion_tokens_per_s"] / static, 3)
                run["steady_share_of_static"] = round(run["steady_tokens_per_s"] / static, 3)
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
