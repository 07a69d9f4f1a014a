"""The decoding engine on tiny Llama/Qwen2/GPT-2 models loaded from disk (SPEC 5, invariants
1, 2, 5, 6)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import kad
from kad.fast.runner import StaticRunner
from kad.runtime.runner import TransformersRunner
from kad.sampling import row_seed

PROMPTS = ["Tom has 3 apples", "Hello", "The quick brown fox jumps over the lazy dog. 12 + 34 ="]
RULES = [
    kad.Dual(lam=0.4),
    kad.Primal(budget=0.9),
    kad.Primal(budget=0.6, fractional=True),
    kad.ProxyReferenced(delta=0.1),
    kad.Nudging(lam=0.4),
    kad.ImplicitReward(beta=1.0),
    kad.BaseOnly(),
    kad.ProxyOnly(),
]


def hf_greedy(path, prompt_ids: list[int], n: int, eos: set[int]) -> list[int]:
    """transformers' own greedy generate on the same prompt ids, cut after the first EOS."""
    model = AutoModelForCausalLM.from_pretrained(path)
    out = model.generate(
        torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
    )[0, len(prompt_ids) :].tolist()
    for i, t in enumerate(out):
        if t in eos:
            return out[: i + 1]
    return out


def test_dual_lambda_zero_is_the_base_alone(tiny_aligner, tiny_dirs):
    """Invariant 1: λ = 0 generates exactly what the base generates, here and in transformers."""
    n = 16
    dual0 = tiny_aligner.generate(PROMPTS, rule=kad.Dual(lam=0.0), max_new_tokens=n)
    base = tiny_aligner.generate(PROMPTS, rule=kad.BaseOnly(), max_new_tokens=n)
    ids = tiny_aligner.encode_prompts(PROMPTS)["base"]
    for i, (a, b) in enumerate(zip(dual0, base, strict=True)):
        assert a.token_ids == b.token_ids
        assert a.stats.deferral_rate == 0.0
        assert a.token_ids == hf_greedy(tiny_dirs.base, ids[i], n, tiny_aligner.eos_ids)


def test_dual_lambda_above_one_is_the_proxy_alone(tiny_aligner, tiny_dirs):
    """Invariant 2: λ > 1 generates exactly what the proxy generates (with its chat template)."""
    n = 16
    dual = tiny_aligner.generate(PROMPTS, rule=kad.Dual(lam=1.5), max_new_tokens=n)
    proxy = tiny_aligner.generate(PROMPTS, rule=kad.ProxyOnly(), max_new_tokens=n)
    ids = tiny_aligner.encode_prompts(PROMPTS)["proxy"]
    for i, (a, b) in enumerate(zip(dual, proxy, strict=True)):
        assert a.token_ids == b.token_ids
        assert a.stats.deferral_rate == 1.0 and a.stats.mean_tv == pytest.approx(0.0, abs=1e-5)
        assert a.token_ids == hf_greedy(tiny_dirs.proxy, ids[i], n, tiny_aligner.eos_ids)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_a_batch_equals_its_rows_one_by_one(tiny_aligner, rule):
    """Invariant 5: left padding, masks and position ids are right for all models, although each
    model's prompt has its own length (raw text for the base, a chat template for the proxy)."""
    ids = tiny_aligner.encode_prompts(PROMPTS)
    assert len({len(r) for r in ids["base"]}) == len(PROMPTS)
    assert [len(r) for r in ids["base"]] != [len(r) for r in ids["proxy"]]
    batch = tiny_aligner.generate(PROMPTS, rule=rule, max_new_tokens=20)
    for prompt, together in zip(PROMPTS, batch, strict=True):
        alone = tiny_aligner.generate(prompt, rule=rule, max_new_tokens=20)[0]
        assert together.token_ids == alone.token_ids
        assert together.text == alone.text


@pytest.mark.parametrize("runner_type", [StaticRunner, TransformersRunner])
def test_cached_logits_match_a_full_recompute(tiny_aligner, runner_type):
    """Invariant 6: a slot's logits after chunked prefill, a rollback of rejected tokens and a
    further step equal a full forward; a slot is independent of the others."""
    for role, member in tiny_aligner.members.items():
        if runner_type is StaticRunner and kad.fast.unsupported_reason(member.model):
            continue
        rows = tiny_aligner.encode_prompts(PROMPTS[:2])["proxy" if role != "base" else "base"]
        runner = runner_type(member.model, tiny_aligner.vocab_size, 3, 64)
        with torch.inference_mode():
            for slot, row in ((1, rows[0]), (2, rows[1])):  # slot 0 stays empty
                head, tail = row[:-1][:3], row[:-1][3:]
                for chunk in (head, tail):
                    if chunk:
                        runner.forward(slot, torch.tensor([chunk]), heads=False)
                        runner.advance(slot, torch.tensor([len(chunk)]))
            steps = torch.tensor([[0, 0, 0, 0], [rows[0][-1], 5, 9, 17], [rows[1][-1], 40, 41, 42]])
            first = runner.forward(0, steps, live=[1, 2])  # [3, 4, V]
            runner.advance(0, torch.tensor([0, 2, 4]))  # slot 1 keeps last, 5; slot 2 all
            after = runner.forward(0, torch.tensor([[0], [7], [8]]), live=[1, 2])[:, 0]  # [3, V]
            for b, row in ((1, rows[0]), (2, rows[1])):
                kept = [*row, *steps[b, 1:].tolist()][: len(row) + (1 if b == 1 else 3)]
                full = member.model(torch.tensor([[*kept, 7 if b == 1 else 8]])).logits[0]
                ref = torch.log_softmax(full[:, : tiny_aligner.vocab_size].float(), dim=-1)
                n_ctx = len(row) - 1
                torch.testing.assert_close(first[b, :2], ref[n_ctx : n_ctx + 2], atol=1e-4, rtol=0)
                torch.testing.assert_close(after[b], ref[-1], atol=1e-4, rtol=0)


def test_one_seed_gives_each_row_its_own_stream(tiny_aligner):
    """Invariant 8: row i of a batch seeded with s draws from row_seed(s, i); row 0 equals the
    prompt alone with seed s; equal prompts in one batch draw different samples."""
    kw = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 0.95}
    batch = tiny_aligner.generate(PROMPTS, seed=7, **kw)
    again = tiny_aligner.generate(PROMPTS, seed=7, **kw)
    assert [g.token_ids for g in batch] == [g.token_ids for g in again]
    assert tiny_aligner.generate(PROMPTS[0], seed=7, **kw)[0].token_ids == batch[0].token_ids
    for i in (1, 2):
        alone = tiny_aligner.generate(PROMPTS[i], seed=row_seed(7, i), **kw)[0]
        assert alone.token_ids == batch[i].token_ids
    same = tiny_aligner.generate([PROMPTS[0]] * 8, seed=0, max_new_tokens=12, temperature=1.0)
    assert len({tuple(g.token_ids) for g in same}) > 1
    other = tiny_aligner.generate(PROMPTS, seed=8, **kw)
    assert [g.token_ids for g in other] != [g.token_ids for g in batch]


@pytest.mark.parametrize("seed", [-1, 1.5, True, 2**64, "3"])
def test_bad_seeds_are_refused(tiny_aligner, seed):
    with pytest.raises(kad.KadError, match="seed must be an integer"):
        tiny_aligner.generate(PROMPTS[0], seed=seed, max_new_tokens=2)


def test_top_k_one_is_greedy(tiny_aligner):
    greedy = tiny_aligner.generate(PROMPTS, max_new_tokens=10)
    top1 = tiny_aligner.generate(PROMPTS, max_new_tokens=10, temperature=0.7, top_k=1, seed=3)
    assert [g.token_ids for g in greedy] == [g.token_ids for g in top1]


def test_warp_top_p_and_temperature():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert torch.allclose(
        kad.Warp(temperature=1.0, top_p=0.7)(probs), torch.tensor([[0.625, 0.375, 0, 0]])
    )
    assert torch.allclose(
        kad.Warp(temperature=1.0, top_k=2)(probs), torch.tensor([[0.625, 0.375, 0, 0]])
    )
    hot = kad.Warp(temperature=2.0)(probs)
    assert torch.allclose(hot, probs.sqrt() / probs.sqrt().sum())
    assert kad.Warp()(probs).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    assert torch.equal(kad.Warp(temperature=1.0)(probs), probs)  # T = 1: π itself
    assert torch.equal(kad.Warp(temperature=1.0, top_k=4)(probs), probs)  # top-k = V is off
    with pytest.raises(kad.KadError, match="top_p"):
        kad.Warp(top_p=0.0)


def test_stops_on_max_tokens_stop_strings_and_eos(tiny_aligner):
    long = tiny_aligner.generate(PROMPTS[0], max_new_tokens=12)[0]
    assert long.finish_reason == "length" and len(long.token_ids) == 12
    # A stop string taken from the middle of the greedy text cuts the text just before it.
    cut = next(i for i in range(2, len(long.text)) if long.text[i].strip())
    stop = long.text[cut : cut + 2]
    stopped = tiny_aligner.generate(PROMPTS[0], max_new_tokens=12, stop=[stop])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == long.text[: long.text.find(stop)]
    # Make the second greedy token an EOS: generation stops there and the EOS is not in the text.
    eos = next(iter(tiny_aligner.eos_ids))
    second = long.token_ids[1]
    saved = set(tiny_aligner.eos_ids)
    tiny_aligner.eos_ids.add(second)
    try:
        ended = tiny_aligner.generate(PROMPTS[0], max_new_tokens=12)[0]
    finally:
        tiny_aligner.eos_ids.clear()
        tiny_aligner.eos_ids.update(saved)
    assert ended.finish_reason == "stop" and ended.token_ids == long.token_ids[:2]
    assert eos in tiny_aligner.eos_ids


def test_stats_are_computed_from_the_steps(tiny_aligner):
    dual = tiny_aligner.generate(PROMPTS, rule=kad.Dual(lam=0.4), max_new_tokens=10)
    for g in dual:
        assert g.stats.tokens == len(g.token_ids) == len(g.proxy_share)
        assert 0 <= g.stats.mean_alpha <= 1 and 0 <= g.stats.deferral_rate <= 1
        assert all(0 <= s <= 1 + 1e-6 for s in g.proxy_share)
    base = tiny_aligner.generate(PROMPTS, rule=kad.BaseOnly(), max_new_tokens=10)
    assert all(g.stats.deferral_rate == 0 and set(g.proxy_share) == {0.0} for g in base)
    primal = tiny_aligner.generate(PROMPTS, rule=kad.Primal(budget=0.5), max_new_tokens=10)
    assert all(0 <= g.stats.mean_unfilled <= 0.5 for g in primal)
    implicit = tiny_aligner.generate(PROMPTS, rule=kad.ImplicitReward(), max_new_tokens=10)
    assert all(g.stats.mean_alpha is None and math.isnan(g.proxy_share[0]) for g in implicit)


def test_step_wise_session_streams_the_same_text(tiny_aligner):
    session = tiny_aligner.start(PROMPTS, max_new_tokens=10)
    pieces = {i: "" for i in range(len(PROMPTS))}
    while not session.done:
        for event in session.step():
            pieces[event.row] += event.text
    results = session.results()
    assert [pieces[i] for i in range(len(PROMPTS))] == [r.text for r in results]


def test_cancel_frees_a_row_and_keeps_the_others(tiny_aligner):
    session = tiny_aligner.start(PROMPTS, max_new_tokens=10)
    session.step()
    session.cancel(1)
    while not session.done:
        session.step()
    results = session.results()
    assert results[1].finish_reason == "cancelled" and len(results[1].token_ids) == 1
    plain = tiny_aligner.generate([PROMPTS[0], PROMPTS[2]], max_new_tokens=10)
    assert [results[0].token_ids, results[2].token_ids] == [g.token_ids for g in plain]


def test_score_is_the_teacher_forced_log_probability(tiny_aligner):
    """Under the base-only rule, score() is the base's own log-likelihood of the continuation."""
    prompt, continuation = PROMPTS[0], " and 5 pears"
    got = tiny_aligner.score([prompt], [continuation], rule=kad.BaseOnly())[0]
    base = tiny_aligner.members["base"]
    p_ids = tiny_aligner.encode_prompts([prompt])["base"][0]
    c_ids = tiny_aligner.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    logits = base.model(torch.tensor([p_ids + c_ids])).logits[0, :, : tiny_aligner.vocab_size]
    logp = torch.log_softmax(logits.float(), dim=-1)
    want = sum(logp[len(p_ids) - 1 + i, t].item() for i, t in enumerate(c_ids))
    assert got == pytest.approx(want, abs=1e-3)
    two = tiny_aligner.score([prompt, PROMPTS[1]], [continuation, " world"], rule=kad.Dual())
    assert two[0] == pytest.approx(
        tiny_aligner.score(prompt, continuation, rule=kad.Dual())[0], abs=1e-4
    )


def test_each_model_renders_prompts_its_own_way(tiny_aligner, tiny_dirs):
    tok = tiny_aligner.tokenizer
    ids = tiny_aligner.encode_prompts(["Hello"])
    assert tok.decode(ids["proxy"][0]) == "<|user|>Hello<|end|><|assistant|>"
    assert tok.decode(ids["base"][0]) == "Hello"
    assert ids["proxy_base"] == ids["proxy"]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids = tiny_aligner.encode_prompts([chat])
    assert tok.decode(ids["base"][0]) == "System: Be brief.\n\nUser: Hi\n\nAssistant:"
    ids = tiny_aligner.encode_prompts([kad.Prompt(base=kad.Raw("Q: 2+2?\nA:"), proxy="2+2?")])
    assert tok.decode(ids["base"][0]) == "Q: 2+2?\nA:"
    custom = kad.Aligner.from_pretrained(
        tiny_dirs.base,
        tiny_dirs.proxy,
        base_template="Question: {prompt}\nAnswer:",
        proxy_template=lambda p: f"<|user|>{p.upper()}<|assistant|>",
    )
    ids = custom.encode_prompts(["hi"])
    assert tok.decode(ids["base"][0]) == "Question: hi\nAnswer:"
    assert tok.decode(ids["proxy"][0]) == "<|user|>HI<|assistant|>"


def test_padded_embedding_rows_are_dropped(tiny_aligner):
    """The Qwen2-style proxy has 7 more embedding rows than the tokenizer has tokens."""
    proxy_rows = tiny_aligner.members["proxy"].model.get_output_embeddings().weight.shape[0]
    assert tiny_aligner.vocab_size == len(tiny_aligner.tokenizer) == proxy_rows - 7


def test_per_row_token_budgets(tiny_aligner):
    both = tiny_aligner.generate(PROMPTS[:2], max_new_tokens=[3, 7])
    assert [len(g.token_ids) for g in both] == [3, 7]
    assert both[1].token_ids == tiny_aligner.generate(PROMPTS[1], max_new_tokens=7)[0].token_ids
    with pytest.raises(kad.KadError, match="2 max_new_tokens values for 3 prompts"):
        tiny_aligner.generate(PROMPTS, max_new_tokens=[3, 7])


def test_the_proxy_base_runs_only_for_rules_that_need_it(tiny_aligner):
    plain = tiny_aligner.start(PROMPTS[0], rule=kad.Dual(), max_new_tokens=2)
    reward = tiny_aligner.start(PROMPTS[0], rule=kad.ImplicitReward(), max_new_tokens=2)
    assert "proxy_base" not in plain.sequences[0].request.prompt_ids
    assert "proxy_base" in reward.sequences[0].request.prompt_ids
    while not (plain.done and reward.done):
        plain.step()
        reward.step()


def test_a_row_that_cuts_nothing_keeps_its_distribution_in_a_batch_that_cuts():
    """A round sorts for top-k/top-p only when some row cuts, and takes the temperature's
    softmax only when some row has T ∉ {0, 1} (`kad.runtime.round.Work`): a row with top_k = 0
    and top_p = 1 beside one that cuts gets exactly the probabilities it gets in a round that
    does not sort (a float32 cumulative sum over a large vocabulary reaches 1 before its last
    tokens, which a cut at top_p = 1 would drop), and a row at T = 1 or 0 those of a round
    without the softmax."""
    from kad.sampling import warp_rows

    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(3, 2, 50_000, generator=generator), dim=-1)
    rows = [kad.Warp(1.0), kad.Warp(0.7), kad.Warp(1.0, top_p=0.9)]
    table = torch.tensor([w.row() for w in rows])
    cut, uncut = warp_rows(probs, table, cut=True), warp_rows(probs[:2], table[:2], cut=False)
    assert torch.equal(cut[:2], uncut)
    assert (cut[2] == 0).any()  # the third row's top-p did cut
    plain = torch.tensor([kad.Warp(1.0).row(), kad.Warp().row()])
    tempered = warp_rows(probs[:2], plain, cut=False, temper=True)
    assert torch.equal(tempered, warp_rows(probs[:2], plain, cut=False, temper=False))
