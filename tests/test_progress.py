"""Without a terminal, a long evaluation prints plain progress lines (issue 16)."""

from __future__ import annotations

import io

from kad.progress import TaskProgress, resume_message


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_every_period_and_at_the_end():
    stream, clock = io.StringIO(), Clock()
    with TaskProgress("gsm8k", 200, done=20, stream=stream, every_s=10, clock=clock) as bar:
        for done in range(21, 201):
            clock.now += 0.5  # one example every half second: a line every 20 examples
            bar.update(done, accuracy=0.25)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "gsm8k: 40/200 examples, accuracy 0.250, 10 s"
    assert lines[-1] == "gsm8k: 200/200 examples, accuracy 0.250, 90 s"
    assert len(lines) == 9  # the last periodic line is the end's: not written twice


def test_nothing_when_disabled_and_a_bar_on_a_terminal():
    stream = io.StringIO()
    with TaskProgress("csqa", 3, stream=stream, enabled=False) as bar:
        bar.update(3, 1.0)
    assert stream.getvalue() == ""
    with TaskProgress("csqa", 3, stream=stream, interactive=True) as bar:
        bar.update(3, 1.0)
    assert "csqa" in stream.getvalue() and "examples," not in stream.getvalue()


def test_resume_message_says_from_where():
    path = "results/x/gsm8k.jsonl"
    assert resume_message("gsm8k", 120, 200, path) == (
        "gsm8k: resuming, 120 of 200 examples already in results/x/gsm8k.jsonl"
    )
    assert resume_message("gsm8k", 0, 200, path) is None
    assert resume_message("gsm8k", 200, 200, path) == f"gsm8k: all 200 examples already in {path}"
