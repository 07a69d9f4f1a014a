"""Throughput of evaluation-shaped work: many prompts of different answer lengths, decoded by
streaming them all through the runtime (what `kad eval` does now) against fixed batches of
--batch-size, each as slow as its longest row (what `kad eval --batch-size` did before).

Answer lengths are drawn uniformly from [--min-tokens, --max-tokens] (GSM8K solutions run
~100-250 tokens); a random-weight pair never stops early, so every row decodes its budget.

    python scripts/eval_bench.py --random-init llama3-8b --examples 256 --batch-size 32 \\
        --max-rows 64 --max-context 512 --json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--random-init", help="a random-weight preset pair (default: built-in)")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32, help="the fixed batches' size")
    parser.add_argument("--min-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--max-rows", type=int, default=64)
    parser.add_argument("--max-context", type=int, default=512)
    parser.add_argument(
        "--prefill-delays", default="0", help="comma-separated runtime prefill_delay values"
    )
    parser.add_argument("--json", action="store_true")
    return parser.parse_args()


def timed(run: Any) -> tuple[float, Any]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    args = parse_args()
    pool = {"max_rows": args.max_rows, "max_context": args.max_context}
    if args.random_init:
        from kad.fast.presets import random_aligner

        aligner = random_aligner(args.random_init, device="cuda", dtype=torch.bfloat16, **pool)
    else:
        from kad.world import builtin_aligner

        aligner = builtin_aligner(proxy_base=False, device="cpu", **pool)
    aligner.eos_ids = set()  # every row decodes its budget, on either path
    aligner.runtime.capture([0])
    rng = random.Random(0)
    prompts = [f"Question {i}: how many apples are left?" for i in range(args.examples)]
    budgets = [rng.randint(args.min_tokens, args.max_tokens) for _ in prompts]
    aligner.generate(prompts[: args.batch_size], max_new_tokens=8)  # warm
    streamed = {}
    for delay in (int(d) for d in args.prefill_delays.split(",")):
        aligner.runtime.prefill_delay = delay
        stream_s, out = timed(lambda: aligner.generate(prompts, max_new_tokens=budgets))
        tokens = sum(len(g.token_ids) for g in out)
        streamed[delay] = stream_s
    aligner.runtime.prefill_delay = 0

    def batches() -> list[Any]:
        size = args.batch_size
        return [
            g
            for i in range(0, len(prompts), size)
            for g in aligner.generate(prompts[i : i + size], max_new_tokens=budgets[i : i + size])
        ]

    fixed_s, fixed = timed(batches)
    assert sum(len(g.token_ids) for g in fixed) == tokens
    result = {
        "examples": args.examples,
        "tokens": tokens,
        "streamed_tokens_per_s": {
            f"prefill_delay={d}": round(tokens / s, 1) for d, s in streamed.items()
        },
        "fixed_batches_tokens_per_s": round(tokens / fixed_s, 1),
        "batch_size": args.batch_size,
        "max_rows": aligner.runtime.rows,
        "speedup": {f"prefill_delay={d}": round(fixed_s / s, 2) for d, s in streamed.items()},
    }
    print(json.dumps(result, indent=2 if args.json else None))


if __name__ == "__main__":
    main()
