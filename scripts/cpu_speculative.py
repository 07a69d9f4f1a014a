"""Base forwards per token, plain vs speculative KAD, on CPU (issue 3's measurement).

Usage: python scripts/cpu_speculative.py [--base DIR --proxy DIR] [--n 50] [--max-new-tokens 64]
Without --base/--proxy it uses the built-in pair. Prints a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import kad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base")
    parser.add_argument("--proxy")
    parser.add_argument("--n", type=int, default=50, help="prompts (held-out problems)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()
    from kad.world import builtin_paths, heldout_problems

    paths = builtin_paths()
    base, proxy = args.base or paths.base, args.proxy or paths.proxy
    aligner = kad.Aligner.from_pretrained(base, proxy)
    prompts = [p["question"] for p in heldout_problems(args.n, split="test")]
    rules = {
        "dual λ=0.4": kad.Dual(lam=0.4),
        "primal b=0.9": kad.Primal(budget=0.9),
        "nudging λ=0.4": kad.Nudging(lam=0.4),
    }
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.n} prompts, batch {args.batch_size}, "
        f"{args.max_new_tokens} new tokens, greedy"
    )
    print(
        "| rule | decoding | tokens | base forwards | tokens / base forward | acceptance | wall s |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, rule in rules.items():
        for spec in (None, 1, 2, 4, 8, "auto"):
            start = time.perf_counter()
            gens = []
            for i in range(0, len(prompts), args.batch_size):
                gens += aligner.generate(
                    prompts[i : i + args.batch_size],
                    rule=rule,
                    max_new_tokens=args.max_new_tokens,
                    speculative=spec,
                )
            wall = time.perf_counter() - start
            tokens = sum(g.stats.tokens for g in gens)
            forwards = sum(g.stats.base_forwards for g in gens)
            drafted = sum(g.stats.drafted or 0 for g in gens)
            acc = sum(g.stats.accepted or 0 for g in gens) / drafted if drafted else None
            label = "plain" if spec is None else f"speculative γ={spec}"
            acc_text = "–" if acc is None else f"{acc:.3f}"
            print(
                f"| {name} | {label} | {tokens} | {forwards} | {tokens / forwards:.2f} | "
                f"{acc_text} | {wall:.1f} |"
            )


if __name__ == "__main__":
    main()
