"""The split-context decode attention on the GPU (`kad.fast.triton_attention`, issue 13): its
agreement with `kad.fast.llama.attend` at the shapes rounds take, and its time against attend's
two matrix products around a softmax.

For the attention shapes of each preset family (heads, KV heads, head dim), batches 1 and 32,
1, 5 or 6 query tokens (a plain step, speculative verifies), over a pool of 1,024 columns with
rows of random lengths (500-800 tokens):

- **agreement**: the kernel in float32 against attend in float32 (IEEE products on both sides:
  the largest difference must stay at rounding level), and in bfloat16 against the float32
  reference, next to attend's own bfloat16 error (the kernel must be no worse);
- **time** (first): each computation captured 20 times in a CUDA graph, the median replay.

    python scripts/gpu_kernels.py $OUT/kernels.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from kad.fast import triton_attention  # noqa: F401  (registers kad::decode_attention)
from kad.fast.graphs import Graph, seconds
from kad.fast.llama import attend

FAMILIES = {  # heads, KV heads, head dim
    "llama3.2-1b": (32, 8, 64),
    "llama3-8b": (32, 8, 128),
    "olmo2-1b": (16, 16, 128),
    "olmo2-13b": (40, 40, 128),
    "qwen3-14b": (40, 8, 128),
    "llama3-70b": (64, 8, 128),
}
SLOTS, CALLS = 1024, 20


def inputs(batch: int, heads: int, kv_heads: int, dim: int, n: int, dtype: torch.dtype):
    """q, caches, rows, cols and the matching mask and width, on the GPU (seeded)."""
    gen = torch.Generator(device="cuda").manual_seed(batch * 100 + n)
    dev = torch.device("cuda")
    q = torch.randn(batch, heads, n, dim, generator=gen, device=dev).to(dtype)
    k = torch.randn(batch + 1, kv_heads, SLOTS, dim, generator=gen, device=dev).to(dtype)
    v = torch.randn(batch + 1, kv_heads, SLOTS, dim, generator=gen, device=dev).to(dtype)
    lengths = torch.randint(500, 800, (batch,), generator=gen, device=dev)
    positions = lengths[:, None] + torch.arange(n, device=dev)
    rows = torch.arange(batch, device=dev)
    mask = (torch.arange(SLOTS, device=dev) <= positions.unsqueeze(-1))[:, None, None]
    return q, k, v, rows, positions.clamp(max=SLOTS - 1), mask


def kernel(q, k, v, rows, cols, mask):
    return torch.ops.kad.decode_attention(q, k, v, rows, cols)


def matmuls(q, k, v, rows, cols, mask):
    return attend(q, k[: q.shape[0]], v[: q.shape[0]], mask)


def agreement(family: str, batch: int, n: int) -> dict:
    heads, kv_heads, dim = FAMILIES[family]
    exact = inputs(batch, heads, kv_heads, dim, n, torch.float32)
    reference = matmuls(*exact)
    low = inputs(batch, heads, kv_heads, dim, n, torch.bfloat16)
    low_reference = matmuls(*(t.float() if t.is_floating_point() else t for t in low))
    return {
        "family": family, "batch": batch, "tokens": n,
        "float32_max_diff": (kernel(*exact) - reference).abs().max().item(),
        "bf16_kernel_max_err": (kernel(*low).float() - low_reference).abs().max().item(),
        "bf16_matmuls_max_err": (matmuls(*low).float() - low_reference).abs().max().item(),
    }  # fmt: skip


def timing(family: str, batch: int, n: int) -> dict:
    heads, kv_heads, dim = FAMILIES[family]
    args = inputs(batch, heads, kv_heads, dim, n, torch.bfloat16)
    out = {"family": family, "batch": batch, "tokens": n}
    for name, fn in (("kernel", kernel), ("matmuls", matmuls)):
        run = lambda fn=fn: [fn(*args) for _ in range(CALLS)]  # noqa: E731
        graph = Graph(run, run, torch.device("cuda"))
        out[f"{name}_us"] = round(1e6 * seconds(graph.replay, torch.device("cuda")) / CALLS, 2)
    out["speedup"] = round(out["matmuls_us"] / out["kernel_us"], 2)
    return out


def main() -> None:
    path = Path(sys.argv[1])
    results: dict = {"agreement": [], "timing": []}
    with torch.inference_mode():
        for family in ("llama3.2-1b", "llama3-8b", "olmo2-13b"):
            for batch in (1, 32):
                for n in (1, 5):
                    row = timing(family, batch, n)
                    results["timing"].append(row)
                    print(row, flush=True)
                    path.write_text(json.dumps(results, indent=2))
        for family in FAMILIES:
            for batch in (1, 32):
                for n in (1, 6):
                    row = agreement(family, batch, n)
                    results["agreement"].append(row)
                    print(row, flush=True)
                    path.write_text(json.dumps(results, indent=2))
    worst = max(r["float32_max_diff"] for r in results["agreement"])
    worse = [r for r in results["agreement"]
             if r["bf16_kernel_max_err"] > 1.5 * r["bf16_matmuls_max_err"] + 1e-3]  # fmt: skip
    results["float32_worst"], results["bf16_worse_than_matmuls"] = worst, worse
    path.write_text(json.dumps(results, indent=2))
    print("float32 worst difference", worst, "; bf16 rows worse than the matmuls:", len(worse))


if __name__ == "__main__":
    main()
