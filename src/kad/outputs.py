"""What decoding returns: a generation per prompt, its statistics, and streaming events."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class GenerationStats:
    """Per-sequence statistics (SPEC sections 5 and 6).

    deferral_rate: share of steps with α > 0; mean_alpha: mean mass taken from the base;
    mean_tv: mean TV(π, q*); mean_unfilled: mean unused budget b − α (primal rule only).
    Rules without α (implicit reward) leave the α fields None. With speculative decoding:
    acceptance (accepted drafts / drafted), mean_accepted (drafts accepted per round),
    accepted_hist (rounds by number accepted, index 0..γ), tokens_per_base_forward, and
    predicted_acceptance (mean 1 − TV(π̃, q̃) over verified positions).
    """

    tokens: int = 0
    deferral_rate: float | None = None
    mean_alpha: float | None = None
    mean_tv: float | None = None
    mean_unfilled: float | None = None
    base_forwards: int = 0
    tokens_per_base_forward: float | None = None
    rounds: int | None = None
    drafted: int | None = None
    accepted: int | None = None
    acceptance: float | None = None
    mean_accepted: float | None = None
    accepted_hist: list[int] | None = None
    predicted_acceptance: float | None = None
    gamma_mean: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Generation:
    """One prompt's continuation.

    proxy_share: per generated token, the share of its probability under π that came from the
    proxy, α q*_v / π_v (0 = kept from the base, 1 = all deferred; NaN for rules without α).
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats
    proxy_share: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The fields, JSON-ready: NaN (proxy_share of rules without α) becomes None."""
        return jsonable(
            {
                "text": self.text,
                "token_ids": self.token_ids,
                "finish_reason": self.finish_reason,
                "proxy_share": self.proxy_share,
                "stats": self.stats.to_dict(),
            }
        )


@dataclass(frozen=True)
class StepEvent:
    """New output of one row after a decoding step: its new tokens and the text they complete."""

    row: int
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None = None


def jsonable(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
