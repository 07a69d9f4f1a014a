"""`kad sweep`: a grid of rules and parameters over tasks, one results folder per point.

The grid of the paper's comparison: the base and the proxy alone, nudging and KAD dual over λ,
KAD primal over b, implicit reward over β (only with the proxy's base model), and the
proxy-referenced rule over δ; each rule is swept over the parameter `swept_param` reads from the
registry. The models are
loaded once; each point runs every task through `run_eval` into ``<out>/<method name>/``, so an
interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kad.errors import KadError
from kad.eval.runner import run_eval
from kad.eval.tasks import Task
from kad.rules import RULE_PARAMS, RULES, Rule, make_rule, rule_key, rule_label, rule_slug

DEFAULT_RULES: tuple[str, ...] = (
    "base",
    "proxy",
    "nudging",
    "implicit-reward",
    "dual",
    "primal",
    "proxy-referenced",
)
# The values of each swept parameter (a rule is swept over its `swept_param`); a parameter
# without a grid here is run at its default.
DEFAULT_GRIDS: dict[str, tuple[float, ...]] = {
    "lam": (0.1, 0.2, 0.3, 0.4, 0.5),
    "budget": (0.5, 0.7, 0.9),
    "beta": (1.0,),
    "delta": (-0.2, -0.1, 0.0, 0.1, 0.2, 0.4),
}
DEFAULT_LAMS = DEFAULT_GRIDS["lam"]
DEFAULT_BUDGETS = DEFAULT_GRIDS["budget"]
DEFAULT_BETAS = DEFAULT_GRIDS["beta"]
DEFAULT_DELTAS = DEFAULT_GRIDS["delta"]


def swept_param(rule: str, loss: str = "nll") -> str | None:
    """The parameter a rule is swept over, from the registry: its first number parameter (λ of
    dual and nudging, b of primal, β, δ), or μ for a rule taking a loss other than nll; None
    for a rule without one (base, proxy)."""
    spec = RULES[rule_key(rule)]
    numbers = [p.name for p in spec.params if p.kind is float]
    if loss != "nll" and "mu" in numbers and "loss" in RULE_PARAMS[spec.slug]:
        return "mu"
    return numbers[0] if numbers else None


def grid(
    rules: Sequence[str],
    grids: Mapping[str, Sequence[float]] | None = None,
    loss: str = "nll",
    **fixed: Any,
) -> list[Rule]:
    """One rule per point: each rule over the values of its `swept_param` in ``grids`` (on top
    of `DEFAULT_GRIDS`; a parameter without a grid: its default), with ``loss`` and the
    ``fixed`` parameters (e.g. ``fractional=True``) on the rules that take them; the rules
    without a number parameter (base, proxy) once."""
    values = {**DEFAULT_GRIDS, **(grids or {})}
    points: list[Rule] = []
    for name in rules:
        key = rule_key(name)
        if key not in RULES:
            raise KadError(f"unknown rule {name!r}: choose among {', '.join(RULES)}")
        given = {"loss": loss, **fixed}
        common = {k: v for k, v in given.items() if k in RULE_PARAMS[key] and v is not None}
        swept = swept_param(key, loss)
        if swept is None:
            points.append(make_rule(key, **common))
            continue
        if swept == "mu" and not values.get("mu"):
            raise KadError(f"{key} with the {loss} loss is swept over μ: give --mus")
        param = next(p for p in RULES[key].params if p.name == swept)
        for value in values.get(swept) or (param.default,):
            points.append(make_rule(key, **common, **{swept: value}))
    return points


def run_sweep(
    aligner: Any,
    tasks: Sequence[Task],
    points: Sequence[Rule],
    out_dir: str | os.PathLike[str],
    run_for: Callable[[Rule], dict[str, Any]],
    **eval_kwargs: Any,
) -> list[dict[str, Any]]:
    """Every task at every point; returns the summaries.

    ``aligner`` decodes every point (it runs the proxy's base model only for the rules that read
    it); ``run_for(rule)`` gives the method record of ``run.json``.
    ``eval_kwargs`` go to `run_eval` (data_dir, limit, batch_size, decoding, progress, ranks).
    Progress names the point and the task: ``KAD dual λ=0.2 (2/9) · gsm8k`` (of a single
    point: ``KAD dual λ=0.4 · gsm8k``).
    """
    root = Path(out_dir)
    summaries = []
    for number, rule in enumerate(points, 1):
        folder = root / rule_slug(rule)
        point = rule_label(rule) + (f" ({number}/{len(points)})" if len(points) > 1 else "")
        for task in tasks:
            run = run_for(rule)
            label = f"{point} · {task.name}"
            summaries.append(run_eval(aligner, task, rule, folder, run, label=label, **eval_kwargs))
    return summaries
