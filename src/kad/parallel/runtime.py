"""The runtime of a tensor-parallel rank: its runners, and the driver that every rank follows.

Every rank holds the same `ParallelRuntime` (the same slots, sequences and device state) and
runs the same steps, so the base's collectives line up: rank 0, the **driver**, is the runtime
that callers use (the library, the server's worker, the bench); each other rank, a
**follower**, runs `follow()`. Host decisions are made once:

- admissions and cancellations: the driver records every `add` and `cancel` and, at the start
  of each `step`, broadcasts them (one pickled message over the gloo control group); followers
  apply them in order and step;
- γ: auto γ reads the rounds' accepted counts (agreed on the device) and the step timings, which
  each runner measures once per shape and then takes from rank 0 (`step_seconds`);
- tokens, and so stops and finished rows: the round takes rank 0's drafts, accepted counts and
  next tokens on the device (`kad.runtime.round`, ``agree``).

A follower's events are dropped; its text is decoded only to find stop strings as the driver does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol
from transformers import PreTrainedModel

from kad.errors import KadError
from kad.fast.graphs import compiled_layer
from kad.fast.llama import LlamaFamily, layer_forward, unsupported_reason
from kad.fast.runner import StaticRunner
from kad.outputs import StepEvent
from kad.parallel.group import TensorParallel
from kad.parallel.shard import shard_family
from kad.runtime.pool import PoolPlan, plan_pool
from kad.runtime.round import ALL, Work
from kad.runtime.runner import Runner, TransformersRunner
from kad.runtime.scheduler import Runtime
from kad.runtime.sequence import Request, Sequence

STOP = [("stop",)]  # the driver's last message


class AgreedTimings:
    """A runner mixin: `step_seconds` measured on every rank (a base forward is collective),
    rank 0's value kept by all, so auto γ decides the same on every rank."""

    tp: TensorParallel

    def step_seconds(self, batch: int, n: int = 1) -> float:
        key = (batch, n)
        agreed: dict[tuple[int, int], float] = self.__dict__.setdefault("_agreed", {})
        if key not in agreed:
            measured = torch.tensor([super().step_seconds(batch, n)], dtype=torch.float64)  # type: ignore[misc]
            dist.broadcast(measured, src=0, group=self.tp.control)
            agreed[key] = float(measured.item())
        return agreed[key]


class ShardedRunner(AgreedTimings, StaticRunner):
    """A `StaticRunner` over this rank's shard of the base (`kad.parallel.shard`): its KV pool
    holds this rank's KV heads ``[R, Hkv_r, S, D]``; each layer sums o's and down's outputs over
    the ranks; `agree` gives every rank rank 0's values of the round's decisions."""

    def __init__(
        self, model: PreTrainedModel, net: LlamaFamily, rows: int, context: int, tp: TensorParallel
    ) -> None:
        self.tp = tp
        super().__init__(model, net.head.shape[0], rows, context, net=net)
        group = tp.group
        self.layer_fn = functools.partial(
            compiled_layer() if self.compiled else layer_forward, group=group
        )
        self.eager_layer = functools.partial(layer_forward, group=group)

    def agree(self, values: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``values`` on every rank (a broadcast, capturable on NCCL)."""
        return funcol.broadcast(values, 0, self.tp.group)


class ReplicatedRunner(AgreedTimings, StaticRunner):
    """A `StaticRunner` over a whole model on every rank (the proxy; module doc of
    `kad.parallel`), its timings agreed."""

    def __init__(
        self, model: PreTrainedModel, vocab_size: int, rows: int, context: int, tp: TensorParallel
    ) -> None:
        self.tp = tp
        super().__init__(model, vocab_size, rows, context)


class ParallelRuntime(Runtime):
    """A `Runtime` on one rank of N (module doc). The driver's `add`, `cancel` and `step` are
    the ones callers use; followers call `follow` and nothing else."""

    def __init__(
        self,
        models: dict[str, PreTrainedModel],
        contexts: dict[str, int],
        vocab_size: int,
        tokenizer: Any,
        eos_ids: set[int],
        *,
        tp: TensorParallel,
        fast: bool | None = None,
        **settings: Any,
    ) -> None:
        if fast is False:
            raise KadError(
                "tensor parallelism runs on the fast path (kad.fast): drop --no-fast / fast=False"
            )
        reason = unsupported_reason(models["base"])
        if reason is not None:
            raise KadError(f"tensor parallelism cannot shard the base: {reason}")
        self.tp = tp
        self._ops: list[tuple] = []  # the driver's operations since its last step
        self._followed: dict[int, Sequence] = {}  # a follower's sequences by the driver's ids
        self._base = shard_family(
            LlamaFamily(models["base"], vocab_size), tp.rank, tp.world, tp.device
        )
        super().__init__(models, contexts, vocab_size, tokenizer, eos_ids, fast=fast, **settings)

    def _plan(
        self, models: dict[str, PreTrainedModel], contexts: dict[str, int], **sizes: Any
    ) -> PoolPlan:
        """This rank's pool, on its device, for its share of the base's KV heads; its rows are
        the fewest that any rank fits (shares and free memory differ), the same on every rank."""
        held = {"base": self._base.arch.kv_heads}
        plan = plan_pool(models, contexts, device=self.tp.device, kv_heads=held, **sizes)
        rows = torch.tensor([plan.rows])
        dist.all_reduce(rows, op=dist.ReduceOp.MIN, group=self.tp.control)
        if int(rows) == plan.rows:
            return plan
        sizes = {**sizes, "max_rows": int(rows)}
        return plan_pool(models, contexts, device=self.tp.device, kv_heads=held, **sizes)

    def _runner(
        self,
        role: str,
        model: PreTrainedModel,
        vocab: int,
        rows: int,
        context: int,
        fast: bool | None,
    ) -> Runner:
        """The base: this rank's shard; the others: whole on this rank's device."""
        if role == "base":
            return ShardedRunner(model, self._base, rows, context, self.tp)
        if model.device != self.tp.device:
            model.to(self.tp.device)
        if unsupported_reason(model) is None and fast is not False:
            return ReplicatedRunner(model, vocab, rows, context, self.tp)
        return TransformersRunner(model, vocab, rows, context)

    # --- the driver -----------------------------------------------------------------------

    def add(self, request: Request) -> Sequence:
        seq = super().add(request)
        self._ops.append(("add", seq.id, request))
        return seq

    def cancel(self, seq: Sequence) -> None:
        if not seq.finished:
            self._ops.append(("cancel", seq.id))
        super().cancel(seq)

    def step(self) -> list[StepEvent]:
        """Tell the followers what happened since the last step, then step with them."""
        self.tp.broadcast(self._ops)
        self._ops = []
        return super().step()

    def capture(
        self,
        gammas: Seq[int] = (0,),
        progress: Callable[[int, int], None] | None = None,
        works: Seq[Work] = (ALL,),
    ) -> int:
        """`Runtime.capture` on every rank together (the warm-ups run collectives)."""
        self._ops.append(("capture", tuple(gammas), tuple(works)))
        self.tp.broadcast(self._ops)
        self._ops = []
        return super().capture(gammas, progress, works)

    def stop(self) -> None:
        """The driver is done: the followers' `follow` returns."""
        self.tp.broadcast(STOP)

    # --- a follower -----------------------------------------------------------------------

    def follow(self) -> None:
        """Apply the driver's operations and step with it, until it stops."""
        if self.tp.driver:
            raise KadError("rank 0 drives the runtime; only other ranks follow it")
        with torch.inference_mode():
            while True:
                capture = None
                for op in self.tp.broadcast():
                    if op[0] == "stop":
                        return
                    if op[0] == "add":
                        self._followed[op[1]] = Runtime.add(self, op[2])
                    elif op[0] == "cancel" and op[1] in self._followed:
                        Runtime.cancel(self, self._followed[op[1]])
                    else:
                        capture = op[1:]  # gammas, works
                if capture is not None:
                    Runtime.capture(self, capture[0], None, capture[1])
                else:
                    Runtime.step(self)
                self._followed = {i: s for i, s in self._followed.items() if not s.finished}
