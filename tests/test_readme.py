"""The README's examples, run: the server's curl body and its `openai` client code against the
built-in pair (which must answer the question right), and its Python one-liners."""

from __future__ import annotations

import json
import re
import shlex

import pytest

from tests.conftest import REPO_ROOT
from tests.serving import serving

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


@pytest.fixture(scope="module")
def builtin():
    from kad.world import builtin_aligner

    try:
        return builtin_aligner(device="cpu", max_rows=4)
    except Exception as error:
        pytest.fail(f"the built-in pair does not load: {error}")


def answer_of(question: str) -> str:
    """The true answer of a held-out problem of the built-in world."""
    from kad.world import heldout_problems

    for problem in heldout_problems(200, "dev"):
        if str(problem["question"]) == question:
            return str(problem["answer"])
    raise AssertionError(f"the README's question is not a held-out problem: {question!r}")


def test_the_curl_example_is_answered_right(builtin):
    from fastapi.testclient import TestClient

    from kad.serve.app import create_app
    from kad.world import score

    (curl,) = [b for b in blocks("bash") if b.lstrip().startswith("curl ")]
    words = shlex.split(curl.replace("\\\n", " "))
    body = json.loads(words[words.index("-d") + 1])
    question = body["messages"][0]["content"]
    with TestClient(create_app(builtin)) as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    text = response.json()["choices"][0]["message"]["content"]
    assert score(text, answer_of(question)), text


def test_the_openai_example_runs_and_is_answered_right(builtin, capsys):
    from kad.serve.app import create_app
    from kad.world import score

    (code,) = [b for b in blocks("python") if "from openai import OpenAI" in b]
    with serving(create_app(builtin)) as url:
        exec(code.replace("http://127.0.0.1:8000", url), {})
    printed = capsys.readouterr().out
    question = re.search(r'question = "(.*?)"', code).group(1)
    first, rest = printed.split("\n{'rule'", 1)
    stats, streamed = rest.split("\n", 1)
    assert score(first, answer_of(question)), printed
    assert "deferral_rate" in stats and streamed.strip()


def test_the_python_one_liner_of_the_builtin_pair_runs():
    line = re.search(r"`(aligner = kad\.world\.builtin_aligner\([^`]*\))`", README).group(1)
    scope: dict = {}
    exec("import kad, kad.world\n" + line, scope)
    out = scope["aligner"].generate(
        "Leo has 2 cups. He gets 3 more. How many cups?", max_new_tokens=8
    )
    assert out[0].token_ids
