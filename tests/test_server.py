"""`kad serve`: a real uvicorn on 127.0.0.1 serving the tiny model family, driven by the official
`openai` client, raw HTTP and schemathesis. References come from a second `Aligner` (the
`tiny_aligner` fixture) decoding each request alone."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings

import kad
from kad.serve.app import create_app
from kad.serve.schema import KadOptions, resolve_rule
from tests.serving import RecordingAligner, serving

PROMPT = "Tom has 3 apples"
CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 7 times 6?"},
]


@pytest.fixture(scope="module")
def served(tiny_dirs: SimpleNamespace) -> Iterator[SimpleNamespace]:
    full = kad.Aligner.from_pretrained(
        str(tiny_dirs.base), str(tiny_dirs.proxy), str(tiny_dirs.proxy_base), max_rows=16
    )
    aligner = RecordingAligner(full)
    app = create_app(aligner, max_rows=16)
    with serving(app) as url:
        yield SimpleNamespace(url=url, aligner=aligner, worker=app.state.worker)


@pytest.fixture(scope="module")
def client(served: SimpleNamespace) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)


def alone(aligner: kad.Aligner, prompt: Any, **kwargs: Any) -> kad.Generation:
    """The same request decoded alone, in a batch of one."""
    return aligner.generate([prompt], **kwargs)[0]


def test_models_and_health(served: SimpleNamespace, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["kad"]
    assert client.models.retrieve("kad").id == "kad"
    health = httpx.get(f"{served.url}/health").json()
    assert health["status"] == "ok" and health["max_rows"] == 16


def test_completion_equals_generate(client: openai.OpenAI, tiny_aligner: kad.Aligner) -> None:
    response = client.completions.create(model="kad", prompt=PROMPT, max_tokens=12, temperature=0)
    expected = alone(tiny_aligner, PROMPT, max_new_tokens=12)
    (choice,) = response.choices
    assert choice.text == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert response.usage.completion_tokens == len(expected.token_ids)
    prompt_ids = tiny_aligner.encode_prompts([PROMPT])["proxy"][0]
    assert response.usage.prompt_tokens == len(prompt_ids)
    stats = response.model_extra["kad"]
    assert stats["rule"] == "dual" and stats["lam"] == pytest.approx(0.4)
    assert stats["deferral_rate"] == pytest.approx(expected.stats.deferral_rate)
    assert stats["mean_alpha"] == pytest.approx(expected.stats.mean_alpha)


def test_chat_with_kad_parameters(client: openai.OpenAI, tiny_aligner: kad.Aligner) -> None:
    response = client.chat.completions.create(
        model="kad",
        messages=CHAT,
        max_tokens=10,
        temperature=0,
        extra_body={"kad": {"rule": "primal", "budget": 0.5, "speculative": 3}},
    )
    expected = alone(tiny_aligner, CHAT, rule=kad.Primal(budget=0.5), max_new_tokens=10)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected.text
    stats = response.model_extra["kad"]
    assert stats["rule"] == "primal" and stats["budget"] == 0.5 and stats["speculative"] == 3
    assert stats["acceptance"] is not None  # speculative decoding reports its acceptance
    assert 0.0 <= stats["mean_alpha"] <= 0.5


def test_implicit_reward_reads_the_proxy_base(
    client: openai.OpenAI, tiny_aligner: kad.Aligner
) -> None:
    response = client.completions.create(
        model="kad",
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        extra_body={"kad": {"rule": "implicit-reward", "beta": 0.5}},
    )
    expected = alone(tiny_aligner, PROMPT, rule=kad.ImplicitReward(beta=0.5), max_new_tokens=8)
    assert response.choices[0].text == expected.text
    assert response.model_extra["kad"]["mean_alpha"] is None  # the rule has no α


def test_sampling_with_seed_and_n(client: openai.OpenAI, tiny_aligner: kad.Aligner) -> None:
    def sample() -> list[str]:
        response = client.completions.create(
            model="kad", prompt=PROMPT, max_tokens=8, temperature=1.0, top_p=0.9, seed=7, n=3
        )
        assert [c.index for c in response.choices] == [0, 1, 2]
        return [c.text for c in response.choices]

    first = sample()
    assert sample() == first  # a seed makes sampling reproducible whatever runs beside it
    expected = alone(tiny_aligner, PROMPT, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    assert first[0] == expected.text


def test_prompt_list_and_stop(client: openai.OpenAI, tiny_aligner: kad.Aligner) -> None:
    prompts = [PROMPT, "Hello world"]
    full = [alone(tiny_aligner, p, max_new_tokens=12).text for p in prompts]
    pairs = (full[0][i : i + 2] for i in range(1, len(full[0]) - 1))
    stop = next(pair for pair in pairs if pair.isascii() and pair.isalpha())
    response = client.completions.create(
        model="kad", prompt=prompts, max_tokens=12, temperature=0, n=2, stop=[stop]
    )
    texts = [c.text for c in response.choices]
    expected = [alone(tiny_aligner, p, max_new_tokens=12, stop=[stop]).text for p in prompts]
    assert texts == [expected[0], expected[0], expected[1], expected[1]]
    assert stop not in texts[0] and texts[0] == full[0][: full[0].index(stop)]


def test_streaming_completion_and_chat(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="kad", prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(
        client.completions.create(
            model="kad", prompt=PROMPT, max_tokens=12, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices[0].model_extra["kad"]["tokens"] == whole.usage.completion_tokens

    chat = client.chat.completions.create(model="kad", messages=CHAT, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(
        model="kad",
        messages=CHAT,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts = list(stream)
    content = [p.choices[0].delta.content or "" for p in parts if p.choices]
    assert "".join(content) == chat.choices[0].message.content
    assert parts[0].choices[0].delta.role == "assistant"
    assert parts[-1].choices == [] and parts[-1].usage == chat.usage
    assert parts[-1].model_extra["kad"]["mean_alpha"] == chat.model_extra["kad"]["mean_alpha"]


def test_stream_is_server_sent_events_ending_with_done(served: SimpleNamespace) -> None:
    body = {"model": "kad", "prompt": PROMPT, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_64_concurrent_clients_with_their_own_parameters_equal_requests_run_alone(
    served: SimpleNamespace, tiny_aligner: kad.Aligner
) -> None:
    """Mixed completions/chats, max_tokens, λ, temperature (seeded) and speculation, all in one
    running batch: every answer equals the request decoded alone; none lost."""
    requests = []
    for i in range(64):
        lam = (0.3, 0.4, 0.5)[i % 3]
        sampled = i % 5 == 2
        kad_opts = {"lam": lam, **({"speculative": 2} if i % 3 == 0 and not sampled else {})}
        sampling = {"temperature": 0.8, "seed": i} if sampled else {"temperature": 0}
        max_tokens = 6 if i % 2 else 8
        if i % 4 == 1:
            messages = [{"role": "user", "content": f"Question {i}: what is {i} times 6?"}]
            requests.append(("chat", messages, max_tokens, kad_opts, sampling))
        else:
            requests.append(
                ("text", f"Tom has {i} apples and buys", max_tokens, kad_opts, sampling)
            )

    async def run_all() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)

        async def one(kind: str, prompt: Any, max_tokens: int, kad_opts: dict, sampling) -> str:
            common = {"model": "kad", "max_tokens": max_tokens, "extra_body": {"kad": kad_opts}}
            if kind == "chat":
                r = await client.chat.completions.create(messages=prompt, **common, **sampling)
                return r.choices[0].message.content
            r = await client.completions.create(prompt=prompt, **common, **sampling)
            return r.choices[0].text

        async with client:
            return await asyncio.gather(*(one(*r) for r in requests))

    answers = asyncio.run(run_all())
    assert len(answers) == 64
    for (_, prompt, max_tokens, kad_opts, sampling), answer in zip(requests, answers, strict=True):
        want = alone(
            tiny_aligner,
            prompt,
            rule=kad.Dual(lam=kad_opts["lam"]),
            max_new_tokens=max_tokens,
            **sampling,
        )
        assert answer == want.text
    load = served.worker.load()
    assert 1 < load["peak_rows"] <= 16  # they were batched, within --max-rows
    assert load["running_rows"] == 0 and load["waiting_requests"] == 0


def test_disconnect_mid_stream_frees_the_slot(served: SimpleNamespace) -> None:
    body = {"model": "kad", "prompt": "Hello world", "max_tokens": 200, "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/completions", json=body) as response:
        first = next(line for line in response.iter_lines() if line)
        assert first.startswith("data: ")
        session = served.aligner.sessions[-1]
    deadline = time.monotonic() + 10
    while served.worker.load()["running_rows"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.worker.load()["running_rows"] == 0
    (generation,) = session.results()
    assert generation.finish_reason == "cancelled" and len(generation.token_ids) < 200
    answer = httpx.post(
        f"{served.url}/v1/completions", json={"model": "kad", "prompt": PROMPT, "max_tokens": 2}
    )
    assert answer.status_code == 200  # the server goes on serving


@pytest.mark.parametrize(
    ("default", "options", "expected"),
    [
        (kad.Dual(lam=0.3), {}, kad.Dual(lam=0.3)),
        (kad.Dual(lam=0.3), {"lam": 0.2}, kad.Dual(lam=0.2)),
        (kad.Dual(lam=0.3), {"loss": "margin", "mu": 0.1}, kad.Dual(loss="margin", mu=0.1)),
        (kad.Dual(lam=0.3), {"rule": "primal"}, kad.Primal(budget=0.9)),
        (kad.Primal(budget=0.7), {"loss": "squared"}, kad.Primal(budget=0.7, loss="squared")),
        (kad.Primal(budget=0.7), {"rule": "nudging", "lam": 0.2}, kad.Nudging(lam=0.2)),
        (kad.Nudging(lam=0.2), {"rule": "implicit_reward"}, kad.ImplicitReward()),
    ],
)
def test_request_rule_overrides_only_what_it_names(
    default: kad.Rule, options: dict, expected: kad.Rule
) -> None:
    assert resolve_rule(default, KadOptions(**options)) == expected


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "kad", "prompt": PROMPT, "temperature": 3}, "temperature"),
        ({"model": "kad", "prompt": PROMPT, "n": 17}, "n"),
        ({"model": "kad", "prompt": [PROMPT] * 9, "n": 2}, "n"),
        ({"model": "kad", "prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
        ({"model": "kad", "prompt": PROMPT, "logprobs": 2}, "logprobs"),
        ({"model": "kad", "prompt": PROMPT, "kad": {"rule": "primal", "lam": 0.3}}, "kad"),
        ({"model": "kad", "prompt": PROMPT, "kad": {"rule": "knapsack"}}, "kad.rule"),
        ({"model": "kad", "prompt": PROMPT, "kad": {"budget": 2}}, "kad.budget"),
        ({"model": "kad", "prompt": ""}, "prompt"),
        ({"model": "kad"}, "prompt"),
    ],
)
def test_invalid_parameters_are_400(served: SimpleNamespace, body: dict, param: str) -> None:
    error = _error(httpx.post(f"{served.url}/v1/completions", json=body), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_malformed_json_and_unknown_model(served: SimpleNamespace, client: openai.OpenAI) -> None:
    for content in ('{"model": "kad", "prompt": ', "[1, 2]", "null"):
        raw = httpx.post(
            f"{served.url}/v1/chat/completions",
            content=content,
            headers={"content-type": "application/json"},
        )
        _error(raw, 400)
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    assert caught.value.code == "model_not_found"
    _error(httpx.get(f"{served.url}/v1/models/gpt-4"), 404)


def test_prompt_over_the_context_is_400_even_when_streaming(client: openai.OpenAI) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(
                model="kad", prompt="Tom has apples. " * 200, max_tokens=2, stream=stream
            )
        assert caught.value.code == "context_length_exceeded"
        assert "context" in caught.value.message


def test_schemathesis_finds_no_server_error(served: SimpleNamespace) -> None:
    """Property-based requests from the server's own OpenAPI schema (valid and invalid ones)
    never get a 5xx. Requests name the served model (others are a 404) and stay small: at
    most 4 tokens and 2 choices."""
    import schemathesis
    from schemathesis import GenerationMode

    raw = httpx.get(f"{served.url}/openapi.json").json()
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = raw["components"]["schemas"][name]["properties"]
        for field in ("max_tokens", "max_completion_tokens"):
            if field in props:
                props[field] = {"type": "integer", "minimum": 1, "maximum": 4}
        props["n"] = {"type": "integer", "minimum": 1, "maximum": 2}
        props["model"] = {"type": "string", "enum": ["kad"]}  # other names are a plain 404
    schema = schemathesis.openapi.from_dict(raw)
    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [GenerationMode.POSITIVE]
        if operation.method.upper() == "POST":  # only bodies can be invalid
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:

            @settings(
                max_examples=12,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case: Any) -> None:
                response = case.call(base_url=served.url, timeout=60)
                assert response.status_code < 500, (case.as_curl_command(), response.text)

            check()


def test_serve_command_rejects_half_a_pair_before_loading() -> None:
    from kad.serve.command import serve_command

    with pytest.raises(kad.KadError, match="both --base and --proxy"):
        serve_command(base="some/base", proxy=None)


def test_builtin_pair_serves_chat_and_streams() -> None:
    """`kad serve` without --base/--proxy: the built-in pair, as the README shows it."""
    from kad.serve.command import load_aligner

    try:
        reference = load_aligner(None, None)
    except kad.ModelNotFoundError:
        pytest.skip("the built-in pair is not built")
    from kad.world import heldout_problems

    messages = [{"role": "user", "content": str(heldout_problems(1, "dev")[0]["question"])}]
    expected = alone(reference, messages, max_new_tokens=48)
    with serving(create_app(load_aligner(None, None))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        response = client.chat.completions.create(
            model="kad", messages=messages, max_tokens=48, temperature=0
        )
        stream = client.chat.completions.create(
            model="kad", messages=messages, max_tokens=48, temperature=0, stream=True
        )
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert response.choices[0].message.content == expected.text == streamed


def test_random_init_serves_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """`kad serve --random-init`: a random-weight preset pair with the built-in tokenizer answers
    HTTP text. The real presets (1B parameters and up) are too slow to build on a CPU: a tiny
    Llama preset of the same shape of config stands in for them."""
    from fastapi.testclient import TestClient

    from kad.fast import presets
    from kad.fast.presets import random_aligner

    tiny = dict(
        presets.PRESETS["llama3.2-1b"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
    )
    monkeypatch.setitem(presets.PRESETS, "tiny-base", tiny)
    monkeypatch.setitem(presets.PRESETS, "tiny-proxy", {**tiny, "num_hidden_layers": 1})
    monkeypatch.setitem(presets.PAIRS, "tiny-base", "tiny-proxy")
    try:
        aligner = random_aligner("tiny-base", device="cpu", dtype=torch.float32, max_rows=4)
    except kad.ModelNotFoundError:
        pytest.skip("the built-in pair is not built")
    assert aligner.members["base"].model.config.num_hidden_layers == 2
    assert aligner.members["proxy"].model.config.num_hidden_layers == 1
    with TestClient(create_app(aligner)) as client:
        body = {"model": "kad", "max_tokens": 5, "temperature": 0}
        chat = client.post("/v1/chat/completions", json={**body, "messages": CHAT})
        completion = client.post("/v1/completions", json={**body, "prompt": PROMPT})
    assert chat.status_code == completion.status_code == 200, (chat.text, completion.text)
    assert completion.json()["usage"]["completion_tokens"] == 5
    assert isinstance(chat.json()["choices"][0]["message"]["content"], str)
