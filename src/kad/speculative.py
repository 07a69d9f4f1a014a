"""Lossless speculative verification with the aligned proxy as drafter (SPEC section 6).

Terms, for one round with draft length γ over a batch of B rows:

- ``q̃_i``  the warped proxy distribution the draft ``x_i`` was sampled from, i = 1..γ;
- ``π̃_i``  the warped target at the same position, built from the base's verify forward;
- a draft is **accepted** with probability ``min(1, π̃_i(x_i) / q̃_i(x_i))``; the first rejection
  stops the round, and the token there is drawn from the **residual** ``norm(max(0, π̃_i − q̃_i))``;
- if all γ drafts are accepted, a **bonus** token is drawn from ``π̃_{γ+1}``.

The emitted tokens are then exactly distributed as plain sampling from π̃ (Leviathan et al.
2023). Under greedy warping both distributions are one-hot, so a draft is accepted iff it is
argmax π and the residual is argmax π: speculative greedy equals plain greedy.
The chance of accepting at a position is ``Σ_v min(π̃_v, q̃_v) = 1 − TV(π̃, q̃)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kad.errors import KadError


def accepted_lengths(
    drafts: torch.Tensor,
    target: torch.Tensor,
    draft_probs: torch.Tensor,
    uniforms: torch.Tensor | None,
) -> torch.Tensor:
    """Number of leading drafts accepted per row ``[B]``.

    drafts ``[B, γ]`` token ids; target ``[B, γ, V]`` = π̃_1..γ; draft_probs ``[B, γ, V]`` = q̃_1..γ;
    uniforms ``[B, γ]`` U[0, 1) draws, one per draft (None: greedy).
    """
    gamma = drafts.shape[1]
    if gamma == 0:
        return torch.zeros(drafts.shape[0], dtype=torch.long, device=drafts.device)
    index = drafts.unsqueeze(-1)
    ratio = target.gather(-1, index).squeeze(-1) / draft_probs.gather(-1, index).squeeze(-1)
    # greedy: one-hot targets, so the ratio is 1 (accept) or 0; else P(u < ratio) = min(1, ratio)
    accept = ratio > 0 if uniforms is None else uniforms < ratio  # [B, γ]
    return accept.long().cumprod(dim=-1).sum(dim=-1)


def next_distribution(
    accepted: torch.Tensor, target: torch.Tensor, draft_probs: torch.Tensor
) -> torch.Tensor:
    """The distribution ``[B, V]`` of the token after the accepted drafts: the residual
    norm(max(0, π̃_i − q̃_i)) at the first rejection i, or π̃_{γ+1} when all were accepted.
    accepted ``[B]``; target ``[B, γ+1, V]``; draft_probs ``[B, γ, V]``.
    """
    rows = torch.arange(target.shape[0], device=target.device)
    at = target[rows, accepted]  # [B, V] π̃ at the first unaccepted position
    gamma = draft_probs.shape[1]
    if gamma > 0:
        drafted = draft_probs[rows, accepted.clamp(max=gamma - 1)]  # [B, V]
        residual = (at - drafted).clamp_min(0.0)
        mass = residual.sum(dim=-1, keepdim=True)
        residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), at)
        at = torch.where((accepted < gamma).unsqueeze(-1), residual, at)
    return at


def acceptance_probability(target: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """1 − TV(π̃, q̃) = Σ_v min(π̃_v, q̃_v) ``[...]``."""
    return torch.minimum(target, draft_probs).sum(dim=-1)


def expected_tokens(acceptance: float, gamma: int) -> float:
    """Tokens emitted by a round of γ drafts when each is accepted with probability a:
    1 + a + … + a^γ = (1 − a^{γ+1}) / (1 − a)."""
    if acceptance >= 1.0:
        return gamma + 1.0
    return (1.0 - acceptance ** (gamma + 1)) / (1.0 - acceptance)


@dataclass
class AutoGamma:
    """Chooses γ round by round to maximise expected tokens per unit of time.

    A round costs (γ + 1) proxy steps and one base verify: t(γ) = (γ + 1) t_q + t_p. With a
    per-position acceptance a, it emits (1 − a^{γ+1}) / (1 − a) tokens. With c = t_q / t_p
    measured, pick γ ∈ [1, γ_max] maximising (1 − a^{γ+1}) / ((1 − a) ((γ + 1) c + 1)).
    a and c are exponential moving averages of what the rounds measured.
    """

    gamma_max: int = 8
    acceptance: float = 0.7
    cost_ratio: float = 0.2
    smoothing: float = 0.3

    def choose(self) -> int:
        def rate(gamma: int) -> float:
            a = min(self.acceptance, 0.999)
            return expected_tokens(a, gamma) / ((gamma + 1) * self.cost_ratio + 1.0)

        gamma = max(range(1, self.gamma_max + 1), key=rate)
        return gamma

    def update(self, acceptance: float, proxy_step_s: float, base_step_s: float) -> None:
        w = self.smoothing
        if not math.isnan(acceptance):
            self.acceptance = (1 - w) * self.acceptance + w * acceptance
        if base_step_s > 0 and proxy_step_s > 0:
            self.cost_ratio = (1 - w) * self.cost_ratio + w * (proxy_step_s / base_step_s)


def parse_speculative(value: int | str | None) -> int | str | None:
    """None or 0 (plain decoding, as the server's ``kad.speculative: 0``), an int γ ≥ 1, or
    "auto"."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        if not text.isdigit():
            raise KadError(f"speculative must be an integer >= 0 or 'auto', got {value!r}")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise KadError(f"speculative must be an integer >= 0 or 'auto', got {value!r}")
    return value or None
