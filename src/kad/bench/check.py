"""The float32 identity check: the compact forward's runtime gives transformers' greedy tokens.

In float32 rounding cannot flip an argmax between kernels as it does in bf16 on random weights,
so the runtime over `StaticRunner`s (``fast=None``: on CUDA compiled layers and captured rounds)
must decode exactly the tokens of the runtime over `TransformersRunner`s (``fast=False``:
transformers' forward and cache), plain and speculative.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from kad.bench.loading import random_prompts, runtime_for
from kad.bench.measure import decode_ids
from kad.rules import BaseOnly, Dual, Primal, Rule
from kad.runtime.scheduler import make_runner

FLOAT32_CASES: tuple[tuple[str, Rule, int | None], ...] = (
    ("dual", Dual(lam=0.4), None),
    ("primal", Primal(0.9), None),
    ("base γ=3", BaseOnly(), 3),
    ("dual γ=3", Dual(lam=0.4), 3),
)
CONTEXT = 128


def agreement(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token sequences."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def float32_check(base: PreTrainedModel, proxy: PreTrainedModel, new_tokens: int = 48) -> dict:
    """Greedy tokens of the two runtimes (module doc) on two prompts of 40 and 23 tokens, for
    each of `FLOAT32_CASES`: per case whether every row is equal and each row's tokens until
    the first difference; and the largest |Δ log p| of one decode step of the base."""
    vocab = min(base.config.vocab_size, proxy.config.vocab_size)
    long, short = random_prompts(2, 40, vocab, seed=5)
    prompts = [long, short[:23]]
    models = {"base": base, "proxy": proxy}
    runtimes = {fast: runtime_for(models, vocab, 2, CONTEXT, fast=fast) for fast in (None, False)}
    fast = runtimes[None]
    out: dict[str, Any] = {
        "new_tokens": new_tokens,
        "runner": type(fast.runners["base"]).__name__,
        "graphed": fast.graphed,
        "cases": {},
    }
    for label, rule, speculative in FLOAT32_CASES:
        ref, got = (
            decode_ids(runtimes[f], prompts, rule, speculative, new_tokens) for f in (False, None)
        )
        out["cases"][label] = {
            "agree": [agreement(a, b) for a, b in zip(ref, got, strict=True)],
            "equal": ref == got,
        }
    out["max_logprob_diff_decode"] = decode_step_difference(base, vocab, prompts)
    return out


def decode_step_difference(model: PreTrainedModel, vocab: int, prompts: list[list[int]]) -> float:
    """max |Δ log p| between the compact and transformers' forward over one decode step after
    each prompt's prefill (each prompt in its own slot)."""
    rows, device = len(prompts), model.get_input_embeddings().weight.device
    steps = []
    with torch.inference_mode():
        for fast in (None, False):
            runner = make_runner(model, vocab, rows, CONTEXT, fast)
            out = []
            for slot, ids in enumerate(prompts):
                tokens = torch.tensor([ids], device=device)  # [1, L]
                runner.forward(slot, tokens[:, :-1], heads=False)
                runner.advance(slot, torch.tensor([len(ids) - 1], device=device))
                out.append(runner.forward(slot, tokens[:, -1:]))  # [1, 1, V]
            steps.append(torch.cat(out))
    return float((steps[0] - steps[1]).abs().max())
