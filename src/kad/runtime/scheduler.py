"""`Runtime`: continuous batching of sequences over one slot pool per model.

Each `step()` is one iteration at a round boundary:

1. **admit**: waiting sequences take free slots, first come first served;
2. **prefill**: up to ``prefill_chunk`` prompt tokens per model are cached, oldest first, so a
   long prompt stalls the running rows for one chunk at most. While rows decode, a joining
   prompt may wait up to ``prefill_delay`` rounds (`PREFILL_DELAY`) to be cached together with
   others (a prefill reads every weight however few its rows; on a GPU each is a CUDA graph);
3. **decode**: one round (`kad.runtime.round`) over the occupied slots, whatever their rules and
   sampling parameters; sequences whose prompt is cached join it;
4. **release**: finished or cancelled sequences free their slot at once; the last occupied slot
   moves into the hole, so occupied slots stay packed at the front of the pool and a round's
   batch is a view of the pool's first rows (padded up to a bucket on a GPU).

**Overlap (on a GPU).** A round reads all its inputs from the device and commits on the device,
so round k + 1 is launched before the host reads round k's results (`pipelined`): the host's
work of a round (recording tokens, text, stop strings, releasing slots, admitting and
prefilling) runs while the GPU decodes the next round, and each step returns the events of the
round before. A row that finishes in round k has decoded once more in round k + 1: that token
is dropped, so a row's tokens are those of the synchronous loop. Host writes to the device never
wait for it (`kad.fast.graphs.to_device`, `fill_` and `copy_`), and a slot that moves while a
round is in flight copies the columns that round may write too.

**γ, per request.** A round has one draft length for its batch. It is 0 (plain) while any
running row asks for plain decoding; otherwise the smallest fixed γ that a row asks for, or the
`AutoGamma` choice when rows ask for "auto" (capped by the fixed ones). Decoding is lossless, so
the batch's γ never changes a greedy row's tokens, nor a sampled row's distribution (only which
uniforms a sampled row uses: a seeded sampled row is reproducible when it runs with plain rounds,
or with the same fixed γ).
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import replace
from typing import Any, NamedTuple

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kad.errors import ContextLengthError
from kad.fast.graphs import Graph, compiled_uniforms, restored
from kad.fast.llama import unsupported_reason
from kad.fast.quant import weight_bytes
from kad.fast.runner import StaticRunner, fit_width, width_buckets
from kad.outputs import StepEvent
from kad.rules import rule_row
from kad.runtime.pool import PoolPlan, SlotTable, plan_pool
from kad.runtime.round import ALL, FIELDS, Work, decode_round
from kad.runtime.runner import Runner, TransformersRunner
from kad.runtime.sequence import Request, Sequence
from kad.speculative import AutoGamma

PREFILL_CHUNK = 512
PREFILL_GROUP = 8  # joining prompts that are cached at once without waiting
PREFILL_DELAY = 4  # rounds a joining prompt may wait to be cached with others (BENCHMARKS.md)
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def make_runner(
    model: PreTrainedModel, vocab_size: int, rows: int, context: int, fast: bool | None
) -> Runner:
    """A `StaticRunner` for the architectures the compact forward supports (unless ``fast`` is
    False), else a `TransformersRunner`. ``fast`` True insists (a KadError names why not)."""
    reason = unsupported_reason(model)
    if fast is False or (reason is not None and fast is None):
        return TransformersRunner(model, vocab_size, rows, context)
    return StaticRunner(model, vocab_size, rows, context)


def bucket(batch: int, rows: int) -> int:
    """The captured batch size that holds ``batch`` rows: the next of `BUCKETS`, or ``rows``."""
    return min(next((b for b in BUCKETS if b >= batch), rows), rows)


class Runtime:
    """The slot pools of a model family and the sequences decoding in them (module doc)."""

    def __init__(
        self,
        models: dict[str, PreTrainedModel],
        contexts: dict[str, int],
        vocab_size: int,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: set[int],
        *,
        fast: bool | None = None,
        max_rows: int | None = None,
        max_context: int | None = None,
        memory_fraction: float | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        prefill_delay: int = PREFILL_DELAY,
    ) -> None:
        self.plan: PoolPlan = self._plan(
            models,
            contexts,
            max_rows=max_rows,
            max_context=max_context,
            memory_fraction=memory_fraction,
        )
        rows = self.plan.rows
        self.runners: dict[str, Runner] = {
            role: self._runner(role, model, vocab_size, rows, self.plan.contexts[role], fast)
            for role, model in models.items()
        }
        self.device = self.runners["base"].device
        self.table = SlotTable(rows, list(models), self.device)
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        self.prefill_chunk = prefill_chunk
        self.prefill_delay = prefill_delay
        self.prefill_group = PREFILL_GROUP
        self.rounds = 0  # rounds decoded so far
        self.row_rounds = 0  # rows decoded, summed over rounds (÷ rounds: the mean batch)
        self._work: tuple[tuple[int, ...], Work] = ((), ALL)  # the running rows' ids, their Work
        self.prefills = 0  # iterations that cached prompt tokens
        self.slots: list[Sequence | None] = [None] * rows  # occupied slots are 0..used-1
        self.waiting: deque[Sequence] = deque()
        self.auto = AutoGamma()
        self._weight_bytes = (_bytes(self.runners["proxy"]), _bytes(self.runners["base"]))
        self.graphed = all(r.graphable for r in self.runners.values())
        self.graphs: dict[tuple[int, int, bool, int, Work], Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.graphed else None  # all graphs'
        for runner in self.runners.values():
            if isinstance(runner, StaticRunner):
                runner.graph_pool = self._pool  # its prefill graphs
        self._beside = torch.cuda.Stream(self.device) if self.graphed else None
        self.pipelined = self.graphed  # launch round k + 1 before reading round k (module doc)
        self._inflight: Launched | None = None  # the round launched and not yet read

    def _plan(
        self, models: dict[str, PreTrainedModel], contexts: dict[str, int], **sizes: Any
    ) -> PoolPlan:
        """The pool's plan (`plan_pool`); `kad.parallel` sizes a rank's share of it."""
        return plan_pool(models, contexts, **sizes)

    def _runner(
        self,
        role: str,
        model: PreTrainedModel,
        vocab: int,
        rows: int,
        context: int,
        fast: bool | None,
    ) -> Runner:
        """One model's runner (`make_runner`); `kad.parallel` shards the base."""
        return make_runner(model, vocab, rows, context, fast)

    @property
    def rows(self) -> int:
        return self.plan.rows

    @property
    def used(self) -> int:
        """Occupied slots (they are the first ones)."""
        return sum(s is not None for s in self.slots)

    @property
    def idle(self) -> bool:
        return not self.waiting and self.used == 0 and self._inflight is None

    def budget(self, prompt_ids: dict[str, list[int]], max_new_tokens: int) -> int:
        """The new tokens a request may have: ``max_new_tokens`` within every model's context.
        A prompt that leaves no room is a ContextLengthError."""
        room = min(self.plan.contexts[role] - len(ids) for role, ids in prompt_ids.items())
        if room < 1:
            role = min(prompt_ids, key=lambda r: self.plan.contexts[r] - len(prompt_ids[r]))
            raise ContextLengthError(
                f"the prompt is {len(prompt_ids[role])} tokens for the {role} model, whose "
                f"context here holds {self.plan.contexts[role]}: shorten it (or raise "
                "max_context)"
            )
        return min(max_new_tokens, room)

    def add(self, request: Request) -> Sequence:
        """Queue a request (its budget already within the context: see `budget`)."""
        needs = request.rule.needs_proxy_base
        roles = [r for r in self.runners if r != "proxy_base" or needs]
        seq = Sequence(replace(request, prompt_ids={r: request.prompt_ids[r] for r in roles}))
        self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence now (its client went away); it keeps what it has."""
        if seq.finished:
            return
        seq.finish_reason = seq.finish_reason or "cancelled"
        if seq in self.waiting:
            self.waiting.remove(seq)
            seq.status = "finished"
        else:
            self._release(seq)

    @torch.inference_mode()
    def step(self) -> list[StepEvent]:
        """One iteration (module doc); events are keyed by sequence id (``StepEvent.row``).
        Pipelined, a step launches a round and returns the events of the one before."""
        events = self._admit()
        self._prefill()
        running = [s for s in self.slots if s is not None and s.status == "running"]
        previous, launched = self._inflight, self._launch(running) if running else None
        self._inflight = launched if self.pipelined else None
        for done in (previous, None if self.pipelined else launched):
            if done is not None:
                events += self._record(done)
        return events

    # --- admission and prefill ------------------------------------------------------------

    def _admit(self) -> list[StepEvent]:
        events = []
        while self.waiting and self.used < self.rows:
            seq = self.waiting.popleft()
            if seq.request.max_new_tokens < 1:  # nothing to decode
                seq.status, seq.finish_reason = "finished", "length"
                events.append(seq.text_event([], self.eos_ids, self.tokenizer))
                continue
            slot = self.used
            self.slots[slot], seq.slot, seq.status = seq, slot, "prefilling"
            seq.admitted_round = self.rounds
            request = seq.request
            for role in self.runners:
                self.runners[role].clear(slot)
                seq.cached[role] = 0
            uses = request.rule.needs_proxy_base and "proxy_base" in self.runners
            self.table.write(slot, rule_row(request.rule), request.warp.row(), request.seed, uses)
        return events

    def _prefill(self) -> None:
        """Cache up to `prefill_chunk` prompt tokens per model, oldest sequence first.

        While rows are decoding, joining prompts wait up to ``prefill_delay`` rounds to be
        cached together (a prefill reads every weight whatever its rows), unless a full group
        of them is already waiting."""
        waiting = sorted(
            (s for s in self.slots if s is not None and s.status == "prefilling"),
            key=lambda s: s.id,
        )
        if not waiting:
            return
        decoding = any(s is not None and s.status == "running" for s in self.slots)
        oldest = self.rounds - waiting[0].admitted_round
        if decoding and oldest < self.prefill_delay and len(waiting) < self.prefill_group:
            return
        self.prefills += 1
        for role, runner in self.runners.items():
            chunks: dict[int, list[int]] = {}
            left = self.prefill_chunk
            for seq in waiting:
                if role not in seq.request.prompt_ids or left <= 0:
                    continue
                chunk = seq.prefill_left(role)[:left]
                if chunk:
                    chunks[seq.slot] = chunk  # type: ignore[index]
                    left -= len(chunk)
            if chunks:
                cached = {slot: self.slots[slot].cached[role] for slot in chunks}  # type: ignore[union-attr]
                runner.prefill(chunks, cached)
                for slot, chunk in chunks.items():
                    self.slots[slot].cached[role] += len(chunk)  # type: ignore[union-attr]
        for seq in waiting:
            if all(not seq.prefill_left(role) for role in seq.request.prompt_ids):
                seq.status = "running"
                last = {role: ids[-1] for role, ids in seq.request.prompt_ids.items()}
                self.table.start(seq.slot, last)  # type: ignore[arg-type]

    # --- decoding -------------------------------------------------------------------------

    def _gamma(self, running: list[Sequence]) -> int:
        """The round's draft length (module doc)."""
        wants = [s.request.speculative for s in running]
        if any(w is None for w in wants):
            return 0
        fixed = [int(w) for w in wants if w != "auto"]
        gamma = min(fixed) if fixed else self.auto.gamma_max
        if len(fixed) < len(wants):
            gamma = min(gamma, self.auto.choose())
        return gamma

    def _launch(self, running: list[Sequence]) -> Launched:
        """Start one round over the occupied slots (its results are read by `_record`)."""
        self.rounds += 1
        self.row_rounds += len(running)
        gamma = self._gamma(running)
        used = self.used
        uses_qb = any(s.request.rule.needs_proxy_base for s in running)
        runners = {r: x for r, x in self.runners.items() if r != "proxy_base" or uses_qb}
        # The columns attention reads: every occupied row's, prefilling ones too (a position
        # past the width is clamped to its last column, which must not hold a cached token),
        # and the columns of the round in flight, not yet counted in `cached`.
        occupied = [s for s in self.slots if s is not None]
        width = max(max(s.cached.values()) for s in occupied) + self._in_flight() + gamma + 1
        work = self._work_of(running)
        ready = None
        if self.graphed:
            batch = bucket(used, self.rows)
            width = fit_width(self.context, width)
            packed = self._graph(batch, gamma, runners, width, work).replay()
            if packed.is_cuda:  # the graph's output is overwritten by the next replay
                host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
                packed = host.copy_(packed, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
        else:
            batch = used
            rows = [s.slot for s in running]
            live = {role: rows for role in runners}
            if uses_qb:
                live["proxy_base"] = [s.slot for s in running if s.request.rule.needs_proxy_base]
            packed = decode_round(
                runners,
                self.table,
                batch,
                gamma,
                width=width,
                live=live,
                work=work,
            )
        return Launched([(s, s.slot) for s in running], gamma, batch, packed, ready)  # type: ignore[misc]

    def _record(self, launched: Launched) -> list[StepEvent]:
        """Read a launched round's results into its sequences (those that finished or were
        cancelled since its launch drop theirs) and release the rows that finish."""
        if launched.ready is not None:
            launched.ready.synchronize()
        values = launched.values.tolist()  # the round's one wait for the device
        gamma, events, accepted = launched.gamma, [], []
        rows = [(seq, slot) for seq, slot in launched.rows if not seq.finished]
        for seq, slot in rows:
            row = values[slot]
            kept = int(row[-1]) + 1
            for role in seq.cached:
                seq.cached[role] += kept
            events.append(seq.record(gamma, row, FIELDS, self.eos_ids, self.tokenizer))
            accepted.append(int(row[-1]))
        self._update_auto(gamma, launched.batch, accepted)
        for seq, _ in rows:
            if seq.finish_reason is not None:
                self._release(seq)
        return events

    def _in_flight(self) -> int:
        """Columns a row may gain from the round in flight (its γ + 1; 0 when none)."""
        return 0 if self._inflight is None else self._inflight.gamma + 1

    def _work_of(self, running: list[Sequence]) -> Work:
        """`Work.of` the running rows, recomputed only when they change (not every round)."""
        ids = tuple(s.id for s in running)
        if ids != self._work[0]:
            requests = [s.request for s in running]
            self._work = (ids, Work.of([r.rule for r in requests], [r.warp for r in requests]))
        return self._work[1]

    def _update_auto(self, gamma: int, batch: int, accepted: list[int]) -> None:
        """Feed auto γ the round's acceptance and the cost ratio of a proxy step to a verify."""
        if gamma == 0 or not accepted:  # plain, or every row dropped its result
            return
        judged = sum(min(k + 1, gamma) for k in accepted)
        base, proxy = self.runners["base"], self.runners["proxy"]
        if isinstance(base, StaticRunner) and isinstance(proxy, StaticRunner):
            costs = proxy.step_seconds(batch, 1), base.step_seconds(batch, gamma + 1)
        else:  # no cheap device timing: the weights' bytes
            costs = self._weight_bytes
        self.auto.update(sum(accepted) / judged, *costs)

    @torch.inference_mode()
    def capture(
        self,
        gammas: Seq[int] = (0,),
        progress: Callable[[int, int], None] | None = None,
        works: Seq[Work] = (ALL,),
    ) -> int:
        """Capture the rounds of every batch bucket and width for these draft lengths and
        `Work`s (e.g. ``Work.of`` a server's default request; with the proxy's base where their
        rules read it), and every prefill bucket, now (at start-up) rather than on first use;
        returns how many graphs exist.
        ``progress(done, total)`` is called after each. A no-op off the GPU path."""
        if not self.graphed:
            return 0
        plain = {r: x for r, x in self.runners.items() if r != "proxy_base"}
        batches = sorted({bucket(b, self.rows) for b in range(1, self.rows + 1)})
        widths = width_buckets(self.context)
        prefills: list[Callable[[], object]] = [
            functools.partial(runner.prefill_graph, *key)  # type: ignore[attr-defined]
            for runner in self.runners.values()
            for key in runner.prefill_buckets()  # type: ignore[attr-defined]
        ]
        captures = prefills + [
            functools.partial(
                self._graph,
                batch,
                gamma,
                self.runners if work.needs_proxy_base else plain,
                width,
                work,
            )
            for work in works
            for gamma in gammas
            for batch in batches
            for width in widths
        ]
        for done, capture in enumerate(captures, 1):
            capture()
            if progress is not None:
                progress(done, len(captures))
        return len(self.graphs) + len(prefills)

    @property
    def context(self) -> int:
        """The widest model's columns (graphs' widths are buckets of it)."""
        return max(self.plan.contexts.values())

    def _graph(
        self, batch: int, gamma: int, runners: dict[str, Runner], width: int, work: Work
    ) -> Graph:
        """The captured round for this batch bucket, γ, set of models, attention width and
        work (captured on first use)."""
        key = (batch, gamma, "proxy_base" in runners, width, work)
        if key not in self.graphs:
            uniforms = compiled_uniforms()
            state = [r.lengths for r in runners.values()] + self.table.tensors()

            def run() -> torch.Tensor:
                return decode_round(
                    runners,
                    self.table,
                    batch,
                    gamma,
                    width=width,
                    work=work,
                    beside=self._beside,
                    uniforms=uniforms,
                )

            def warmup() -> None:
                with restored(state):
                    run()

            self.graphs[key] = Graph(run, warmup, self.device, pool=self._pool)
        return self.graphs[key]

    # --- release --------------------------------------------------------------------------

    def _release(self, seq: Sequence) -> None:
        """Free a sequence's slot; the last occupied slot moves into it."""
        seq.status = "finished"
        slot, last = seq.slot, self.used - 1
        seq.slot = None
        if slot is None:
            return
        self.table.clear(slot)
        if slot != last:
            moved = self.slots[last]
            assert moved is not None
            for role, runner in self.runners.items():
                used = min(runner.context, moved.cached.get(role, 0) + self._in_flight())
                runner.move(last, slot, used)
            self.table.move(last, slot)
            self.slots[slot], moved.slot = moved, slot
        else:
            for runner in self.runners.values():
                runner.clear(slot)
        self.slots[last] = None


class Launched(NamedTuple):
    """A round on its way: its rows with the slots they held at launch, its γ and batch, and
    its results ``[B, FIELDS·(γ+1) + 1]`` (on a GPU a pinned host copy, there once ``ready``)."""

    rows: list[tuple[Sequence, int]]
    gamma: int
    batch: int
    values: torch.Tensor
    ready: torch.cuda.Event | None


def _bytes(runner: Runner) -> float:
    return float(weight_bytes(runner.model))  # type: ignore[attr-defined]


class Session:
    """Some sequences of a runtime, stepped together: what `Aligner.start` returns.

    `step()` runs one runtime iteration (which also advances any other sequences in the
    runtime) and returns the new output of this session's rows, ``row`` being the index of the
    prompt; `cancel(row)` stops a row, `results()` gives one Generation per prompt."""

    def __init__(self, runtime: Runtime, sequences: list[Sequence]) -> None:
        self.runtime = runtime
        self.sequences = sequences
        self._row = {seq.id: i for i, seq in enumerate(sequences)}

    @property
    def done(self) -> bool:
        return all(seq.finished for seq in self.sequences)

    @property
    def tokens(self) -> int:
        """Tokens generated so far by this session's rows."""
        return sum(len(seq.token_ids) for seq in self.sequences)

    def step(self) -> list[StepEvent]:
        if self.done:
            return []
        events = self.runtime.step()
        return [
            StepEvent(self._row[e.row], e.token_ids, e.text, e.finished, e.finish_reason)
            for e in events
            if e.row in self._row
        ]

    def cancel(self, row: int) -> None:
        self.runtime.cancel(self.sequences[row])

    def results(self) -> list:
        return [seq.generation() for seq in self.sequences]
