"""The worker behind `kad serve`: one thread steps the aligner's runtime, requests come and go.

Requests (`Job`s: one or more rows, prompts × n) are handed over through a thread-safe inbox.
At every round boundary the worker queues the new jobs' rows in the runtime (which admits them
first come first served, prefills them in chunks and decodes every running row in one round,
whatever its rule and sampling parameters), applies cancellations (a cancelled job's rows free
their slots at once), steps the runtime once, and routes each row's new output to its job.

Each job has its own asyncio queue on the server's event loop; the worker only ever puts into it
(`call_soon_threadsafe`, unbounded), so a slow client never blocks the worker or other clients.
A job's queue receives, in order: `RowDelta`s (new output of one of its rows), then exactly one
`JobDone` (a `kad.Generation` per row) or `JobFailed` (the exception).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import queue
import signal
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kad.errors import KadError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeParams:
    """How a job's rows are decoded (each row has its own budget; the seed comes apart)."""

    rule: Hashable
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    speculative: int | str | None = None

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `Aligner.start` besides the prompts and the seed."""
        return {
            "rule": self.rule,
            "max_new_tokens": self.max_new_tokens,
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

    A seed s gives row i the stream of `kad.sampling.row_seed(s, i)` (as `Aligner.generate`
    does), so n > 1 samples differ and row 0 matches ``aligner.generate(prompt, seed=s)``."""

    prompts: list[Any]
    params: DecodeParams
    loop: asyncio.AbstractEventLoop
    seed: int | None = None
    prompt_ids: dict[str, list[list[int]]] | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: int = field(default_factory=lambda: next(_job_ids))
    cancelled: bool = False
    prompt_tokens: list[int] = field(default_factory=list)
    session: Any = None  # the job's `kad.runtime.scheduler.Session` once queued

    @property
    def rows(self) -> int:
        return len(self.prompts)

    def emit(self, item: RowDelta | JobDone | JobFailed) -> None:
        """Hand an item to the job's event loop; never blocks. A closed loop (the server is
        shutting down) drops it."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)


def _put_all(items: list[tuple[Job, RowDelta | JobDone]]) -> None:
    """On the event loop: hand each job its items of the round, in order."""
    for job, item in items:
        job.events.put_nowait(item)


class Worker:
    """Runs an aligner's runtime in one thread and feeds it the jobs submitted to it.

    max_rows: the most rows one request may ask for (default: the runtime's slots)."""

    def __init__(self, aligner: Any, max_rows: int | None = None) -> None:
        self.aligner = aligner
        rows = aligner.runtime.rows
        if max_rows is not None and max_rows < 1:
            raise KadError(f"max_rows must be >= 1, got {max_rows}")
        self.max_rows = rows if max_rows is None else min(max_rows, rows)
        self.peak_rows = 0  # the most rows ever decoded at once (for tests and monitoring)
        self._inbox: queue.SimpleQueue[Job | tuple[str, Job] | None] = queue.SimpleQueue()
        self._jobs: dict[int, tuple[Job, int]] = {}  # sequence id -> (job, row in the job)
        self._open: set[Job] = set()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # --- called from the event loop ------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="kad-worker", daemon=True)
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
        ``prompt_ids``: the prompts as `Aligner.encode_prompts` tokenized them (the worker
        never tokenizes then)."""
        if not 1 <= len(prompts) <= self.max_rows:
            raise KadError(
                f"a request may decode 1 to {self.max_rows} sequences (prompts × n) at once; "
                f"this one asks for {len(prompts)}"
            )
        job = Job(list(prompts), params, asyncio.get_running_loop(), seed, prompt_ids)
        self._inbox.put(job)
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: stop decoding the job's rows and free their slots."""
        self._inbox.put(("cancel", job))

    def load(self) -> dict[str, int]:
        """Rows in slots, requests waiting, and the peak (read without a lock: approximate)."""
        runtime = self.aligner.runtime
        return {
            "running_rows": runtime.used,
            "waiting_requests": len(runtime.waiting) + self._inbox.qsize(),
            "max_rows": runtime.rows,
            "peak_rows": self.peak_rows,
        }

    # --- the worker thread ---------------------------------------------------------------------

    def _run(self) -> None:
        runtime = self.aligner.runtime
        with torch.inference_mode():
            while not self._stopping.is_set():
                self._take_inbox(block=runtime.idle)
                if runtime.idle:
                    continue
                outbox: dict[asyncio.AbstractEventLoop, list] = {}
                try:
                    for event in runtime.step():
                        self._route(event, outbox)
                except Exception as error:  # a bug: fail everything in flight, keep serving
                    logger.error("decoding failed", exc_info=error)
                    for job in list(self._open):
                        self._drop(job)
                        job.emit(JobFailed(error))
                    if getattr(self.aligner, "parallel", None) is not None:
                        self._give_up(error)
                        return
                    continue
                self.peak_rows = max(self.peak_rows, runtime.used)
                for loop, items in outbox.items():  # one wake-up of each event loop a round
                    with contextlib.suppress(RuntimeError):
                        loop.call_soon_threadsafe(_put_all, items)
        for job in list(self._open):
            self._drop(job)
            job.emit(JobFailed(KadError("the server is shutting down")))

    def _give_up(self, error: BaseException) -> None:
        """Under tensor parallelism a failed step leaves the ranks out of step (a rank died,
        a collective broke): serving on is impossible, so the server shuts down (SIGTERM to
        itself: uvicorn's graceful exit) for a supervisor to restart it."""
        logger.critical(
            "a tensor-parallel step failed (%s): the ranks are out of step; shutting down",
            error,
        )
        os.kill(os.getpid(), signal.SIGTERM)

    def _take_inbox(self, block: bool) -> None:
        """Queue submitted jobs and apply cancellations; wait for work only when idle."""
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if item is None:
                return
            if isinstance(item, Job):
                self._queue(item)
            else:
                job = item[1]
                job.cancelled = True
                if job in self._open:
                    self._drop(job)

    def _queue(self, job: Job) -> None:
        try:
            session = self.aligner.start(
                job.prompts, seed=job.seed, prompt_ids=job.prompt_ids, **job.params.kwargs()
            )
        except Exception as error:
            if not isinstance(error, KadError):
                logger.error("queueing a request failed", exc_info=error)
            job.emit(JobFailed(error))
            return
        job.session = session
        job.prompt_tokens = [len(s.request.prompt_ids["proxy"]) for s in session.sequences]
        self._open.add(job)
        for row, seq in enumerate(session.sequences):
            self._jobs[seq.id] = (job, row)
        if session.done:  # nothing to decode (e.g. budgets of 0)
            self._finish(job)

    def _route(self, event: Any, outbox: dict[asyncio.AbstractEventLoop, list]) -> None:
        """File a row's new output (and its job's end) for delivery after the round."""
        owner = self._jobs.get(event.row)
        if owner is None:
            return
        job, row = owner
        items = outbox.setdefault(job.loop, [])
        tokens = list(event.token_ids)
        items.append((job, RowDelta(row, tokens, event.text, event.finished, event.finish_reason)))
        if job.session.done:
            items.append((job, self._finish(job, emit=False)))

    def _finish(self, job: Job, emit: bool = True) -> JobDone:
        done = JobDone(job.session.results(), job.prompt_tokens)
        self._drop(job)
        if emit:
            job.emit(done)
        return done

    def _drop(self, job: Job) -> None:
        """Forget a job; rows still decoding are cancelled (their slots freed at once)."""
        self._open.discard(job)
        for seq in job.session.sequences:
            self._jobs.pop(seq.id, None)
            self.aligner.runtime.cancel(seq)
