"""transformers' own decoding, timed the same way: the peers `kad bench` is compared with.

- ``generate`` of the base alone, greedy, eagerly with its dynamic cache ("eager");
- ``generate`` of the base alone with a static cache, whose forward transformers compiles
  (``cache_implementation="static"``: `torch.compile`, mode reduce-overhead, CUDA graphs); on
  CUDA only;
- assisted generation with the proxy as ``assistant_model`` (constant γ, greedy, eager): the same
  lossless greedy work as speculative ``rule=base``; one vocabulary, batch 1 only.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import CompileConfig, PreTrainedModel

from kad.bench.measure import sync


def hf_generate(
    model: PreTrainedModel,
    prompts: list[list[int]],
    new_tokens: int,
    *,
    static: bool = False,
    assistant: PreTrainedModel | None = None,
    gamma: int = 0,
) -> tuple[float, list[int]]:
    """(seconds of new_tokens − 1 decode steps, row 0's ids) of greedy ``generate``: the decode
    time is t(new_tokens) − t(1), so prefill is excluded. A static cache warms up at the full
    length twice (compile, capture): it keeps its largest length, so t(1) reuses the graphs."""
    device = model.device
    ids = torch.tensor(prompts, device=device)
    kwargs: dict[str, Any] = dict(
        attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, use_cache=True
    )
    if static:
        kwargs |= dict(cache_implementation="static", compile_config=CompileConfig())
    if assistant is not None:
        config = assistant.generation_config
        config.num_assistant_tokens = gamma
        config.num_assistant_tokens_schedule = "constant"
        config.assistant_confidence_threshold = 0.0
        kwargs["assistant_model"] = assistant

    def run(n: int) -> tuple[float, torch.Tensor]:
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        sync(device)
        return time.perf_counter() - start, out

    for n in (new_tokens, new_tokens) if static else (2,):  # compile, capture; or load kernels
        run(n)
    first, _ = run(1)
    full, out = run(new_tokens)
    return max(full - first, 1e-9), out[0, ids.shape[1] :].tolist()
