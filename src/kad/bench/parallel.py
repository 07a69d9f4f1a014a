"""`kad bench --tensor-parallel N`: decode speed of the runtime with the base sharded over N
ranks, next to the roofline of N GPUs, and the all-reduce time measured alone.

Every rank runs the same `ParallelBench` (`kad.parallel.group.launch`): they time the
all-reduces together, then, batch size by batch size, make the same runtime, which rank 0 drives
(plain KAD dual λ = 0.4 and speculative KAD for each γ and auto, `kad.bench.measure`) while the
others follow it. The roofline of N ranks: a step lasts as long as one rank reads its bytes
(its base shard, the replicated output head, the whole proxy, its share of the KV cache) at one
GPU's bandwidth; the all-reduces (2 a layer, of the layer's activations ``[B, n, E]``) are timed
apart, since they are latency, not bytes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kad.bench.loading import load_pair, random_prompts, runtime_for
from kad.bench.measure import GAMMA_MAX, time_runtime
from kad.bench.run import (
    DUAL,
    DUAL_LABEL,
    BenchConfig,
    Rows,
    _free,
    _meta,
    add_speculative_rows,
)
from kad.errors import KadError
from kad.fast.graphs import seconds
from kad.fast.roofline import (
    ModelBytes,
    copy_bandwidth,
    mean_context,
    model_bytes,
    plain_roofline,
)
from kad.models import resolve_device, resolve_dtype
from kad.parallel.group import TensorParallel, check_shardable, check_size, launch
from kad.parallel.runtime import ParallelRuntime
from kad.parallel.shard import shard_bytes


def rank_bytes(model: Any, shard: Any) -> ModelBytes:
    """What one rank reads per forward of the base: its shard (less an untied input embedding,
    of which a step reads B rows) and its KV heads' share of the KV per token."""
    whole = model_bytes(model)
    embed, head = shard.embed, shard.head
    weights = shard_bytes(shard)
    if embed.data_ptr() != head.data_ptr():
        weights -= embed.numel() * embed.element_size()
    kv_heads, whole_kv_heads = shard.arch.kv_heads, shard.arch.whole_heads[1]
    return ModelBytes(weights=weights, kv_per_token=whole.kv_per_token * kv_heads // whole_kv_heads)


def allreduce_seconds(tp: TensorParallel, shape: tuple[int, ...], dtype: torch.dtype) -> float:
    """Median time of one all-reduce of a ``shape`` tensor over the ranks (collective: every
    rank calls it with the same arguments)."""
    x = torch.zeros(shape, dtype=dtype, device=tp.device)
    for _ in range(3):
        dist.all_reduce(x, group=tp.group)
    return seconds(lambda: dist.all_reduce(x, group=tp.group), tp.device)


@dataclass
class ParallelBench:
    """One rank's part of the bench (module doc)."""

    config: BenchConfig
    tp: TensorParallel

    def __post_init__(self) -> None:
        c = self.config
        dtype = resolve_dtype(c.dtype, self.tp.device)
        base_device = torch.device("cpu") if self.tp.device.type == "cuda" else self.tp.device
        self.pair = load_pair(c.base, c.proxy, c.random_init, c.seed, base_device, dtype)
        self.pair.proxy.to(self.tp.device)
        self.dtype = dtype

    def _allreduces(self) -> dict[int, dict[int, float]]:
        """Per batch size and tokens per forward n: the all-reduce time of one forward (2 per
        layer of ``[B, n, E]``)."""
        config = self.pair.base.config
        layers, width = config.num_hidden_layers, config.hidden_size
        return {
            b: {
                n: 2 * layers * allreduce_seconds(self.tp, (b, n, width), self.dtype)
                for n in sorted({1, *(g + 1 for g in self.config.gammas)})
            }
            for b in self.config.batches
        }

    def _runtime(self, batch: int) -> ParallelRuntime:
        c = self.config
        pool = c.prompt_tokens + c.new_tokens + 2 * (max(*c.gammas, GAMMA_MAX) + 1)
        return runtime_for(self.pair.models, self.pair.vocab_size, batch, pool, tp=self.tp)  # type: ignore[return-value]

    def follow(self) -> None:
        """A follower rank: the same collectives and runtimes as the driver, in its order."""
        self._allreduces()
        for batch in self.config.batches:
            self._runtime(batch).follow()
            _free(self.tp.device)

    def run(self, step: Callable[[str], None]) -> dict[str, Any]:
        """The driver: every measurement; ``step`` is told what runs next."""
        c, tp, pair = self.config, self.tp, self.pair
        step(f"all-reduce timing over {tp.world} ranks")
        allreduce = self._allreduces()
        bandwidth = copy_bandwidth(tp.device)
        batches = []
        for batch in c.batches:
            runtime = self._runtime(batch)
            base = rank_bytes(pair.base, runtime.runners["base"].net)  # type: ignore[attr-defined]
            proxy = model_bytes(pair.proxy)
            context = mean_context(c.prompt_tokens, c.new_tokens)
            prompts = random_prompts(batch, c.prompt_tokens, pair.vocab_size, c.seed + batch)
            table = Rows()
            step(f"B={batch}: {DUAL_LABEL}")
            run = time_runtime(runtime, prompts, DUAL, None, c.new_tokens, c.repeats)
            plain = plain_roofline(bandwidth, [base, proxy], batch, context)
            table.add(DUAL_LABEL, run.seconds, run.tokens, plain, tokens_per_round=1.0)
            roofline = (bandwidth, base, proxy, batch, context)
            add_speculative_rows(
                table, runtime, prompts, c.gammas, c.new_tokens, c.repeats, roofline, step
            )
            runtime.stop()
            batches.append(
                {
                    "batch": batch,
                    "rows": table.rows,
                    "allreduce_s_per_forward": allreduce[batch],
                    "rank_bytes": {
                        "base_weights": base.weights,
                        "proxy_weights": proxy.weights,
                        "kv_pool": runtime.plan.bytes,
                    },
                }
            )
            del runtime
            _free(tp.device)
        return {
            "meta": _meta(c, tp.device, self.dtype, bandwidth),
            "parallel": {
                "tensor_parallel": tp.world,
                "base_bytes_whole": model_bytes(pair.base).weights,
                "base_bytes_per_rank": base.weights,
                "proxy_bytes_per_rank": proxy.weights,
                "kv_bytes_per_token_per_rank": base.kv_per_token + proxy.kv_per_token,
            },
            "pair": {"base": pair.base_name, "proxy": pair.proxy_name},
            "batches": batches,
        }

    def close(self) -> None:
        self.tp.close()


def _bench_rank(config: BenchConfig, tp: TensorParallel) -> ParallelBench:
    return ParallelBench(config, tp)


def parallel_bench(config: BenchConfig, n: int, step: Callable[[str], None]) -> dict[str, Any]:
    """Start the ranks (`launch`) and run the bench; rank 0 returns the results."""
    device = resolve_device(config.device)
    check_size(n, device)
    if config.quantize:
        raise KadError("tensor parallelism does not shard quantized models yet: drop --quantize-*")
    if config.random_init is not None:
        from kad.fast.presets import parse_pair, preset_config

        check_shardable(preset_config(parse_pair(config.random_init)[0]), n, config.random_init)
    elif config.base is not None:
        from kad.parallel.group import check_model_shardable

        check_model_shardable(config.base, n)
    bench = launch(n, device, functools.partial(_bench_rank, config))
    try:
        return bench.run(step)
    finally:
        bench.close()


def render_parallel(results: dict[str, Any], console: Any) -> None:
    """The tensor-parallel results as rich tables."""
    from kad.bench.render import tokens_table

    par, meta = results["parallel"], results["meta"]
    gb = 1e9
    console.print(
        f"[bold]{results['pair']['base']}[/] + [bold]{results['pair']['proxy']}[/], base over "
        f"{par['tensor_parallel']} ranks on {meta['device']} ({meta['dtype']}); bytes per rank: "
        f"base {par['base_bytes_per_rank'] / gb:.2f} GB (whole {par['base_bytes_whole'] / gb:.2f})"
        f", proxy {par['proxy_bytes_per_rank'] / gb:.2f} GB; KV "
        f"{par['kv_bytes_per_token_per_rank'] / 1e3:.1f} kB/token; one GPU's bandwidth (copy) "
        f"{meta['bandwidth_bytes_per_s'] / gb:,.0f} GB/s"
    )
    for batch in results["batches"]:
        console.print(tokens_table(batch, f"roofline ×{par['tensor_parallel']}"))
        reduce = ", ".join(
            f"n={n}: {s * 1e3:.3f} ms" for n, s in batch["allreduce_s_per_forward"].items()
        )
        console.print(f"all-reduce time per base forward (2 per layer, alone): {reduce}")
