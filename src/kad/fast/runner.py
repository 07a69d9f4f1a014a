"""`StaticRunner`: one model's slot pool as static tensors, run by the compact Llama forward.

State, allocated once and updated in place so that captured CUDA graphs stay valid:

- ``k[l]``, ``v[l]``  the cache of layer l ``[R, Hkv, S, D]``: slot r's token at position t
  lives at column t;
- ``lengths`` ``[R]``  tokens committed per slot (`kad.runtime.runner` explains the contract);
- ``cos``, ``sin`` ``[S, D]``  the model's own RoPE tables for positions 0..S−1.

A forward over slots start..start+B−1 is a view of the first dimension, so the rows of a batch
are the pool's first rows (the scheduler keeps the occupied slots packed). Decode-sized forwards
run the compiled layer (and are captured in the round's graph on a GPU); prefill chunks run the
plain layer eagerly. On a CPU everything runs eagerly and attends only over the columns in use.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from kad.fast.graphs import Graph, compiled_layer, mark_step_dynamic, seconds, static_shapes
from kad.fast.llama import LlamaFamily, layer_forward, rms_norm
from kad.runtime.runner import log_probs


class StaticRunner:
    """The `kad.runtime.runner.Runner` contract over static tensors (module doc)."""

    def __init__(
        self,
        model: PreTrainedModel,
        vocab_size: int,
        rows: int,
        context: int,
        *,
        graphs: bool | None = None,
        compile: bool | None = None,
        net: LlamaFamily | None = None,
    ) -> None:
        """graphs: capture rounds as CUDA graphs (default: on a CUDA device). compile: run the
        decode layers compiled by Inductor (default: with graphs, unless KAD_COMPILE=0).
        net: the model's tensors when they are not the model's own (a tensor-parallel shard,
        `kad.parallel.shard`); its device is the runner's."""
        self.model = model
        self.net = LlamaFamily(model, vocab_size) if net is None else net
        self.vocab_size = vocab_size
        self.device = self.net.device
        self.graphable = self.device.type == "cuda" if graphs is None else graphs
        if compile is None:
            compile = self.graphable and os.environ.get("KAD_COMPILE", "1") != "0"
        self.compiled = compile
        self.layer_fn = compiled_layer() if compile else layer_forward  # decode-sized steps
        self.eager_layer = layer_forward  # prefill chunks
        self.rows, self.context = rows, context
        shape = self.net.kv_shape(rows, context)
        dtype, dev = self.net.dtype, self.device
        self.k = [torch.zeros(shape, dtype=dtype, device=dev) for _ in self.net.layers]
        self.v = [torch.zeros(shape, dtype=dtype, device=dev) for _ in self.net.layers]
        self.lengths = torch.zeros(rows, dtype=torch.long, device=dev)
        self.cos, self.sin = self.net.rope_tables(context)  # [S, D]
        self.columns = torch.arange(context, device=dev)
        self._timings: dict[tuple[int, int], float] = {}

    @property
    def kv_bytes(self) -> int:
        """Bytes of the pool's keys and values."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def forward(self, start, tokens, *, width=None, live=None, heads=True):
        """See `Runner.forward`. Positions past the pool (drafts of a row at its budget's end,
        rows that are not live) are clamped to the last column, which no committed token uses."""
        batch, n = tokens.shape
        width = self.context if width is None else min(width, self.context)
        positions = self.lengths[start : start + batch, None] + torch.arange(
            n, device=self.device
        )  # [B, n]
        cols = positions.clamp(max=width - 1)
        cos = self.cos[cols].unsqueeze(1)  # [B, 1, n, D]
        sin = self.sin[cols].unsqueeze(1)
        mask = (self.columns[:width] <= positions.unsqueeze(-1))[:, None, None]  # [B,1,1,n,W]
        x = F.embedding(tokens.to(self.device), self.net.embed)  # [B, n, E]
        arch = self.net.arch
        decode = n <= 16 and heads
        layer_fn = self.layer_fn if decode else self.eager_layer
        with static_shapes():
            for layer, k, v in zip(self.net.layers, self.k, self.v, strict=True):
                if decode and self.compiled:
                    mark_step_dynamic(x, cols, (cos, sin), mask)
                x = layer_fn(x, layer, k, v, cols, cos, sin, mask, arch, start)
        if not heads:
            return None
        x = rms_norm(x, self.net.norm, arch.eps, arch.weight_first)
        return log_probs(F.linear(x, self.net.head))

    def advance(self, start, counts):
        self.lengths[start : start + counts.shape[0]] += counts

    def move(self, src, dst, used):
        for cache in self.k + self.v:
            cache[dst, :, :used] = cache[src, :, :used]
        self.lengths[dst] = self.lengths[src]
        self.lengths[src] = 0

    def clear(self, slot):
        self.lengths[slot] = 0

    @torch.inference_mode()
    def step_seconds(self, batch: int, n: int = 1) -> float:
        """Measured time of a forward of ``n`` tokens over the first ``batch`` slots (a graph
        replay where rounds are graphs). Its keys and values land past the rows' lengths, where
        the next forward overwrites them."""
        key = (batch, n)
        if key not in self._timings:
            tokens = torch.zeros(batch, n, dtype=torch.long, device=self.device)
            run = lambda: self.forward(0, tokens)  # noqa: E731
            if self.graphable:
                graph = Graph(run, run, self.device)
                self._timings[key] = seconds(graph.replay, self.device)
            else:
                self._timings[key] = seconds(run, self.device, 3)
        return self._timings[key]
