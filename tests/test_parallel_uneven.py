"""Uneven tensor-parallel shards on CPU (gloo; this process is rank 0 and spawns the others).

The built-in pair's base (5 heads, 5 KV heads, MLP 432) over 2 ranks (3 + 2 heads) and over 4
(2 + 1 + 1 + 1), and a random OLMo2 base with grouped KV heads, an odd MLP width and
whole-projection q/k norms over 2 ranks (3 KV heads: 2 + 1, so 4 + 2 query heads; MLP 99:
50 + 49), give the greedy tokens of one process, plain and speculative, and float-close numbers
read from the base's distribution; the ranks agree on the pool's rows; more ranks than KV heads
is a clear error before any weights load.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import Olmo2Config, Olmo2ForCausalLM

import kad
import kad.aligner
from kad.errors import KadError
from kad.fast.quant import weight_bytes
from kad.parallel.shard import split
from kad.runtime.pool import _host_memory, kv_bytes_per_token, plan_pool
from kad.world import builtin_aligner, heldout_problems
from tests.conftest import _sharpen

os.environ.setdefault("KAD_TP_TIMEOUT", "120")  # a diverging rank fails the test, never hangs

QUESTIONS = [str(p["question"]) for p in heldout_problems(3, "dev")]


def test_split_is_as_even_as_it_goes_the_first_ranks_taking_one_more():
    assert split(5, 2) == [(0, 3), (3, 5)]
    assert split(5, 4) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert split(432, 3) == [(0, 144), (144, 288), (288, 432)]
    assert split(99, 2) == [(0, 50), (50, 99)]


def test_more_ranks_than_kv_heads_is_a_clear_error_before_loading(monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(kad.aligner, "load_causal_lm", no_loading)
    with pytest.raises(
        KadError, match=r"tensor_parallel=8 is more than .*KV heads \(5\).*at most 5"
    ):
        builtin_aligner(device="cpu", tensor_parallel=8)


def same_generations(alone: kad.Aligner, sharded: kad.Aligner, prompts: list[str]) -> None:
    """Greedy tokens equal, plain and speculative; the base-dependent numbers float-close."""
    for speculative in (None, 3):
        want = alone.generate(prompts, max_new_tokens=24, speculative=speculative)
        got = sharded.generate(prompts, max_new_tokens=24, speculative=speculative)
        assert [g.token_ids for g in got] == [g.token_ids for g in want], speculative
        for g, w in zip(got, want, strict=True):
            assert g.proxy_share == pytest.approx(w.proxy_share, rel=1e-4, abs=1e-5)
            assert g.stats.mean_tv == pytest.approx(w.stats.mean_tv, rel=1e-4, abs=1e-6)


@pytest.fixture(scope="module")
def builtin_alone():
    return builtin_aligner(device="cpu", max_rows=4)


@pytest.mark.parametrize(("world", "heads"), [(2, [3, 2]), (4, [2, 1, 1, 1])])
def test_builtin_pair_over_uneven_ranks_gives_the_single_process_generations(
    builtin_alone, world, heads
):
    assert [end - start for start, end in split(5, world)] == heads
    sharded = builtin_aligner(device="cpu", max_rows=4, tensor_parallel=world)
    try:
        arch = sharded.runtime.runners["base"].net.arch  # rank 0's shard
        assert (arch.heads, arch.kv_heads, arch.whole_heads) == (heads[0], heads[0], (5, 5))
        plan = builtin_alone.runtime.plan  # rank 0's pool holds its share of the KV heads
        base_row = plan.contexts["base"] * kv_bytes_per_token(builtin_alone.members["base"].model)
        assert sharded.runtime.plan.rows == plan.rows == 4
        assert sharded.runtime.plan.bytes == plan.bytes - 4 * base_row * (5 - heads[0]) // 5
        same_generations(builtin_alone, sharded, QUESTIONS)
    finally:
        sharded.close()


@pytest.fixture(scope="module")
def olmo2_base(tiny_dirs, tmp_path_factory):
    """A random OLMo2 base on the tiny family's tokenizer: 6 heads over 3 KV heads, MLP 99."""
    torch.manual_seed(3)
    config = Olmo2Config(
        vocab_size=len(tiny_dirs.tokenizer),
        hidden_size=48,
        intermediate_size=99,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,
        max_position_embeddings=256,
        eos_token_id=tiny_dirs.tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = Olmo2ForCausalLM(config)
    with torch.no_grad():  # random q/k norms, so that a wrong width or head would show
        for block in model.model.layers:
            block.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            block.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("olmo2") / "base"
    _sharpen(model, 40.0).save_pretrained(path)
    tiny_dirs.tokenizer.save_pretrained(path)
    return path


def test_olmo2_base_with_gqa_and_an_odd_mlp_over_2_ranks_gives_the_single_process_generations(
    tiny_dirs, olmo2_base
):
    pair = (str(olmo2_base), str(tiny_dirs.proxy))
    alone = kad.Aligner.from_pretrained(*pair, device="cpu", max_rows=4)
    sharded = kad.Aligner.from_pretrained(*pair, device="cpu", max_rows=4, tensor_parallel=2)
    try:
        net = sharded.runtime.runners["base"].net  # rank 0's shard: KV heads 0-1, q heads 0-3
        assert (net.arch.heads, net.arch.kv_heads) == (4, 2)
        assert net.layers[0].gate_up.weight.shape[0] == 2 * 50
        same_generations(alone, sharded, ["Tom has 3 apples", "The quick brown fox", "12 + 34 ="])
    finally:
        sharded.close()


def test_every_rank_takes_the_fewest_rows_that_any_rank_fits(builtin_alone):
    """A host budget that holds 2 rows of rank 0's pool (3 of the 5 KV heads) and 3 of rank 1's
    (2 of them): both ranks take 2 rows, else 3 prompts would be batched differently on each and
    the ranks' collectives would not line up."""
    models = {role: member.model for role, member in builtin_alone.members.items()}
    contexts = builtin_alone.runtime.plan.contexts

    def row_bytes(kv_heads: int) -> int:
        return plan_pool(models, contexts, max_rows=1, kv_heads={"base": kv_heads}).bytes

    assert 3 <= 2.5 * row_bytes(3) / row_bytes(2) < 4
    weights = sum(weight_bytes(m) for m in {id(m): m for m in models.values()}.values())
    fraction = (weights + 2.5 * row_bytes(3)) / _host_memory()
    sharded = builtin_aligner(device="cpu", memory_fraction=fraction, tensor_parallel=2)
    try:
        assert sharded.runtime.plan.rows == 2
        want = builtin_alone.generate(QUESTIONS, max_new_tokens=12)
        got = sharded.generate(QUESTIONS, max_new_tokens=12)
        assert [g.token_ids for g in got] == [g.token_ids for g in want]
    finally:
        sharded.close()
