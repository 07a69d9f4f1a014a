"""`kad serve --tensor-parallel 2` end to end on CPU: the command spawns its second (gloo) rank
itself and serves HTTP. Greedy answers equal one process's `Aligner.generate`, also with two
requests of different λ decoding together; a client that leaves mid-stream neither hangs nor
kills the server; SIGINT to the process group (a terminal's Ctrl-C) and SIGTERM to the server
shut it down cleanly, its follower rank exiting with it.

The built-in pair's base has 5 attention heads, which 2 ranks cannot split: the tiny family
(4 heads, 2 KV heads) is served."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

import kad
from kad.parallel.group import free_port

PROMPT = "Tom has 3 apples"
READY_S = 90  # the server and its follower rank load on 2 busy cores
EXIT_S = 30


def followers_of(pid: int) -> list[int]:
    """The spawned rank processes among ``pid``'s children (not multiprocessing's tracker)."""
    found = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        if b"multiprocessing.spawn" in cmdline:
            found.append(int(child))
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` runs (an exited process left unreaped, a zombie, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@contextmanager
def tp_server(tiny_dirs: SimpleNamespace, log: Path) -> Iterator[SimpleNamespace]:
    """``kad serve --tensor-parallel 2`` in its own process group, once /health answers."""
    port = free_port()
    command = [
        sys.executable, "-m", "kad", "serve", "--base", str(tiny_dirs.base),
        "--proxy", str(tiny_dirs.proxy), "--device", "cpu", "--tensor-parallel", "2",
        "--port", str(port), "--max-rows", "4",
    ]  # fmt: skip
    env = {**os.environ, "KAD_TP_TIMEOUT": "60"}  # ranks out of step fail, never hang
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_S
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "not ready in time:\n" + log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        (follower,) = followers_of(process.pid)
        yield SimpleNamespace(url=url, process=process, follower=follower, log=log)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def complete(url: str, lam: float, max_tokens: int, **extra) -> dict:
    body = {"model": "kad", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    response = httpx.post(
        f"{url}/v1/completions", json={**body, "kad": {"lam": lam}, **extra}, timeout=60
    )
    assert response.status_code == 200, response.text
    return response.json()


def assert_alone(answer: dict, text: str, aligner: kad.Aligner, lam: float, max_tokens: int):
    """``answer`` (and its ``text``) is what one process decodes alone."""
    (expected,) = aligner.generate([PROMPT], rule=kad.Dual(lam=lam), max_new_tokens=max_tokens)
    assert text == expected.text
    assert answer["usage"]["completion_tokens"] == len(expected.token_ids)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


def stop(server: SimpleNamespace, sig: signal.Signals, group: bool) -> int:
    """Signal the server (its whole process group: a terminal's Ctrl-C), wait for it and its
    follower rank to exit; its exit status."""
    if group:
        os.killpg(server.process.pid, sig)
    else:
        server.process.send_signal(sig)
    try:
        code = server.process.wait(timeout=EXIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{sig.name} did not stop the server:\n{server.log.read_text()[-3000:]}")
    deadline = time.monotonic() + 10
    while running(server.follower) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(server.follower), "the follower rank outlived the server"
    text = server.log.read_text()
    assert "Traceback" not in text and "Error" not in text, text[-3000:]
    assert "Application shutdown complete" in text
    return code


def test_serves_like_one_process_survives_a_disconnect_and_stops_on_ctrl_c(
    tiny_dirs, tiny_aligner, tmp_path
):
    with tp_server(tiny_dirs, tmp_path / "serve.log") as server:
        url = server.url
        # (a) a greedy completion: one process's tokens and text
        answer = complete(url, 0.4, 12)
        assert_alone(answer, answer["choices"][0]["text"], tiny_aligner, 0.4, 12)

        # (b) two requests with different λ decoding together: A streams, B joins it
        body = {"model": "kad", "prompt": PROMPT, "max_tokens": 40, "temperature": 0}
        body.update(stream=True, stream_options={"include_usage": True}, kad={"lam": 0.1})
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as stream:
            lines = (line for line in stream.iter_lines() if line)
            chunks = [next(lines)]
            joined = complete(url, 2.0, 12)  # while A decodes
            chunks += list(lines)
        assert chunks.pop() == "data: [DONE]"
        chunks = [json.loads(line.removeprefix("data: ")) for line in chunks]
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        assert_alone(chunks[-1], text, tiny_aligner, 0.1, 40)
        assert_alone(joined, joined["choices"][0]["text"], tiny_aligner, 2.0, 12)
        assert health(url)["peak_rows"] == 2

        # (c) a client that leaves mid-stream: its row is freed, the server serves on
        body = {**body, "max_tokens": 200, "kad": {"lam": 0.3}}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as stream:
            lines = (line for line in stream.iter_lines() if line)
            for _ in range(3):
                assert next(lines).startswith("data: {")
            assert health(url)["running_rows"] == 1
        deadline = time.monotonic() + 10
        while health(url)["running_rows"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health(url)["running_rows"] == 0
        after = complete(url, 0.4, 12)  # the follower dropped the row too: the ranks agree
        assert after["choices"][0]["text"] == answer["choices"][0]["text"]

        # (d) Ctrl-C in a terminal: SIGINT to the server and its follower rank
        assert stop(server, signal.SIGINT, group=True) == 0


def test_sigterm_to_the_group_stops_the_server_and_its_follower_rank(tiny_dirs, tmp_path):
    """systemd's stop: SIGTERM to every process of the group, the follower rank exiting first
    (the server's own SIGTERM, a container's stop, takes the same path but for that)."""
    with tp_server(tiny_dirs, tmp_path / "serve.log") as server:
        assert complete(server.url, 0.4, 4)["usage"]["completion_tokens"] == 4
        assert stop(server, signal.SIGTERM, group=True) == 128 + signal.SIGTERM


def test_a_dead_follower_rank_shuts_the_server_down_with_a_clear_message(tiny_dirs, tmp_path):
    """A rank that dies leaves the ranks out of step: the request in flight fails (500), and
    the server says why and exits (for a supervisor to restart it) rather than answering every
    later request with an error."""
    with tp_server(tiny_dirs, tmp_path / "serve.log") as server:
        assert complete(server.url, 0.4, 4)["usage"]["completion_tokens"] == 4
        os.kill(server.follower, signal.SIGKILL)
        body = {"model": "kad", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        try:
            response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
            assert response.status_code == 500, response.text
        except httpx.HTTPError:
            pass  # the server may already be going down
        try:
            code = server.process.wait(timeout=EXIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail("the server outlived its rank:\n" + server.log.read_text()[-3000:])
        assert code != 0
        assert "the ranks are out of step; shutting down" in server.log.read_text()
