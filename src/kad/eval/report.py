"""`kad report`: the paper's table and plots from a folder of eval summaries.

Reads every ``*.summary.json`` under the folder. The table has a row per method (base, proxy,
nudging, implicit reward, KAD dual and primal at each parameter) and a column per task, plus
the deferral rate, mean α and speculative acceptance averaged over the tasks; one table per
model pair. Plots (PNG): accuracy against λ (dual, nudging) and against b (primal), with the
base and the proxy as reference lines, and the deferral rate and mean α against λ.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kad.errors import KadError
from kad.eval.runner import SUMMARY_SUFFIX
from kad.eval.tasks import TASKS
from kad.rules import RULES, make_rule, rule_key, rule_label

RULE_ORDER = ("base", "proxy", "nudging", "implicit-reward", "dual", "primal", "proxy-referenced")
TASK_TITLES = {
    "gsm8k": "GSM8K",
    "svamp": "SVAMP",
    "math500": "MATH500",
    "arc_challenge": "ARC-C",
    "csqa": "CSQA",
    "truthfulqa_mc1": "TQA-MC1",
    "truthfulqa_mc2": "TQA-MC2",
    "toy": "Toy",
}
Summary = dict[str, Any]


def load_summaries(root: str | os.PathLike[str]) -> list[Summary]:
    """Every summary under ``root``; of a (model pair, method, task) found twice, the one over
    most examples."""
    folder = Path(root)
    if not folder.is_dir():
        raise KadError(f"{folder} is not a folder of results")
    best: dict[tuple, Summary] = {}
    for path in sorted(folder.rglob(f"*{SUMMARY_SUFFIX}")):
        summary = read_summary(path)
        key = (*pair_of(summary), method_key(summary), summary["task"])
        if key not in best or summary["n"] > best[key]["n"]:
            best[key] = summary
    if not best:
        raise KadError(
            f"no *{SUMMARY_SUFFIX} files under {folder}: run kad eval or kad sweep first"
        )
    return list(best.values())


SUMMARY_KEYS = ("base", "proxy", "rule", "params", "task", "n", "accuracy")


def read_summary(path: Path) -> Summary:
    """One ``*.summary.json``; a `KadError` naming the file if it is not a summary kad wrote."""
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise KadError(
            f"{path} is not a kad summary ({err}): remove it or rerun kad eval"
        ) from None
    missing = [key for key in SUMMARY_KEYS if not isinstance(summary, dict) or key not in summary]
    if missing:
        raise KadError(f"{path} is not a kad summary (no {', '.join(missing)}): remove it")
    return summary


def pair_of(summary: Summary) -> tuple[str, str]:
    return summary["base"], summary["proxy"]


def method_key(summary: Summary) -> tuple:
    return summary["rule"], tuple(sorted(summary["params"].items()))


def method_label(rule: str, params: dict[str, Any]) -> str:
    """The registry's `rule_label`, capitalised: ``KAD dual λ=0.4``, ``KAD primal b=0.9``,
    ``Nudging λ=0.3``, ``Implicit reward β=1``, ``Base alone``; a rule the registry no longer
    knows, by its name."""
    try:
        label = rule_label(make_rule(rule, **params))
    except KadError:
        return rule
    return label[:1].upper() + label[1:]


def _sort_key(key: tuple) -> tuple:
    rule, params = key
    slug = rule_key(rule)  # the table's order, then the registry's
    order = [*RULE_ORDER, *(name for name in RULES if name not in RULE_ORDER)]
    rank = order.index(slug) if slug in order else len(order)
    return rank, [(k, v if isinstance(v, (int, float)) else 0) for k, v in params]


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def markdown_table(summaries: Sequence[Summary]) -> str:
    """Methods × tasks (accuracy %), then means over the tasks of the deferral rate (steps with
    α > 0), the mean α (mass moved to the proxy) and the speculative acceptance, in %; for
    summaries of one model pair. A † marks a cell over fewer examples than its column's most."""
    tasks = [t for t in TASKS if any(s["task"] == t for s in summaries)]
    cells = {(method_key(s), s["task"]): s for s in summaries}
    methods = sorted({method_key(s) for s in summaries}, key=_sort_key)
    most = {t: max(s["n"] for s in summaries if s["task"] == t) for t in tasks}
    header = ["Method", *[f"{TASK_TITLES.get(t, t)} (n={most[t]})" for t in tasks]]
    header += ["Deferral %", "Mean α %", "Acceptance %"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for key in methods:
        row = [method_label(key[0], dict(key[1]))]
        for task in tasks:
            cell = cells.get((key, task))
            mark = "†" if cell is not None and cell["n"] < most[task] else ""
            row.append(_percent(cell["accuracy"] if cell else None) + mark)
        present = [cells[(key, t)] for t in tasks if (key, t) in cells]
        for stat in ("deferral_rate", "mean_alpha", "acceptance"):
            row.append(_percent(_mean([s.get(stat) for s in present])))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _curves(
    summaries: Sequence[Summary], rule: str, param: str, value: str
) -> dict[str, list[tuple[float, float]]]:
    """task -> sorted (parameter, value) points of one rule (nll loss only)."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for s in summaries:
        params = s["params"]
        wanted = s["rule"] == rule and param in params and params.get("loss", "nll") == "nll"
        if wanted and s.get(value) is not None:
            curves.setdefault(s["task"], []).append((params[param], s[value]))
    return {task: sorted(points) for task, points in curves.items()}


def _reference(summaries: Sequence[Summary], rule: str, task: str) -> float | None:
    return next((s["accuracy"] for s in summaries if s["rule"] == rule and s["task"] == task), None)


def clamp_percent_axis(ax: Any, values: Sequence[float]) -> None:
    """The y-axis of a percentage panel: the data's range with a margin, within [0, 100]."""
    if not values:
        return
    low, high = min(values), max(values)
    margin = max(2.0, 0.1 * (high - low))
    ax.set_ylim(max(0.0, low - margin), min(100.0, high + margin))


def plot_accuracy(
    summaries: Sequence[Summary],
    lines: Sequence[tuple[str, str, str]],
    param: str,
    xlabel: str,
    path: Path,
) -> Path | None:
    """One panel per task: accuracy of each (rule, style, label) against ``param``, with the
    base and the proxy as horizontal lines. None (no file) when no rule has points."""
    from matplotlib.figure import Figure

    curves = {rule: _curves(summaries, rule, param, "accuracy") for rule, _, _ in lines}
    tasks = [t for t in TASKS if any(t in c for c in curves.values())]
    if not tasks:
        return None
    cols = min(3, len(tasks))
    rows = -(-len(tasks) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, task in zip(axes.flat, tasks, strict=False):
        shown: list[float] = []
        for rule, style, label in lines:
            points = curves[rule].get(task)
            if points:
                xs, ys = zip(*points, strict=True)
                shown += [100 * y for y in ys]
                ax.plot(xs, [100 * y for y in ys], style, label=label)
        for rule, style in (("base", ":"), ("proxy", "--")):
            level = _reference(summaries, rule, task)
            if level is not None:
                shown.append(100 * level)
                ax.axhline(100 * level, linestyle=style, color="gray", label=rule)
        clamp_percent_axis(ax, shown)
        ax.set_title(TASK_TITLES.get(task, task))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy %")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_deferral(summaries: Sequence[Summary], path: Path) -> Path | None:
    """Against λ, for dual (solid) and nudging (dashed), a line per task: the deferral rate
    (steps with α > 0) and the mean α (mass moved to the proxy)."""
    from matplotlib.figure import Figure

    stats = (("deferral_rate", "steps with deferral %"), ("mean_alpha", "mean α %"))
    panels = [
        (label, _curves(summaries, "dual", "lam", stat), _curves(summaries, "nudging", "lam", stat))
        for stat, label in stats
    ]
    if not any(dual or nudging for _, dual, nudging in panels):
        return None
    fig = Figure(figsize=(10, 3.8))
    for ax, (label, dual, nudging) in zip(fig.subplots(1, 2), panels, strict=True):
        shown: list[float] = []
        for task in TASKS:
            for curves, style, name in ((dual, "o-", "KAD dual"), (nudging, "s--", "nudging")):
                if task in curves:
                    xs, ys = zip(*curves[task], strict=True)
                    shown += [100 * y for y in ys]
                    ax.plot(xs, [100 * y for y in ys], style, label=f"{name} · {TASK_TITLES[task]}")
        clamp_percent_axis(ax, shown)
        ax.set_xlabel("λ")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def write_report(
    root: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None
) -> tuple[str, list[Path]]:
    """The markdown report of the results under ``root`` and the plots written for it (into
    ``out_dir``, default ``root``); the markdown is also saved as ``report.md``."""
    summaries = load_summaries(root)
    target = Path(out_dir) if out_dir is not None else Path(root)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise KadError(f"--out {target}: cannot write there ({err.strerror})") from None
    pairs = sorted({pair_of(s) for s in summaries})
    sections, plots = [], []
    for index, pair in enumerate(pairs):
        group = [s for s in summaries if pair_of(s) == pair]
        tag = "" if len(pairs) == 1 else f"-{index + 1}"
        sections.append(f"### base `{pair[0]}` · proxy `{pair[1]}`\n\n{markdown_table(group)}")
        lam_lines = (("dual", "o-", "KAD dual"), ("nudging", "s--", "Nudging"))
        drawn = (
            plot_accuracy(group, lam_lines, "lam", "λ", target / f"accuracy_vs_lambda{tag}.png"),
            plot_accuracy(
                group,
                (("primal", "o-", "KAD primal"),),
                "budget",
                "b",
                target / f"accuracy_vs_budget{tag}.png",
            ),
            plot_deferral(group, target / f"deferral_vs_lambda{tag}.png"),
        )
        plots += [path for path in drawn if path is not None]
    markdown = "\n\n".join(sections) + "\n"
    if any("†" in section for section in sections):
        markdown += "\n† fewer examples than the column's n.\n"
    (target / "report.md").write_text(markdown, encoding="utf-8")
    return markdown, plots
