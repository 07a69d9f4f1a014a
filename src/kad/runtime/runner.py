"""One model's KV cache over the slot pool, behind one interface (`Runner`).

A runner owns ``rows`` slots of ``context`` tokens each, allocated once. Slot r holds one
sequence's tokens at columns 0..len_r − 1 (``lengths`` ``[R]``), so a token's column is its RoPE
position. A forward writes its n tokens at columns len_r .. len_r + n − 1 and shows each token
the columns up to its own; nothing is committed until `advance` moves ``lengths``. Rollback is
free: rejected drafts lie past ``len_r`` and are overwritten by the next forward.

Two implementations:
- `kad.fast.runner.StaticRunner`: the compact Llama-family forward over static tensors, eager on
  a CPU and captured in CUDA graphs on a GPU (`graphable`);
- `TransformersRunner` (here): transformers' own forward and cache for any other architecture
  (and for models spread over several devices), one slot at a time, eager only.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import Protocol

import torch
from transformers import PreTrainedModel


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax in float32 ``[..., V]``; NaN logits count as −inf, and a row with no finite
    logit becomes uniform rather than NaN."""
    logits = logits.float()
    logits = torch.where(torch.isnan(logits), -torch.inf, logits)
    dead = torch.isneginf(logits).all(dim=-1, keepdim=True)
    logits = torch.where(dead, torch.zeros_like(logits), logits)
    return torch.log_softmax(logits, dim=-1)


class Runner(Protocol):
    """What the round and the scheduler need from one model's cache (module doc). A base
    runner may also have ``agree(tensor) -> tensor`` (tensor parallelism: rank 0's values on
    every rank), which the round then calls on its drafts and decisions."""

    rows: int
    context: int
    vocab_size: int
    device: torch.device
    lengths: torch.Tensor  # [R] long: tokens committed per slot
    graphable: bool  # its forward can be captured in a CUDA graph

    def forward(
        self,
        start: int,
        tokens: torch.Tensor,
        *,
        width: int | None = None,
        live: Sequence[int] | None = None,
        heads: bool = True,
    ) -> torch.Tensor | None:
        """Write ``tokens`` ``[B, n]`` into slots start..start+B−1 at their lengths; return the
        next-token log-probs ``[B, n, V]`` (float32; None when not ``heads``). ``width``: the
        columns attention may read (the host's bound on len + n; None: all). ``live``: the
        batch rows whose outputs matter (a runner may skip the others)."""
        ...

    def prefill(self, chunks: dict[int, list[int]], cached: dict[int, int]) -> None:
        """Cache and commit prompt tokens: slot -> its next tokens, written at its length
        (``cached[slot]`` tokens, the host's copy of it); no log-probs."""
        ...

    def advance(self, start: int, counts: torch.Tensor) -> None:
        """lengths[start : start + B] += counts ``[B]`` (long; negative rolls back)."""
        ...

    def move(self, src: int, dst: int, used: int) -> None:
        """Copy slot ``src``'s first ``used`` columns and length to slot ``dst``."""
        ...

    def clear(self, slot: int) -> None:
        """Empty a slot (length 0)."""
        ...


def prefill_in_runs(runner: Runner, chunks: dict[int, list[int]], cached: dict[int, int]) -> None:
    """`Runner.prefill` by eager forwards: runs of consecutive slots go through one forward,
    their chunks right-padded (padding lies past the committed length, so it is never read)."""
    for start, run in consecutive_runs(sorted(chunks)):
        width = max(len(chunks[s]) for s in run)
        tokens = torch.zeros(len(run), width, dtype=torch.long)
        for b, slot in enumerate(run):
            tokens[b, : len(chunks[slot])] = torch.tensor(chunks[slot])
        counts = torch.tensor([len(chunks[s]) for s in run])
        bound = max(cached[s] for s in run) + width
        runner.forward(
            start, tokens.to(runner.device), width=bound, live=range(len(run)), heads=False
        )
        runner.advance(start, counts.to(runner.device))


def consecutive_runs(slots: Sequence[int]) -> list[tuple[int, list[int]]]:
    """Sorted slots grouped in runs of consecutive ones: [(first slot, the run), ...]."""
    runs: list[tuple[int, list[int]]] = []
    for slot in slots:
        if runs and runs[-1][1][-1] == slot - 1:
            runs[-1][1].append(slot)
        else:
            runs.append((slot, [slot]))
    return runs


@functools.cache
def _cache_keyword(model_type: type) -> str:
    """transformers ≥ 5.24 calls the cache argument ``cache``; earlier, ``past_key_values``."""
    return (
        "cache"
        if "cache" in inspect.signature(model_type.forward).parameters
        else ("past_key_values")
    )


@functools.cache
def _crop_takes_a_count(cache_type: type) -> bool:
    """transformers ≥ 5.23: ``crop(tokens_to_remove)`` (negative); before: ``crop(max_length)``."""
    return "tokens_to_remove" in inspect.signature(cache_type.crop).parameters


def _crop(cache, length: int) -> None:
    """Cut a transformers cache back to ``length`` tokens."""
    current = cache.get_seq_length()
    if length >= current:
        return
    if _crop_takes_a_count(type(cache)):
        cache.crop(length - current)
    else:
        cache.crop(length)


class TransformersRunner:
    """The `Runner` contract over transformers' forward: one transformers cache per slot, each
    forward running the live rows one at a time (so any architecture works, at batch-1 speed)."""

    graphable = False

    def __init__(self, model: PreTrainedModel, vocab_size: int, rows: int, context: int) -> None:
        self.model = model
        self.vocab_size = vocab_size
        self.rows, self.context = rows, context
        self.device = model.get_input_embeddings().weight.device
        self.lengths = torch.zeros(rows, dtype=torch.long, device=self.device)
        self._host = [0] * rows  # host copy of lengths
        self._caches: list = [None] * rows
        self._keyword = _cache_keyword(type(model))

    def forward(self, start, tokens, *, width=None, live=None, heads=True):
        batch, n = tokens.shape
        out = torch.zeros(batch, n, self.vocab_size, device=self.device)
        for b in range(batch) if live is None else live:
            slot = start + b
            positions = torch.arange(n, device=self.device).unsqueeze(0) + self._host[slot]
            result = self.model(
                input_ids=tokens[b : b + 1].to(self.device),
                position_ids=positions,
                use_cache=True,
                **{self._keyword: self._caches[slot]},
            )
            self._caches[slot] = getattr(result, "cache", None) or result.past_key_values
            if heads:
                out[b] = log_probs(result.logits[0, :, : self.vocab_size])
        return out if heads else None

    def prefill(self, chunks, cached):
        prefill_in_runs(self, chunks, cached)

    def advance(self, start, counts):
        for b, step in enumerate(counts.tolist()):
            slot = start + b
            self._host[slot] += int(step)
            if self._caches[slot] is not None:
                _crop(self._caches[slot], self._host[slot])
        self.lengths[start : start + counts.shape[0]] += counts.to(self.device)

    def move(self, src, dst, used):
        self._caches[dst], self._caches[src] = self._caches[src], None
        self._host[dst], self._host[src] = self._host[src], 0
        self.lengths[dst] = self.lengths[src]
        self.lengths[src] = 0

    def clear(self, slot):
        self._caches[slot] = None
        self._host[slot] = 0
        self.lengths[slot] = 0
