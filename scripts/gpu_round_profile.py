"""Where a decoding round's time goes on the GPU: the llama3-8b + llama3.2-1b random pair with
32 rows decoding; the captured round's replay against a whole runtime step (replay + host work),
each model's forward alone, and a kernel profile of three replays.

    python scripts/gpu_round_profile.py $OUT/profile.json
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from kad.fast.presets import random_aligner

ROWS = 32


def milliseconds(run: Callable[[], object], repeats: int = 20) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    aligner = random_aligner(
        "llama3-8b", device="cuda", dtype=torch.bfloat16, max_rows=64, max_context=512
    )
    runtime = aligner.runtime
    runtime.capture([0])
    session = aligner.start([f"question {i} about apples" for i in range(ROWS)], max_new_tokens=200)
    for _ in range(5):  # every row prefilled and decoding
        session.step()
    graph = runtime.graphs[(ROWS, 0, False)]
    result = {
        "step_ms": milliseconds(session.step),
        "replay_ms": milliseconds(graph.replay),
        "base_step_ms": runtime.runners["base"].step_seconds(ROWS, 1) * 1e3,
        "proxy_step_ms": runtime.runners["proxy"].step_seconds(ROWS, 1) * 1e3,
    }
    print(result, flush=True)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    with open(sys.argv[1], "w", encoding="utf-8") as sink:
        json.dump(result, sink)


if __name__ == "__main__":
    main()
