"""Warping and sampling of a target distribution, per row, with no host synchronisation.

Warping (SPEC section 5) applies to the target π after mixing: temperature T, then top-k, then
top-p. T = 0 is greedy: the warped target is the one-hot of argmax π (lowest id among ties), so
greedy decoding and speculative verification are the same code as sampling.

Randomness comes from counter-based uniforms (`counter_uniform`): a pure function of (seed,
counter, stream), one stream per row, so a row's draws do not depend on its batch or on when it
joined, and a round captured as a CUDA graph draws fresh numbers at every replay with no
generator state. Tokens are drawn by inverse CDF (`sample_inverse_cdf`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kad.errors import KadError

SEED_LIMIT = 2**63  # seeds are int64 on the device


@dataclass(frozen=True)
class Warp:
    """Sampling parameters: temperature (0 = greedy), top_k (0 = off), top_p (1 = off)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        number = (int, float)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, number):
            raise KadError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not self.temperature >= 0 or math.isinf(self.temperature):
            raise KadError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise KadError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, number):
            raise KadError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise KadError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def cuts(self) -> bool:
        """Whether top-k or top-p removes tokens (a sort over the vocabulary)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)

    @property
    def tempers(self) -> bool:
        """Whether the temperature reshapes π (a softmax over the vocabulary): T ∉ {0, 1}."""
        return not self.greedy and self.temperature != 1.0

    def row(self) -> list[float]:
        """The row of a batch's warp table: temperature, top_k, top_p."""
        return [float(self.temperature), float(self.top_k), float(self.top_p)]

    def __call__(self, probs: torch.Tensor) -> torch.Tensor:
        """The warped distribution ``[..., V]`` of probabilities ``[..., V]``."""
        table = torch.tensor([self.row()], dtype=torch.float32, device=probs.device)
        flat = probs.reshape(1, -1, probs.shape[-1])
        return warp_rows(flat, table, self.cuts, self.tempers).reshape(probs.shape)


def warp_rows(
    probs: torch.Tensor, table: torch.Tensor, cut: bool = True, temper: bool = True
) -> torch.Tensor:
    """Each row's warped distribution: probs ``[B, ..., V]``, ``table`` ``[B, 3]`` rows of
    `Warp.row` (temperature, top_k, top_p).

    softmax(log π / T), then the k most probable tokens (k > 0), then the smallest prefix of
    the rest by probability whose mass reaches top_p; greedy rows (T = 0) get the one-hot of
    argmax π (lowest id among ties). ``cut`` False skips top-k and top-p (no row uses them),
    ``temper`` False the softmax (every row has T = 0 or 1); a row that needs neither gets the
    same probabilities either way."""
    shape = (table.shape[0],) + (1,) * (probs.dim() - 1)
    temperature, top_k, top_p = (table[:, i].reshape(shape) for i in range(3))
    greedy = temperature == 0
    scale = torch.where(greedy, torch.ones_like(temperature), temperature)
    warped = probs
    if temper:
        warped = torch.softmax(torch.log(probs) / scale, dim=-1)
        warped = torch.where(scale == 1, probs, warped)  # softmax(log π) is π: keep it exact
    if cut:
        ordered, order = torch.sort(warped, dim=-1, descending=True, stable=True)
        rank = torch.arange(probs.shape[-1], device=probs.device)
        in_k = (top_k <= 0) | (rank < top_k)  # [B, ..., V] in sorted order
        kept = ordered * in_k
        before = (torch.cumsum(kept, dim=-1) - kept) / kept.sum(dim=-1, keepdim=True)
        keep_sorted = in_k & (before < top_p)  # always keeps the first token
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        kept = warped * keep
        cuts = (top_k > 0) | (top_p < 1)  # [B, 1, ..]
        warped = torch.where(cuts, kept / kept.sum(dim=-1, keepdim=True), warped)
    one_hot = torch.zeros_like(probs).scatter_(-1, probs.argmax(dim=-1, keepdim=True), 1.0)
    return torch.where(greedy, one_hot, warped)


def check_seed(seed: object) -> int:
    """A seed is an integer in [0, 2^63); anything else is a KadError."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise KadError(f"seed must be an integer in [0, 2^63), got {seed!r}")
    return seed


def row_seed(seed: int, row: int) -> int:
    """The seed of row ``row`` of a batch seeded with one int: the seed itself for row 0 (so
    row 0 equals the prompt run alone), a splitmix64 hash of (seed, row) for the others."""
    if row == 0:
        return seed
    z = (seed + row * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) % SEED_LIMIT


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
