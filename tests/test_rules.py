"""The rules as pure tensor functions: SPEC sections 2-4 and invariant 7."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kad
from kad.rules import LOSSES, loss_values, mixture, risk


def distribution(seed: int, vocab: int, sharpness: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(vocab, generator=g) * sharpness, dim=-1)


dists = st.builds(
    distribution,
    seed=st.integers(0, 2**31),
    vocab=st.integers(2, 12),
    sharpness=st.floats(0.1, 6.0),
)
pairs = st.builds(
    lambda seed, vocab, s1, s2: (
        distribution(seed, vocab, s1),
        distribution(seed + 1, vocab, s2),
        distribution(seed + 2, vocab, 1.0),
    ),
    seed=st.integers(0, 2**31),
    vocab=st.integers(2, 12),
    s1=st.floats(0.1, 6.0),
    s2=st.floats(0.1, 6.0),
)

ALL_RULES = [
    kad.Dual(lam=0.4),
    kad.Dual(mu=0.1, loss="squared"),
    kad.Dual(mu=0.2, loss="margin"),
    kad.Dual(mu=0.5, loss="zero_one"),
    kad.Primal(budget=0.9),
    kad.Primal(budget=0.3, loss="squared"),
    kad.Primal(budget=0.6, fractional=True),
    kad.Primal(budget=0.4, loss="margin", fractional=True),
    kad.ProxyReferenced(delta=0.1),
    kad.ProxyReferenced(delta=-0.3),
    kad.Nudging(lam=0.4),
    kad.ImplicitReward(beta=1.0),
    kad.BaseOnly(),
    kad.ProxyOnly(),
]


@settings(max_examples=60, deadline=None)
@given(pairs, st.sampled_from(ALL_RULES))
def test_target_is_a_distribution(pqs, rule):
    p, q, q_base = pqs
    pi = rule.target(p, q, q_base)
    assert pi.shape == p.shape
    assert (pi >= 0).all()
    assert pi.sum().item() == pytest.approx(1.0, abs=1e-5)


@settings(max_examples=60, deadline=None)
@given(pairs, st.integers(0, 2**31))
def test_mixture_extremes_and_lower_bound(pqs, seed):
    p, q, _ = pqs
    assert torch.allclose(mixture(p, q, torch.zeros_like(p, dtype=torch.bool)).pi, p)
    assert torch.allclose(mixture(p, q, torch.ones_like(p, dtype=torch.bool)).pi, q, atol=1e-6)
    d = torch.rand(p.shape, generator=torch.Generator().manual_seed(seed)) < 0.5
    pi, alpha, _ = mixture(p, q, d)
    assert alpha.item() == pytest.approx((p * d).sum().item(), abs=1e-6)
    assert (pi >= alpha * q - 1e-7).all()


@settings(max_examples=60, deadline=None)
@given(pairs)
def test_dual_lambda_zero_is_base_and_above_one_is_proxy(pqs):
    p, q, _ = pqs
    assert torch.equal(kad.Dual(lam=0.0).target(p, q), p)
    assert torch.allclose(kad.Dual(lam=1.01).target(p, q), q, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(dists, st.floats(0.0, 3.0))
def test_dual_closed_forms_match_the_loss_threshold(p, mu):
    """SPEC table: nll p < e^{-μ}; squared p < 1 − √μ; margin p < max p − μ; zero_one."""
    assert torch.equal(kad.Dual(mu=mu).defer(p), p < math.exp(-mu))
    if mu <= 1:
        assert torch.equal(kad.Dual(mu=mu, loss="squared").defer(p), p < 1 - math.sqrt(mu))
    assert torch.equal(kad.Dual(mu=mu, loss="margin").defer(p), p < p.max() - mu)
    zero_one = kad.Dual(mu=min(mu, 0.99), loss="zero_one").defer(p)
    assert zero_one.sum() == p.numel() - 1 and not zero_one[p.argmax()]


@settings(max_examples=80, deadline=None)
@given(dists, st.floats(0.0, 1.0), st.sampled_from(LOSSES))
def test_primal_is_feasible_greedy_prefix(p, budget, loss):
    rule = kad.Primal(budget=budget, loss=loss)
    d = rule.defer(p)
    alpha = (p * d).sum().item()
    assert alpha <= budget + 1e-6
    ell = loss_values(p, loss)
    order = sorted(range(p.numel()), key=lambda v: (-ell[v].item(), v))
    flags = [bool(d[v]) for v in order]
    assert flags == sorted(flags, reverse=True), "deferred tokens form a prefix"
    n = sum(flags)
    if n < p.numel():  # the critical item did not fit, and the gap is smaller than it
        crit = order[n]
        assert budget - alpha < p[crit].item() + 1e-6
    unfilled = rule.mix(p, p).unfilled
    assert unfilled.item() == pytest.approx(budget - alpha, abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(dists, st.floats(0.0, 1.0))
def test_primal_nll_keeps_the_top_nucleus(p, budget):
    """For nll, the kept tokens are the most probable ones, with mass ≥ 1 − b."""
    kept = ~kad.Primal(budget=budget).defer(p)
    assert p[kept].sum().item() >= 1 - budget - 1e-5
    if kept.any() and (~kept).any():
        assert p[kept].min() >= p[~kept].max()


@settings(max_examples=40, deadline=None)
@given(
    st.builds(distribution, st.integers(0, 2**31), st.integers(2, 10), st.floats(0.2, 5)),
    st.floats(0.0, 1.0),
    st.sampled_from(LOSSES),
)
def test_exact_beats_primal_within_the_greedy_bound(p, budget, loss):
    """Invariant 7 and SPEC 3: r(exact) ≤ r(primal) ≤ r(exact) + p_crit ℓ(p, crit)."""
    exact = kad.exact_deferral(p, budget, loss)
    assert (p * exact).sum().item() <= budget + 1e-6
    primal = kad.Primal(budget=budget, loss=loss).defer(p)
    r_exact, r_primal = risk(p, exact, loss).item(), risk(p, primal, loss).item()
    assert r_exact <= r_primal + 1e-5
    ell = loss_values(p, loss)
    order = sorted(range(p.numel()), key=lambda v: (-ell[v].item(), v))
    n = int(primal.sum())
    bound = p[order[n]].item() * ell[order[n]].item() if n < p.numel() else 0.0
    assert r_primal - r_exact <= bound + 1e-5


@settings(max_examples=40, deadline=None)
@given(
    st.builds(distribution, st.integers(0, 2**31), st.integers(2, 10), st.floats(0.2, 5)),
    st.floats(0.0, 3.0),
    st.sampled_from(LOSSES),
)
def test_primal_never_worse_than_dual_at_the_same_mass(p, mu, loss):
    """Invariant 7: with the dual's deferred mass as budget, primal risk ≤ dual risk, and the
    exact optimum is never worse than either."""
    if loss == "zero_one":
        mu = min(mu, 0.99)
    dual = kad.Dual(mu=mu, loss=loss).defer(p)
    mass = min((p * dual).sum().item(), 1.0)
    primal = kad.Primal(budget=mass, loss=loss).defer(p)
    exact = kad.exact_deferral(p, mass, loss)
    r_dual, r_primal, r_exact = (risk(p, d, loss).item() for d in (dual, primal, exact))
    assert r_primal <= r_dual + 1e-5
    assert r_exact <= min(r_primal, r_dual) + 1e-5


def test_exact_deferral_on_a_known_instance():
    """Greedy takes the 0.3 token (highest ratio) and stops; the optimum takes 0.2 + 0.2 + ..."""
    p = torch.tensor([0.45, 0.3, 0.25])
    # nll ratios: -log p. Budget 0.55: {0.3, 0.25} fits (0.55) and removes the most risk.
    assert kad.exact_deferral(p, 0.55).tolist() == [False, True, True]
    assert kad.exact_deferral(p, 0.29).tolist() == [False, False, True]
    with pytest.raises(kad.KadError, match="over 20"):
        kad.exact_deferral(torch.full((21,), 1 / 21), 0.5)


@settings(max_examples=40, deadline=None)
@given(pairs, st.floats(0.0, 1.0))
def test_nudging_is_all_or_nothing(pqs, lam):
    p, q, _ = pqs
    pi = kad.Nudging(lam=lam).target(p, q)
    expected = q if p.max() < lam else p
    assert torch.equal(pi, expected)


@settings(max_examples=40, deadline=None)
@given(pairs, st.floats(0.0, 3.0))
def test_implicit_reward_formula(pqs, beta):
    p, q, q_base = pqs
    pi = kad.ImplicitReward(beta=beta).target(p, q, q_base)
    expected = torch.softmax(p.log() + beta * (q.log() - q_base.log()), dim=-1)
    assert torch.allclose(pi, expected, atol=1e-5)
    assert torch.allclose(kad.ImplicitReward(beta=beta).target(p, q, q), p, atol=1e-5)


def test_rules_work_on_batched_positions():
    p = torch.softmax(torch.randn(3, 5, 11), dim=-1)
    q = torch.softmax(torch.randn(3, 5, 11), dim=-1)
    for rule in ALL_RULES:
        mix = rule.mix(p, q, q)
        assert mix.pi.shape == (3, 5, 11) and mix.alpha.shape == (3, 5)
        single = rule.mix(p[1, 2], q[1, 2], q[1, 2])
        assert torch.allclose(mix.pi[1, 2], single.pi, atol=1e-6)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: kad.Dual(lam=-0.1), r"lam must be in \[0, ∞\]"),
        (lambda: kad.Dual(lam=float("nan")), "finite"),
        (lambda: kad.Dual(lam=0.3, loss="squared"), "takes mu="),
        (lambda: kad.Dual(loss="margin"), "needs mu="),
        (lambda: kad.Dual(mu=0.1, loss="hinge"), "unknown loss"),
        (lambda: kad.Primal(budget=1.5), r"budget must be in \[0, 1\]"),
        (lambda: kad.Primal(budget=-0.1), r"budget must be in \[0, 1\]"),
        (lambda: kad.Nudging(lam=-1), r"lam must be in \[0, ∞\]"),
        (lambda: kad.ProxyReferenced(delta=1.5), r"delta must be in \[-1, 1\]"),
        (lambda: kad.Primal(fractional=1), "fractional must be true or false"),
        (lambda: kad.ImplicitReward(beta=-5), r"beta must be in \[0, 100\]"),
        (lambda: kad.make_rule("dual", budget=0.5), "does not take budget"),
        (lambda: kad.make_rule("greedy"), "unknown rule 'greedy'"),
        (lambda: kad.ImplicitReward().target(torch.ones(2) / 2, torch.ones(2) / 2), "proxy_base"),
    ],
)
def test_bad_parameters_name_the_problem(build, message):
    with pytest.raises(kad.KadError, match=message):
        build()


def test_make_rule_maps_names_and_parameters():
    assert kad.make_rule("dual", lam=0.3) == kad.Dual(lam=0.3)
    assert kad.make_rule("implicit_reward", beta=2.0) == kad.ImplicitReward(beta=2.0)
    assert kad.make_rule("primal") == kad.Primal(budget=0.9)
    assert kad.Dual(mu=-math.log(0.25)).lam == pytest.approx(0.25)


@settings(max_examples=60, deadline=None)
@given(pairs)
def test_proxy_referenced_limits_and_formula(pqs):
    """SPEC 4b: d_v = [p_v < max q* − δ]; δ = 1 gives the base alone, δ = −1 defers every
    token with p_v < 1 (and one with p_v = 1 too, as max q* > 0)."""
    p, q, _ = pqs
    assert torch.equal(kad.ProxyReferenced(delta=1.0).target(p, q), p)
    everything = kad.ProxyReferenced(delta=-1.0)
    assert everything.defer(p, q)[p < 1].all()
    rule = kad.ProxyReferenced(delta=0.2)
    d = p < q.max() - 0.2
    assert torch.allclose(rule.target(p, q), mixture(p, q, d).pi)


@settings(max_examples=60, deadline=None)
@given(
    st.builds(distribution, st.integers(0, 2**31), st.integers(2, 10), st.floats(0.2, 5)),
    st.floats(0.0, 1.0),
    st.sampled_from(LOSSES),
)
def test_fractional_primal_fills_the_budget_and_bounds_the_exact_risk(p, budget, loss):
    """SPEC 4b: d ∈ [0, 1]^V with α = min(b, 1) exactly (no unfilled budget), the LP
    relaxation's optimum: r(fractional) ≤ r(exact 0-1) ≤ r(greedy 0-1)."""
    fractional = kad.Primal(budget=budget, loss=loss, fractional=True)
    d = fractional.defer(p)
    assert ((d >= 0) & (d <= 1)).all()
    q = torch.ones_like(p) / p.numel()
    mix = fractional.mix(p, q)
    assert mix.alpha.item() == pytest.approx(min(budget, p.sum().item()), abs=1e-5)
    assert abs(mix.unfilled.item()) < 1e-5 or budget >= 1.0
    exact = kad.exact_deferral(p, budget, loss)
    greedy = kad.Primal(budget=budget, loss=loss).defer(p)
    r_frac, r_exact, r_greedy = (risk(p, x, loss).item() for x in (d, exact, greedy))
    assert r_frac <= r_exact + 1e-5 <= r_greedy + 2e-5


def test_per_row_tables_equal_each_rule_alone():
    """`mix_rows`: rows of every registered rule and parameters in one batch give what each
    rule gives alone (the runtime's per-row parameter table)."""
    from kad.rules import mix_rows, rule_row

    rules = [r for r in ALL_RULES if not r.needs_proxy_base] + [kad.ImplicitReward(beta=0.5)]
    p = torch.softmax(torch.randn(len(rules), 3, 13) * 3, dim=-1)
    q = torch.softmax(torch.randn(len(rules), 3, 13) * 3, dim=-1)
    q_base = torch.softmax(torch.randn(len(rules), 3, 13), dim=-1)
    table = torch.tensor([rule_row(r) for r in rules])
    together = mix_rows(p, q, q_base, table)
    for i, rule in enumerate(rules):
        alone = rule.mix(p[i], q[i], q_base[i])
        assert torch.allclose(together.pi[i], alone.pi, atol=1e-6), rule
        assert torch.allclose(together.alpha[i], alone.alpha, atol=1e-6, equal_nan=True), rule
