"""Weight-only quantization on one GPU (issue 13, item 1), in one device call of under 8 minutes.

    PYTHONPATH=src python scripts/gpu_quant.py $OUT/gpu_quant.json

Stages (each caught on its own; the JSON is rewritten after each; later stages are skipped when
the time is short):

- ``check``: an 8B-shaped stack of 4 random layers, quantized (int8, int4), against the same
  model whose projections hold the dequantized weights (bf16): log-probs of a 250-token prefill
  (int8's cuBLAS path, M > 64) or of 60-token chunks (the kernels at M = 60 and 10), then one
  decode token and a 5-token verify (the kernels at M = 1 and 5); eager, no graphs.
- ``proxy``: llama3.2-1b alone at batch 1, greedy, compiled and graph-captured, bf16 / int8 /
  int4: tokens/s and share of the roofline (weight bytes + KV bytes per step over 4.2e12 B/s).
- ``kad8b``: plain KAD (dual), llama3-8b (bf16) + llama3.2-1b in int8 and in int4.
- ``kad70b``: llama3-70b in int8 + llama3.2-1b (bf16): memory, tokens/s, share of roofline;
  then in int4 if the time allows.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import sys
import time
import traceback
from typing import Any

import torch

import kad
from kad.bench.loading import random_prompts, runtime_for
from kad.bench.measure import GAMMA_MAX, decode_alone, time_runtime
from kad.fast import presets
from kad.fast.presets import random_model
from kad.fast.quant import dequantize, quantize_model, quantize_weight, weight_bytes
from kad.fast.roofline import copy_bandwidth, mean_context, model_bytes, plain_roofline
from kad.fast.runner import StaticRunner

BANDWIDTH = 4.2e12  # H200 B/s, the roofline
PROMPT, NEW, REPEATS = 512, 128, 1
DEADLINE = float(os.environ.get("KAD_GPU_DEADLINE", "440"))  # s: later stages are skipped
START = time.perf_counter()
DEVICE = torch.device("cuda")
BF16 = torch.bfloat16
VOCAB = 128256
results: dict[str, Any] = {}


def log(text: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] {text}", flush=True)


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def gib(nbytes: float) -> float:
    return round(nbytes / 2**30, 2)


def stage(name: str, fn) -> None:
    if time.perf_counter() - START > DEADLINE:
        results[name] = {"skipped": "out of time"}
        log(f"{name}: skipped (out of time)")
        return
    log(f"{name}: start")
    try:
        results[name] = fn()
    except Exception as err:  # one stage's failure must not lose the others
        results[name] = {"error": repr(err), "traceback": traceback.format_exc()[-3000:]}
        log(f"{name}: FAILED {err!r}")
    free()
    results[name + "_seconds"] = round(time.perf_counter() - START, 1)
    log(f"{name}: {json.dumps(results[name], default=str)[:1500]}")
    with open(sys.argv[1], "w", encoding="utf-8") as sink:
        json.dump(results, sink, indent=2, default=str)


# ----- check
def log_probs_along(runner: StaticRunner, ids: torch.Tensor, cuts: list[int]) -> torch.Tensor:
    """Log-probs ``[1, L, V]`` of ids ``[1, L]``, fed in chunks ending at ``cuts``."""
    out, start = [], 0
    for end in [*cuts, ids.shape[1]]:
        out.append(runner.forward(0, ids[:, start:end]))
        runner.advance(0, torch.tensor([end - start], device=DEVICE))
        start = end
    return torch.cat(out, dim=1)


@torch.inference_mode(False)
def dequantized_copy(model: torch.nn.Module, fmt: str) -> torch.nn.Module:
    """The model with each projection's weight replaced by its quantized-then-dequantized value
    (host layout: what the GPU kernels must compute)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for block in ref.model.layers:
            for module in block.modules():
                if isinstance(module, torch.nn.Linear):
                    host = quantize_weight(module.weight.detach().cpu(), fmt)
                    module.weight.copy_(dequantize(host).to(DEVICE, BF16))
    return ref


def centred_error(lp: torch.Tensor, ref: torch.Tensor) -> float:
    """‖c(lp) − c(ref)‖ / ‖c(ref)‖, c centring each position's log-probs (the logits up to a
    constant): near-uniform random-model distributions cannot hide a wrong product."""
    a, b = (t.float() - t.float().mean(-1, keepdim=True) for t in (lp, ref))
    return ((a - b).norm() / b.norm()).item()


def eager(model: torch.nn.Module) -> StaticRunner:
    return StaticRunner(model, VOCAB, 1, 512, graphs=False, compile=False)


def check() -> dict[str, Any]:
    presets.PRESETS["llama3-8b-4l"] = dict(presets.PRESETS["llama3-8b"], num_hidden_layers=4)
    torch.manual_seed(0)
    out: dict[str, Any] = {}
    ids = torch.randint(0, VOCAB, (1, 316), device=DEVICE)
    chunks = {"prefill 250": [250, 310, 311], "prefill by 60": [60, 120, 180, 240, 300, 310, 311]}
    for fmt in ("int8", "int4"):
        torch.manual_seed(0)
        model = random_model("llama3-8b-4l", device=DEVICE, dtype=BF16)
        ref = dequantized_copy(model, fmt)  # before a runner fuses (and caches) q, k, v
        with torch.inference_mode():
            floats = log_probs_along(eager(model), ids, chunks["prefill 250"])
        quantize_model(model, fmt)
        with torch.inference_mode():
            want = log_probs_along(eager(ref), ids, chunks["prefill 250"])
            for name, cuts in chunks.items():
                lp = log_probs_along(eager(model), ids, cuts)
                out[f"{fmt} {name}"] = {
                    "centred_error_vs_dequantized": centred_error(lp, want),
                    "decode_positions_error": centred_error(lp[:, 310:], want[:, 310:]),
                    "max_abs_logprob_diff": (lp.float() - want.float()).abs().max().item(),
                    "argmax_agree": (lp.argmax(-1) == want.argmax(-1)).float().mean().item(),
                }
        out[f"{fmt} float vs dequantized (the quantization's own error)"] = centred_error(
            floats, want
        )
        out[f"{fmt} ok"] = all(  # bf16 rounding: ~1e-2; a wrong product: ~1
            out[f"{fmt} {name}"]["centred_error_vs_dequantized"] < 0.05 for name in chunks
        )
        del model, ref
        free()
    return out


# ----- speed
def alone(model: torch.nn.Module) -> dict[str, Any]:
    runner = StaticRunner(model, VOCAB, 1, PROMPT + NEW + 20)
    prompts = random_prompts(1, PROMPT, VOCAB, seed=1)
    seconds, _ = decode_alone(runner, prompts, NEW, REPEATS)
    rate = NEW / seconds
    roof = plain_roofline(BANDWIDTH, [model_bytes(model)], 1, mean_context(PROMPT, NEW))
    return {
        "tokens_per_s": round(rate, 1),
        "roofline_tokens_per_s": round(roof, 1),
        "roofline_pct": round(100 * rate / roof, 1),
        "step_ms": round(1e3 * seconds / NEW, 3),
        "weight_bytes_per_step": model_bytes(model).weights,
    }


def proxy_alone() -> dict[str, Any]:
    out = {"copy_bandwidth_bytes_per_s": copy_bandwidth(DEVICE)}
    for fmt in ("none", "int8", "int4"):
        torch.manual_seed(0)
        model = random_model("llama3.2-1b", device=DEVICE, dtype=BF16, quantize=fmt)
        out[fmt] = alone(model)
        log(f"proxy {fmt}: {out[fmt]}")
        del model
        free()
    return out


def plain_kad(base: torch.nn.Module, proxy: torch.nn.Module) -> dict[str, Any]:
    runtime = runtime_for(
        {"base": base, "proxy": proxy}, VOCAB, 1, PROMPT + NEW + 2 * (GAMMA_MAX + 1)
    )
    prompts = random_prompts(1, PROMPT, VOCAB, seed=2)
    run = time_runtime(runtime, prompts, kad.Dual(), None, NEW, REPEATS)
    rate = run.tokens / run.seconds
    models = [model_bytes(base), model_bytes(proxy)]
    roof = plain_roofline(BANDWIDTH, models, 1, mean_context(PROMPT, NEW))
    return {
        "tokens_per_s": round(rate, 1),
        "roofline_tokens_per_s": round(roof, 1),
        "roofline_pct": round(100 * rate / roof, 1),
        "weight_bytes_per_step": sum(m.weights for m in models),
        "kv_pool_gib": gib(runtime.plan.bytes),
    }


def kad_8b() -> dict[str, Any]:
    torch.manual_seed(0)
    base = random_model("llama3-8b", device=DEVICE, dtype=BF16)
    out = {}
    for fmt in ("int8", "int4"):
        proxy = random_model("llama3.2-1b", device=DEVICE, dtype=BF16, quantize=fmt)
        out[f"proxy {fmt}"] = plain_kad(base, proxy)
        log(f"8b + 1b {fmt}: {out[f'proxy {fmt}']}")
        del proxy
        free()
    return out


def kad_70b(fmt: str) -> dict[str, Any]:
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    base = random_model("llama3-70b", device=DEVICE, dtype=BF16, quantize=fmt)
    made_s = time.perf_counter() - t0
    proxy = random_model("llama3.2-1b", device=DEVICE, dtype=BF16)
    memory = {
        "base_weight_gib": gib(weight_bytes(base)),
        "proxy_weight_gib": gib(weight_bytes(proxy)),
        "allocated_after_models_gib": gib(torch.cuda.memory_allocated()),
        "peak_while_making_gib": gib(torch.cuda.max_memory_allocated()),
        "make_base_seconds": round(made_s, 1),
    }
    log(f"70b {fmt} made: {memory}")
    out = plain_kad(base, proxy)
    free_bytes, total = torch.cuda.mem_get_info()
    memory.update(
        peak_allocated_gib=gib(torch.cuda.max_memory_allocated()),
        device_used_gib=gib(total - free_bytes),
        device_total_gib=gib(total),
    )
    return {"memory": memory, **out}


def main() -> None:
    import transformers
    import triton

    results["meta"] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "prompt_tokens": PROMPT,
        "new_tokens": NEW,
        "bandwidth_for_roofline": BANDWIDTH,
    }
    stages = {
        "check": check,
        "proxy": proxy_alone,
        "kad8b": kad_8b,
        "kad70b_int8": lambda: kad_70b("int8"),
        "kad70b_int4": lambda: kad_70b("int4"),
    }
    chosen = os.environ.get("KAD_GPU_STAGES")  # e.g. "kad70b_int8,proxy": these, in order
    for name in chosen.split(",") if chosen else stages:
        stage(name, stages[name])
    log("done")


if __name__ == "__main__":
    main()
