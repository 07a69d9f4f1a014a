"""`StaticRunner`: one model's slot pool as static tensors, run by the compact Llama forward.

State, allocated once and updated in place so that captured CUDA graphs stay valid:

- ``keys``, ``values`` ``[L, R + 1, Hkv, S, D]``, viewed per layer as ``k[l]``, ``v[l]``: slot
  r's token at position t lives at column t (slot R is the scratch slot, below);
- ``lengths`` ``[R + 1]``  tokens committed per slot (`kad.runtime.runner` explains the
  contract; the scratch slot's stays 0);
- ``cos``, ``sin`` ``[S, D]``  the model's own RoPE tables for positions 0..S−1.

A forward over slots start..start+B−1 is a view of the first dimension, so the rows of a batch
are the pool's first rows (the scheduler keeps the occupied slots packed). Decode-sized forwards
run the compiled layer (and are captured in the round's graph on a GPU). On a CPU everything
runs eagerly and attends only over the columns in use.

**Prefill on a GPU** runs as CUDA graphs too, one per (rows, tokens, width) bucket
(`PREFILL_ROWS` × `PREFILL_TOKENS` within `PREFILL_AREA` padded tokens, `width_buckets` of the
context): an eager forward launches hundreds of kernels per model, tens of milliseconds of
Python each time a request joins. A row of a bucket is a piece of a chunk: a prompt of a short
row goes in pieces of 16 tokens (`PREFILL_PIECE`), through the compiled decode layer and
attention kernel, padded to a multiple of 16 only; a chunk of a long row is one piece. A graph
reads each piece's slot and first column from buffers, so pieces need not be consecutive slots;
padding rows point at one scratch slot past the pool (index R), which no sequence uses. Chunks
too long for a bucket run eagerly (they are compute-bound).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from kad.fast.graphs import (
    Graph,
    compiled_layer,
    compiled_log_probs,
    mark_rows_dynamic,
    mark_step_dynamic,
    seconds,
    static_shapes,
    to_device,
)
from kad.fast.llama import DECODE_TOKENS, LlamaFamily, layer_forward, rms_norm
from kad.runtime.runner import log_probs, prefill_in_runs

PREFILL_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)  # pieces of one graphed prefill
PREFILL_TOKENS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
PREFILL_AREA = 512  # padded tokens (rows × tokens) of one graphed prefill
PREFILL_PIECE = DECODE_TOKENS  # a chunk's piece: the compiled decode layer and attention kernel
PIECE_COLUMNS = 1024  # chunks go in pieces while their row stays within this many columns
MIN_WIDTH = 256  # the narrowest width bucket of a graph


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
        """graphs: capture rounds (and prefill) as CUDA graphs (default: on a CUDA device).
        compile: run the decode layers compiled by Inductor (default: with graphs, unless
        KAD_COMPILE=0). net: the model's tensors when they are not the model's own (a
        tensor-parallel shard, `kad.parallel.shard`); its device is the runner's."""
        self.model = model
        self.net = LlamaFamily(model, vocab_size) if net is None else net
        self.vocab_size = vocab_size
        self.device = self.net.device
        if self.device.type == "cuda":
            from kad.fast import triton_attention  # noqa: F401  (registers kad::decode_attention)
        self.graphable = self.device.type == "cuda" if graphs is None else graphs
        if compile is None:
            compile = self.graphable and os.environ.get("KAD_COMPILE", "1") != "0"
        self.compiled = compile
        self.layer_fn = compiled_layer() if compile else layer_forward  # decode-sized steps
        self.eager_layer = layer_forward  # prefill chunks
        self.rows, self.context = rows, context
        scratch = 1  # slot R: where the padding rows of bucketed prefills write
        shape = self.net.kv_shape(rows + scratch, context)
        dtype, dev = self.net.dtype, self.device
        layers = len(self.net.layers)
        self.keys = torch.zeros(layers, *shape, dtype=dtype, device=dev)  # [L, R+1, Hkv, S, D]
        self.values = torch.zeros_like(self.keys)
        self.k, self.v = list(self.keys), list(self.values)  # per-layer views
        self.lengths = torch.zeros(rows + scratch, dtype=torch.long, device=dev)
        self.cos, self.sin = self.net.rope_tables(context)  # [S, D]
        self.columns = torch.arange(context, device=dev)
        self._timings: dict[tuple[int, int], float] = {}
        self.graph_pool: object = None  # the runtime's pool, shared by all its graphs
        self._prefills: dict[tuple[int, int, int], Graph] = {}

    @property
    def kv_bytes(self) -> int:
        """Bytes of the pool's keys and values."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    def forward(self, start, tokens, *, width=None, live=None, heads=True):
        """See `Runner.forward`. Positions past the pool (drafts of a row at its budget's end,
        rows that are not live) are clamped to the last column, which no committed token uses."""
        batch = tokens.shape[0]
        width = self.context if width is None else min(width, self.context)
        x = self._layers(self.lengths[start : start + batch], tokens, width, start, None, heads)
        if not heads:
            return None
        arch = self.net.arch
        x = rms_norm(x, self.net.norm, arch.eps, arch.weight_first)
        logits = F.linear(x, self.net.head)  # [B, n, V]
        if self.compiled and tokens.shape[1] <= DECODE_TOKENS:
            with static_shapes():
                return compiled_log_probs()(mark_rows_dynamic(logits))
        return log_probs(logits)

    def _layers(
        self,
        lengths: torch.Tensor,
        tokens: torch.Tensor,
        width: int,
        start: int,
        slots: torch.Tensor | None,
        decode: bool,
    ) -> torch.Tensor:
        """The decoder layers over ``tokens`` ``[B, n]`` of rows whose lengths are ``lengths``
        ``[B]``: rows start.. or ``slots``; returns the last hidden states ``[B, n, E]``.
        ``decode``: a step of a round, which runs the compiled layer (when n ≤ DECODE_TOKENS)."""
        n = tokens.shape[1]
        positions = lengths[:, None] + torch.arange(n, device=self.device)  # [B, n]
        cols = positions.clamp(max=width - 1)
        cos = self.cos[cols].unsqueeze(1)  # [B, 1, n, D]
        sin = self.sin[cols].unsqueeze(1)
        mask = (self.columns[:width] <= positions.unsqueeze(-1))[:, None, None]  # [B,1,1,n,W]
        x = F.embedding(tokens.to(self.device), self.net.embed)  # [B, n, E]
        arch = self.net.arch
        compiled = decode and n <= DECODE_TOKENS and self.compiled
        layer_fn = self.layer_fn if compiled else self.eager_layer
        with static_shapes():
            for layer, k, v in zip(self.net.layers, self.k, self.v, strict=True):
                if compiled:
                    mark_step_dynamic(x, cols, (cos, sin), mask)
                x = layer_fn(x, layer, k, v, cols, cos, sin, mask, arch, start, slots)
        return x

    def prefill(self, chunks, cached):
        """See `Runner.prefill`: graphed on a GPU where the chunks fit a bucket (module doc)."""
        if not self.graphable:
            return prefill_in_runs(self, chunks, cached)
        self.bucketed_prefill(chunks, cached, self.prefill_graph)

    def bucketed_prefill(
        self,
        chunks: dict[int, list[int]],
        cached: dict[int, int],
        program: Callable[[int, int, int], Graph | Program],
    ) -> None:
        """Prefill by (pieces, tokens, width) buckets, each run by ``program(rows, n, width)``
        (a captured graph, or the same program run eagerly); longer chunks run eagerly.

        A chunk whose row stays within `PIECE_COLUMNS` goes in pieces of `PREFILL_PIECE` tokens
        (each a row of the bucket, at its own columns of the slot): they run the compiled
        decode layer and attention kernel, and a chunk is padded to a multiple of 16 tokens
        rather than to the token bucket of the longest chunk beside it. Pieces of one slot see
        each other: every layer writes all keys before it attends."""
        parts = [piece for slot, chunk in chunks.items() for piece in _pieces(slot, chunk, cached)]
        small = [piece for piece in parts if len(piece.tokens) <= PREFILL_TOKENS[-1]]
        if len(small) < len(parts):
            long = {p.slot: p.tokens for p in parts if len(p.tokens) > PREFILL_TOKENS[-1]}
            prefill_in_runs(self, long, cached)
        for group in _groups(small):
            rows = _fit(len(group), PREFILL_ROWS)
            n = _fit(len(group[0].tokens), PREFILL_TOKENS)
            step = program(rows, n, fit_width(self.context, max(p.start for p in group) + n))
            slots, starts, tokens, counts = step.inputs
            host = torch.zeros(4, rows, n, dtype=torch.long)  # slots, starts, counts, tokens
            host[0].fill_(self.rows)
            for b, piece in enumerate(group):
                host[0, b], host[1, b], host[2, b] = piece.slot, piece.start, len(piece.tokens)
                host[3, b, : len(piece.tokens)] = torch.tensor(piece.tokens)
            host = to_device(host, self.device)
            slots.copy_(host[0, :, 0])
            starts.copy_(host[1, :, 0])
            counts.copy_(host[2, :, 0])
            tokens.copy_(host[3])
            step.replay()

    def prefill_program(self, rows: int, n: int, width: int) -> Program:
        """The prefill of ``rows`` pieces × ``n`` tokens over ``width`` columns, on buffers:
        slots ``[rows]`` (padding: the scratch slot R), starts ``[rows]`` (each piece's first
        column), tokens ``[rows, n]``, counts ``[rows]`` (the real tokens of each piece,
        committed). Only the scratch slot is written while the buffers hold their initial
        values, so a warm-up run changes nothing."""
        dev = self.device
        slots = torch.full((rows,), self.rows, dtype=torch.long, device=dev)
        starts = torch.zeros(rows, dtype=torch.long, device=dev)
        tokens = torch.zeros(rows, n, dtype=torch.long, device=dev)
        counts = torch.zeros(rows, dtype=torch.long, device=dev)

        def run() -> None:
            self._layers(starts, tokens, width, 0, slots, True)
            self.lengths.index_add_(0, slots, counts)

        return Program(run, (slots, starts, tokens, counts))

    def prefill_graph(self, rows: int, n: int, width: int) -> Graph:
        """`prefill_program` captured (once per bucket)."""
        key = (rows, n, width)
        if key not in self._prefills:
            program = self.prefill_program(rows, n, width)
            self._prefills[key] = Graph(
                program.run, program.run, self.device, inputs=program.inputs, pool=self.graph_pool
            )
        return self._prefills[key]

    def prefill_buckets(self) -> list[tuple[int, int, int]]:
        """Every (rows, tokens, width) bucket a graphed prefill may take (none off the GPU)."""
        if not self.graphable:
            return []
        return [
            (rows, n, width)
            for rows in PREFILL_ROWS
            for n in PREFILL_TOKENS
            for width in width_buckets(self.context)
            if rows * n <= PREFILL_AREA and fit_width(self.context, n) <= width
        ]

    def advance(self, start, counts):
        self.lengths[start : start + counts.shape[0]] += counts

    def move(self, src, dst, used):
        for cache in (self.keys, self.values):  # every layer in one copy
            cache[:, dst, :, :used] = cache[:, src, :, :used]
        self.lengths[dst] = self.lengths[src]
        self.lengths[src].fill_(0)  # fill_: `t[i] = 0` would wait for the device

    def clear(self, slot):
        self.lengths[slot].fill_(0)

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


class Program(NamedTuple):
    """A function over fixed buffers, run eagerly: `Graph`'s interface without the capture."""

    run: Callable[[], None]
    inputs: tuple[torch.Tensor, ...]

    def replay(self) -> None:
        self.run()


def width_buckets(context: int) -> list[int]:
    """The attention widths graphs are captured for: the context and its power-of-4 fractions
    down to `MIN_WIDTH`, smallest first (a graph attends over its bucket's columns only)."""
    widths = [context]
    while widths[-1] // 4 >= MIN_WIDTH:
        widths.append(widths[-1] // 4)
    return widths[::-1]


def fit_width(context: int, need: int) -> int:
    """The narrowest width bucket that holds ``need`` columns (the context at most)."""
    return next((w for w in width_buckets(context) if w >= need), context)


def _fit(value: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds ``value`` (``value`` ≤ the last bucket)."""
    return next(b for b in buckets if b >= value)


class Piece(NamedTuple):
    """Tokens of one slot's chunk cached by one row of a prefill, from column ``start``."""

    slot: int
    start: int
    tokens: list[int]


def _pieces(slot: int, chunk: list[int], cached: dict[int, int]) -> list[Piece]:
    """The chunk in pieces of `PREFILL_PIECE` tokens while its row stays within
    `PIECE_COLUMNS` columns (a piece's attention reads its row's columns), else whole."""
    start = cached[slot]
    size = PREFILL_PIECE if start + len(chunk) <= PIECE_COLUMNS else len(chunk)
    return [Piece(slot, start + i, chunk[i : i + size]) for i in range(0, len(chunk), size)]


def _groups(pieces: list[Piece]) -> list[list[Piece]]:
    """Pieces grouped for graphed prefills, longest first: a group grows while its padded
    area (row bucket × token bucket of its longest piece) stays within `PREFILL_AREA`."""
    groups: list[list[Piece]] = []
    for piece in sorted(pieces, key=lambda p: -len(p.tokens)):
        if groups:
            group = groups[-1]
            longest = _fit(len(group[0].tokens), PREFILL_TOKENS)
            rows = len(group) + 1
            if rows <= PREFILL_ROWS[-1] and _fit(rows, PREFILL_ROWS) * longest <= PREFILL_AREA:
                group.append(piece)
                continue
        groups.append([piece])
    return groups
