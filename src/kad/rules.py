"""Deferral rules and baselines: how the target distribution π is built from the models'.

Terms (SPEC sections 2-4b), for one decoding position and a vocabulary of V tokens:

- ``p``   the base model's next-token distribution ``[..., V]``;
- ``q``   the aligned proxy's (q* in the paper) ``[..., V]``;
- ``q_base`` the proxy's own unaligned base (only for the implicit-reward baseline);
- ``d``   a deferral vector in [0,1]^V (0-1 for every rule but the fractional primal): d_v = 1
  hands the mass of token v over to the proxy;
- ``α = Σ_v p_v d_v``, the mass taken from p;
- ``π_v = p_v (1 − d_v) + α q_v``, the token-specific mixture.

Choosing d is a 0-1 knapsack: minimise the risk ``r(d) = Σ_v p_v ℓ(p, v) (1 − d_v)`` under
``Σ_v p_v d_v ≤ b``. Items are tokens with value ``p_v ℓ(p, v)`` and weight ``p_v``.

**One registry.** Each rule is declared once, as a frozen dataclass decorated with
`register(slug, label)`: its fields are its parameters (default, range, symbol and help in the
field's metadata, see `param`), and its static ``formula(p, q, q_base, c)`` is its mixture as a
pure tensor function of the parameter columns ``c``. Everything else derives from that: `RULES`,
`make_rule` and its errors, the per-row parameter table `rule_row` / `COLUMNS` that lets rows
with different rules and parameters share one batch (`mix_rows`), the CLI and server options,
eval folder names and report labels.

A rule object has ``.mix(p, q, q_base) -> Mix`` (π plus per-position statistics) and
``.target(p, q, q_base) -> π``. Rules never see a model, a tokenizer or a cache. All inputs are
probabilities (float32, rows summing to 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, get_args, runtime_checkable

from kad.errors import KadError

if TYPE_CHECKING:
    import torch
else:

    class _Torch:
        """torch, imported on first use: the registry (names, parameters, ranges) is read by
        the command line's help, which must not wait seconds for torch."""

        def __getattr__(self, name: str) -> Any:
            import torch as module

            globals()["torch"] = module
            return getattr(module, name)

    torch = _Torch()

Loss = Literal["nll", "squared", "margin", "zero_one"]
LOSSES: tuple[str, ...] = get_args(Loss)
BUDGET_ROUNDING = 1e-6  # float32 sums of a distribution stray from 1 by about this much


class Mix(NamedTuple):
    """One mixing step: the target and what it cost.

    pi:       the target distribution π ``[..., V]``.
    alpha:    mass taken from p and given to the proxy ``[...]``; NaN where the rule has no α
              (implicit reward).
    unfilled: for the primal rules, the unused budget ``b − α`` ``[...]``; otherwise None (NaN
              in a batch of mixed rules).
    """

    pi: torch.Tensor
    alpha: torch.Tensor
    unfilled: torch.Tensor | None = None


@runtime_checkable
class Rule(Protocol):
    """What decoding needs from a rule."""

    name: str
    needs_proxy_base: bool

    def mix(self, p: torch.Tensor, q: torch.Tensor, q_base: torch.Tensor | None = None) -> Mix: ...

    def target(
        self, p: torch.Tensor, q: torch.Tensor, q_base: torch.Tensor | None = None
    ) -> torch.Tensor: ...


# --- the formulas' building blocks ----------------------------------------------------------


def loss_values(p: torch.Tensor, loss: str = "nll") -> torch.Tensor:
    """ℓ(p, v) for every token ``[..., V]``.

    nll: −log p_v;  squared: (1 − p_v)²;  margin: max_u p_u − p_v;  zero_one: 1[v ≠ argmax p]
    (the argmax is the lowest id among ties).
    """
    if loss not in LOSSES:
        raise KadError(f"unknown loss {loss!r}: choose one of {', '.join(LOSSES)}")
    if loss == "nll":
        return -torch.log(p)
    if loss == "squared":
        return (1.0 - p) ** 2
    if loss == "margin":
        return p.amax(dim=-1, keepdim=True) - p
    top = p.argmax(dim=-1, keepdim=True)
    return torch.ones_like(p).scatter_(-1, top, 0.0)


def _per_row(values: dict[int, torch.Tensor], which: torch.Tensor | int) -> torch.Tensor:
    """values[which] where ``which`` is one id, or row by row for ids ``[B, 1, ..]``."""
    if isinstance(which, int):
        return values[which]
    out = next(iter(values.values()))
    for key, value in values.items():
        out = torch.where(which == key, value, out)
    return out


def _losses(p: torch.Tensor, loss: torch.Tensor | int, only: Iterable[int] | None) -> torch.Tensor:
    """ℓ(p, v) ``[..., V]`` for each row's loss id (an index into `LOSSES`)."""
    ids = [loss] if isinstance(loss, int) else list(range(len(LOSSES)) if only is None else only)
    return _per_row({i: loss_values(p, LOSSES[i]) for i in ids}, loss)


def risk(p: torch.Tensor, d: torch.Tensor, loss: str = "nll") -> torch.Tensor:
    """r(d) = Σ_v p_v ℓ(p, v) (1 − d_v) ``[...]``, with 0 · ∞ = 0 for tokens of zero mass."""
    value = torch.where(p > 0, p * loss_values(p, loss), torch.zeros_like(p))
    return (value * (1.0 - d.to(p.dtype))).sum(dim=-1)


def mixture(p: torch.Tensor, q: torch.Tensor, d: torch.Tensor) -> Mix:
    """π_v = p_v (1 − d_v) + α q_v with α = Σ_v p_v d_v (SPEC section 2)."""
    d = d.to(p.dtype)
    alpha = (p * d).sum(dim=-1)
    pi = p * (1.0 - d) + alpha.unsqueeze(-1) * q
    return Mix(pi, alpha)


def greedy_prefix(
    p: torch.Tensor, ell: torch.Tensor, budget: torch.Tensor | float, fractional: Any
) -> torch.Tensor:
    """d ``[..., V]`` of the primal rule: order tokens by ℓ descending (ties: lower id first),
    defer the longest prefix whose cumulative mass is ≤ b; the first token that does not fit
    is the critical item. ``fractional`` (bool, or ``[B, 1, ..]``): also defer the critical item
    in part, d_crit = (b − α_prefix) / p_crit ∈ [0, 1), so that α = min(b, 1)."""
    order = torch.sort(-ell, dim=-1, stable=True).indices  # [..., V] descending ℓ
    mass = p.gather(-1, order)
    cum = torch.cumsum(mass, dim=-1)  # non-decreasing: p >= 0
    fits = cum <= budget + BUDGET_ROUNDING  # a prefix; b = 1 defers all despite rounding
    d_sorted = fits.to(p.dtype)
    if fractional is not False:
        count = fits.sum(dim=-1, keepdim=True)  # [..., 1] the critical item's rank
        taken = (mass * d_sorted).sum(dim=-1, keepdim=True)
        crit_mass = mass.gather(-1, count.clamp(max=p.shape[-1] - 1))
        part = ((budget - taken) / crit_mass.clamp_min(1e-30)).clamp(0.0, 1.0)
        part = torch.where(count < p.shape[-1], part, torch.zeros_like(part))
        if fractional is not True:
            part = part * fractional
        rank = torch.arange(p.shape[-1], device=p.device)
        d_sorted = d_sorted + torch.where(rank == count, part, torch.zeros_like(part))
    return torch.zeros_like(d_sorted).scatter_(-1, order, d_sorted)


# --- the registry ---------------------------------------------------------------------------


def param(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    choices: tuple[str, ...] = (),
    symbol: str | None = None,
    abbr: str | None = None,
) -> Any:
    """A rule parameter: a dataclass field whose metadata gives its range, choices, help, the
    symbol of report labels (λ) and the abbreviation of folder names (lam)."""
    meta = {"help": help, "low": low, "high": high, "choices": choices, "symbol": symbol}
    meta["abbr"] = abbr
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Param:
    """A rule parameter as the registry describes it (read from the rule's dataclass field)."""

    name: str
    default: Any
    kind: type  # float, str or bool
    help: str
    low: float | None
    high: float | None
    choices: tuple[str, ...]
    symbol: str
    abbr: str

    def check(self, value: Any) -> Any:
        """``value`` if it is a valid setting of this parameter; else a KadError naming it."""
        if value is None:
            return value
        if self.kind is bool:
            if not isinstance(value, bool):
                raise KadError(f"{self.name} must be true or false, got {value!r}")
            return value
        if self.kind is str:
            if value not in self.choices:
                raise KadError(
                    f"unknown {self.name} {value!r}: choose one of {', '.join(self.choices)}"
                )
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise KadError(f"{self.name} must be a number, got {value!r}")
        if math.isnan(value) or math.isinf(value):
            raise KadError(f"{self.name} must be a finite number, got {value!r}")
        if (self.low is not None and value < self.low) or (
            self.high is not None and value > self.high
        ):
            raise KadError(f"{self.name} must be in {self.range_text()}, got {value!r}")
        return float(value)

    def range_text(self) -> str:
        low = "-∞" if self.low is None else f"{self.low:g}"
        high = "∞" if self.high is None else f"{self.high:g}"
        return f"[{low}, {high}]"


@dataclass(frozen=True)
class RuleSpec:
    """One rule as the registry knows it: its slug (the CLI/API name), its label (tables and
    plots), its class, its parameters, and its mixture formula on parameter columns."""

    slug: str
    label: str
    cls: type
    params: tuple[Param, ...]
    formula: Callable[..., Mix]
    needs_proxy_base: bool
    kind: int  # the rule's id in a batch's per-row table


RULES: dict[str, RuleSpec] = {}
_NOT_PARAMETERS = ("name", "needs_proxy_base")
COLUMNS: tuple[str, ...] = ()  # the per-row table's parameter columns, after "kind"
RULE_NAMES: tuple[str, ...] = ()  # the slugs, in registry order
RULE_PARAMS: dict[str, tuple[str, ...]] = {}  # e.g. ("lam", "loss", "mu") for dual


def _refresh_columns() -> None:
    """Derive the names and the table's columns from `RULES` (after each `register`)."""
    global COLUMNS, RULE_NAMES
    names: list[str] = []
    for spec in RULES.values():
        names += [p.name for p in spec.params if p.name not in names]
    COLUMNS = tuple(names)
    RULE_NAMES = tuple(RULES)
    RULE_PARAMS.clear()
    RULE_PARAMS.update({slug: tuple(p.name for p in spec.params) for slug, spec in RULES.items()})


def _param_of(f: Field) -> Param:
    meta = f.metadata
    default = f.default if f.default is not MISSING else None
    kind = str if meta.get("choices") else bool if isinstance(default, bool) else float
    return Param(
        name=f.name,
        default=default,
        kind=kind,
        help=meta.get("help", ""),
        low=meta.get("low"),
        high=meta.get("high"),
        choices=tuple(meta.get("choices") or ()),
        symbol=meta.get("symbol") or f.name,
        abbr=meta.get("abbr") or f.name,
    )


def register(slug: str, label: str) -> Callable[[type], type]:
    """Add a rule class to `RULES` under ``slug``; its dataclass fields (but ``name`` and
    ``needs_proxy_base``) are its parameters and its static ``formula`` its mixture."""

    def add(cls: type) -> type:
        params = tuple(_param_of(f) for f in fields(cls) if f.name not in _NOT_PARAMETERS)
        needs = next(f.default for f in fields(cls) if f.name == "needs_proxy_base")
        RULES[slug] = RuleSpec(slug, label, cls, params, cls.formula, bool(needs), kind=len(RULES))
        _refresh_columns()
        return cls

    return add


class _RuleBase:
    """What every registered rule shares: validation from the registry, `mix` and `target`
    through the rule's formula on its own parameters."""

    name: str

    def __post_init__(self) -> None:
        for p in spec_of(self).params:
            object.__setattr__(self, p.name, p.check(getattr(self, p.name)))

    def columns(self) -> dict[str, Any]:
        """The parameters as the formula reads them: losses as their index in `LOSSES`."""
        values = {p.name: getattr(self, p.name) for p in spec_of(self).params}
        if "loss" in values:
            values["loss"] = LOSSES.index(values["loss"])
        return values

    def mix(self, p: torch.Tensor, q: torch.Tensor, q_base: torch.Tensor | None = None) -> Mix:
        return spec_of(self).formula(p, q, q_base, self.columns())

    def target(
        self, p: torch.Tensor, q: torch.Tensor, q_base: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.mix(p, q, q_base).pi


def spec_of(rule: Any) -> RuleSpec:
    """The registry entry of a rule object (or class)."""
    cls = rule if isinstance(rule, type) else type(rule)
    for spec in RULES.values():
        if spec.cls is cls:
            return spec
    raise KadError(f"{cls.__name__} is not a registered rule")


# --- the rules ------------------------------------------------------------------------------


@register("dual", "KAD dual")
@dataclass(frozen=True)
class Dual(_RuleBase):
    """Dual (Lagrangian) approximation: defer token v iff ℓ(p, v) > μ.

    For the default ``nll`` loss the threshold is given as λ = e^{−μ}: defer iff p_v < λ.
    λ = 0 never defers (π = p); λ > 1 defers everything (π = q). The paper uses λ = 0.3-0.4.
    The other losses take ``mu``: ``squared`` defers iff p_v < 1 − √μ, ``margin`` iff
    p_v < max_u p_u − μ, ``zero_one`` (μ < 1) every token but the argmax.
    """

    lam: float | None = param(
        None, "threshold λ of the nll loss: defer p_v < λ (default 0.4)", low=0.0, symbol="λ"
    )
    loss: Loss = param("nll", "the loss ℓ(p, v)", choices=LOSSES)
    mu: float | None = param(
        None, "threshold μ of the other losses: defer ℓ(p, v) > μ", low=0.0, symbol="μ"
    )
    name: str = "dual"
    needs_proxy_base: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lam is not None and self.mu is not None:
            raise KadError("give Dual either lam= (nll loss) or mu=, not both")
        if self.loss == "nll":
            lam = 0.4 if self.lam is None and self.mu is None else self.lam
            if lam is None:
                lam = math.exp(-self.mu)  # type: ignore[operator]
            object.__setattr__(self, "lam", float(lam))
            object.__setattr__(self, "mu", math.inf if lam == 0 else -math.log(lam))
        else:
            if self.lam is not None:
                raise KadError(
                    f"lam= is the threshold of the nll loss; the {self.loss} loss takes mu="
                )
            if self.mu is None:
                raise KadError(f"Dual(loss={self.loss!r}) needs mu=")

    def defer(self, p: torch.Tensor) -> torch.Tensor:
        """d ``[..., V]`` bool."""
        return self.dual_defer(p, self.columns(), None)

    @staticmethod
    def dual_defer(p: torch.Tensor, c: dict[str, Any], losses: Iterable[int] | None):
        """d_v = [p_v < λ] for nll rows, [ℓ(p, v) > μ] for the others."""
        loss = c["loss"]
        if isinstance(loss, int):
            if loss == 0:
                return p < c["lam"]
            return loss_values(p, LOSSES[loss]) > c["mu"]
        return torch.where(loss == 0, p < c["lam"], _losses(p, loss, losses) > c["mu"])

    @staticmethod
    def formula(p, q, q_base, c, losses=None) -> Mix:
        return mixture(p, q, Dual.dual_defer(p, c, losses))


@register("primal", "KAD primal")
@dataclass(frozen=True)
class Primal(_RuleBase):
    """Primal (greedy knapsack) approximation with budget b ∈ [0, 1].

    Order tokens by ℓ(p, v) descending (ties: lower id first) and defer the longest prefix whose
    cumulative mass is ≤ b. The first token that does not fit is the critical item; the rule
    stops there, so α ≤ b and the unfilled budget b − α is < p_critical. For ``nll`` this keeps
    the most probable tokens of the shortest top-p prefix with mass ≥ 1 − b. The paper uses b = 0.9.

    ``fractional=True`` also defers the critical item in part, d_crit = (b − α) / p_crit, so the
    mass taken is exactly min(b, 1) and nothing is left unfilled: the optimum of the knapsack's LP
    relaxation, so r(fractional) ≤ r(exact 0-1) ≤ r(primal) (SPEC section 4b).
    """

    budget: float = param(
        0.9, "budget b: the most mass deferred", low=0.0, high=1.0, symbol="b", abbr="b"
    )
    loss: Loss = param("nll", "the loss ℓ(p, v)", choices=LOSSES)
    fractional: bool = param(
        False, "defer the critical item in part, so that α = b exactly", abbr="fractional"
    )
    name: str = "primal"
    needs_proxy_base: bool = False

    def defer(self, p: torch.Tensor) -> torch.Tensor:
        """d ``[..., V]``: bool, or float in [0, 1] with ``fractional``."""
        d = greedy_prefix(p, loss_values(p, self.loss), self.budget, self.fractional)
        return d if self.fractional else d.bool()

    @staticmethod
    def formula(p, q, q_base, c, losses=None) -> Mix:
        ell = _losses(p, c["loss"], losses)
        budget = c["budget"]
        pi, alpha, _ = mixture(p, q, greedy_prefix(p, ell, budget, c["fractional"]))
        unfilled = budget - alpha if isinstance(budget, float) else budget[..., 0] - alpha
        return Mix(pi, alpha, unfilled)


@register("proxy-referenced", "proxy-referenced")
@dataclass(frozen=True)
class ProxyReferenced(_RuleBase):
    """Proxy-referenced deferral: defer token v iff p_v < max_u q*_u − δ, δ ∈ [−1, 1].

    The rejection criterion of the authors' follow-up ("On the Rejection Criterion for
    Proxy-based Test-time Alignment", Hammal, Zweigenbaum & Corro, ACL 2026) and of their
    released code: the base's confidence in a token is judged against the aligned proxy's best
    confidence at that step (a conservative confidence bet), not against a fixed λ. π is the
    token-specific mixture of SPEC section 2. δ = 1 defers nothing (π = p); δ = −1 defers every
    token with p_v < 1; the released variants are δ and −δ.
    """

    delta: float = param(0.0, "margin δ: defer p_v < max q* − δ", low=-1.0, high=1.0, symbol="δ")
    name: str = "proxy-referenced"
    needs_proxy_base: bool = False

    def defer(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """d ``[..., V]`` bool; it reads the proxy's q* ``[..., V]`` too."""
        return p < q.amax(dim=-1, keepdim=True) - self.delta

    @staticmethod
    def formula(p, q, q_base, c, losses=None) -> Mix:
        return mixture(p, q, p < q.amax(dim=-1, keepdim=True) - c["delta"])


@register("nudging", "nudging")
@dataclass(frozen=True)
class Nudging(_RuleBase):
    """Distribution-level deferral (Fei et al. 2024): π = q if max_v p_v < λ, else p."""

    lam: float = param(0.4, "threshold λ: defer the whole step when max p < λ", low=0.0, symbol="λ")
    name: str = "nudging"
    needs_proxy_base: bool = False

    @staticmethod
    def formula(p, q, q_base, c, losses=None) -> Mix:
        alpha = (p.amax(dim=-1, keepdim=True) < c["lam"]).to(p.dtype)  # [..., 1]
        return Mix(alpha * q + (1.0 - alpha) * p, alpha[..., 0])


@register("implicit-reward", "implicit reward")
@dataclass(frozen=True)
class ImplicitReward(_RuleBase):
    """Proxy tuning / emulated fine-tuning: log π ∝ log p + β (log q − log q_base).

    Needs the proxy's unaligned base q_base. β = 1 transfers the proxy's alignment as is.
    """

    beta: float = param(
        1.0, "weight β of the proxy's implicit reward", low=0.0, high=100.0, symbol="β"
    )
    name: str = "implicit_reward"
    needs_proxy_base: bool = True

    @staticmethod
    def formula(p, q, q_base, c, losses=None) -> Mix:
        if q_base is None:
            raise KadError("the implicit-reward rule needs the proxy's base model (proxy_base=)")
        tiny = torch.finfo(p.dtype).tiny
        logits = torch.log(p.clamp_min(tiny)) + c["beta"] * (
            torch.log(q.clamp_min(tiny)) - torch.log(q_base.clamp_min(tiny))
        )
        logits = torch.where(p > 0, logits, torch.full_like(logits, -math.inf))
        pi = torch.softmax(logits, dim=-1)
        return Mix(pi, torch.full(p.shape[:-1], math.nan, dtype=p.dtype, device=p.device))


@register("base", "base alone")
@dataclass(frozen=True)
class BaseOnly(_RuleBase):
    """π = p: the base model alone."""

    name: str = "base"
    needs_proxy_base: bool = False

    @staticmethod
    def formula(p, q, q_base, c, losses=None) -> Mix:
        return Mix(p, torch.zeros(p.shape[:-1], dtype=p.dtype, device=p.device))


@register("proxy", "proxy alone")
@dataclass(frozen=True)
class ProxyOnly(_RuleBase):
    """π = q: the aligned proxy alone."""

    name: str = "proxy"
    needs_proxy_base: bool = False

    @staticmethod
    def formula(p, q, q_base, c, losses=None) -> Mix:
        return Mix(q, torch.ones(q.shape[:-1], dtype=q.dtype, device=q.device))


# --- names, construction and the per-row table ----------------------------------------------


def rule_key(name: str) -> str:
    """A rule's CLI/API name as `RULES` spells it: "Implicit_Reward" -> "implicit-reward"."""
    return name.strip().lower().replace("_", "-")


def rule_params(rule: Rule) -> dict[str, Any]:
    """The parameters that define a rule, e.g. ``{"lam": 0.4, "loss": "nll"}`` for dual.

    For the nll loss μ = −log λ is implied by λ and left out; booleans at their default too."""
    values = asdict(rule)  # type: ignore[call-overload]
    params = {k: v for k, v in values.items() if k not in _NOT_PARAMETERS}
    if params.get("loss") == "nll":
        params.pop("mu", None)
    return {k: v for k, v in params.items() if v is not None and v is not False}


def make_rule(name: str, **params: Any) -> Rule:
    """Build a rule from its CLI/API name and parameters; None means "the default".

    A parameter the rule does not take, or a value out of its range, is a KadError."""
    key = rule_key(name)
    if key not in RULES:
        raise KadError(f"unknown rule {name!r}: choose one of {', '.join(RULE_NAMES)}")
    spec = RULES[key]
    given = {k: v for k, v in params.items() if v is not None}
    if given.get("loss") == "nll":  # the default loss names nothing new
        given.pop("loss")
    unknown = [k for k in given if k not in RULE_PARAMS[key]]
    if unknown:
        takes = ", ".join(RULE_PARAMS[key]) or "no parameters"
        raise KadError(f"rule {key!r} does not take {', '.join(unknown)} (it takes {takes})")
    return spec.cls(**given)


def rule_label(rule: Rule) -> str:
    """A rule as tables and plots show it: "KAD dual λ=0.4", "KAD primal b=0.9 fractional"."""
    spec = spec_of(rule)
    parts = [spec.label]
    for p in spec.params:
        value = rule_params(rule).get(p.name)
        if value is None or (p.name == "loss" and value == "nll"):
            continue
        parts.append(
            p.name if value is True else str(value) if p.kind is str else f"{p.symbol}={value:g}"
        )
    return " ".join(parts)


def rule_slug(rule: Rule) -> str:
    """A short folder-safe name: ``dual-lam0.4``, ``primal-b0.9``, ``dual-squared-mu0.5``."""
    spec = spec_of(rule)
    params = rule_params(rule)
    parts = [spec.slug]
    for p in spec.params:
        value = params.get(p.name)
        if value is None or (p.name == "loss" and value == "nll"):
            continue
        parts.append(
            p.abbr if value is True else str(value) if p.kind is str else f"{p.abbr}{value:g}"
        )
    return "-".join(parts)


def rule_row(rule: Rule) -> list[float]:
    """One row of the per-row parameter table: ``[kind, *COLUMNS]`` as floats (losses as their
    index in `LOSSES`, booleans as 0/1, parameters the rule lacks as 0)."""
    spec = spec_of(rule)
    values = rule.columns()  # type: ignore[attr-defined]
    return [float(spec.kind)] + [float(values.get(name) or 0.0) for name in COLUMNS]


def mix_rows(
    p: torch.Tensor,
    q: torch.Tensor,
    q_base: torch.Tensor | None,
    table: torch.Tensor,
    kinds: Sequence[int] | None = None,
    losses: Sequence[int] | None = None,
) -> Mix:
    """π of each row under its own rule: p, q, q_base ``[B, ..., V]``; ``table`` ``[B, 1 + C]``
    rows of `rule_row`. ``kinds`` / ``losses``: the rule and loss ids present (None: all, as a
    captured graph must; the implicit reward only when q_base is given). Rows of other kinds are
    masked out of each formula's result; ``unfilled`` is NaN for rules without a budget."""
    shape = (table.shape[0],) + (1,) * (p.dim() - 1)  # [B, 1, .., 1]: broadcasts over p
    cols = {name: table[:, 1 + i].reshape(shape) for i, name in enumerate(COLUMNS)}
    if "loss" in cols:
        cols["loss"] = cols["loss"].long()
    kind = table[:, 0].long().reshape(shape)
    specs = [s for s in RULES.values() if kinds is None or s.kind in kinds]
    specs = [s for s in specs if q_base is not None or not s.needs_proxy_base]
    if len(specs) == 1 and kinds is not None:
        mix = specs[0].formula(p, q, q_base, cols, losses)
        unfilled = (
            mix.unfilled if mix.unfilled is not None else torch.full_like(mix.alpha, math.nan)
        )
        return Mix(mix.pi, mix.alpha, unfilled)
    pi = torch.zeros_like(p)
    alpha = torch.zeros_like(p[..., 0])
    unfilled = torch.full_like(alpha, math.nan)
    for spec in specs:
        mix = spec.formula(p, q, q_base, cols, losses)
        mine = kind == spec.kind  # [B, 1, .., 1]
        pi = torch.where(mine, mix.pi, pi)
        alpha = torch.where(mine[..., 0], mix.alpha, alpha)
        if mix.unfilled is not None:
            unfilled = torch.where(mine[..., 0], mix.unfilled, unfilled)
    return Mix(pi, alpha, unfilled)


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
