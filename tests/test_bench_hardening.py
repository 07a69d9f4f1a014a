"""`kad bench` for a new user on a CPU: an unknown preset named as such, a pair too large for the
free memory refused before it is made, `--quick`, progress lines of `--acceptance` without a
terminal, and the JSON the README describes."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

import kad.bench.loading as loading
from kad.bench import command as bench_command_module
from kad.bench import run as bench_run
from kad.bench.run import BenchConfig
from kad.cli import app
from kad.errors import KadError
from kad.fast.presets import PRESETS
from tests.conftest import REPO_ROOT


def bench(*args: str):
    return CliRunner().invoke(app, ["bench", *args])


def test_an_unknown_preset_is_named_with_the_presets():
    for spec in ("nosuch", "nosuch:llama3.2-1b", "llama3-8b:nosuch"):
        result = bench("--random-init", spec)
        assert result.exit_code == 2, result.output
        assert f"unknown preset 'nosuch': choose one of {', '.join(PRESETS)}" in result.output
    result = bench()
    assert result.exit_code == 2 and "--random-init BASE, or --quick" in result.output


@pytest.fixture
def made_on_meta_only(monkeypatch):
    """Presets may be made on the meta device only (sized, not allocated)."""
    real = loading.random_model

    def meta_only(name, *, device, **kwargs):
        assert str(device) == "meta", f"{name} was made on {device}"
        return real(name, device=device, **kwargs)

    monkeypatch.setattr(loading, "random_model", meta_only)


def test_a_pair_larger_than_the_free_memory_is_refused_before_it_is_made(
    monkeypatch, made_on_meta_only
):
    monkeypatch.setattr(loading, "available_bytes", lambda device: 15 * 10**9)
    result = bench("--random-init", "llama3-8b", "--device", "cpu", "--batch", "1")
    assert result.exit_code == 2, result.output
    line = " ".join(result.output.split())  # rich wraps the line at the terminal's width
    need = re.search(
        r"llama3-8b \+ llama3\.2-1b in float32 need about ([\d.]+) GB on cpu \(weights ([\d.]+), "
        r"KV cache ([\d.]+) at batch 1, float32 check ([\d.]+) \(--no-check\)\), but 15\.0 GB is "
        r"free; no preset pair fits; --quick benches the built-in pair",
        line,
    )
    assert need, line
    total, weights, kv, check = map(float, need.groups())
    assert weights == pytest.approx(4 * (8.03 + 1.24), abs=0.1)  # float32, 8B + 1.2B parameters
    assert check == pytest.approx(2 * 4 * 1.24, abs=0.1)
    per_token = 2 * 4 * (32 * 8 * 128 + 16 * 8 * 64)  # K and V: layers, KV heads, head dim
    assert kv == pytest.approx(786 * per_token / 1e9, abs=0.05)  # 512 + 256 + 2 (8 + 1) tokens
    assert total == pytest.approx(weights + kv + check, abs=0.2)
    result = bench("--random-init", "llama3-8b", "--device", "cpu", "--batch", "1", "--no-check")
    line = " ".join(result.output.split())
    assert result.exit_code == 2 and "float32 check" not in line, line
    assert (
        "pairs that fit: llama3.2-1b:llama3.2-1b, olmo2-1b:olmo2-1b, qwen3-1.7b:qwen3-1.7b" in line
    )


def test_what_a_preset_pair_needs():
    need = loading.preset_need("llama3-8b", torch.bfloat16, {}, rows=2, tokens=10, check=False)
    per_token = 2 * 32 * 8 * 128 * 2 + 2 * 16 * 8 * 64 * 2  # K and V, layers, KV heads, head dim
    assert need.kv == 2 * 10 * per_token and need.check == 0
    assert need.total == need.weights + need.kv
    int8 = loading.preset_need("llama3-8b", torch.bfloat16, {"base": "int8"}, 2, 10, False)
    assert int8.weights < need.weights and int8.kv == need.kv
    meta = torch.device("meta")  # its free memory is unknown: no check
    loading.check_fits("llama3-70b", meta, torch.bfloat16, {}, 2, 10, False)
    assert loading.available_bytes(torch.device("cpu")) > 0
    with pytest.raises(KadError, match="unknown preset 'gpt5'"):
        loading.preset_need("gpt5", torch.bfloat16, {}, 1, 1, False)


def test_quick_sizes_and_the_options_given_win(monkeypatch):
    from kad.world import builtin_paths

    configs: list[BenchConfig] = []

    def fake_run(config, step, out=None):
        configs.append(config)
        return {"batches": []}

    monkeypatch.setattr(bench_command_module, "run_bench", fake_run)
    assert bench("--quick", "--json").exit_code == 0
    assert bench("--quick", "--batch", "2", "--transformers", "--json").exit_code == 0
    assert bench("--random-init", "llama3-8b", "--json").exit_code == 0
    quick, given, full = configs
    paths = builtin_paths()
    assert (quick.base, quick.proxy) == (str(paths.base), str(paths.proxy))
    assert quick.batches == [1, 4] and quick.gammas == [1, 2, 4] and quick.repeats == 1
    assert (quick.prompt_tokens, quick.new_tokens, quick.transformers) == (64, 32, False)
    assert given.batches == [2] and given.transformers and given.new_tokens == 32
    assert full.batches == [1, 8, 32] and full.gammas == list(range(1, 9)) and full.transformers
    assert (full.base, full.prompt_tokens, full.repeats) == (None, 512, 3)


def test_acceptance_prints_a_line_per_case_without_a_terminal(monkeypatch, tiny_aligner):
    monkeypatch.setattr(bench_run, "real_pairs", lambda: [("tiny pair", lambda d, t: tiny_aligner)])
    result = bench("--acceptance", "--acceptance-tokens", "2", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert "] loading tiny pair (pair 1 of 1)" in result.output
    for i, case in enumerate(("dual γ=1", "dual γ=4", "base γ=1", "base γ=4"), 1):
        rule, gamma = case.split()
        assert f"] tiny pair: acceptance of rule={rule} {gamma} on 4 prompts ({i} of 4)" in (
            result.output
        )


def readme_bench_json() -> str:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("`--json` prints one object (`--out` writes it):")
    return readme[start : readme.index("}`", start)]


def keys(value) -> set[str]:
    """Every key of a JSON value, at any depth."""
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in keys(v)}
    return set()


def test_a_quick_run_gives_the_json_the_readme_describes():
    args = ["--quick", "--batch", "1", "--prompt-tokens", "4", "--new-tokens", "3"]
    args += ["--gammas", "1", "--acceptance-tokens", "2", "--device", "cpu", "--json"]
    result = bench(*args)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output[result.output.index("\n{") :])
    described = " ".join(readme_bench_json().split())
    named = set(re.findall(r'"(\w+)"', described))
    assert named <= keys(printed), named - keys(printed)
    top = set(re.findall(r'(?:\{|\], |\}, )"(\w+)": ', described))
    assert (
        top == set(printed) == {"meta", "pair", "float32_check", "batches", "acceptance", "targets"}
    )
    assert printed["pair"]["base"].endswith("base") and printed["batches"][0]["batch"] == 1
