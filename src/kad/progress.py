"""Progress of a long evaluation: a rich bar on a terminal, plain periodic lines otherwise.

Without a terminal (a batch job, a log file, a pipe), `TaskProgress` writes a line such as
``gsm8k: 120/200 examples, accuracy 0.412, 83 s`` to stderr every ``every_s`` seconds and when
the task ends. ``resume_message`` says that a task resumed and from where.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _accuracy(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


class TaskProgress:
    """Progress of one task over ``total`` items (``unit``: examples, or the demo's methods),
    ``done`` of them finished before it started.

    A context manager; call ``update(done, accuracy)`` after each finished item (or batch)
    with the number finished so far (resumed ones included) and the running accuracy (or,
    with ``detail`` naming the item, the item's). ``interactive`` None: a bar when ``stream``
    is a terminal, else lines every ``every_s`` seconds and one at the end. ``enabled`` False
    shows nothing.
    """

    def __init__(
        self,
        task: str,
        total: int,
        done: int = 0,
        accuracy: float | None = None,
        *,
        unit: str = "examples",
        enabled: bool = True,
        interactive: bool | None = None,
        every_s: float = 10.0,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.task, self.total, self.done, self.accuracy = task, total, done, accuracy
        self.unit, self.detail = unit, ""
        self.written: int | None = None  # ``done`` as of the last line written
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.every_s, self.clock = every_s, clock
        self.started = self.last_line = clock()
        self.bar: Progress | None = None

    def __enter__(self) -> TaskProgress:
        self.started = self.last_line = self.clock()
        if self.enabled and self.interactive:
            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
            )
            self.bar.start()
            self.handle = self.bar.add_task(
                self.task, total=self.total, completed=self.done, status=self.status()
            )
        return self

    def update(self, done: int, accuracy: float | None, detail: str = "") -> None:
        """``done`` items finished of ``total`` (resumed ones included), at ``accuracy``;
        ``detail`` (e.g. ``nudging λ=0.4:``) goes before the accuracy."""
        self.done, self.accuracy, self.detail = done, accuracy, detail
        if self.bar is not None:
            self.bar.update(self.handle, completed=done, status=self.status())
        elif self.enabled and self.clock() - self.last_line >= self.every_s:
            self.write_line()

    def status(self) -> str:
        """``accuracy 0.412``, after the detail if any: ``nudging λ=0.4: accuracy 0.438``."""
        return f"{self.detail} accuracy {_accuracy(self.accuracy)}".lstrip()

    def line(self) -> str:
        """``gsm8k: 120/200 examples, accuracy 0.412, 83 s``."""
        elapsed = self.clock() - self.started
        return (
            f"{self.task}: {self.done}/{self.total} {self.unit}, {self.status()}, {elapsed:.0f} s"
        )

    def write_line(self) -> None:
        self.last_line, self.written = self.clock(), self.done
        print(self.line(), file=self.stream, flush=True)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.enabled and kind is None and self.written != self.done:
            self.write_line()


def resume_message(task: str, done: int, total: int, path: str | Path) -> str | None:
    """``gsm8k: resuming, 120 of 200 examples already in results/x/gsm8k.jsonl``; None when
    nothing was done before."""
    if done == 0:
        return None
    if done >= total:
        return f"{task}: all {total} examples already in {path}"
    return f"{task}: resuming, {done} of {total} examples already in {path}"
