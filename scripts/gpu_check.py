"""GPU correctness of the runtime over the compact forward (compiled layers, captured rounds).

In float32 (so that rounding cannot flip a greedy choice) a random-weight pair of one preset
decodes two prompts of different lengths with the runtime over `TransformersRunner`s
(transformers' forward and cache) and over `StaticRunner`s (compiled, rounds as CUDA graphs),
plain and speculative; the tokens must be equal (`kad.bench.check.float32_check`, which also
reports the largest log-prob difference of one decode step). Then `kad.Aligner(fast=None)` on the
GPU must give the tokens of `Aligner(fast=False)` on the built-in pair, for every kind of round.
Last, the sampled output distribution of the graphed runtime is compared with the eager one
(transformers' forward, nothing captured) by chi-square. Everything goes to $OUT/check.json.

Usage: python scripts/gpu_check.py [PRESET ...]   (default: llama3.2-1b)
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch

import kad
from kad.bench.check import agreement, float32_check
from kad.bench.loading import random_float32_pair, runtime_for
from kad.bench.measure import decode_ids
from kad.fast.graphs import compiled_uniforms
from kad.sampling import Warp, counter_uniform

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests.stats
from tests.stats import homogeneity_p_value


def check(preset: str) -> dict:
    """A random-weight pair of the preset (two seeds) in float32: `float32_check`."""
    out = {"preset": preset, "dtype": "float32"}
    out |= float32_check(*random_float32_pair(preset, "cuda"))
    for label, case in out["cases"].items():
        print(label, case, flush=True)
    print("max |Δ log p| one decode step:", out["max_logprob_diff_decode"], flush=True)
    return out


def check_aligner() -> dict:
    """The built-in pair in float32 through `Aligner` on the GPU: fast=None vs fast=False."""
    from kad.world import builtin_aligner, heldout_problems

    questions = [str(p["question"]) for p in heldout_problems(12)]
    aligners = {
        fast: builtin_aligner(device="cuda", dtype="float32", fast=fast) for fast in (None, False)
    }
    runtime = aligners[None].runtime
    out: dict = {
        "preset": "built-in pair via Aligner",
        "dtype": "float32",
        "runner": type(runtime.runners["base"]).__name__,
        "graphed": runtime.graphed,
    }
    sampled = {"temperature": 1.0, "top_p": 0.9, "seed": 3}  # the same counter draws on both
    for label, rule, spec, warp in (
        ("dual", kad.Dual(lam=0.4), None, {}),
        ("dual γ=4", kad.Dual(lam=0.4), 4, {}),
        ("primal γ=2", kad.Primal(0.9), 2, {}),
        ("implicit reward γ=2", kad.ImplicitReward(), 2, {}),
        ("implicit reward sampled γ=2", kad.ImplicitReward(), 2, sampled),
    ):
        got, ref = (
            [
                g.token_ids
                for g in aligners[fast].generate(
                    questions, rule=rule, max_new_tokens=64, speculative=spec, **warp
                )
            ]
            for fast in (None, False)
        )
        out[label] = {
            "agree": [agreement(a, b) for a, b in zip(ref, got, strict=True)],
            "equal": ref == got,
        }
        print(label, out[label], flush=True)
    return out


def check_sampled_distribution() -> dict:
    """Sampled rounds of the graphed runtime (compact forward, compiled uniforms, CUDA graphs)
    against the eager runtime (transformers' forward), on a random pair over 12 tokens with
    spread-out distributions: 3-token outputs, 2000 samples each from disjoint seeds,
    chi-square homogeneity (rare outcomes pooled). A correct sampler fails at 0.001 one time in
    1000."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config = dict(
        vocab_size=12,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**config)).cuda().eval()
    proxy = Qwen2ForCausalLM(Qwen2Config(**config)).cuda().eval()
    with torch.no_grad():
        base.lm_head.weight.mul_(20.0)
        proxy.lm_head.weight.mul_(6.0)
    n, rule, warp = 2000, kad.Dual(lam=0.4), Warp(temperature=1.0)
    prompts = [[1, 2, 3]] * n

    def outcomes(fast: bool | None, seed0: int, spec: int | None):
        runtime = runtime_for({"base": base, "proxy": proxy}, 12, 256, 16, fast=fast)
        seeds = list(range(seed0, seed0 + n))
        ids = decode_ids(runtime, prompts, rule, spec, 3, warp, seeds)
        return Counter(tuple(row) for row in ids), runtime.graphed

    reference, _ = outcomes(False, 0, None)
    out: dict = {"preset": "12-token random pair, sampled: graphed vs eager", "samples": n}
    seeds = torch.randint(0, 2**62, (512, 1), device="cuda")
    counters = torch.randint(0, 2**40, (512, 1), device="cuda")
    streams = torch.arange(27, device="cuda")
    eager = counter_uniform(seeds, counters, streams)
    out["compiled uniforms"] = {
        "equal": bool(torch.equal(compiled_uniforms()(seeds, counters, streams), eager))
    }
    print("compiled uniforms", out["compiled uniforms"], flush=True)
    for spec in (None, 2):
        got, graphed = outcomes(None, 10_000, spec)
        p_value = homogeneity_p_value(reference, got)
        label = f"sampled γ={spec}" if spec else "sampled plain"
        out[label] = {
            "graphed": graphed,
            "outcomes": len(set(reference) | set(got)),
            "p_value": p_value,
            "equal": graphed and p_value > 0.001,
        }
        print(label, out[label], flush=True)
    return out


def main() -> None:
    presets = sys.argv[1:] or ["llama3.2-1b"]
    results = [check(p) for p in presets] + [check_aligner(), check_sampled_distribution()]
    path = os.path.join(os.environ.get("OUT", "."), "check.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    ok = all(
        case["equal"]
        for r in results
        for case in (r["cases"].values() if "cases" in r else r.values())
        if isinstance(case, dict)
    )
    print("GPU CHECK", "PASS" if ok else "FAIL", flush=True)


if __name__ == "__main__":
    main()
