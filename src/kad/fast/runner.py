"""`StaticRunner`: one model's static KV cache over a batch, with `ModelRunner`'s contract.

State, updated in place so that captured CUDA graphs stay valid across steps:

- ``k[l]``, ``v[l]``  the cache of layer l ``[B, Hkv, S, D]``, indexed by slot;
- ``valid`` ``[B, S]``  slots holding one of the row's tokens (prompt padding and rejected drafts
  are holes, as in the engine);
- ``next_pos`` ``[B]``  the row's valid-token count: the RoPE position of its next token;
- ``col`` ``[]``  the first unwritten slot, shared by the batch (a device scalar, so no step
  needs the host); ``length`` is its host copy, kept by whoever moves ``col``.

A step writes slots ``col .. col+n-1`` and shows each new token the valid slots plus the new
slots up to its own. Rollback is free: it only marks slots invalid and moves ``col`` back.
On CUDA, decode-sized forwards replay a CUDA graph of compiled layers; on a CPU the same code
runs eagerly (it must give the engine's greedy tokens).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from kad.engine import left_pad, log_probs, prompt_positions
from kad.fast.graphs import Graph, compiled_layer, mark_step_dynamic, seconds, static_shapes
from kad.fast.llama import LlamaFamily, layer_forward, rms_norm

GRAPH_MAX_TOKENS = 16  # forwards of more tokens (prompt scoring) run eagerly
SLOT_ALIGN = 16
DEFAULT_ROOM = 256  # slots reserved past the prompt when nobody said how many are needed


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class StaticRunner:
    """prefill / forward / rollback / select over a static cache (see the module docstring)."""

    def __init__(
        self,
        model: PreTrainedModel,
        vocab_size: int,
        *,
        graphs: bool | None = None,
        compile: bool | None = None,
    ) -> None:
        """graphs: replay decode steps as CUDA graphs (default: on a CUDA device). compile: run
        the layers compiled by Inductor (default: with graphs, unless KAD_COMPILE=0)."""
        self.model = model
        self.net = LlamaFamily(model, vocab_size)
        self.vocab_size = vocab_size
        self.device = self.net.device
        self.use_graphs = self.device.type == "cuda" if graphs is None else graphs
        if compile is None:
            compile = self.use_graphs and os.environ.get("KAD_COMPILE", "1") != "0"
        self.compiled = compile
        self.layer_fn = compiled_layer() if compile else layer_forward
        self.room = DEFAULT_ROOM
        self.batch = self.slots = self.length = 0
        self.epoch = 0  # bumped whenever the buffers move: graphs over the old ones are stale
        self.graphs: dict[tuple, Graph] = {}
        self._pool = None  # the memory pool of self.graphs
        self._side: torch.cuda.Stream | None = None
        self._timings: dict[tuple, float] = {}
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.valid = torch.zeros(0, 0, dtype=torch.bool, device=self.device)
        self.next_pos = torch.zeros(0, dtype=torch.long, device=self.device)
        self.col = torch.zeros((), dtype=torch.long, device=self.device)

    def reserve(self, tokens: int) -> None:
        """Slots to allocate past the longest prompt at the next prefill."""
        self.room = max(int(tokens), 1)

    # ----- buffers
    def _allocate(self, batch: int, slots: int) -> None:
        shape = self.net.kv_shape(batch, slots)
        dtype, dev = self.net.dtype, self.device
        self.k = [torch.zeros(shape, dtype=dtype, device=dev) for _ in self.net.layers]
        self.v = [torch.zeros(shape, dtype=dtype, device=dev) for _ in self.net.layers]
        self.valid = torch.zeros(batch, slots, dtype=torch.bool, device=dev)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=dev)
        self.cos, self.sin = self.net.rope_tables(slots)  # [S, D]
        self.slot_ids = torch.arange(slots, device=dev)
        self.batch, self.slots = batch, slots
        self._moved()

    def _moved(self) -> None:
        self.epoch += 1
        self.drop_graphs(list(self.graphs))
        self._timings.clear()

    def side_stream(self) -> torch.cuda.Stream:
        """A second CUDA stream of this runner's, kept for its life (graphs captured with work
        on it stay valid)."""
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        return self._side

    def graph_pool(self):
        """The memory pool shared by this runner's graphs (a CUDA graph pool handle)."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def drop_graphs(self, keys: list[tuple]) -> None:
        """Forget these graphs; later captures go to a fresh pool."""
        for key in keys:
            del self.graphs[key]
        if keys:
            self._pool = None

    def ensure_room(self, tokens: int) -> None:
        """Grow the cache (copying it) if ``tokens`` more slots do not fit."""
        if self.length + tokens <= self.slots:
            return
        old_k, old_v, old_valid, old_next = self.k, self.v, self.valid, self.next_pos
        self._allocate(self.batch, _round_up(2 * (self.length + tokens), SLOT_ALIGN))
        used = self.length
        for new, old in zip(self.k + self.v, old_k + old_v, strict=True):
            new[:, :, :used] = old[:, :, :used]
        self.valid[:, :used] = old_valid[:, :used]
        self.next_pos.copy_(old_next)

    # ----- ModelRunner's contract
    @torch.inference_mode()
    def prefill(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Cache every prompt token but the last; return the last ones ``[B]``, still to feed."""
        ids, mask, last = left_pad(rows, self.device)
        batch, width = ids.shape
        need = width + self.room
        if batch != self.batch or need > self.slots:
            self._allocate(batch, _round_up(need, SLOT_ALIGN))
        self.valid.zero_()
        self.valid[:, :width] = mask
        self.next_pos.copy_(mask.sum(dim=-1))
        self.col.fill_(width)
        self.length = width
        if width:
            self._prefill_forward(ids, mask)
        return last

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` ``[B, n]``; return next-token log-probs ``[B, n, V]`` (float32)."""
        tokens = tokens.to(self.device)
        n = tokens.shape[1]
        self.ensure_room(n)
        if self.use_graphs and n <= GRAPH_MAX_TOKENS:
            graph = self.logits_graph(n)
            graph.inputs.copy_(tokens)
            out = graph.replay().clone()
        else:
            out = self.logits(tokens)
        self.advance(n)
        self.length += n
        return out

    @torch.inference_mode()
    def rollback(self, kept: torch.Tensor, span: int, longest: int | None = None) -> None:
        """Of the last ``span`` positions, keep the first ``kept[b]`` of each row ``[B]``.
        ``longest`` = max(kept) when the caller knows it (saves a host read)."""
        if span == 0:
            return
        kept = kept.to(self.device)
        self.retract(kept, span)
        self.length += (int(kept.max()) if longest is None else longest) - span

    @torch.inference_mode()
    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows ``[B']`` (new buffers: graphs are captured again).
        Dropping every row keeps the buffers and graphs for the next prefill of this size."""
        if rows.numel() == 0:
            return
        if rows.numel() == self.batch and torch.equal(rows.cpu(), torch.arange(self.batch)):
            return  # (callers pass host tensors: no device round trip)
        rows = rows.to(self.device)
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]
        self.valid, self.next_pos = self.valid[rows], self.next_pos[rows]
        self.batch = rows.numel()
        self._moved()

    # ----- device-side steps (no host synchronisation)
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Log-probs ``[B, n, V]`` of ``tokens`` ``[B, n]`` fed at slots col.., without
        committing them: keys and values land in slots that stay invalid, so a repeat is
        harmless (timing) and `advance`/`commit` makes them part of the context."""
        n = tokens.shape[1]
        offsets = torch.arange(n, device=self.device)
        slots = self.col + offsets  # [n]
        positions = self.next_pos.unsqueeze(-1) + offsets  # [B, n]
        cos = self.cos[positions].unsqueeze(1)  # [B, 1, n, D]
        sin = self.sin[positions].unsqueeze(1)
        own = (self.slot_ids >= self.col) & (self.slot_ids <= slots.unsqueeze(-1))  # [n, S]
        mask = (self.valid.unsqueeze(1) | own)[:, None, None]  # [B, 1, 1, n, S]
        x = F.embedding(tokens, self.net.embed)  # [B, n, E]
        arch = self.net.arch
        with static_shapes():
            for layer, k, v in zip(self.net.layers, self.k, self.v, strict=True):
                if self.compiled:
                    mark_step_dynamic(x, (k, v), slots, (cos, sin), mask)
                x = self.layer_fn(x, layer, k, v, slots, cos, sin, mask, arch)
        x = rms_norm(x, self.net.norm, arch.eps, arch.weight_first)
        return log_probs(F.linear(x, self.net.head))

    def advance(self, n: int) -> None:
        """Commit the ``n`` tokens of the last `logits` call in every row."""
        cols = self.col + torch.arange(n, device=self.device)
        self.valid.index_fill_(1, cols, True)
        self.next_pos += n
        self.col += n

    def commit(self, kept: torch.Tensor, span: int) -> None:
        """Commit the first ``kept[b]`` ``[B]`` of the ``span`` tokens of the last `logits` call."""
        offsets = torch.arange(span, device=self.device)
        self.valid.index_copy_(1, self.col + offsets, offsets < kept.unsqueeze(-1))
        self.next_pos += kept
        self.col += kept.max()

    def retract(self, kept: torch.Tensor, span: int) -> None:
        """Of the last ``span`` committed slots, keep the first ``kept[b]`` ``[B]`` of each row;
        slots rejected by every row are freed."""
        offsets = torch.arange(span, device=self.device)
        self.valid.index_copy_(1, self.col - span + offsets, offsets < kept.unsqueeze(-1))
        self.next_pos += kept - span
        self.col += kept.max() - span

    # ----- graphs and timings
    def logits_graph(self, n: int) -> Graph:
        """The graph of `logits` for ``n`` tokens at the current batch size; its input
        buffer is ``graph.inputs`` ``[B, n]``."""
        key = ("logits", self.batch, n)
        if key not in self.graphs:
            tokens = torch.zeros(self.batch, n, dtype=torch.long, device=self.device)
            run = lambda: self.logits(tokens)  # noqa: E731
            self.graphs[key] = Graph(run, run, self.device, tokens, self.graph_pool())
        return self.graphs[key]

    @torch.inference_mode()
    def step_seconds(self, n: int = 1) -> float:
        """Measured time of one `logits` call of ``n`` tokens at the current batch size."""
        key = (self.batch, n)
        if key not in self._timings:
            if self.use_graphs:
                graph = self.logits_graph(n)
                self._timings[key] = seconds(graph.replay, self.device)
            else:
                tokens = torch.zeros(self.batch, n, dtype=torch.long, device=self.device)
                self._timings[key] = seconds(lambda: self.logits(tokens), self.device, 3)
        return self._timings[key]

    def state(self) -> list[torch.Tensor]:
        """The tensors a round mutates besides the cache (for warm-ups that must undo it)."""
        return [self.valid, self.next_pos, self.col]

    # ----- prefill
    def _prefill_forward(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Cache the prompt ``ids`` ``[B, w]`` (left-padded; ``mask`` marks real tokens) in one
        eager pass over slots 0..w-1. A pad slot sees itself, so no softmax row is empty."""
        width = ids.shape[1]
        positions = prompt_positions(mask)  # [B, w]
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        slots = torch.arange(width, device=self.device)
        causal = slots.unsqueeze(-1) >= slots  # [w, w] query i sees j <= i
        visible = (mask.unsqueeze(1) & causal) | torch.eye(
            width, dtype=torch.bool, device=self.device
        )
        visible = visible[:, None, None]  # [B, 1, 1, w, w]
        x = F.embedding(ids, self.net.embed)
        for layer, k, v in zip(self.net.layers, self.k, self.v, strict=True):
            x = layer_forward(
                x, layer, k[:, :, :width], v[:, :, :width], slots, cos, sin, visible, self.net.arch
            )
