"""The command line starts light (issue 16): help and argument errors without torch; help
without typer's type labels; `kad lm-eval --help` names the kad model args first."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from kad.cli import LAZY_COMMANDS, app
from tests.conftest import REPO_ROOT

WIDE = {"COLUMNS": "200"}
LIGHT = """
import sys
from kad.cli import app
try:
    app({args!r})
except SystemExit as done:
    code = done.code
assert "torch" not in sys.modules, "torch was imported"
assert "transformers" not in sys.modules, "transformers was imported"
sys.exit(code)
"""


def run_light(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-c", LIGHT.format(args=args)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--help"], 0),
        (["generate", "--help"], 0),
        (["eval", "--help"], 0),
        (["sweep", "--help"], 0),
        (["report", "--help"], 0),
        (["demo", "--help"], 0),
        (["generate", "--no-such-option", "hi"], 2),
        (["eval", "--limit", "many"], 2),
        (["no-such-command"], 2),
    ],
)
def test_help_and_argument_errors_do_not_import_torch(args, code):
    done = run_light(args)
    assert done.returncode == code, done.stderr
    assert "was imported" not in done.stderr


def test_importing_kad_does_not_import_torch():
    script = "import sys, kad; kad.KadError; kad.Prompt; assert 'torch' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    subprocess.run([sys.executable, "-c", script], env=env, check=True)


def test_lazy_commands_are_listed_with_their_own_short_help():
    runner = CliRunner()
    listing = " ".join(runner.invoke(app, ["--help"], env=WIDE).output.split())
    for name, lazy in LAZY_COMMANDS.items():
        command = lazy.load(name)
        assert command.help is not None
        first_paragraph = " ".join(command.help.split("\n\n")[0].split())
        assert first_paragraph == lazy.short_help
        assert lazy.short_help in listing


@pytest.mark.parametrize("command", ["generate", "eval", "sweep", "serve", "bench"])
def test_options_have_no_type_labels(command):
    output = CliRunner().invoke(app, [command, "--help"], env=WIDE).output
    options = [line for line in output.splitlines() if line.lstrip("│ ").startswith("--")]
    assert len(options) > 5
    for line in options:
        assert not re.search(r"\s<[a-z\[\]|,.-]+>\s", line), line


@pytest.mark.parametrize("command", ["generate", "eval", "sweep"])
def test_runtime_options_are_on_the_commands_that_load_models(command):
    output = CliRunner().invoke(app, [command, "--help"], env=WIDE).output
    for option in ("--max-rows", "--max-context", "--memory-fraction", "--fast", "--device"):
        assert option in output


def test_lm_eval_help_names_the_kad_model_args_first():
    pytest.importorskip("lm_eval")
    result = CliRunner().invoke(app, ["lm-eval", "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    kad_part, _, lm_eval_part = result.output.partition("lm-eval's own help")
    for arg in (
        "base", "proxy", "proxy_base", "rule", "lam", "budget", "beta", "loss", "mu",
        "max_new_tokens", "speculative", "seed", "device", "dtype", "proxy_chat",
    ):  # fmt: skip
        assert f"  {arg}" in kad_part
    assert "--model_args" in kad_part and "--tasks" in lm_eval_part


def test_the_rule_registry_is_read_without_torch():
    """The CLI's help reads the rules' names and parameters from `kad.rules` itself (one
    registry), which imports torch only when a rule computes."""
    code = (
        "import sys; from kad import rules; "
        "assert rules.RULE_NAMES[:2] == ('dual', 'primal'), rules.RULE_NAMES; "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
