"""`kad serve` against bad and hostile input (issue 16): unpaired surrogates, loose types, bodies
and prompts over the limits, clients that leave, the OpenAI fields common clients send, and
random bodies (hypothesis). A real uvicorn serves the tiny family, with small limits and a
slowed step (so that a request decodes long enough to leave it)."""

from __future__ import annotations

import json
import logging
import math
import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kad
from kad.serve.app import create_app
from tests.serving import RecordingAligner, serving

PROMPT = "Tom has 3 apples"
CHAT = [{"role": "user", "content": "What is 7 times 6?"}]
MAX_BODY = 64 * 1024
MAX_CHARS = 2000
STEP_DELAY = 0.01  # s of sleep per decoding step: 200 tokens take >= 2 s


@pytest.fixture(scope="module")
def served(tiny_dirs: SimpleNamespace) -> Iterator[SimpleNamespace]:
    full = kad.Aligner.from_pretrained(
        str(tiny_dirs.base), str(tiny_dirs.proxy), str(tiny_dirs.proxy_base)
    )
    aligner = RecordingAligner(full, delay=STEP_DELAY)
    app = create_app(aligner, max_rows=8, max_body_bytes=MAX_BODY, max_prompt_chars=MAX_CHARS)
    with serving(app) as url:
        yield SimpleNamespace(url=url, aligner=aligner, worker=app.state.worker)


def post(served: SimpleNamespace, path: str, body: Any) -> httpx.Response:
    """POST ``body`` as JSON; ``json.dumps`` writes unpaired surrogates as ``\\udXXX`` escapes."""
    return httpx.post(
        f"{served.url}/v1/{path}",
        content=json.dumps(body),
        headers={"content-type": "application/json"},
        timeout=60,
    )


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("completions", {"prompt": "lone \ud800 escape"}, "prompt"),
        ("completions", {"prompt": [PROMPT, "x\udfffy"]}, "prompt"),
        ("completions", {"prompt": PROMPT, "stop": "\ud83d"}, "stop"),
        ("chat/completions", {"messages": [{"role": "user", "content": "\udfff"}]}, None),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a\ud800"}]}]},
            None,
        ),
    ],
)
def test_unpaired_surrogates_are_400(
    served: SimpleNamespace, path: str, body: dict, param: str | None
) -> None:
    error = error_of(post(served, path, {"model": "kad", "max_tokens": 2, **body}), 400)
    assert "surrogate" in error["message"] and "Unicode" in error["message"]
    if param is not None:
        assert error["param"] == param
    else:
        assert error["param"].startswith("messages.0.content")


def test_disconnect_while_waiting_frees_the_rows_at_once(served: SimpleNamespace) -> None:
    """A non-streaming request whose client closes the socket is cancelled within a second,
    though its tokens keep coming (today's server polled only when none came)."""
    body = json.dumps({"model": "kad", "prompt": "Hello world", "max_tokens": 200, "n": 4})
    host, port = served.url.removeprefix("http://").split(":")
    before = len(served.aligner.sessions)
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        deadline = time.monotonic() + 10
        while served.worker.load()["running_rows"] < 4:
            assert time.monotonic() < deadline, "the request never started decoding"
            time.sleep(0.01)
    closed = time.monotonic()
    while served.worker.load()["running_rows"] and time.monotonic() < closed + 5:
        time.sleep(0.01)
    freed = time.monotonic() - closed
    assert served.worker.load()["running_rows"] == 0
    assert freed < 1.0, f"the rows were freed {freed:.1f} s after the client left"
    (session,) = served.aligner.sessions[before:]
    assert {g.finish_reason for g in session.results()} == {"cancelled"}


def test_body_over_the_limit_is_413_before_parsing(served: SimpleNamespace) -> None:
    encoded_before = served.aligner.encoded
    huge = {"model": "kad", "prompt": "a" * (2 * MAX_BODY)}
    error = error_of(post(served, "completions", huge), 413)
    assert error["code"] == "request_too_large" and "max-body-bytes" in error["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit counts the bytes read
        yield b'{"model": "kad", "prompt": "'
        for _ in range(4):
            yield b"a" * (MAX_BODY // 2)
        yield b'"}'

    chunked = httpx.post(
        f"{served.url}/v1/completions",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    error_of(chunked, 413)
    assert served.aligner.encoded == encoded_before
    assert post(
        served, "completions", {"model": "kad", "prompt": PROMPT, "max_tokens": 2}
    ).is_success


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("completions", {"prompt": "apples " * MAX_CHARS}, "prompt"),
        ("completions", {"prompt": [PROMPT, "x" * (MAX_CHARS + 1)]}, "prompt"),
        (
            "chat/completions",
            {"messages": [{"role": "system", "content": "y" * MAX_CHARS}, *CHAT]},
            "messages",
        ),
    ],
)
def test_prompt_over_the_character_limit_is_400_before_tokenizing(
    served: SimpleNamespace, path: str, body: dict, param: str
) -> None:
    encoded_before = served.aligner.encoded
    error = error_of(post(served, path, {"model": "kad", "max_tokens": 2, **body}), 400)
    assert error["param"] == param and error["code"] == "prompt_too_long"
    assert str(MAX_CHARS) in error["message"]
    assert served.aligner.encoded == encoded_before  # refused before the tokenizer saw it


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("completions", {"prompt": PROMPT, "max_tokens": True}, "max_tokens"),
        ("completions", {"prompt": PROMPT, "n": True}, "n"),
        ("completions", {"prompt": PROMPT, "seed": False}, "seed"),
        ("completions", {"prompt": PROMPT, "max_tokens": "2"}, "max_tokens"),
        ("completions", {"prompt": PROMPT, "temperature": True}, "temperature"),
        ("completions", {"prompt": PROMPT, "stream": "yes"}, "stream"),
        ("completions", {"prompt": PROMPT, "top_k": True}, "top_k"),
        ("completions", {"prompt": PROMPT, "kad": {"speculative": True}}, "kad.speculative"),
        (
            "completions",
            {"prompt": PROMPT, "kad": {"rule": "implicit-reward", "beta": 150}},
            "kad.beta",
        ),
        ("chat/completions", {"messages": [{"role": "user", "content": ""}]}, "messages"),
        (
            "chat/completions",
            {"messages": [{"role": "system", "content": " "}, {"role": "user", "content": []}]},
            "messages",
        ),
        (
            "chat/completions",
            {"messages": CHAT, "max_completion_tokens": True},
            "max_completion_tokens",
        ),
    ],
)
def test_loose_values_are_400(served: SimpleNamespace, path: str, body: dict, param: str) -> None:
    error = error_of(post(served, path, {"model": "kad", **body}), 400)
    assert error["param"] == param


def test_non_finite_numbers_are_400(served: SimpleNamespace) -> None:
    for text in ("NaN", "Infinity"):  # Python's JSON reader takes them
        raw = f'{{"model": "kad", "prompt": "{PROMPT}", "max_tokens": 2, "temperature": {text}}}'
        response = httpx.post(
            f"{served.url}/v1/completions",
            content=raw,
            headers={"content-type": "application/json"},
        )
        assert error_of(response, 400)["param"] == "temperature"


def test_mu_of_the_nll_loss_means_lam(served: SimpleNamespace) -> None:
    body = {"model": "kad", "prompt": PROMPT, "max_tokens": 2, "kad": {"mu": 2.0}}
    stats = post(served, "completions", body).json()["kad"]
    assert stats["loss"] == "nll" and stats["lam"] == pytest.approx(math.exp(-2.0))
    both = {**body, "kad": {"mu": 2.0, "lam": 0.3}}
    assert "not both" in error_of(post(served, "completions", both), 400)["message"]


ACCEPTED = {
    "response_format": {"type": "text"},
    "tools": [],
    "tool_choice": "none",
    "parallel_tool_calls": True,
    "logit_bias": {},
    "logprobs": False,
    "top_logprobs": 0,
    "metadata": {"app": "test"},
    "store": False,
    "service_tier": "auto",
    "user": "someone",
    "stream_options": None,
    "top_k": -1,
}


def test_fields_common_clients_send_are_accepted(served: SimpleNamespace) -> None:
    body = {"model": "kad", "messages": CHAT, "max_tokens": 3, "temperature": 0}
    plain = post(served, "chat/completions", body).json()["choices"][0]["message"]["content"]
    response = post(served, "chat/completions", {**body, **ACCEPTED, "tool_choice": "auto"})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == plain
    completion = {"model": "kad", "prompt": PROMPT, "max_tokens": 3, "logit_bias": {}, "user": "u"}
    assert post(served, "completions", completion).status_code == 200


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("response_format", {"type": "json_object"}, "json_object"),
        ("response_format", {"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema"),
        ("tools", [{"type": "function", "function": {"name": "f"}}], "tools"),
        ("tool_choice", "required", "tool_choice"),
        ("tool_choice", {"type": "function", "function": {"name": "f"}}, "tool_choice"),
        ("logit_bias", {"42": 100}, "logit_bias"),
        ("top_logprobs", 2, "top_logprobs"),
        ("logprobs", True, "logprobs"),
    ],
)
def test_fields_asking_for_what_the_server_lacks_are_refused(
    served: SimpleNamespace, field: str, value: Any, words: str
) -> None:
    body = {"model": "kad", "messages": CHAT, "max_tokens": 2, field: value}
    error = error_of(post(served, "chat/completions", body), 400)
    assert error["param"].split(".")[0] == field
    assert words in error["message"] and "this server" in error["message"]


def test_top_k_is_honoured(served: SimpleNamespace, tiny_aligner: kad.Aligner) -> None:
    body = {"model": "kad", "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": 3}
    text = post(served, "completions", {**body, "top_k": 1}).json()["choices"][0]["text"]
    greedy = tiny_aligner.generate([PROMPT], max_new_tokens=8)[0].text
    assert text == greedy  # top-1 sampling is greedy decoding
    sampled = tiny_aligner.generate([PROMPT], max_new_tokens=8, temperature=1.0, top_k=3, seed=3)[
        0
    ].text
    assert post(served, "completions", {**body, "top_k": 3}).json()["choices"][0]["text"] == sampled


def test_serve_command_speculative_0_is_off_and_passes_the_sizes(
    monkeypatch: pytest.MonkeyPatch, tiny_aligner: kad.Aligner
) -> None:
    """`kad serve --speculative 0 --max-rows 3 --max-context 128 --memory-fraction 0.5`: the
    loader gets the sizes, the app serves without speculation and 3 rows at most."""
    from fastapi.testclient import TestClient

    import kad.serve.command as command

    loaded: dict[str, Any] = {}
    served: dict[str, Any] = {}

    def load(*args: Any, **kwargs: Any) -> kad.Aligner:
        loaded.update(kwargs)
        return tiny_aligner

    monkeypatch.setattr(command, "load_aligner", load)
    monkeypatch.setattr(command, "check_port_free", lambda host, port: None)  # 8000 may be taken
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: served.update(app=app))
    command.serve_command(
        speculative="0", max_rows=3, max_context=128, memory_fraction=0.5, threads=1
    )
    assert (loaded["max_rows"], loaded["max_context"], loaded["memory_fraction"]) == (3, 128, 0.5)
    with TestClient(served["app"]) as client:
        body = {"model": "kad", "prompt": PROMPT, "max_tokens": 2}
        assert client.post("/v1/completions", json=body).json()["kad"]["speculative"] is None
        assert client.get("/health").json()["max_rows"] == tiny_aligner.runtime.rows
        assert client.post("/v1/completions", json={**body, "n": 4}).status_code == 400
    with pytest.raises(kad.KadError, match="--random-init or model paths"):
        command.serve_command(random_init="llama3-8b", base="b", proxy="p")


# --- random bodies -------------------------------------------------------------------------


def mostly(good: Any, other: Any, percent: int = 85) -> Any:
    """``good`` in ``percent`` % of the draws, else ``other``."""
    return st.integers(0, 99).flatmap(lambda i: good if i < percent else other)


SURROGATES = st.sampled_from(["\ud800", "\udfff", "\ud83d", "a\udc00b"])
WORDS = st.sampled_from([PROMPT, "Hello world", "What is 7 times 6?", "fox", " "])
TEXT = mostly(
    mostly(WORDS, st.text(max_size=12), 60),
    SURROGATES | st.builds("".join, st.lists(SURROGATES, max_size=3)),
    90,
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-3, 5)
    | st.floats(allow_nan=True, allow_infinity=True)
    | TEXT
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant"]),
        "content": TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT})),
    },
    optional={"name": TEXT},
)
KAD = st.fixed_dictionaries(
    {},
    optional={
        "rule": st.sampled_from(["dual", "primal", "nudging", "implicit-reward", "base", "proxy"]),
        "lam": st.floats(0, 1.5),
        "budget": st.floats(0, 1),
        "beta": st.floats(0, 3),
        "loss": st.sampled_from(["nll", "squared", "margin", "zero_one"]),
        "mu": st.floats(0, 3),
        "speculative": st.integers(0, 3) | st.just("auto"),
    },
)
# Each field: mostly a valid value, else any JSON value.
GOOD = {
    "max_tokens": st.integers(1, 3),
    "n": st.integers(1, 2),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.05, 1),
    "top_k": st.integers(-1, 5),
    "seed": st.integers(0, 2**63 - 1),
    "stop": TEXT | st.lists(TEXT, max_size=4),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "kad": KAD,
    "user": TEXT,
    "logit_bias": st.just({}),
}
CHAT_ONLY = {
    "max_completion_tokens": st.integers(1, 3),
    "response_format": st.just({"type": "text"}),
    "tools": st.just([]),
    "tool_choice": st.sampled_from(["none", "auto"]),
    "top_logprobs": st.just(0),
    "metadata": st.dictionaries(TEXT, TEXT, max_size=2),
}


def _bodies(required: dict[str, Any], optional: dict[str, Any]) -> Any:
    wild = {name: mostly(good, JSON) for name, good in optional.items()}
    return st.fixed_dictionaries({"model": mostly(st.just("kad"), JSON), **required}, optional=wild)


RAW = st.tuples(st.just("/v1/completions"), st.binary(max_size=40))
REQUESTS = (
    st.tuples(
        st.just("/v1/completions"),
        _bodies({"prompt": mostly(TEXT | st.lists(TEXT, min_size=1, max_size=3), JSON)}, GOOD),
    )
    | st.tuples(
        st.just("/v1/chat/completions"),
        _bodies({"messages": st.lists(MESSAGE, min_size=1, max_size=3)}, {**GOOD, **CHAT_ONLY}),
    )
    | st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), JSON)
)


def test_random_bodies_never_get_a_server_error(
    tiny_aligner: kad.Aligner, caplog: pytest.LogCaptureFixture
) -> None:
    """Random JSON bodies (and raw bytes), unpaired surrogates included, on both endpoints, in
    process: every answer is below 500, no stream carries a server error, nothing is logged as
    an error (an exception escaping the app would also fail the test client)."""
    from fastapi.testclient import TestClient

    app = create_app(tiny_aligner, max_rows=4, default_max_tokens=3, max_prompt_chars=500)
    caplog.set_level(logging.ERROR)
    with TestClient(app) as client:

        @settings(
            max_examples=100,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(request=REQUESTS.map(lambda r: (r[0], json.dumps(r[1]))) | RAW)
        def check(request: tuple[str, str | bytes]) -> None:
            path, content = request
            response = client.post(
                path, content=content, headers={"content-type": "application/json"}
            )
            assert response.status_code < 500, (content, response.text)
            assert "server_error" not in response.text, (content, response.text)

        check()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
