"""Tensor parallelism on one GPU: is ``tensor_parallel=1`` as fast as the fast path before it,
and does the parallel code path (a world of 1 over NCCL) capture and decode right?

    git archive ebe7075 src | tar -x -C out/baseline     # the tree before kad.parallel
    python scripts/gpu_tp.py --baseline-tree out/baseline [--preset llama3-8b] [--out DIR]

A. ``kad bench --random-init PRESET`` (no transformers peers, no check) on the baseline tree (a
   directory holding a commit's ``src/``: the device has no git history) and on this tree, with
   ``--tensor-parallel 1``: tokens/s per path, side by side (TP=1 runs the single-process
   runtime, so the ratio should be ~1.00).
B. The `kad.parallel` path with one rank (`launch(1, ...)`: a sharded runner whose all-reduces
   and broadcasts run over a 1-rank NCCL group, inside the compiled layers and CUDA graphs)
   against the plain runtime on the same random weights: greedy tokens (must be equal), and
   tokens/s, plain and speculative γ = 4.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(tree: Path, preset: str, out: Path, extra: list[str]) -> dict:
    args = [sys.executable, "-m", "kad", "bench", "--random-init", preset, "--batch", "1,32",
            "--gammas", "4", "--new-tokens", "128", "--no-transformers", "--no-check",
            "--repeats", "2", "--out", str(out), *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def part_a(tree: Path, preset: str, out: Path) -> None:
    before = bench(tree, preset, out / "baseline.json", [])
    after = bench(ROOT, preset, out / "tp1.json", ["--tensor-parallel", "1"])
    print(f"A. {preset}: tokens/s, baseline {tree} vs this tree with --tensor-parallel 1")
    for b0, b1 in zip(before["batches"], after["batches"], strict=True):
        rows1 = {r["path"]: r["tokens_per_s"] for r in b1["rows"]}
        for r in b0["rows"]:
            if r["path"] in rows1:
                ratio = rows1[r["path"]] / r["tokens_per_s"]
                print(f"  B={b0['batch']:>3} {r['path']:<45} {r['tokens_per_s']:>9.1f} "
                      f"{rows1[r['path']]:>9.1f}  x{ratio:.3f}")  # fmt: skip


def decode(aligner, prompts: list[list[int]], gamma: int | None, n: int) -> tuple[list, float]:
    import torch

    ids = {"base": prompts, "proxy": prompts}
    aligner.generate(["x"] * len(prompts), max_new_tokens=4, speculative=gamma)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    session = aligner.start(["x"] * len(prompts), max_new_tokens=n, speculative=gamma,
                            prompt_ids=ids)  # fmt: skip
    with torch.inference_mode():
        while not session.done:
            session.step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    gens = session.results()
    return [g.token_ids for g in gens], sum(len(g.token_ids) for g in gens) / seconds


def part_b(preset: str) -> None:
    import torch

    from kad.fast.presets import _random_rank, parse_pair
    from kad.parallel.group import launch

    device, dtype = torch.device("cuda"), torch.bfloat16
    prompts = [[(7 * i + 13 * j) % 1000 + 10 for j in range(128)] for i in range(4)]
    settings = {"max_rows": 8, "max_context": 512}
    names = parse_pair(preset)
    # The reference draws the weights the rank draws (the base on the CPU's generator).
    plain = _random_rank(*names, None, dtype=dtype, seed=0, device=device,
                         base_device=torch.device("cpu"), **settings)  # fmt: skip
    parallel = launch(1, device, functools.partial(_random_rank, *names, dtype=dtype, seed=0,
                                                   **settings))  # fmt: skip
    print(f"B. {preset}: the kad.parallel path with 1 rank vs the plain runtime")
    for gamma in (None, 4):
        ref, rate_ref = decode(plain, prompts, gamma, 128)
        got, rate = decode(parallel, prompts, gamma, 128)
        print(f"  γ={gamma}: tokens equal: {got == ref}; tokens/s plain {rate_ref:.1f}, "
              f"parallel path {rate:.1f} (x{rate / rate_ref:.3f})")  # fmt: skip
    parallel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--baseline-tree", type=Path, help="a directory holding the baseline's src/"
    )
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu_tp"))
    parser.add_argument("--part-b-preset", default="llama3.2-1b:llama3.2-1b")
    parser.add_argument("--skip-a", action="store_true", help="only part B")
    parser.add_argument("--skip-b", action="store_true", help="only part A")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.skip_a:
        part_a(args.baseline_tree.resolve(), args.preset, args.out)
    if not args.skip_b:
        part_b(args.part_b_preset)


if __name__ == "__main__":
    main()
