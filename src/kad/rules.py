"""Deferral rules and baselines: how the target distribution π is built from the models'.

Terms (SPEC sections 2-4), for one decoding position and a vocabulary of V tokens:

- ``p``   the base model's next-token distribution ``[..., V]``;
- ``q``   the aligned proxy's (q* in the paper) ``[..., V]``;
- ``q_base`` the proxy's own unaligned base (only for the implicit-reward baseline);
- ``d``   a deferral vector in {0,1}^V: d_v = 1 hands the mass of token v over to the proxy;
- ``α = Σ_v p_v d_v``, the mass taken from p;
- ``π_v = p_v (1 − d_v) + α q_v``, the token-specific mixture.

Choosing d is a 0-1 knapsack: minimise the risk ``r(d) = Σ_v p_v ℓ(p, v) (1 − d_v)`` under
``Σ_v p_v d_v ≤ b``. Items are tokens with value ``p_v ℓ(p, v)`` and weight ``p_v``.

Every rule is a small frozen object with ``.mix(p, q, q_base) -> Mix`` (π plus per-position
statistics) and ``.target(p, q, q_base) -> π``. Deferral rules also have ``.defer(p) -> d``.
Rules are pure tensor functions: they never see a model, a tokenizer or a cache.
All inputs are probabilities (float32, rows summing to 1).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, NamedTuple, Protocol, get_args, runtime_checkable

import torch

from kad.errors import KadError

Loss = Literal["nll", "squared", "margin", "zero_one"]
LOSSES: tuple[str, ...] = get_args(Loss)
BUDGET_ROUNDING = 1e-6  # float32 sums of a distribution stray from 1 by about this much


class Mix(NamedTuple):
    """One mixing step: the target and what it cost.

    pi:       the target distribution π ``[..., V]``.
    alpha:    mass taken from p and given to the proxy ``[...]``; NaN where the rule has no α
              (implicit reward).
    unfilled: for the primal rule, the unused budget ``b − α`` ``[...]``; otherwise None.
    """

    pi: torch.Tensor
    alpha: torch.Tensor
    unfilled: torch.Tensor | None = None


@runtime_checkable
class Rule(Protocol):
    """What the engine needs from a rule."""

    name: str
    needs_proxy_base: bool

    def mix(self, p: torch.Tensor, q: torch.Tensor, q_base: torch.Tensor | None = None) -> Mix: ...

    def target(
        self, p: torch.Tensor, q: torch.Tensor, q_base: torch.Tensor | None = None
    ) -> torch.Tensor: ...


def _check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise KadError(f"unknown loss {loss!r}: choose one of {', '.join(LOSSES)}")


def loss_values(p: torch.Tensor, loss: str = "nll") -> torch.Tensor:
    """ℓ(p, v) for every token ``[..., V]``.

    nll: −log p_v;  squared: (1 − p_v)²;  margin: max_u p_u − p_v;  zero_one: 1[v ≠ argmax p]
    (the argmax is the lowest id among ties).
    """
    _check_loss(loss)
    if loss == "nll":
        return -torch.log(p)
    if loss == "squared":
        return (1.0 - p) ** 2
    if loss == "margin":
        return p.amax(dim=-1, keepdim=True) - p
    top = p.argmax(dim=-1, keepdim=True)
    return torch.ones_like(p).scatter_(-1, top, 0.0)


def risk(p: torch.Tensor, d: torch.Tensor, loss: str = "nll") -> torch.Tensor:
    """r(d) = Σ_v p_v ℓ(p, v) (1 − d_v) ``[...]``, with 0 · ∞ = 0 for tokens of zero mass."""
    value = torch.where(p > 0, p * loss_values(p, loss), torch.zeros_like(p))
    return (value * (~d.bool())).sum(dim=-1)


def mixture(p: torch.Tensor, q: torch.Tensor, d: torch.Tensor) -> Mix:
    """π_v = p_v (1 − d_v) + α q_v with α = Σ_v p_v d_v."""
    d = d.to(p.dtype)
    alpha = (p * d).sum(dim=-1)
    pi = p * (1.0 - d) + alpha.unsqueeze(-1) * q
    return Mix(pi, alpha)


def _check_finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value):
        raise KadError(f"{name} must be a finite number, got {value!r}")


@dataclass(frozen=True)
class Dual:
    """Dual (Lagrangian) approximation: defer token v iff ℓ(p, v) > μ.

    For the default ``nll`` loss the threshold is given as λ = e^{−μ}: defer iff p_v < λ.
    λ = 0 never defers (π = p); λ > 1 defers everything (π = q). The paper uses λ = 0.3-0.4.
    The other losses take ``mu``: ``squared`` defers iff p_v < 1 − √μ, ``margin`` iff
    p_v < max_u p_u − μ, ``zero_one`` (μ < 1) every token but the argmax.
    """

    lam: float | None = None
    loss: Loss = "nll"
    mu: float | None = None
    name: str = "dual"
    needs_proxy_base: bool = False

    def __post_init__(self) -> None:
        _check_loss(self.loss)
        if self.lam is not None and self.mu is not None:
            raise KadError("give Dual either lam= (nll loss) or mu=, not both")
        if self.loss == "nll":
            lam = 0.4 if self.lam is None and self.mu is None else self.lam
            if lam is None:
                _check_finite("mu", self.mu)  # type: ignore[arg-type]
                lam = math.exp(-self.mu)  # type: ignore[operator]
            _check_finite("lam", lam)
            if lam < 0:
                raise KadError(f"lam must be >= 0 (it is a probability threshold), got {lam}")
            object.__setattr__(self, "lam", float(lam))
            object.__setattr__(self, "mu", math.inf if lam == 0 else -math.log(lam))
        else:
            if self.lam is not None:
                raise KadError(
                    f"lam= is the threshold of the nll loss; the {self.loss} loss takes mu="
                )
            if self.mu is None:
                raise KadError(f"Dual(loss={self.loss!r}) needs mu=")
            _check_finite("mu", self.mu)
            if self.mu < 0:
                raise KadError(f"mu must be >= 0, got {self.mu}")

    def defer(self, p: torch.Tensor) -> torch.Tensor:
        """d ``[..., V]`` bool."""
        if self.loss == "nll":
            return p < self.lam
        return loss_values(p, self.loss) > self.mu

    def mix(self, p: torch.Tensor, q: torch.Tensor, q_base: torch.Tensor | None = None) -> Mix:
        return mixture(p, q, self.defer(p))

    def target(
        self, p: torch.Tensor, q: torch.Tensor, q_base: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.mix(p, q).pi


@dataclass(frozen=True)
class Primal:
    """Primal (greedy knapsack) approximation with budget b ∈ [0, 1].

    Order tokens by ℓ(p, v) descending (ties: lower id first) and defer the longest prefix whose
    cumulative mass is ≤ b. The first token that does not fit is the critical item; the rule
    stops there, so α ≤ b and the unfilled budget b − α is < p_critical. For ``nll`` this keeps
    the most probable tokens of the shortest top-p prefix with mass ≥ 1 − b. The paper uses b = 0.9.
    """

    budget: float = 0.9
    loss: Loss = "nll"
    name: str = "primal"
    needs_proxy_base: bool = False

    def __post_init__(self) -> None:
        _check_loss(self.loss)
        _check_finite("budget", self.budget)
        if not 0.0 <= self.budget <= 1.0:
            raise KadError(f"budget must be in [0, 1] (a probability mass), got {self.budget}")

    def defer(self, p: torch.Tensor) -> torch.Tensor:
        """d ``[..., V]`` bool: the greedy prefix in descending-loss order."""
        ell = loss_values(p, self.loss)
        order = torch.sort(-ell, dim=-1, stable=True).indices  # [..., V] descending ℓ
        mass = torch.cumsum(p.gather(-1, order), dim=-1)  # [..., V] non-decreasing: p >= 0
        fits = mass <= self.budget + BUDGET_ROUNDING  # so that b = 1 defers all despite rounding
        return torch.zeros_like(fits).scatter_(-1, order, fits)

    def mix(self, p: torch.Tensor, q: torch.Tensor, q_base: torch.Tensor | None = None) -> Mix:
        pi, alpha, _ = mixture(p, q, self.defer(p))
        return Mix(pi, alpha, self.budget - alpha)

    def target(
        self, p: torch.Tensor, q: torch.Tensor, q_base: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.mix(p, q).pi


@dataclass(frozen=True)
class Nudging:
    """Distribution-level deferral (Fei et al. 2024): π = q if max_v p_v < λ, else p."""

    lam: float = 0.4
    name: str = "nudging"
    needs_proxy_base: bool = False

    def __post_init__(self) -> None:
        _check_finite("lam", self.lam)
        if self.lam < 0:
            raise KadError(f"lam must be >= 0, got {self.lam}")

    def mix(self, p: torch.Tensor, q: torch.Tensor, q_base: torch.Tensor | None = None) -> Mix:
        alpha = (p.amax(dim=-1) < self.lam).to(p.dtype)  # [...] 1 where the whole step defers
        a = alpha.unsqueeze(-1)
        return Mix(a * q + (1.0 - a) * p, alpha)

    def target(
        self, p: torch.Tensor, q: torch.Tensor, q_base: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.mix(p, q).pi


@dataclass(frozen=True)
class ImplicitReward:
    """Proxy tuning / emulated fine-tuning: log π ∝ log p + β (log q − log q_base).

    Needs the proxy's unaligned base q_base. β = 1 transfers the proxy's alignment as is.
    """

    beta: float = 1.0
    name: str = "implicit_reward"
    needs_proxy_base: bool = True

    def __post_init__(self) -> None:
        _check_finite("beta", self.beta)

    def mix(self, p: torch.Tensor, q: torch.Tensor, q_base: torch.Tensor | None = None) -> Mix:
        if q_base is None:
            raise KadError("the implicit-reward rule needs the proxy's base model (proxy_base=)")
        tiny = torch.finfo(p.dtype).tiny
        logits = torch.log(p.clamp_min(tiny)) + self.beta * (
            torch.log(q.clamp_min(tiny)) - torch.log(q_base.clamp_min(tiny))
        )
        logits = torch.where(p > 0, logits, torch.full_like(logits, -math.inf))
        pi = torch.softmax(logits, dim=-1)
        return Mix(pi, torch.full(p.shape[:-1], math.nan, dtype=p.dtype, device=p.device))

    def target(
        self, p: torch.Tensor, q: torch.Tensor, q_base: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.mix(p, q, q_base).pi


@dataclass(frozen=True)
class BaseOnly:
    """π = p: the base model alone."""

    name: str = "base"
    needs_proxy_base: bool = False

    def mix(self, p: torch.Tensor, q: torch.Tensor, q_base: torch.Tensor | None = None) -> Mix:
        return Mix(p, torch.zeros(p.shape[:-1], dtype=p.dtype, device=p.device))

    def target(
        self, p: torch.Tensor, q: torch.Tensor, q_base: torch.Tensor | None = None
    ) -> torch.Tensor:
        return p


@dataclass(frozen=True)
class ProxyOnly:
    """π = q: the aligned proxy alone."""

    name: str = "proxy"
    needs_proxy_base: bool = False

    def mix(self, p: torch.Tensor, q: torch.Tensor, q_base: torch.Tensor | None = None) -> Mix:
        return Mix(q, torch.ones(q.shape[:-1], dtype=q.dtype, device=q.device))

    def target(
        self, p: torch.Tensor, q: torch.Tensor, q_base: torch.Tensor | None = None
    ) -> torch.Tensor:
        return q


RULES: dict[str, type] = {
    "dual": Dual,
    "primal": Primal,
    "nudging": Nudging,
    "implicit-reward": ImplicitReward,
    "base": BaseOnly,
    "proxy": ProxyOnly,
}
RULE_NAMES: tuple[str, ...] = tuple(RULES)
_NOT_PARAMETERS = ("name", "needs_proxy_base")
RULE_PARAMS: dict[str, tuple[str, ...]] = {
    name: tuple(f.name for f in fields(cls) if f.name not in _NOT_PARAMETERS)
    for name, cls in RULES.items()
}  # the parameters each rule takes, e.g. ("lam", "loss", "mu") for dual


def rule_key(name: str) -> str:
    """A rule's CLI/API name as `RULES` spells it: "Implicit_Reward" -> "implicit-reward"."""
    return name.strip().lower().replace("_", "-")


def rule_params(rule: Rule) -> dict[str, Any]:
    """The parameters that define a rule, e.g. ``{"lam": 0.4, "loss": "nll"}`` for dual.

    For the nll loss μ = −log λ is implied by λ and left out."""
    values = asdict(rule)  # type: ignore[call-overload]
    params = {k: v for k, v in values.items() if k not in _NOT_PARAMETERS}
    if params.get("loss") == "nll":
        params.pop("mu", None)
    return {k: v for k, v in params.items() if v is not None}


def make_rule(
    name: str,
    *,
    lam: float | None = None,
    budget: float | None = None,
    beta: float | None = None,
    loss: str = "nll",
    mu: float | None = None,
) -> Rule:
    """Build a rule from its CLI/API name and the parameters that apply to it."""
    key = rule_key(name)
    if key == "dual":
        return Dual(lam=lam, loss=loss, mu=mu)  # type: ignore[arg-type]
    if key == "primal":
        return Primal(budget=0.9 if budget is None else budget, loss=loss)  # type: ignore[arg-type]
    if key == "nudging":
        return Nudging(lam=0.4 if lam is None else lam)
    if key == "implicit-reward":
        return ImplicitReward(beta=1.0 if beta is None else beta)
    if key == "base":
        return BaseOnly()
    if key == "proxy":
        return ProxyOnly()
    raise KadError(f"unknown rule {name!r}: choose one of {', '.join(RULE_NAMES)}")


def exact_deferral(p: torch.Tensor, budget: float, loss: str = "nll") -> torch.Tensor:
    """The true knapsack optimum d ``[V]`` bool, by enumerating all 2^V subsets (V ≤ 20).

    Maximises the removed risk Σ_v p_v ℓ(p, v) d_v under Σ_v p_v d_v ≤ budget; among optimal
    sets it returns the one of least mass. For tests and analysis only.
    """
    if p.dim() != 1:
        raise KadError(f"exact_deferral takes one distribution [V], got shape {tuple(p.shape)}")
    vocab = p.shape[0]
    if vocab > 20:
        raise KadError(f"exact_deferral enumerates 2^V subsets; V = {vocab} is over 20")
    p64 = p.double()
    value = torch.where(p64 > 0, p64 * loss_values(p64, loss), torch.zeros_like(p64))  # [V]
    codes = torch.arange(2**vocab, dtype=torch.int64).unsqueeze(-1)  # [2^V, 1]
    subsets = ((codes >> torch.arange(vocab)) & 1).to(torch.float64)  # [2^V, V]
    weight = subsets @ p64  # [2^V]
    gain = subsets @ value  # [2^V]
    gain = torch.where(weight <= budget + BUDGET_ROUNDING, gain, torch.full_like(gain, -math.inf))
    best = gain.max()
    ties = (gain >= best - 1e-12).nonzero().squeeze(-1)
    choice = ties[weight[ties].argmin()]
    return subsets[choice].bool()
