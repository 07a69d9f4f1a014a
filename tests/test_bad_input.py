"""Every kind of bad input gets a clear message; in the CLI, exit code 2 (issue 2, item 7)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import kad
from kad.cli import app
from tests.conftest import build_tokenizer

runner = CliRunner()


def run_cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def mismatched_dir(tmp_path_factory, tiny_dirs):
    """The tiny base model with a tokenizer whose ids 100 and 101 are swapped."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = build_tokenizer()
    data = json.loads(tok.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    a, b = (next(k for k, v in vocab.items() if v == i) for i in (100, 101))
    vocab[a], vocab[b] = 101, 100
    from tokenizers import Tokenizer

    swapped = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        eos_token="<|endoftext|>",
        pad_token="<pad>",
    )
    path = tmp_path_factory.mktemp("mismatch")
    AutoModelForCausalLM.from_pretrained(tiny_dirs.base).save_pretrained(path)
    swapped.save_pretrained(path)
    return path


def test_mismatched_vocabularies_name_the_first_bad_id(tiny_dirs, mismatched_dir):
    with pytest.raises(kad.VocabularyMismatchError, match="token id 100"):
        kad.Aligner.from_pretrained(mismatched_dir, tiny_dirs.proxy)
    result = run_cli("generate", "--base", mismatched_dir, "--proxy", tiny_dirs.proxy, "hi")
    assert result.exit_code == 2 and "token id 100" in result.output


def test_prompt_longer_than_the_context(tiny_aligner, tiny_dirs):
    long = "apples " * 400  # the tiny models hold 256 positions
    with pytest.raises(kad.PromptError, match="context holds 256"):
        tiny_aligner.generate(long, max_new_tokens=4)
    result = run_cli("generate", "--base", tiny_dirs.base, "--proxy", tiny_dirs.proxy, long)
    assert result.exit_code == 2 and "shorten it" in result.output


def test_generation_stops_at_the_context_end(tiny_aligner):
    out = tiny_aligner.generate("apples " * 120, max_new_tokens=500)[0]
    assert out.finish_reason == "length" and len(out.token_ids) < 500


def test_empty_prompt(tiny_aligner, tiny_dirs):
    with pytest.raises(kad.PromptError, match="empty"):
        tiny_aligner.generate("   ", max_new_tokens=4)
    with pytest.raises(kad.PromptError, match="no prompts"):
        tiny_aligner.generate([], max_new_tokens=4)
    result = run_cli("generate", "--base", tiny_dirs.base, "--proxy", tiny_dirs.proxy, "")
    assert result.exit_code == 2 and "empty" in result.output


def test_missing_model_path(tiny_dirs, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(kad.ModelNotFoundError, match="does not exist"):
        kad.Aligner.from_pretrained(str(missing), tiny_dirs.proxy)
    result = run_cli("generate", "--base", missing, "--proxy", tiny_dirs.proxy, "hi")
    assert result.exit_code == 2 and "does not exist" in result.output


def test_offline_hub_id_is_a_clear_error(tiny_dirs):
    with pytest.raises(kad.ModelNotFoundError, match="'nobody/no-such-model': no such path"):
        kad.Aligner.from_pretrained("nobody/no-such-model", tiny_dirs.proxy)


def test_implicit_reward_without_proxy_base(tiny_dirs):
    aligner = kad.Aligner.from_pretrained(tiny_dirs.base, tiny_dirs.proxy)
    with pytest.raises(kad.KadError, match="proxy_base="):
        aligner.generate("hi", rule=kad.ImplicitReward())
    result = run_cli(
        "generate",
        "--base",
        tiny_dirs.base,
        "--proxy",
        tiny_dirs.proxy,
        "--rule",
        "implicit-reward",
        "hi",
    )
    assert result.exit_code == 2 and "--proxy-base" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lam", "-0.5"], "lam must be in [0, ∞]"),
        (["--rule", "primal", "--budget", "1.5"], "budget must be in [0, 1]"),
        (["--rule", "primal", "--budget", "-0.1"], "budget must be in [0, 1]"),
        (["--rule", "magic"], "magic"),
        (["--speculative", "-1"], "speculative must be an integer >= 0"),
        (["--stop", ""], "a stop string must be non-empty text"),
        (["--loss", "hinge", "--mu", "0.1"], "unknown loss"),
        (["--temperature", "-1"], "temperature must be a finite number >= 0"),
    ],
)
def test_cli_rejects_bad_parameters_with_exit_code_2(tiny_dirs, args, message):
    result = run_cli("generate", "--base", tiny_dirs.base, "--proxy", tiny_dirs.proxy, *args, "hi")
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_cli_and_library_agree_with_the_server_on_speculative_0_and_empty_stops(
    tiny_dirs, tiny_aligner
):
    """--speculative 0 is plain decoding (the server's kad.speculative: 0); an empty stop
    string is refused everywhere; scoring nothing is a clear error, not a raw ValueError."""
    result = run_cli(
        "generate", "--base", tiny_dirs.base, "--proxy", tiny_dirs.proxy,
        "--speculative", "0", "--max-new-tokens", "3", "--json", "hi",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert tiny_aligner.generate("hi", max_new_tokens=3, speculative=0)[0].stats.rounds is None
    with pytest.raises(kad.KadError, match="non-empty"):
        tiny_aligner.generate("hi", max_new_tokens=3, stop=[""])
    with pytest.raises(kad.PromptError, match="no prompts"):
        tiny_aligner.score([], [])
    with pytest.raises(kad.PromptError, match="surrogate"):
        tiny_aligner.score(["hi"], ["lone \ud800"])


def test_cli_generate_prints_text_json_and_deferral(tiny_dirs, tiny_aligner):
    common = [
        "generate",
        "--base",
        tiny_dirs.base,
        "--proxy",
        tiny_dirs.proxy,
        "--max-new-tokens",
        "8",
    ]
    want = tiny_aligner.generate(["Hello", "Tom has"], max_new_tokens=8)
    result = run_cli(*common, "--json", "Hello", "Tom has")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["token_ids"] for r in rows] == [g.token_ids for g in want]
    assert rows[0]["stats"]["deferral_rate"] == want[0].stats.deferral_rate
    result = run_cli(*common, "--show-deferral", "Hello")
    assert result.exit_code == 0 and "deferred to the proxy" in result.output
    result = run_cli(*common, "--json", "--speculative", "3", "Hello")
    stats = json.loads(result.stdout)[0]["stats"]
    assert result.exit_code == 0 and stats["acceptance"] is not None and stats["rounds"] >= 1
    result = run_cli(*common, "--json", "--fast", "Hello", "Tom has")  # static caches, eager
    assert result.exit_code == 0, result.output
    assert [r["token_ids"] for r in json.loads(result.stdout)] == [g.token_ids for g in want]


def test_json_is_a_list_for_one_prompt_too(tiny_dirs):
    result = run_cli(
        "generate", "--base", tiny_dirs.base, "--proxy", tiny_dirs.proxy, "--max-new-tokens", "4",
        "--json", "Hello",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert isinstance(rows, list) and len(rows) == 1 and rows[0]["prompt"] == "Hello"


@pytest.mark.parametrize(
    "prompt",
    [
        "abc \ud800 def",
        [{"role": "user", "content": "abc \udcff def"}],
        kad.Raw("abc \ud800 def"),
        kad.Prompt(base="fine", proxy="abc \udfff def"),
        kad.Prompt(base=kad.Raw("abc \ud800 def")),
    ],
)
def test_unpaired_surrogates_are_a_prompt_error(tiny_aligner, prompt):
    with pytest.raises(kad.PromptError, match=r"unpaired surrogate .* at character 4"):
        tiny_aligner.generate([prompt], max_new_tokens=2)


def test_cli_rejects_arguments_that_are_not_utf8(tiny_dirs):
    not_utf8 = b"abc \xff\xfe def".decode("utf-8", "surrogateescape")  # as Python reads argv
    result = run_cli("generate", "--base", tiny_dirs.base, "--proxy", tiny_dirs.proxy, not_utf8)
    assert result.exit_code == 2
    assert "unpaired surrogate (U+DCFF) at character 4" in " ".join(result.output.split())


def test_cli_generate_defaults_to_the_builtin_pair():
    result = run_cli("generate", "--max-new-tokens", "4", "--json", "What is 2 + 3?")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)[0]["token_ids"]) <= 4


def test_cli_rejects_half_a_pair(tiny_dirs):
    result = run_cli("generate", "--base", tiny_dirs.base, "hi")
    assert result.exit_code == 2 and "give both --base and --proxy" in result.output
