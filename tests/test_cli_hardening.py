"""`kad generate`, `kad serve` and the shared options against what a new user hits (issue 22):
output printed verbatim, every option value checked before any model loads, ports refused in
one line, `--json`'s documented fields, the server's default temperature, prompts from a file
or stdin."""

from __future__ import annotations

import json
import math
import socket
import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import kad
from kad.cli import app
from kad.outputs import Generation, GenerationStats

runner = CliRunner()
PROMPT = "Tom has 3 apples"


class FakeAligner:
    """Stands in for a loaded pair: records the prompts and answers each with ``text``."""

    def __init__(self, text: str = "an answer") -> None:
        self.text = text
        self.prompts: list[str] = []

    def generate(self, prompts: list[str], **kwargs: Any) -> list[Generation]:
        self.prompts += prompts
        stats = GenerationStats(tokens=2)
        return [Generation(self.text, [1, 2], "length", stats, [0.0, 1.0]) for _ in prompts]

    def close(self) -> None:
        pass


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeAligner:
    aligner = FakeAligner()
    monkeypatch.setattr("kad.cli.load_aligner", lambda *args, **kwargs: aligner)
    return aligner


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the built-in pair (what every command below would load) fails the test."""

    def load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("kad.world.builtin_aligner", load)


def refused(args: list[str], message: str, code: int = 2, **kwargs: Any) -> None:
    result = runner.invoke(app, args, **kwargs)
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output, result.output
    assert result.output.count("\n") == 1, result.output  # one line


# --- item 1: the text as generated ---------------------------------------------------------


def test_plain_output_is_not_wrapped_at_the_terminal_width(fake: FakeAligner) -> None:
    fake.text = "word " * 60 + "end [b]not markup[/b] :smile:"  # 330 characters on one line
    result = runner.invoke(app, ["generate", PROMPT])
    assert result.exit_code == 0, result.output
    assert result.stdout == fake.text + "\n"


# --- item 3: every option checked before any model loads -----------------------------------

BAD_VALUES = [
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--temperature", "-0.5"], "--temperature must be a finite number >= 0, got -0.5"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0, got nan"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--seed", "-1"], "--seed must be in [0, 2^63), got -1"),
    (["--seed", str(2**63)], f"--seed must be in [0, 2^63), got {2**63}"),
    (["--dtype", "float8"], "--dtype must be auto or one of float32"),
    (["--device", "gpu"], "--device 'gpu' is not a device"),
    (["--max-rows", "0"], "--max-rows must be >= 1, got 0"),
    (["--max-context", "-4"], "--max-context must be >= 1, got -4"),
    (["--memory-fraction", "0"], "--memory-fraction must be in (0, 1], got 0.0"),
]
COMMANDS = {
    "generate": ["generate", PROMPT],
    "eval": ["eval", "--task", "toy", "--limit", "1"],
    "sweep": ["sweep", "--task", "toy", "--limit", "1"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize(("option", "message"), BAD_VALUES)
def test_bad_values_are_one_line_before_loading(
    no_loading: None, command: str, option: list[str], message: str
) -> None:
    refused([*COMMANDS[command], *option], message)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--top-k", "-1"], "--top-k must be >= 0, got -1"),
        (["--tensor-parallel", "0"], "--tensor-parallel must be >= 1, got 0"),
    ],
)
def test_generate_only_options(no_loading: None, option: list[str], message: str) -> None:
    refused(["generate", PROMPT, *option], message)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--temperature", "2.5"], "--temperature must be in [0, 2], got 2.5"),
        (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
        (["--max-rows", "0"], "--max-rows must be >= 1, got 0"),
        (["--max-body-bytes", "0"], "--max-body-bytes must be >= 1, got 0"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--memory-fraction", "2"], "--memory-fraction must be in (0, 1], got 2.0"),
        (["--device", "cuda:x"], "--device 'cuda:x' is not a device"),
        (["--dtype", "int8"], "--dtype must be auto or one of"),
        (["--port", "99999"], "--port must be in 1..65535, got 99999"),
        (["--port", "-1"], "--port must be in 1..65535, got -1"),
        (["--port", "0"], "--port must be in 1..65535, got 0"),
    ],
)
def test_serve_refuses_bad_values_before_loading(
    no_loading: None, option: list[str], message: str
) -> None:
    refused(["serve", *option], message)


def test_devices_this_machine_lacks(no_loading: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    refused(["generate", PROMPT, "--device", "cuda"], "this machine has no cuda device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    message = "--device 'cuda:3': this machine has 2 cuda device(s), cuda:0 to cuda:1"
    for command in (["generate", PROMPT], ["eval", "--task", "toy"], ["serve"], ["bench"]):
        refused([*command, "--device", "cuda:3"], message)
    refused(["bench", "--dtype", "float8"], "--dtype must be auto or one of")


def test_good_values_pass(fake: FakeAligner) -> None:
    args = ["--temperature", "0.7", "--top-p", "1", "--top-k", "0", "--seed", str(2**63 - 1)]
    args += ["--max-new-tokens", "1", "--dtype", "auto", "--device", "auto", "--device", "cpu"]
    result = runner.invoke(app, ["generate", PROMPT, *args])
    assert result.exit_code == 0, result.output


# --- item 2: ports -------------------------------------------------------------------------


def test_a_busy_port_is_one_line_and_exit_3_before_loading(no_loading: None) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused(["serve", "--port", str(port)], f"port {port} is in use", code=3)


def test_a_port_in_time_wait_is_free_as_uvicorn_sees_it() -> None:
    """A server that closed its connections first leaves them in TIME_WAIT: a plain bind fails,
    uvicorn's (SO_REUSEADDR) succeeds, and so does the check."""
    from kad.serve.command import check_port_free

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server's side closes first: TIME_WAIT
        client.close()
    time.sleep(0.1)
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))
    check_port_free("127.0.0.1", port)


def test_an_address_not_of_this_machine(no_loading: None) -> None:
    refused(["serve", "--host", "nowhere.invalid"], "cannot listen on nowhere.invalid:8000")


# --- item 4: --json as documented ----------------------------------------------------------


def test_json_has_the_documented_fields(tiny_dirs: SimpleNamespace) -> None:
    args = ["generate", "--base", tiny_dirs.base, "--proxy", tiny_dirs.proxy]
    args += ["--proxy-base", tiny_dirs.proxy_base, "--max-new-tokens", "4", "--json"]
    for rule in ("dual", "implicit-reward"):  # implicit reward has no α: proxy_share NaN
        result = runner.invoke(app, [*map(str, args), "--rule", rule, PROMPT, "Hello"])
        assert result.exit_code == 0, result.output

        def strict(constant: str) -> None:
            raise AssertionError(f"{constant} is not JSON")

        rows = json.loads(result.stdout, parse_constant=strict)
        assert [list(row) for row in rows] == 2 * [
            ["prompt", "text", "token_ids", "finish_reason", "proxy_share", "stats"]
        ]
        for row in rows:
            assert len(row["proxy_share"]) == len(row["token_ids"])
            if rule == "dual":
                assert all(0 <= share <= 1 for share in row["proxy_share"])
            else:
                assert row["proxy_share"] == [None] * len(row["token_ids"])


def test_generation_to_dict_is_json_ready() -> None:
    out = Generation("x", [5], "stop", GenerationStats(tokens=1), [math.nan])
    assert out.to_dict()["proxy_share"] == [None]


# --- item 5: the server's default temperature ----------------------------------------------


def test_serve_temperature_is_the_default_of_requests_and_of_the_capture(
    monkeypatch: pytest.MonkeyPatch, tiny_aligner: kad.Aligner
) -> None:
    from fastapi.testclient import TestClient

    import kad.serve.command as command

    served: dict[str, Any] = {}
    captured: list[Any] = []
    monkeypatch.setattr(command, "load_aligner", lambda *args, **kwargs: tiny_aligner)
    monkeypatch.setattr(command, "check_port_free", lambda host, port: None)
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: served.update(app=app))
    monkeypatch.setattr(command, "capture_graphs", lambda *args: captured.append(args[-1]))
    body = {"model": "kad", "prompt": PROMPT, "max_tokens": 8, "seed": 1}
    texts = {}
    for option in ([], ["--temperature", "0", "--top-p", "0.9"]):
        result = runner.invoke(app, ["serve", "--threads", "1", *option])
        assert result.exit_code == 0, result.output
        with TestClient(served["app"]) as client:
            texts[len(option)] = client.post("/v1/completions", json=body).json()
            sampled = client.post("/v1/completions", json={**body, "temperature": 1})
        assert (
            sampled.json()["choices"][0]["text"]
            == tiny_aligner.generate(
                PROMPT, max_new_tokens=8, temperature=1.0, top_p=0.9 if option else 1.0, seed=1
            )[0].text
        )
    default = tiny_aligner.generate(PROMPT, max_new_tokens=8, temperature=1.0, seed=1)[0].text
    greedy = tiny_aligner.generate(PROMPT, max_new_tokens=8, temperature=0.0)[0].text
    assert default != greedy
    assert texts[0]["choices"][0]["text"] == default
    assert texts[4]["choices"][0]["text"] == greedy
    assert [(w.temperature, w.top_p) for w in captured] == [(1.0, 1.0), (0.0, 0.9)]


# --- item 6: prompts from a file or stdin --------------------------------------------------


def test_prompts_from_stdin_and_files(fake: FakeAligner, tmp_path: Any) -> None:
    result = runner.invoke(app, ["generate", "first", "-"], input="two\nlines\n")
    assert result.exit_code == 0, result.output
    text = tmp_path / "prompts.txt"
    text.write_bytes(b"\xef\xbb\xbfa\r\n\n  \nb c\n")  # a BOM, CRLF, blank lines
    lines = tmp_path / "prompts.jsonl"
    lines.write_text('{"prompt": "x\\ny", "id": 1}\n\n{"prompt": "z"}\n')
    for path in (text, lines):
        result = runner.invoke(app, ["generate", "--prompts-file", str(path)])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["generate", "--prompts-file", "-"], input="p\nq\n")
    assert result.exit_code == 0, result.output
    assert fake.prompts == ["first", "two\nlines", "a", "b c", "x\ny", "z", "p", "q"]


def test_bad_prompt_sources(no_loading: None, tmp_path: Any) -> None:
    refused(["generate"], "no prompt: give one or more")
    refused(["generate", "-"], "stdin is empty", input="\n")
    refused(["generate", "-", "-"], "- (stdin) can be given once", input="a")
    refused(["generate", "-"], "stdin line 2 is not UTF-8 text: byte 0xff", input=b"ok\n\xff")
    missing = tmp_path / "missing.txt"
    refused(["generate", "--prompts-file", str(missing)], f"{missing}: no such file")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nalso fine\nnot \xc3\x28 fine\n")
    message = f"{bad} line 3 is not UTF-8 text: byte 0xc3 at byte 5 of the line"
    refused(["generate", "--prompts-file", str(bad)], message)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    refused(["generate", "--prompts-file", str(empty)], f"{empty} holds no prompts")
    refused(["generate", "hi", "--prompts-file", str(empty)], "not both")
    records = tmp_path / "records.jsonl"
    records.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    refused(["generate", "--prompts-file", str(records)], 'line 2 is not an object with a "prompt"')
    records.write_text('{"prompt": "a"}\nnot json\n')
    refused(["generate", "--prompts-file", str(records)], "line 2 is not valid JSON")
