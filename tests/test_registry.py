"""One registry (issue 12.3-12.4): a rule registered in one place is seen everywhere, the
library, the command line, the server, eval folder names, report labels, the sweep and
lm-eval's model args; a bad value gets the registry's message on every path."""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import kad
from kad import rules
from kad.cli import app, exits_on_bad_input
from kad.eval import sweep
from kad.eval.report import method_label
from kad.eval.runner import method_name
from kad.options import with_rule_options
from kad.rules import Mix, _RuleBase, make_rule, param, register, rule_label, rule_slug
from kad.serve import schema
from kad.serve.app import create_app

TOY = "always-proxy-test"
runner = CliRunner()
WIDE = {"COLUMNS": "200"}


@pytest.fixture
def toy() -> Any:
    """A rule registered for one test: π = w q* + (1 − w) p, with one number parameter w."""

    @register(TOY, "test rule")
    @dataclass(frozen=True)
    class AlwaysProxyTest(_RuleBase):
        weight: float = param(1.0, "share w of the proxy", low=0.0, high=1.0, symbol="w")
        name: str = TOY
        needs_proxy_base: bool = False

        @staticmethod
        def formula(p, q, q_base, c, losses=None) -> Mix:
            w = torch.as_tensor(c["weight"], dtype=p.dtype, device=p.device)
            return Mix(w * q + (1.0 - w) * p, (w * torch.ones_like(p[..., :1]))[..., 0])

    try:
        yield AlwaysProxyTest
    finally:
        del rules.RULES[TOY]
        rules._refresh_columns()


def test_a_registered_rule_is_built_named_and_labelled(toy: type) -> None:
    assert TOY in rules.RULE_NAMES and rules.RULE_PARAMS[TOY] == ("weight",)
    rule = make_rule(TOY, weight=0.5)
    assert isinstance(rule, toy) and rule.weight == 0.5
    assert make_rule(TOY.replace("-", "_")).weight == 1.0
    with pytest.raises(kad.KadError, match=r"does not take lam \(it takes weight\)"):
        make_rule(TOY, lam=0.3)
    with pytest.raises(kad.KadError, match=re.escape("weight must be in [0, 1], got 1.5")):
        make_rule(TOY, weight=1.5)
    assert rule_slug(rule) == method_name(TOY, {"weight": 0.5}) == "always-proxy-test-weight0.5"
    assert rule_label(rule) == "test rule w=0.5"
    assert method_label(TOY, {"weight": 0.5}) == "Test rule w=0.5"
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.1, 0.1, 0.8])
    assert torch.allclose(rule.target(p, q), 0.5 * (p + q))


def test_a_registered_rule_is_swept_over_its_parameter(toy: type) -> None:
    assert sweep.swept_param(TOY) == "weight"
    points = sweep.grid([TOY], {"weight": [0.2, 0.8]})
    assert [rule_slug(r) for r in points] == [f"{TOY}-weight0.2", f"{TOY}-weight0.8"]
    assert [r.weight for r in sweep.grid([TOY])] == [1.0]  # no grid: its default


def test_a_registered_rule_gets_its_command_line_options(toy: type) -> None:
    """Options are derived when a command is declared: a command declared after the rule has
    ``--weight``; the built-in commands take the rule by name and refuse what it lacks."""
    made: list[Any] = []

    @with_rule_options
    def command(rule: str = "dual", rule_values: dict[str, Any] | None = None) -> None:
        made.append(make_rule(rule, **(rule_values or {})))

    single = typer.Typer()
    single.command()(exits_on_bad_input(command))
    single.command("other")(lambda: None)  # two commands: the name is an argument
    help_text = " ".join(runner.invoke(single, ["command", "--help"], env=WIDE).output.split())
    assert "--weight" in help_text and "always-proxy-test: share w of the proxy" in help_text
    result = runner.invoke(single, ["command", "--rule", TOY, "--weight", "0.25"])
    assert result.exit_code == 0, result.output
    assert made == [make_rule(TOY, weight=0.25)]
    result = runner.invoke(single, ["command", "--rule", TOY, "--weight", "1.5"])
    assert result.exit_code == 2 and "weight must be in [0, 1], got 1.5" in result.output
    result = runner.invoke(app, ["generate", "x", "--rule", TOY, "--lam", "0.3"])
    assert result.exit_code == 2 and "does not take lam (it takes weight)" in result.output


def test_a_registered_rule_is_served(toy: type, tiny_dirs: SimpleNamespace) -> None:
    aligner = kad.Aligner.from_pretrained(tiny_dirs.base, tiny_dirs.proxy)
    body = {"model": "kad", "prompt": "Hello", "max_tokens": 3, "temperature": 0}
    with TestClient(create_app(aligner)) as client:
        good = client.post("/v1/completions", json={**body, "kad": {"rule": TOY, "weight": 0.5}})
        bad = client.post("/v1/completions", json={**body, "kad": {"rule": TOY, "weight": 2}})
        lam = client.post("/v1/completions", json={**body, "kad": {"rule": TOY, "lam": 0.3}})
    assert good.status_code == 200, good.text
    assert good.json()["kad"]["rule"] == TOY and good.json()["kad"]["weight"] == 0.5
    assert good.json()["kad"]["mean_alpha"] == pytest.approx(0.5)
    assert bad.status_code == 400 and "weight must be in [0, 1], got 2" in bad.text
    assert bad.json()["error"]["param"] == "kad.weight"
    assert lam.status_code == 400 and "does not take lam" in lam.text
    assert "weight" in schema.KadOptions.model_fields


def test_a_registered_rule_is_an_lm_eval_model_arg(toy: type) -> None:
    pytest.importorskip("lm_eval")
    from kad.eval.lm_eval_model import rule_from_args

    assert rule_from_args(TOY, {"weight": "0.5"}) == make_rule(TOY, weight=0.5)


@pytest.mark.parametrize(
    ("rule", "option", "value", "message"),
    [
        ("proxy-referenced", "delta", 1.5, "delta must be in [-1, 1], got 1.5"),
        ("primal", "budget", 1.2, "budget must be in [0, 1], got 1.2"),
    ],
)
def test_a_bad_value_reads_the_same_on_every_path(
    tiny_aligner: kad.Aligner, rule: str, option: str, value: float, message: str
) -> None:
    with pytest.raises(kad.KadError) as library:
        make_rule(rule, **{option: value})
    assert str(library.value) == message
    cli = runner.invoke(app, ["generate", "x", "--rule", rule, f"--{option}", str(value)])
    assert cli.exit_code == 2 and message in cli.output
    for name in ("eval", "sweep"):
        flag = f"--{option}s" if name == "sweep" else f"--{option}"
        args = [name, "--task", "toy", "--rules" if name == "sweep" else "--rule", rule]
        result = runner.invoke(app, [*args, flag, str(value)])
        assert result.exit_code == 2 and message in result.output, (name, result.output)
    body = {
        "model": "kad",
        "prompt": "Hello",
        "max_tokens": 2,
        "kad": {"rule": rule, option: value},
    }
    with TestClient(create_app(tiny_aligner)) as client:
        response = client.post("/v1/completions", json=body)
    assert response.status_code == 400 and message in response.json()["error"]["message"]
    assert response.json()["error"]["param"] == f"kad.{option}"


def test_new_rules_everywhere_without_a_toy() -> None:
    """The two rules of this issue: options, server fields, folders, labels, lm-eval args."""
    help_text = " ".join(runner.invoke(app, ["generate", "--help"], env=WIDE).output.split())
    assert (
        "--delta" in help_text and "--fractional" in help_text and "proxy-referenced" in help_text
    )
    assert {"delta", "fractional"} <= set(schema.KadOptions.model_fields)
    primal = make_rule("primal", budget=0.9, fractional=True)
    assert method_name("primal", {"budget": 0.9, "fractional": True}) == "primal-b0.9-fractional"
    assert method_label("primal", rules.rule_params(primal)) == "KAD primal b=0.9 fractional"
    assert method_name("proxy-referenced", {"delta": 0.1}) == "proxy-referenced-delta0.1"
    assert method_label("proxy-referenced", {"delta": 0.1}) == "Proxy-referenced δ=0.1"
    expected = {
        ("dual", (("lam", 0.4), ("loss", "nll"))): "dual-lam0.4",
        ("primal", (("budget", 0.9), ("loss", "nll"))): "primal-b0.9",
        ("dual", (("loss", "squared"), ("mu", 0.5))): "dual-squared-mu0.5",
        ("nudging", (("lam", 0.4),)): "nudging-lam0.4",
        ("implicit_reward", (("beta", 1.0),)): "implicit-reward-beta1",
        ("base", ()): "base",
        ("proxy", ()): "proxy",
    }
    for (name, params), folder in expected.items():
        assert method_name(name, dict(params)) == folder
    points = sweep.grid(["proxy-referenced", "primal"], {"budget": [0.9]}, fractional=True)
    assert [rule_slug(r) for r in points] == [
        *(f"proxy-referenced-delta{d:g}" for d in sweep.DEFAULT_DELTAS),
        "primal-b0.9-fractional",
    ]
    assert "proxy-referenced" in sweep.DEFAULT_RULES
    pytest.importorskip("lm_eval")
    from kad.eval.commands import model_args_help
    from kad.eval.lm_eval_model import KadLM, rule_from_args

    section = model_args_help(KadLM)
    assert "delta" in section and "fractional" in section
    assert rule_from_args("primal", {"fractional": "true"}) == primal
    with pytest.raises(kad.KadError, match=re.escape("delta must be in [-1, 1], got 1.5")):
        rule_from_args("proxy-referenced", {"delta": 1.5})
