"""Where the time of a round's own work goes (uniforms, mixing, warping, acceptance), on the GPU.

For each preset vocabulary, times a round over fixed random p, q (`kad.bench.measure.
decision_round`: `mix_rows` + `warp_rows` + acceptance on ``[B, γ+1, V]``, no model work),
greedy and sampled (T = 1, with and without top-p 0.9), as CUDA graph replays: as the runtime
captures it for a batch of dual rows (the dual formula, the warp's own cut), for a batch of mixed
rules (every rule's formula and the top-k/top-p cut), and wholly compiled by Inductor (an
experiment on the llama3 vocabulary at batch 1); and profiles the kernels of the sampled round. Writes
$OUT/sampling.json.

    python scripts/gpu_sampling.py          (on the GPU)
    python scripts/gpu_sampling.py --dry    (a quick run of the same code on the CPU; writes no file)
"""

from __future__ import annotations

import json
import os
import sys

import torch

from kad.bench.measure import decision_round, kernel_profile, seconds_of
from kad.rules import Dual
from kad.sampling import Warp

VOCABS = {"llama3": 128256, "olmo2": 100352, "qwen3": 151936}
WARPS = {"greedy": Warp(), "T=1 top-p 0.9": Warp(temperature=1.0, top_p=0.9), "T=1": Warp(1.0)}


def main() -> None:
    dry = "--dry" in sys.argv
    device = torch.device("cpu" if dry else "cuda")
    vocabs = {"dry": 1000} if dry else VOCABS
    results = []
    for family, vocab in vocabs.items():
        for batch, gamma in ((1, 0), (1, 4), (32, 0)):
            row: dict = {"family": family, "vocab": vocab, "batch": batch, "gamma": gamma}
            for name, warp in WARPS.items():
                fn = decision_round(Dual(lam=0.4), warp, batch, gamma, vocab, device)
                row[f"{name} ms"] = 1e3 * seconds_of(fn, device)
                if not dry:
                    mixed = decision_round(Dual(lam=0.4), warp, batch, gamma, vocab, device, True)
                    row[f"{name} every formula ms"] = 1e3 * seconds_of(mixed, device)
                if batch == 1 and gamma == 0 and name != "greedy":
                    with torch.inference_mode():
                        row[f"{name} profile"] = kernel_profile(fn, device)
                if batch > 1 or gamma > 0 or (family != "llama3" and not dry):
                    continue  # compiling is slow: one case shows what it would give
                compiled = torch.compile(fn, dynamic=False)
                try:
                    row[f"{name} compiled ms"] = 1e3 * seconds_of(compiled, device)
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
