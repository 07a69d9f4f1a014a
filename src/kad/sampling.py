"""Warping and sampling of a target distribution, per row, with no host synchronisation.

Warping (SPEC section 5) applies to the target π after mixing: temperature T, then top-k, then
top-p. T = 0 is greedy: the warped target is the one-hot of argmax π (lowest id among ties), so
greedy decoding and speculative verification are the same code as sampling.

Two sources of randomness, both one stream per row (a row's draws do not depend on its batch):
- per-row `torch.Generator`s (`make_generators`, `sample`, `uniform`): the engine's round;
- counter-based uniforms (`counter_uniform`): a pure function of (seed, counter, stream), so a
  round captured as a CUDA graph draws fresh numbers at every replay with no generator state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kad.errors import KadError


@dataclass(frozen=True)
class Warp:
    """Sampling parameters: temperature (0 = greedy), top_k (0 = off), top_p (1 = off)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise KadError(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise KadError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise KadError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def __call__(self, probs: torch.Tensor) -> torch.Tensor:
        """The warped distribution ``[..., V]`` of probabilities ``[..., V]``."""
        if self.greedy:
            top = probs.argmax(dim=-1, keepdim=True)
            return torch.zeros_like(probs).scatter_(-1, top, 1.0)
        warped = probs  # T = 1 and no top-k: softmax(log p) is p, so skip both passes over V
        cut = bool(self.top_k) and self.top_k < probs.shape[-1]
        if self.temperature != 1.0 or cut:
            logits = torch.log(probs)
            if self.temperature != 1.0:
                logits = logits / self.temperature
            if cut:
                kth = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
                logits = logits.masked_fill(logits < kth, -torch.inf)
            warped = torch.softmax(logits, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = torch.sort(warped, dim=-1, descending=True)
            before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass strictly above
            drop_sorted = before >= self.top_p  # always keeps the first token
            drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
            warped = warped.masked_fill(drop, 0.0)
            warped = warped / warped.sum(dim=-1, keepdim=True)
        return warped


def make_generators(seeds: list[int], device: torch.device) -> list[torch.Generator]:
    """One generator per row, so that a row's samples do not depend on its batch."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def sample(probs: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
    """One token per row of ``probs`` ``[B, V]`` -> ``[B]``, by the exponential race
    argmax_v p_v / E_v with E_v ~ Exp(1) (an exact sample of p, no host sync).
    With no generators (greedy: one-hot rows), the argmax."""
    if generators is None:
        return probs.argmax(dim=-1)
    noise = torch.stack(
        [torch.empty_like(probs[0]).exponential_(generator=g) for g in generators]
    )  # [B, V]
    return (probs / noise).argmax(dim=-1)


def uniform(generators: list[torch.Generator], device: torch.device) -> torch.Tensor:
    """One U(0, 1) draw per row ``[B]``."""
    return torch.cat([torch.rand(1, generator=g, device=device) for g in generators])


_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2³² for x in [0, 2³²) as int64, without int64 overflow (c split in halves)."""
    low = x * (c & 0xFFFF)
    high = ((x * (c >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche (xor-shift-multiply, "lowbias32")."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(
    seeds: torch.Tensor, counters: torch.Tensor, streams: torch.Tensor | int
) -> torch.Tensor:
    """U[0, 1) draws, a pure function of each (seed, counter, stream), int64 tensors that
    broadcast together (e.g. ``[B, 1]``, ``[B, 1]``, ``[S]`` -> ``[B, S]``): equal inputs give
    equal draws, and distinct ones independent-looking draws. 24 random bits per draw, as
    torch.rand gives float32."""
    h = _mix32((seeds & _MASK32) ^ 0x9E3779B9)  # constants: no input maps to a fixed point
    h = _mix32(h ^ ((seeds >> 32) & _MASK32) ^ 0x85EBCA6B)
    h = _mix32(h ^ (counters & _MASK32) ^ 0xC2B2AE35)
    h = _mix32(h ^ (streams & _MASK32) ^ 0x27D4EB2F)
    return (h >> 8).to(torch.float32) * 2.0**-24


def sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token ``[B]`` whose cumulative-probability interval holds u · Σp, for probabilities
    ``[B, V]`` and uniforms u ``[B]``: an exact draw from p up to float32 rounding of the
    cumulative sum. Tokens of probability 0 are never drawn."""
    cdf = probs.cumsum(dim=-1)  # [B, V]
    point = (u * cdf[:, -1]).unsqueeze(-1)  # [B, 1]
    token = torch.searchsorted(cdf, point, right=True).squeeze(-1)  # first cdf > point
    ids = torch.arange(probs.shape[-1], device=probs.device)
    last = torch.where(probs > 0, ids, 0).amax(dim=-1)  # a rounding overshoot lands here
    return torch.minimum(token, last)
