"""The continuous-batching runtime (SPEC invariant 8): a row computes the same thing alone, in a
full batch, or joining a running batch mid-flight beside rows with other rules and parameters;
slots are reused cleanly; prefill is chunked; the pool is never over-committed."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import kad
from kad.rules import LOSSES
from kad.runtime.round import ALL, Work, decode_round
from kad.runtime.runner import TransformersRunner
from tests.test_engine import PROMPTS, RULES

MIXED = [
    (kad.Dual(lam=0.3), {}),
    (kad.Primal(budget=0.7), {"temperature": 0.9, "top_p": 0.8}),
    (kad.ProxyReferenced(delta=0.2), {}),
    (kad.Nudging(lam=0.5), {"temperature": 1.2}),
    (kad.ImplicitReward(beta=0.5), {"temperature": 0.7, "top_k": 5}),
    (kad.Primal(budget=0.5, fractional=True), {}),
    (kad.Dual(mu=0.3, loss="margin"), {"temperature": 1.0}),
]


def run_sessions(aligner, plan, also: str | None = None):
    """Start sessions at the given steps and step until all are done: ``plan`` is a list of
    (step to start at, start kwargs). Returns each session's token ids (with ``also``: pairs of
    them and that field of each Generation)."""
    sessions, started, step = [None] * len(plan), 0, 0
    while started < len(plan) or not all(s.done for s in sessions):
        for i, (at, kwargs) in enumerate(plan):
            if sessions[i] is None and at <= step:
                sessions[i] = aligner.start(**kwargs)
                started += 1
        live = [s for s in sessions if s is not None and not s.done]
        if live:
            live[0].step()  # one runtime iteration steps every session
        step += 1
    if also is not None:
        return [[(g.token_ids, getattr(g, also)) for g in s.results()] for s in sessions]
    return [[g.token_ids for g in s.results()] for s in sessions]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_a_row_is_the_same_alone_batched_and_joining_mid_flight(tiny_aligner, rule):
    """For every rule, plain and γ = 1..8: greedy tokens alone = in a full batch = joining a
    running batch whose other rows (with budgets of their own) finish and leave meanwhile."""
    alone = [tiny_aligner.generate(p, rule=rule, max_new_tokens=10)[0].token_ids for p in PROMPTS]
    for gamma in (None, *range(1, 9)):
        full = tiny_aligner.generate(PROMPTS, rule=rule, max_new_tokens=10, speculative=gamma)
        assert [g.token_ids for g in full] == alone, f"full batch, γ={gamma}"
        runners = [
            (0, {"prompts": PROMPTS, "rule": kad.Dual(lam=0.2), "max_new_tokens": [2, 5, 9]}),
            (3, {"prompts": PROMPTS[1], "rule": rule, "max_new_tokens": 10}),
            (4, {"prompts": PROMPTS[2::-2], "rule": rule, "max_new_tokens": 10}),
        ]
        for _, kwargs in runners:
            kwargs["speculative"] = gamma
        _, joined, late = run_sessions(tiny_aligner, runners)
        assert joined == [alone[1]], f"joined mid-flight, γ={gamma}"
        assert late == [alone[2], alone[0]], f"joined later, γ={gamma}"


def test_rows_with_different_rules_and_sampling_share_a_batch(tiny_aligner):
    """Each row of a batch with different λ, b, rules, losses, temperature, top-p and top-k
    (greedy and seeded sampled rows together) equals its own run alone."""
    prompts = [PROMPTS[i % 3] for i in range(len(MIXED))]
    seeds = list(range(100, 100 + len(MIXED)))
    rules = [rule for rule, _ in MIXED]
    warp = {
        key: [w.get(key, default) for _, w in MIXED]
        for key, default in (("temperature", 0.0), ("top_p", 1.0), ("top_k", 0))
    }
    together = tiny_aligner.generate(prompts, rule=rules, seed=seeds, max_new_tokens=12, **warp)
    for i, (rule, w) in enumerate(MIXED):
        alone = tiny_aligner.generate(
            prompts[i], rule=rule, seed=[seeds[i]], max_new_tokens=12, **w
        )
        assert together[i].token_ids == alone[0].token_ids, rule


def test_a_seeded_sampled_row_ignores_its_batch_and_when_it_joins(tiny_aligner):
    kw = {"rule": kad.Dual(lam=0.4), "temperature": 1.0, "top_p": 0.9, "max_new_tokens": 12}
    alone = tiny_aligner.generate(PROMPTS[2], seed=[5], **kw)[0].token_ids
    busy = {"prompts": PROMPTS * 2, "max_new_tokens": [3, 8, 1, 12, 4, 6], "temperature": 0.8}
    for at in (0, 2, 5):
        _, joined = run_sessions(
            tiny_aligner, [(0, busy), (at, {"prompts": PROMPTS[2], "seed": [5], **kw})]
        )
        assert joined == [alone], f"joined at step {at}"


def test_a_reused_slot_leaks_nothing(tiny_dirs):
    """A slot freed by one request and taken by another gives the tokens of a fresh pool."""
    fresh = kad.Aligner.from_pretrained(tiny_dirs.base, tiny_dirs.proxy, max_rows=1)
    want = fresh.generate(PROMPTS[0], max_new_tokens=10, speculative=3)[0].token_ids
    used = kad.Aligner.from_pretrained(tiny_dirs.base, tiny_dirs.proxy, max_rows=1)
    used.generate(PROMPTS[2], max_new_tokens=30, temperature=1.0, seed=1)  # a longer occupant
    assert used.generate(PROMPTS[0], max_new_tokens=10, speculative=3)[0].token_ids == want
    assert used.runtime.rows == 1


def test_more_prompts_than_slots_stream_through(tiny_dirs):
    aligner = kad.Aligner.from_pretrained(tiny_dirs.base, tiny_dirs.proxy, max_rows=2)
    prompts = [PROMPTS[i % 3] for i in range(7)]
    got = aligner.generate(prompts, max_new_tokens=[3, 9, 1, 6, 2, 8, 4])
    for prompt, budget, gen in zip(prompts, [3, 9, 1, 6, 2, 8, 4], got, strict=True):
        assert gen.token_ids == aligner.generate(prompt, max_new_tokens=budget)[0].token_ids


def test_chunked_prefill_keeps_the_running_rows_going(tiny_dirs):
    """A long prompt is cached a chunk per iteration, while the running rows decode a round in
    each; its tokens equal a one-shot prefill's."""
    long_prompt = " ".join([PROMPTS[2]] * 4)
    whole = kad.Aligner.from_pretrained(tiny_dirs.base, tiny_dirs.proxy)
    want = whole.generate(long_prompt, max_new_tokens=6)[0].token_ids
    chunked = kad.Aligner.from_pretrained(tiny_dirs.base, tiny_dirs.proxy)
    chunked.prefill_chunk = 8
    running = chunked.start(PROMPTS[0], max_new_tokens=40)
    running.step()
    late = chunked.start(long_prompt, max_new_tokens=6)
    length = len(late.sequences[0].request.prompt_ids["base"])
    before = running.tokens
    running.step()  # one chunk of the long prompt, and one round for the running row
    assert late.sequences[0].status == "prefilling" and length > 8
    assert running.tokens == before + 1
    while not late.done:
        late.step()
    assert late.results()[0].token_ids == want


def test_transformers_runner_gives_the_same_tokens(tiny_dirs):
    """fast=False: every model behind transformers' own forward and cache, slot by slot."""
    static = kad.Aligner.from_pretrained(tiny_dirs.base, tiny_dirs.proxy)
    hf = kad.Aligner.from_pretrained(tiny_dirs.base, tiny_dirs.proxy, fast=False)
    assert all(isinstance(r, TransformersRunner) for r in hf.runtime.runners.values())
    for gamma in (None, 3):
        a = static.generate(PROMPTS, max_new_tokens=12, speculative=gamma)
        b = hf.generate(PROMPTS, max_new_tokens=12, speculative=gamma)
        assert [g.token_ids for g in a] == [g.token_ids for g in b]


def test_a_prompt_over_the_pool_context_is_a_clear_error(tiny_dirs):
    aligner = kad.Aligner.from_pretrained(tiny_dirs.base, tiny_dirs.proxy, max_context=16)
    with pytest.raises(kad.ContextLengthError, match="raise max_context"):
        aligner.generate(" ".join([PROMPTS[2]] * 3), max_new_tokens=4)
    out = aligner.generate(PROMPTS[1], max_new_tokens=100)[0]  # clamped to the context
    assert out.finish_reason == "length" and len(out.token_ids) < 16
    assert aligner.runtime.idle  # nothing left behind


def test_pool_sizes_are_validated_and_reported(tiny_dirs):
    for bad in ({"max_rows": 0}, {"max_rows": 1.5}, {"max_context": 1}, {"memory_fraction": 2.0}):
        aligner = kad.Aligner.from_pretrained(tiny_dirs.base, tiny_dirs.proxy, **bad)
        with pytest.raises(kad.KadError, match=next(iter(bad))):
            aligner.generate(PROMPTS[0], max_new_tokens=2)
    aligner = kad.Aligner.from_pretrained(
        tiny_dirs.base, tiny_dirs.proxy, max_rows=3, max_context=32
    )
    plan = aligner.runtime.plan
    assert plan.rows == 3 and set(plan.contexts.values()) == {32}
    assert aligner.runtime.runners["base"].k[0].shape[:3] == (3 + 1, 2, 32)  # + scratch slot


def test_cancel_frees_the_slot_at_once(tiny_aligner):
    session = tiny_aligner.start(PROMPTS, max_new_tokens=50)
    session.step()
    session.cancel(1)
    runtime = tiny_aligner.runtime
    assert all(s is not session.sequences[1] for s in runtime.slots)
    while not session.done:
        session.step()
    results = session.results()
    assert results[1].finish_reason == "cancelled"
    assert results[0].token_ids == tiny_aligner.generate(PROMPTS[0], max_new_tokens=50)[0].token_ids
    assert torch.all(runtime.table.active == False)  # noqa: E712


def test_bucketed_prefill_and_a_prefill_delay_keep_every_row_the_same(tiny_dirs, monkeypatch):
    """The GPU's prefill (rows gathered by slot into (rows, tokens, width) buckets, padding rows
    writing to the scratch slot), run eagerly here, and joining prompts that wait a few rounds
    to be cached together give each row the tokens it gets alone; the pool is left clean."""
    from kad.fast.runner import StaticRunner

    aligner = kad.Aligner.from_pretrained(tiny_dirs.base, tiny_dirs.proxy, max_rows=6)
    alone = [aligner.generate(p, max_new_tokens=10)[0].token_ids for p in PROMPTS]
    calls = []

    def bucketed(self, chunks, cached):
        calls.append(sorted(chunks))
        self.bucketed_prefill(chunks, cached, self.prefill_program)

    monkeypatch.setattr(StaticRunner, "prefill", bucketed)
    aligner.runtime.prefill_delay = 3
    for gamma in (None, 3):
        plan = [
            (0, {"prompts": PROMPTS, "max_new_tokens": [2, 5, 9]}),
            (3, {"prompts": PROMPTS[1], "max_new_tokens": 10}),
            (4, {"prompts": PROMPTS[2::-2], "max_new_tokens": 10}),
        ]
        for _, kwargs in plan:
            kwargs["speculative"] = gamma
        _, joined, late = run_sessions(aligner, plan)
        assert joined == [alone[1]] and late == [alone[2], alone[0]], f"γ={gamma}"
    assert any(len(slots) == 3 for slots in calls)  # three joiners cached in one prefill
    assert aligner.runtime.idle


def test_capture_takes_every_batch_bucket_width_and_prefill_bucket(tiny_dirs, monkeypatch):
    """What `Runtime.capture` captures on a GPU (the capture itself stubbed out here): every
    round of each batch bucket × γ × width bucket of the context × work (with the proxy's base
    for a rule that reads it), and each runner's prefill buckets, with progress after each."""
    from kad.fast.runner import StaticRunner, fit_width, width_buckets
    from kad.runtime.scheduler import bucket

    aligner = kad.Aligner.from_pretrained(
        tiny_dirs.base, tiny_dirs.proxy, tiny_dirs.proxy_base, max_rows=5, max_context=1024
    )
    runtime = aligner.runtime
    wide = {role: 1024 for role in runtime.plan.contexts}  # widths 256 and 1024 (tiny models
    monkeypatch.setattr(runtime, "plan", replace(runtime.plan, contexts=wide))  # hold less)
    rounds, prefills, progress = [], [], []
    monkeypatch.setattr(runtime, "graphed", True)
    monkeypatch.setattr(
        runtime,
        "_graph",
        lambda batch, gamma, runners, width, work: rounds.append(
            (batch, gamma, width, work, "proxy_base" in runners)
        ),
    )
    monkeypatch.setattr(StaticRunner, "prefill_buckets", lambda self: [(1, 16, 256), (2, 32, 1024)])
    monkeypatch.setattr(StaticRunner, "prefill_graph", lambda self, *key: prefills.append(key))
    # the proxy's base (GPT-2 here) runs on transformers' forward: no prefill graphs
    monkeypatch.setattr(TransformersRunner, "prefill_buckets", lambda self: [], raising=False)
    reward = Work.of([kad.ImplicitReward()], [kad.Warp()])
    works = [Work.of([kad.Dual()], [kad.Warp()]), reward, ALL]
    runtime.capture([0, 3], lambda done, total: progress.append((done, total)), works)
    widths = width_buckets(runtime.context)
    assert widths == [256, 1024]
    assert (width_buckets(4096), width_buckets(512)) == ([256, 1024, 4096], [512])
    assert (fit_width(4096, 300), fit_width(4096, 256), fit_width(4096, 5000)) == (1024, 256, 4096)
    batches = sorted({bucket(b, 5) for b in range(1, 6)})
    want = [
        (b, g, w, k, k == reward) for b in batches for g in (0, 3) for w in widths for k in works
    ]
    assert sorted(rounds, key=str) == sorted(want, key=str)
    static = [r for r in runtime.runners.values() if isinstance(r, StaticRunner)]
    assert len(static) == 2 and len(prefills) == 2 * len(static)
    total = len(rounds) + len(prefills)
    assert progress == [(i, total) for i in range(1, total + 1)]


def test_graphed_rounds_compute_their_batchs_work_and_give_each_row_its_tokens(
    tiny_dirs, monkeypatch
):
    """The GPU's round graphs (a batch bucket's round keyed by its `Work`), replayed eagerly here:
    a batch of one rule computes only that rule's formula for its rows' losses, the cut and the
    temperature's softmax only when a row needs them; a batch of mixed rules computes every
    formula; every row's tokens equal its own run alone, greedy and seeded sampled, plain and
    speculative."""
    aligner = kad.Aligner.from_pretrained(
        tiny_dirs.base, tiny_dirs.proxy, tiny_dirs.proxy_base, max_rows=8
    )
    rules = [rule for rule, _ in MIXED]
    warps = [w for _, w in MIXED]
    prompts = [PROMPTS[i % 3] for i in range(len(MIXED))]
    seeds = list(range(100, 100 + len(MIXED)))
    kw = {"max_new_tokens": 8}
    alone = {}
    for gamma in (None, 3):
        for i in range(len(MIXED)):
            alone[gamma, i] = aligner.generate(
                prompts[i], rule=rules[i], seed=[seeds[i]], speculative=gamma, **kw, **warps[i]
            )[0].token_ids
    runtime = aligner.runtime
    keys = []

    def graph(batch, gamma, runners, width, work):
        keys.append(work)
        round_ = lambda: decode_round(runners, runtime.table, batch, gamma, width=width, work=work)  # noqa: E731
        return type("Eager", (), {"replay": staticmethod(round_)})

    monkeypatch.setattr(runtime, "graphed", True)
    monkeypatch.setattr(runtime, "_graph", graph)
    warp = {
        key: [w.get(key, default) for w in warps]
        for key, default in (("temperature", 0.0), ("top_p", 1.0), ("top_k", 0))
    }
    for gamma in (None, 3):
        keys.clear()
        together = aligner.generate(
            prompts, rule=rules, seed=seeds, speculative=gamma, **kw, **warp
        )
        assert [g.token_ids for g in together] == [alone[gamma, i] for i in range(len(MIXED))]
        assert keys[0] == ALL  # mixed rules and cuts: every formula (later rounds hold fewer)
        for i in (0, 3, 6):  # one rule: its own formula, losses, cut
            keys.clear()
            one = aligner.generate(
                prompts[i], rule=rules[i], seed=[seeds[i]], speculative=gamma, **kw, **warps[i]
            )
            assert one[0].token_ids == alone[gamma, i]
            assert set(keys) == {Work.of([rules[i]], [kad.Warp(**warps[i])])}
    dual, margin = kad.Dual(lam=0.3), kad.Dual(mu=0.3, loss="margin")
    kinds, margin_id = Work.of([dual], [kad.Warp()]).kinds, LOSSES.index("margin")
    pair = Work.of([dual, margin], [kad.Warp(), kad.Warp(1.0)])
    assert pair == Work(kinds, (0, margin_id), False, False)
    assert Work.of([dual], [kad.Warp(1.0, top_p=0.9)]).cut
    assert Work.of([dual], [kad.Warp(0.7)]).temper and not Work.of([dual], [kad.Warp(0.7)]).cut
    assert Work.of([dual, kad.Primal(0.5)], [kad.Warp()]) == Work(None, None, False, False)


@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "graphed"])
def test_a_pipelined_runtime_gives_every_row_the_tokens_of_the_synchronous_loop(
    tiny_dirs, monkeypatch, graphed
):
    """Rounds launched before the round before is read (the GPU's overlap, run eagerly here;
    "graphed": through the graphed branch, the graphs replayed eagerly): rows joining
    mid-flight, finishing at their budgets, at a stop string or cancelled, more rows than slots
    (so that slots move while a round is in flight), plain and γ = 3, get exactly the tokens of
    the synchronous loop, and the pool ends clean."""
    aligner = kad.Aligner.from_pretrained(tiny_dirs.base, tiny_dirs.proxy, max_rows=3)
    runtime = aligner.runtime
    if graphed:

        def graph(batch, gamma, runners, width, work):
            def round_():
                return decode_round(runners, runtime.table, batch, gamma, width=width, work=work)

            return type("Eager", (), {"replay": staticmethod(round_)})

        monkeypatch.setattr(runtime, "graphed", True)
        monkeypatch.setattr(runtime, "_graph", graph)
    seeded = {"temperature": 0.9, "seed": [7, 8, 9]}

    def plan(gamma):
        return [
            (0, {"prompts": PROMPTS, "max_new_tokens": [2, 12, 9], "speculative": gamma}),
            (1, {"prompts": PROMPTS[1], "max_new_tokens": 9, "speculative": gamma}),
            (2, {"prompts": PROMPTS[::-1], "max_new_tokens": 7, "speculative": gamma, **seeded}),
            (4, {"prompts": PROMPTS[2], "max_new_tokens": 12, "stop": ["3"], "speculative": gamma}),
        ]

    for gamma in (None, 3):
        monkeypatch.setattr(runtime, "pipelined", False)
        synchronous = run_sessions(aligner, plan(gamma), "proxy_share")
        monkeypatch.setattr(runtime, "pipelined", True)
        pipelined = run_sessions(aligner, plan(gamma), "proxy_share")
        assert [[t for t, _ in s] for s in pipelined] == [[t for t, _ in s] for s in synchronous]
        for one, other in zip(pipelined, synchronous, strict=True):  # a cache entry lost
            for (_, share), (_, want) in zip(one, other, strict=True):  # moves the shares
                assert share == pytest.approx(want, rel=1e-3, abs=0), f"γ={gamma}"
        runtime.step()  # read the round still in flight (its rows all finished)
        assert runtime.idle and not bool(runtime.table.active.any())
    session = aligner.start(PROMPTS, max_new_tokens=30)
    for _ in range(3):
        session.step()
    session.cancel(1)  # while a round is in flight
    while not session.done:
        session.step()
    results = session.results()
    assert results[1].finish_reason == "cancelled"
    monkeypatch.setattr(runtime, "pipelined", False)
    for i in (0, 2):
        assert results[i].token_ids == aligner.generate(PROMPTS[i], max_new_tokens=30)[0].token_ids
