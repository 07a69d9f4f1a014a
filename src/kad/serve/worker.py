"""Transitional shim: the worker API the server uses (replaced by the runtime's worker).

`Worker(aligner, max_rows)`, `.start()`, `.stop()`, `.load()`, `.cancel(job)` and
`.submit(prompts, params, seed, prompt_ids=None)`; a job's events are `RowDelta`s, then one
`JobDone` or `JobFailed`.
"""

from __future__ import annotations

from typing import Any

from kad.scheduler import DecodeParams, Job, JobDone, JobFailed, RowDelta, Scheduler


class Worker(Scheduler):
    """The batching scheduler under the worker's names (``max_rows``; ``load()["max_rows"]``)."""

    def __init__(self, aligner: Any, max_rows: int) -> None:
        super().__init__(aligner, max_batch=max_rows)

    def load(self) -> dict[str, int]:
        load = super().load()
        load["max_rows"] = load.pop("max_batch")
        return load


__all__ = ["DecodeParams", "Job", "JobDone", "JobFailed", "RowDelta", "Worker"]
