"""Where a small model's decoding step goes on the GPU, and what candidate changes buy (issue 13,
item 2): the proxy alone at batch 1, greedy, compiled and graph-captured, as tokens/s and share of
its roofline, with a kernel profile of the captured step, for each variant:

- ``current``: the compact forward as it is (`kad.fast.llama`, `kad.fast.graphs`);
- ``matmul-attention``: attention as two matrix products around a fused softmax over the width
  bucket (`kad.fast.llama.attend`), as before the split-context kernel (2026-12-02, issue 13);
- ``eager``: the same step captured without Inductor (what compiling the layer buys);
- ``coordinate-descent``: Inductor's coordinate-descent tuning of its Triton kernels (gpt-fast);
- ``sdpa``: attention by ``F.scaled_dot_product_attention`` (GQA, boolean mask) instead of two
  matrix products around a fused softmax;
- ``max-autotune``: Inductor's Triton matrix-product templates next to cuBLAS, with the
  residual adds fused into their epilogues where they win.

Each (variant, preset) runs in its own process under a time limit, so one slow compile cannot
cost the others.

    python scripts/gpu_proxy.py $OUT/proxy.json [--presets llama3.2-1b,olmo2-1b]
        [--variants current,eager,...] [--deadline 300]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("current", "matmul-attention", "sdpa", "coordinate-descent", "eager", "max-autotune")
PROMPT, NEW, REPEATS = 512, 128, 3


def sdpa_attend(q, k_cache, v_cache, mask):
    """`kad.fast.llama.attend` through SDPA: q ``[B, H, n, D]``, caches ``[B, Hkv, W, D]``,
    mask ``[B, 1, 1, n, W]`` → ``[B, n, H·D]``."""
    import torch.nn.functional as F

    batch, heads, n, dim = q.shape
    out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask[:, :, 0],
                                         enable_gqa=True)  # fmt: skip
    return out.transpose(1, 2).reshape(batch, n, heads * dim)


def one(variant: str, preset: str) -> dict:
    """The proxy alone under ``variant`` (this process only)."""
    import torch

    if variant == "eager":
        os.environ["KAD_COMPILE"] = "0"
    if variant == "coordinate-descent":
        torch._inductor.config.coordinate_descent_tuning = True
    if variant == "max-autotune":
        torch._inductor.config.max_autotune_gemm = True
        torch._inductor.config.max_autotune_gemm_backends = "TRITON,ATEN"
    if variant in ("sdpa", "matmul-attention"):
        import kad.fast.llama

        kad.fast.llama.DECODE_TOKENS = 0  # no step takes the decode kernel
        if variant == "sdpa":
            kad.fast.llama.attend = sdpa_attend

    from kad.bench.loading import random_prompts
    from kad.bench.measure import decode_alone, kernel_profile
    from kad.fast.graphs import Graph
    from kad.fast.presets import random_model
    from kad.fast.roofline import copy_bandwidth, mean_context, model_bytes, plain_roofline
    from kad.fast.runner import StaticRunner

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = random_model(preset, device=device, dtype=torch.bfloat16)
    vocab = model.get_output_embeddings().weight.shape[0]
    runner = StaticRunner(model, vocab, 1, PROMPT + NEW + 20)
    prompts = random_prompts(1, PROMPT, vocab, seed=1)
    t0 = time.perf_counter()
    seconds, ids = decode_alone(runner, prompts, NEW, REPEATS)
    bandwidth = copy_bandwidth(device)
    rate = NEW / seconds
    roof = plain_roofline(bandwidth, [model_bytes(model)], 1, mean_context(PROMPT, NEW))
    tokens = torch.zeros(1, 1, dtype=torch.long, device=device)
    with torch.inference_mode():
        step = Graph(lambda: runner.forward(0, tokens), lambda: runner.forward(0, tokens), device)
    profile = kernel_profile(step.replay, device, calls=5)
    return {
        "variant": variant,
        "preset": preset,
        "tokens_per_s": round(rate, 1),
        "step_ms": round(1e3 * seconds / NEW, 4),
        "roofline_tokens_per_s": round(roof, 1),
        "roofline_pct": round(100 * rate / roof, 1),
        "copy_bandwidth_bytes_per_s": bandwidth,
        "weight_bytes": model_bytes(model).weights,
        "first_ids": ids[:16],
        "seconds_compile_and_time": round(time.perf_counter() - t0, 1),
        "profile": profile,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--presets", default="llama3.2-1b,olmo2-1b")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds for all runs")
    parser.add_argument("--limit", type=float, default=150.0, help="seconds for one run")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # variant:preset, in a child process
    args = parser.parse_args()
    if args.one:
        variant, preset = args.one.split(":")
        args.out.write_text(json.dumps(one(variant, preset), indent=2, default=str))
        return
    start, results = time.perf_counter(), []
    for variant in args.variants.split(","):  # every preset's current first
        for preset in args.presets.split(","):
            left = args.deadline - (time.perf_counter() - start)
            if left < 30:
                results.append({"variant": variant, "preset": preset, "skipped": "out of time"})
                continue
            part = args.out.with_suffix(f".{variant}.{preset}.part")
            try:
                subprocess.run([sys.executable, __file__, str(part), "--one",
                                f"{variant}:{preset}"], check=True,
                               timeout=min(args.limit, left))  # fmt: skip
                result = json.loads(part.read_text())
                part.unlink()
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
                result = {"variant": variant, "preset": preset, "error": repr(err)[:300]}
            results.append(result)
            summary = {k: result.get(k) for k in ("tokens_per_s", "roofline_pct", "error")}
            prof = result.get("profile", {})
            print(f"[{time.perf_counter() - start:6.1f} s] {preset} {variant}: {summary} "
                  f"kernels/step {prof.get('kernels_per_call')} us {prof.get('us_per_call')}",
                  flush=True)  # fmt: skip
            args.out.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
