"""The batching scheduler behind `kad serve`: requests in flight are decoded together.

One worker thread owns the aligner. Requests (`Job`s, each one or more rows: prompts × n) wait in
a FIFO queue; the worker groups waiting jobs whose decoding parameters are equal (rule, sampling
parameters, stops, speculation; seeds and max tokens are per row) into one `aligner.start(...)`
session, and steps every live session in turn, one `session.step()` each, so that a long batch
never starves a newer one. The rows of all live sessions together never exceed `max_batch`.

Each job has its own asyncio queue on the server's event loop; the worker only ever puts into it
(`call_soon_threadsafe`, unbounded), so a slow client never blocks the worker or other clients.
A cancelled job (its client went away) has its rows cancelled in their session and its slots
freed at once.

A job's queue receives, in order: `RowDelta`s (new output of one of its rows), then exactly one
`JobDone` (a `kad.Generation` per row) or `JobFailed` (the exception).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import queue
import random
import threading
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kad.errors import KadError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeParams:
    """What a session is started with besides its prompts and seeds; jobs with the same
    `batch_key` (everything but max_new_tokens, a per-row budget) share a batch. Greedy decoding
    (temperature 0) ignores top_p, so it is normalised away."""

    rule: Hashable
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    speculative: int | str | None = None

    def __post_init__(self) -> None:
        if self.temperature == 0.0:
            object.__setattr__(self, "top_p", 1.0)
            object.__setattr__(self, "top_k", 0)

    @property
    def batch_key(self) -> DecodeParams:
        return dataclasses.replace(self, max_new_tokens=0)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `aligner.start` besides the prompts, seeds and token budgets."""
        return {
            "rule": self.rule,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "stop": list(self.stop) or None,
            "speculative": self.speculative,
        }


@dataclass(frozen=True)
class RowDelta:
    """New output of one row of a job; `row` indexes the job's own prompts (0..rows-1)."""

    row: int
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None


@dataclass(frozen=True)
class JobDone:
    """All rows of the job are finished: a `kad.Generation` per row, and each row's prompt
    length in tokens as the proxy reads it."""

    generations: list[Any]
    prompt_tokens: list[int]


@dataclass(frozen=True)
class JobFailed:
    """Decoding the job raised; a `KadError` is the user's fault (4xx), anything else a bug."""

    error: BaseException


_job_ids = itertools.count()


@dataclass(eq=False)
class Job:
    """One request: its prompts (rows), its parameters and the queue its events go to.

    Row i of a job with seed s is drawn with seed s + i, so n > 1 samples differ and n = 1
    matches ``aligner.generate(prompt, seed=s)``. A seeded row draws the same tokens whatever
    it is batched with; rows without a seed get random ones.
    """

    prompts: list[Any]
    params: DecodeParams
    loop: asyncio.AbstractEventLoop
    seed: int | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: int = field(default_factory=lambda: next(_job_ids))
    cancelled: bool = False
    prompt_ids: dict[str, list[list[int]]] | None = None  # per role, from aligner.encode_prompts
    prompt_tokens: list[int] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.prompts)

    def seeds(self) -> list[int]:
        if self.seed is None:
            return [random.randrange(2**62) for _ in self.prompts]
        return [self.seed + i for i in range(self.rows)]

    def emit(self, item: RowDelta | JobDone | JobFailed) -> None:
        """Hand an item to the job's event loop; never blocks. A closed loop (the server is
        shutting down) drops it."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)


@dataclass(eq=False)
class _Batch:
    """A live session and the jobs whose rows it decodes (session rows in job order)."""

    session: Any
    jobs: list[Job]
    owner: list[tuple[Job, int]]  # session row -> (job, row within the job)
    first_row: dict[int, int]  # job id -> its first session row
    finished: dict[int, set[int]]  # job id -> its finished rows
    delivered: set[int] = field(default_factory=set)  # ids of jobs that got JobDone / JobFailed

    @classmethod
    def start(cls, aligner: Any, jobs: list[Job]) -> _Batch:
        prompts = [prompt for job in jobs for prompt in job.prompts]
        seeds = [seed for job in jobs for seed in job.seeds()]
        budgets = [job.params.max_new_tokens for job in jobs for _ in range(job.rows)]
        session = aligner.start(
            prompts, seed=seeds, max_new_tokens=budgets, **jobs[0].params.kwargs()
        )
        owner = [(job, i) for job in jobs for i in range(job.rows)]
        starts = itertools.accumulate([0] + [job.rows for job in jobs])
        first = {job.id: start for job, start in zip(jobs, starts, strict=False)}
        return cls(session, jobs, owner, first, {job.id: set() for job in jobs})

    def open_jobs(self) -> list[Job]:
        """Jobs still holding slots: neither delivered nor cancelled."""
        return [j for j in self.jobs if j.id not in self.delivered and not j.cancelled]

    def live_rows(self) -> int:
        return sum(job.rows for job in self.open_jobs())


class Scheduler:
    """Runs an aligner in one worker thread and batches the jobs submitted to it."""

    def __init__(self, aligner: Any, max_batch: int = 16) -> None:
        if max_batch < 1:
            raise KadError(f"max_batch must be >= 1, got {max_batch}")
        self.aligner = aligner
        self.max_batch = max_batch
        self.peak_rows = 0  # the most rows ever decoded at once (for tests and monitoring)
        self._inbox: queue.SimpleQueue[Job | tuple[str, Job] | None] = queue.SimpleQueue()
        self._pending: deque[Job] = deque()
        self._batches: list[_Batch] = []
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # --- called from the event loop ------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="kad-scheduler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the worker; jobs still waiting or decoding get `JobFailed`."""
        if self._thread is not None:
            self._stopping.set()
            self._inbox.put(None)
            self._thread.join()
            self._thread = None

    def submit(
        self,
        prompts: Sequence[Any],
        params: DecodeParams,
        seed: int | None = None,
        prompt_ids: dict[str, list[list[int]]] | None = None,
    ) -> Job:
        """Queue a job; call it on the event loop that will read the job's events.

        prompt_ids: what ``aligner.encode_prompts(prompts)`` returned, if the caller tokenized."""
        if not 1 <= len(prompts) <= self.max_batch:
            raise KadError(
                f"a request may decode 1 to {self.max_batch} sequences (prompts × n) at once; "
                f"this one asks for {len(prompts)}"
            )
        job = Job(list(prompts), params, asyncio.get_running_loop(), seed, prompt_ids=prompt_ids)
        self._inbox.put(job)
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: stop decoding the job's rows and free their slots."""
        self._inbox.put(("cancel", job))

    def load(self) -> dict[str, int]:
        """Rows decoding now, requests waiting, and the peak (read without a lock: approximate)."""
        return {
            "running_rows": sum(b.live_rows() for b in list(self._batches)),
            "waiting_requests": len(self._pending) + self._inbox.qsize(),
            "max_batch": self.max_batch,
            "peak_rows": self.peak_rows,
        }

    # --- the worker thread ---------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopping.is_set():
                self._take_inbox(block=not self._batches and not self._pending)
                self._admit()
                for batch in list(self._batches):
                    self._step(batch)
        for job in [*self._pending, *(j for b in self._batches for j in b.open_jobs())]:
            job.emit(JobFailed(KadError("the server is shutting down")))

    def _take_inbox(self, block: bool) -> None:
        """Move submitted jobs to the waiting queue and apply cancellations; wait for work only
        when there is nothing else to do."""
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if item is None:
                return
            if isinstance(item, Job):
                self._pending.append(item)
            else:
                self._cancel(item[1])

    def _cancel(self, job: Job) -> None:
        job.cancelled = True
        if job in self._pending:
            self._pending.remove(job)
            return
        for batch in self._batches:
            if job in batch.jobs:
                first = batch.first_row[job.id]
                for row in range(first, first + job.rows):
                    batch.session.cancel(row)
                if not batch.open_jobs():
                    self._batches.remove(batch)  # nobody is listening any more
                return

    def _admit(self) -> None:
        """Start sessions from the oldest waiting jobs while they fit in the free slots (FIFO:
        a job that does not fit yet is not overtaken).

        Each job's prompts are encoded on their own first, so that a bad prompt (empty, over the
        context) fails only its own request."""
        free = self.max_batch - sum(b.live_rows() for b in self._batches)
        waiting = sum(job.rows for job in self._pending)
        if self._batches and free < min(waiting, self.max_batch // 2):
            return  # wait for half the slots rather than start many tiny sessions
        while self._pending and self._pending[0].rows <= free:
            key = self._pending[0].params.batch_key
            group: list[Job] = []
            for job in list(self._pending):
                if job.params.batch_key == key and job.rows <= free:
                    self._pending.remove(job)
                    if self._encode(job):
                        group.append(job)
                        free -= job.rows
            if group:
                try:
                    self._batches.append(_Batch.start(self.aligner, group))
                except Exception as error:
                    for job in group:
                        self._fail(job, error)
        self.peak_rows = max(self.peak_rows, self.max_batch - free)

    def _encode(self, job: Job) -> bool:
        try:
            ids = job.prompt_ids or self.aligner.encode_prompts(job.prompts)
        except Exception as error:
            self._fail(job, error)
            return False
        job.prompt_tokens = [len(row) for row in ids["proxy"]]
        return True

    def _step(self, batch: _Batch) -> None:
        try:
            events = batch.session.step()
        except Exception as error:
            self._batches.remove(batch)
            for job in batch.open_jobs():
                self._fail(job, error)
            return
        for event in events:
            job, row = batch.owner[event.row]
            if job.cancelled or job.id in batch.delivered:
                continue
            job.emit(
                RowDelta(
                    row, list(event.token_ids), event.text, event.finished, event.finish_reason
                )
            )
            if event.finished:
                batch.finished[job.id].add(row)
                if len(batch.finished[job.id]) == job.rows:
                    self._deliver(batch, job)
        if batch.session.done or not batch.open_jobs():
            self._batches.remove(batch)
            for job in batch.open_jobs():  # rows the engine ended without a `finished` event
                self._deliver(batch, job)

    def _deliver(self, batch: _Batch, job: Job) -> None:
        batch.delivered.add(job.id)
        first = batch.first_row[job.id]
        try:
            generations = batch.session.results()[first : first + job.rows]
        except Exception as error:
            self._fail(job, error)
            return
        job.emit(JobDone(generations, job.prompt_tokens))

    def _fail(self, job: Job, error: BaseException) -> None:
        if not isinstance(error, KadError):
            logger.error("decoding failed", exc_info=error)
        job.emit(JobFailed(error))
