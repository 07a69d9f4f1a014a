"""Lossless speculative decoding with the proxy as drafter (SPEC 6, invariants 3 and 4)."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from scipy.stats import chisquare
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import kad
from kad.speculative import AutoGamma, expected_tokens
from tests.conftest import CHAT_TEMPLATE
from tests.stats import homogeneity_p_value
from tests.test_engine import PROMPTS, RULES

SIGNIFICANCE = 0.001  # each statistical test rejects a correct sampler with probability 0.001


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_speculative_greedy_equals_plain_greedy(tiny_aligner, rule):
    """Invariant 3, for γ = 1..8, on a batch whose rows accept different numbers of drafts."""
    plain = [g.token_ids for g in tiny_aligner.generate(PROMPTS, rule=rule, max_new_tokens=24)]
    for gamma in range(1, 9):
        spec = tiny_aligner.generate(PROMPTS, rule=rule, max_new_tokens=24, speculative=gamma)
        assert [g.token_ids for g in spec] == plain, f"gamma={gamma}"
        assert all(g.stats.rounds >= 1 and g.stats.base_forwards <= len(g.token_ids) for g in spec)


def test_auto_gamma_is_lossless_and_adapts(tiny_aligner):
    plain = tiny_aligner.generate(PROMPTS, max_new_tokens=24)
    auto = tiny_aligner.generate(PROMPTS, max_new_tokens=24, speculative="auto")
    assert [g.token_ids for g in auto] == [g.token_ids for g in plain]
    assert all(1 <= g.stats.gamma_mean <= 8 for g in auto)


def test_auto_gamma_formula():
    """High acceptance and a cheap drafter ask for long drafts; the reverse for short ones."""
    easy = AutoGamma(acceptance=0.95, cost_ratio=0.02)
    hard = AutoGamma(acceptance=0.1, cost_ratio=0.5)
    assert easy.choose() == 8 and hard.choose() == 1
    middle = AutoGamma(acceptance=0.75, cost_ratio=0.1)
    gamma = middle.choose()

    def rate(g):
        return expected_tokens(0.75, g) / ((g + 1) * 0.1 + 1)

    assert rate(gamma) == max(rate(g) for g in range(1, 9))
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    hard.update(acceptance=1.0, proxy_step_s=0.01, base_step_s=1.0)
    assert hard.acceptance > 0.1 and hard.cost_ratio < 0.5


def test_an_always_accepted_drafter_emits_gamma_plus_one_per_base_forward(tiny_aligner):
    """Under rule=proxy, π = q*: every draft is accepted and a round yields γ + 1 tokens."""
    gamma = 3
    out = tiny_aligner.generate(PROMPTS, rule=kad.ProxyOnly(), max_new_tokens=16, speculative=gamma)
    for g in out:
        assert g.stats.acceptance == 1.0
        full_rounds = len(g.token_ids) // (gamma + 1)
        assert g.stats.base_forwards <= full_rounds + 1
    plain = tiny_aligner.generate(PROMPTS, rule=kad.ProxyOnly(), max_new_tokens=16)
    assert all(g.stats.tokens_per_base_forward == 1.0 for g in plain)


# --- invariant 4: a tiny vocabulary, where output distributions can be compared -------------

LETTERS = ["a", "b", "c", "d", "e", "f"]


@pytest.fixture(scope="module")
def tiny_vocab(tmp_path_factory) -> SimpleNamespace:
    """A family over 11 tokens (6 letters, EOS, pad, chat markers) with spread-out distributions."""
    specials = ["<eos>", "<pad>", "<|user|>", "<|assistant|>", "<|end|>"]
    vocab = {t: i for i, t in enumerate(LETTERS + specials)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": specials[2:]})
    fast.chat_template = CHAT_TEMPLATE
    root = tmp_path_factory.mktemp("tiny_vocab")
    common = dict(vocab_size=len(vocab), max_position_embeddings=64, eos_token_id=6, bos_token_id=6)
    torch.manual_seed(1)
    base = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
    )
    proxy = Qwen2ForCausalLM(
        Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
    )
    proxy_base = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            **common,
        )
    )
    paths = {}
    for name, model, scale in (
        ("base", base, 20.0),
        ("proxy", proxy, 6.0),
        ("proxy_base", proxy_base, 3.0),
    ):
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(scale)
        paths[name] = root / name
        model.save_pretrained(paths[name])
        fast.save_pretrained(paths[name])
    aligner = kad.Aligner.from_pretrained(
        paths["base"], paths["proxy"], paths["proxy_base"], max_rows=128
    )
    return SimpleNamespace(aligner=aligner, **paths)


def outcomes(aligner, n: int, seed0: int, **kw) -> tuple[Counter, list[kad.Generation]]:
    gens = aligner.generate(["a b c"] * n, seed=list(range(seed0, seed0 + n)), **kw)
    return Counter(tuple(g.token_ids) for g in gens), gens


@pytest.mark.parametrize(
    ("rule", "warp"),
    [
        (kad.Dual(lam=0.4), {"temperature": 1.0}),
        (kad.Primal(budget=0.9), {"temperature": 1.0}),
        (kad.Primal(budget=0.6, fractional=True), {"temperature": 1.0}),
        (kad.ProxyReferenced(delta=0.1), {"temperature": 1.0}),
        (kad.Nudging(lam=0.4), {"temperature": 1.0}),
        (kad.ImplicitReward(), {"temperature": 1.0}),
        (kad.BaseOnly(), {"temperature": 1.0}),
        (kad.Dual(lam=0.3), {"temperature": 0.7, "top_p": 0.9, "top_k": 4}),
    ],
    ids=[
        "dual",
        "primal",
        "fractional",
        "proxy-referenced",
        "nudging",
        "implicit",
        "base",
        "dual-warped",
    ],
)
def test_speculative_sampling_has_the_plain_distribution(tiny_vocab, rule, warp):
    """Invariant 4: 3-token outputs of 2000 speculative (γ = 2) and 2000 plain samples pass a
    chi-square homogeneity test at significance 0.001 (fixed seeds: the test is deterministic)."""
    n, kw = 2000, {"rule": rule, "max_new_tokens": 3, **warp}
    plain, _ = outcomes(tiny_vocab.aligner, n, 0, **kw)
    spec, gens = outcomes(tiny_vocab.aligner, n, 10_000, speculative=2, **kw)
    assert len(plain) > 5, "the test needs a spread-out distribution"
    assert homogeneity_p_value(plain, spec) > SIGNIFICANCE
    assert sum(g.stats.accepted for g in gens) > 0


@pytest.mark.parametrize(
    ("rule", "warp", "speculative"),
    [
        (kad.Dual(lam=0.4), {"temperature": 1.0}, None),
        (kad.Primal(budget=0.9), {"temperature": 1.0}, 3),
        (kad.Dual(lam=0.3), {"temperature": 0.7, "top_p": 0.9, "top_k": 4}, 2),
    ],
    ids=["dual-plain", "primal-spec", "dual-warped-spec"],
)
def test_sampling_in_a_mixed_batch_has_the_plain_distribution(tiny_vocab, rule, warp, speculative):
    """Rows of one rule, interleaved in one batch with rows of other rules, parameters, greedy
    and sampled: their 3-token outputs have the distribution of the rule decoded alone
    (chi-square homogeneity, 2000 samples each, significance 0.001)."""
    n, kw = 2000, {"max_new_tokens": 3, "speculative": speculative}
    alone, _ = outcomes(tiny_vocab.aligner, n, 0, rule=rule, **warp, **kw)
    others = [
        kad.Nudging(lam=0.5),
        kad.ProxyReferenced(delta=0.1),
        kad.Primal(0.5, fractional=True),
    ]
    rules, temperature, top_p, top_k = [], [], [], []
    for i in range(2 * n):
        mine = i % 2 == 0
        rules.append(rule if mine else others[i % 3])
        temperature.append(warp.get("temperature", 1.0) if mine else (0.0, 1.3)[i % 4 == 1])
        top_p.append(warp.get("top_p", 1.0) if mine else 0.8)
        top_k.append(warp.get("top_k", 0) if mine else 0)
    gens = tiny_vocab.aligner.generate(
        ["a b c"] * (2 * n),
        rule=rules,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=list(range(30_000, 30_000 + 2 * n)),
        **kw,
    )
    mixed = Counter(tuple(g.token_ids) for g in gens[::2])
    assert homogeneity_p_value(alone, mixed) > SIGNIFICANCE


def test_first_token_matches_the_exact_target(tiny_vocab):
    """The first speculative token follows π̃_1 computed directly from the rule."""
    aligner, rule = tiny_vocab.aligner, kad.Dual(lam=0.4)
    n = 2000
    spec, _ = outcomes(
        aligner, n, 50_000, rule=rule, max_new_tokens=3, temperature=1.0, speculative=3
    )
    first = Counter()
    for seq, count in spec.items():
        first[seq[0]] += count
    ids = aligner.encode_prompts(["a b c"])
    with torch.inference_mode():
        dists = {
            role: torch.softmax(member.model(torch.tensor(ids[role])).logits[0, -1], dim=-1)
            for role, member in aligner.members.items()
        }
    pi = rule.target(dists["base"], dists["proxy"])
    support = [v for v in range(pi.numel()) if pi[v] * n >= 5]
    observed = [first[v] for v in support] + [n - sum(first[v] for v in support)]
    expected = [pi[v].item() * n for v in support]
    expected.append(n - sum(expected))
    assert chisquare(observed, expected).pvalue > SIGNIFICANCE


def test_predicted_acceptance_matches_measured(tiny_vocab):
    """Mean 1 − TV(π̃, q̃) over verified positions predicts the acceptance rate: they agree within
    4 standard errors of a binomial proportion."""
    _, gens = outcomes(
        tiny_vocab.aligner,
        2000,
        90_000,
        rule=kad.Dual(lam=0.4),
        max_new_tokens=6,
        temperature=1.0,
        speculative=3,
    )
    drafted = sum(g.stats.drafted for g in gens)
    measured = sum(g.stats.accepted for g in gens) / drafted
    predicted = sum(g.stats.predicted_acceptance * g.stats.drafted for g in gens) / drafted
    standard_error = (predicted * (1 - predicted) / drafted) ** 0.5
    assert abs(measured - predicted) < 4 * standard_error
    assert 0.05 < measured < 0.98
    hist = [
        sum(h)
        for h in zip(
            *[g.stats.accepted_hist + [0] * (4 - len(g.stats.accepted_hist)) for g in gens],
            strict=True,
        )
    ]
    assert sum(hist) == sum(g.stats.rounds for g in gens)
