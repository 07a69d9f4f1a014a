"""Helpers of the server tests: an aligner that records its sessions, and uvicorn in a thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn


class RecordingAligner:
    """The real aligner, keeping every session it starts (to see what the server cancelled) and
    counting the prompts it encodes; ``delay`` seconds of sleep before each step make decoding
    slow enough to watch."""

    def __init__(self, aligner: Any, delay: float = 0.0) -> None:
        self.aligner = aligner
        self.delay = delay
        self.sessions: list[Any] = []
        self.encoded = 0

    def encode_prompts(self, prompts: Any) -> dict[str, list[list[int]]]:
        self.encoded += len(prompts)
        return self.aligner.encode_prompts(prompts)

    def start(self, prompts: Any, **kwargs: Any) -> Any:
        session = self.aligner.start(prompts, **kwargs)
        self.sessions.append(session)
        return session

    @property
    def runtime(self) -> Any:
        runtime = self.aligner.runtime
        return _SlowRuntime(runtime, self.delay) if self.delay else runtime


class _SlowRuntime:
    """A runtime that sleeps before each step."""

    def __init__(self, runtime: Any, delay: float) -> None:
        self.runtime = runtime
        self.delay = delay

    def step(self) -> Any:
        time.sleep(self.delay)
        return self.runtime.step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runtime, name)


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Run `app` under uvicorn on a free loopback port in a thread; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
