"""`kad sweep`: a grid of rules and parameters over tasks, one results folder per point.

The grid of the paper's comparison: the base and the proxy alone, nudging and KAD dual over λ,
KAD primal over b, implicit reward over β (only with the proxy's base model). The models are
loaded once; each point runs every task through `run_eval` into ``<out>/<method name>/``, so an
interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kad.errors import KadError
from kad.eval.runner import method_name, run_eval
from kad.eval.tasks import Task
from kad.rules import RULE_NAMES, Rule, make_rule, rule_key, rule_params

DEFAULT_RULES: tuple[str, ...] = ("base", "proxy", "nudging", "implicit-reward", "dual", "primal")
DEFAULT_LAMS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_BUDGETS: tuple[float, ...] = (0.5, 0.7, 0.9)
DEFAULT_BETAS: tuple[float, ...] = (1.0,)


def grid(
    rules: Sequence[str],
    lams: Sequence[float] = DEFAULT_LAMS,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    betas: Sequence[float] = DEFAULT_BETAS,
    loss: str = "nll",
    mus: Sequence[float] = (),
) -> list[Rule]:
    """One rule per point: dual and nudging over ``lams`` (dual over ``mus`` for a non-nll
    loss), primal over ``budgets``, implicit reward over ``betas``; base and proxy once."""
    points: list[Rule] = []
    for name in rules:
        key = rule_key(name)
        if key not in RULE_NAMES:
            raise KadError(f"unknown rule {name!r}: choose among {', '.join(RULE_NAMES)}")
        if key == "dual" and loss != "nll":
            if not mus:
                raise KadError(f"dual with the {loss} loss is swept over μ: give --mus")
            points += [make_rule(key, loss=loss, mu=mu) for mu in mus]
        elif key in ("dual", "nudging"):
            points += [make_rule(key, lam=lam) for lam in lams]
        elif key == "primal":
            points += [make_rule(key, budget=b, loss=loss) for b in budgets]
        elif key == "implicit-reward":
            points += [make_rule(key, beta=beta) for beta in betas]
        else:
            points.append(make_rule(key))
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
    ``eval_kwargs`` go to `run_eval` (data_dir, limit, batch_size, decoding, progress).
    """
    root = Path(out_dir)
    summaries = []
    for rule in points:
        folder = root / method_name(rule.name, rule_params(rule))
        for task in tasks:
            summaries.append(run_eval(aligner, task, rule, folder, run_for(rule), **eval_kwargs))
    return summaries
