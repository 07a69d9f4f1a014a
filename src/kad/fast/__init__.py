"""The CUDA fast path: static KV caches, compiled layers, and rounds captured as CUDA graphs.

`make_runner` picks a `StaticRunner` for a Llama-family model on a GPU and the engine's
`ModelRunner` otherwise; `FastSession` runs greedy rounds over two static runners as one graph
each, and any other round as the engine does. Both give the engine's greedy tokens.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from kad.engine import ModelRunner
from kad.fast.llama import unsupported_reason
from kad.fast.runner import StaticRunner
from kad.fast.session import FastSession, fused_round


def make_runner(
    model: PreTrainedModel, vocab_size: int, *, fast: bool | None = None
) -> ModelRunner | StaticRunner:
    """A StaticRunner if ``fast`` (None: on a CUDA device) and the architecture is supported,
    else the engine's ModelRunner (transformers' own forward and cache)."""
    on_gpu = model.get_input_embeddings().weight.device.type == "cuda"
    if (on_gpu if fast is None else fast) and unsupported_reason(model) is None:
        return StaticRunner(model, vocab_size)
    return ModelRunner(model, vocab_size)


__all__ = ["FastSession", "StaticRunner", "fused_round", "make_runner", "unsupported_reason"]
