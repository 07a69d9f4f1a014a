"""Where the time of a round's decision goes (mixing, warping, drawing), on the GPU.

For each preset vocabulary, times `decide` (greedy) and `decide_sampled` with the round's
uniforms (T = 1, with and without top-p 0.9) on random p, q as CUDA graph replays: as the fused
round runs them (eager, uniforms compiled) and wholly compiled by Inductor (an experiment on the llama3
vocabulary at batch 1: the fused round does not compile them), and profiles the kernels of the sampled decision. Writes $OUT/sampling.json.

    python scripts/gpu_sampling.py          (on the GPU)
    python scripts/gpu_sampling.py --dry    (a quick run of the same code on the CPU; writes no file)
"""

from __future__ import annotations

import json
import os
import sys

import torch
from kad.fast.session import Draws, decide, decide_sampled

from kad.bench import _random_pair, _seconds_of, kernel_profile
from kad.rules import Dual
from kad.sampling import Warp

VOCABS = {"llama3": 128256, "olmo2": 100352, "qwen3": 151936}
WARPS = {"T=1 top-p 0.9": Warp(temperature=1.0, top_p=0.9), "T=1": Warp(temperature=1.0)}


def cases(batch: int, gamma: int, vocab: int, device: torch.device) -> dict:
    """name -> a no-argument function running one decision on fixed random inputs."""
    p, q = _random_pair(batch, gamma + 1, vocab, device)
    rule = Dual(lam=0.4)
    drafted = q[:, :gamma].argmax(dim=-1)
    q_tilde = q[:, :gamma] if gamma else None
    seeds = torch.arange(batch, device=device)
    positions = torch.zeros(batch, dtype=torch.long, device=device)

    def sampled(warp: Warp):
        draws = Draws(seeds, positions, gamma, compiled=device.type == "cuda")
        return decide_sampled(p, q, drafted, rule, warp, q_tilde, draws)

    out = {"greedy": lambda: decide(p, q, drafted, rule)}
    for name, warp in WARPS.items():
        out[name] = lambda warp=warp: sampled(warp)
    return out


def main() -> None:
    dry = "--dry" in sys.argv
    device = torch.device("cpu" if dry else "cuda")
    vocabs = {"dry": 1000} if dry else VOCABS
    results = []
    for family, vocab in vocabs.items():
        for batch, gamma in ((1, 0), (1, 4), (32, 0)):
            row: dict = {"family": family, "vocab": vocab, "batch": batch, "gamma": gamma}
            for name, fn in cases(batch, gamma, vocab, device).items():
                row[f"{name} eager ms"] = 1e3 * _seconds_of(fn, device, not dry)
                if batch == 1 and gamma == 0 and name != "greedy":
                    with torch.inference_mode():
                        row[f"{name} profile"] = kernel_profile(fn, device)
                if batch > 1 or gamma > 0 or (family != "llama3" and not dry):
                    continue  # compiling is slow: one case shows what it would give
                compiled = torch.compile(fn, dynamic=False)
                try:
                    row[f"{name} compiled ms"] = 1e3 * _seconds_of(compiled, device, not dry)
                except Exception as error:  # an experiment: record the failure and go on
                    row[f"{name} compiled ms"] = f"failed: {type(error).__name__}: {error}"[:300]
            print({k: v for k, v in row.items() if "profile" not in k}, flush=True)
            results.append(row)
    if not dry:
        with open(os.path.join(os.environ.get("OUT", "."), "sampling.json"), "w") as f:
            json.dump(results, f, indent=2)
    for row in results:
        for key, value in row.items():
            if key.endswith("profile"):
                print(row["family"], key, value["us_per_call"], value["kernels_per_call"])
                for k in value["top"][:8]:
                    print("   ", k)


if __name__ == "__main__":
    main()
