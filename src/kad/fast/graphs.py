"""CUDA graphs and the compiled layer: launching a whole decoding step as one graph replay.

A graph records the kernels of one call of a function on fixed buffers; a replay reruns them with
no Python and no per-kernel launch cost. Everything a graph reads or writes across replays must
live at a fixed address: the runners' state is updated in place for that reason. The graphs of a
runner share one memory pool (a runner takes a fresh pool whenever it drops graphs: a pool whose
graphs are all gone cannot be captured into again); what a replay returns may be overwritten by
the next replay of a graph of the same pool, so callers copy out what they keep first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any

import torch

from kad.fast.llama import layer_forward
from kad.runtime.runner import log_probs
from kad.sampling import counter_uniform

_COMPILED: dict[str, Callable] = {}


class Graph:
    """``fn`` captured once as a CUDA graph; `replay()` reruns it and returns its outputs.

    ``warmup`` runs first on a side stream, outside the capture: it must compile and load every
    kernel ``fn`` launches, and leave the state as it found it. ``pool``: a memory pool handle
    shared with other graphs that never run concurrently (None: a private pool).
    """

    def __init__(
        self,
        fn: Callable[[], Any],
        warmup: Callable[[], None],
        device: torch.device,
        inputs: Any = None,
        pool: Any = None,
    ) -> None:
        self.inputs = inputs  # the buffers fn reads: fill them before a replay
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            warmup()
        current.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = fn()

    def replay(self) -> Any:
        self.graph.replay()
        return self.outputs


@contextmanager
def restored(tensors: Iterable[torch.Tensor]):
    """Put these tensors back as they were on exit (for warm-up runs that mutate state)."""
    tensors = list(tensors)
    saved = [t.clone() for t in tensors]
    try:
        yield
    finally:
        for tensor, value in zip(tensors, saved, strict=True):
            tensor.copy_(value)


def compiled_layer() -> Callable:
    """`layer_forward` compiled by Inductor (fused norms, RoPE, softmax), compiled once per
    (model shapes, batch 1 or more, tokens 1 or more): batch and token counts are dynamic, model
    dimensions static. Recompilation limits are raised for the several models of a family."""
    if "layer" not in _COMPILED:
        config = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit", "accumulated_cache_size_limit"):
            if hasattr(config, name):
                setattr(config, name, max(getattr(config, name), 256))
        _COMPILED["layer"] = torch.compile(layer_forward, dynamic=None, fullgraph=True)
    return _COMPILED["layer"]


def compiled_log_probs() -> Callable:
    """`kad.runtime.runner.log_probs` compiled by Inductor (eager, its NaN guards and the
    log-softmax over the vocabulary are seven kernels, the softmax one thread block per row);
    the leading dimensions (batch, tokens) are dynamic: callers mark them (`mark_rows_dynamic`)."""
    if "log_probs" not in _COMPILED:
        _COMPILED["log_probs"] = torch.compile(log_probs, dynamic=None, fullgraph=True)
    return _COMPILED["log_probs"]


def mark_rows_dynamic(logits: torch.Tensor) -> torch.Tensor:
    """Mark every dimension of ``logits`` but the last (the vocabulary) dynamic."""
    for dim in range(logits.dim() - 1):
        torch._dynamo.maybe_mark_dynamic(logits, dim)
    return logits


def compiled_uniforms() -> Callable:
    """`counter_uniform` compiled by Inductor into one kernel (eager, its ~70 small integer
    operations would each be a kernel launch of a round's graph), for any shapes."""
    if "uniforms" not in _COMPILED:
        _COMPILED["uniforms"] = torch.compile(counter_uniform, dynamic=True, fullgraph=True)
    return _COMPILED["uniforms"]


def mark_step_dynamic(
    x: torch.Tensor,
    cols: torch.Tensor,
    rope: Iterable[torch.Tensor],
    mask: torch.Tensor,
) -> None:
    """Mark the batch, token and attention-width dimensions of a step's inputs dynamic (the
    rest, the pool's caches included, stays static): one compiled layer serves every graph."""
    mark = torch._dynamo.maybe_mark_dynamic
    mark(x, 0)
    mark(x, 1)
    mark(cols, 0)
    mark(cols, 1)
    for table in rope:
        mark(table, 0)
        mark(table, 2)
    mark(mask, 0)
    mark(mask, 3)
    mark(mask, 4)


def static_shapes():
    """Compile with only the marked dimensions dynamic: never generalise a model's dimensions
    because another model of other sizes ran through the same function."""
    return torch._dynamo.config.patch(automatic_dynamic_shapes=False)


def seconds(fn: Callable[[], Any], device: torch.device, repeats: int = 20) -> float:
    """Median wall time of ``fn()`` in seconds: CUDA events on a GPU, the host clock on a CPU."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def to_device(values: list[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host values as a tensor on ``device`` without waiting for the device: through pinned
    memory on a GPU (a pageable copy, or ``tensor[i] = x``, would wait for every queued kernel,
    a round in flight included)."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
