"""Plots (issue 16): lines that never double back, y-axes within the data's [0, 100] range."""

from __future__ import annotations

from pathlib import Path

import pytest
from matplotlib.figure import Figure

import kad
from kad import demo
from kad.eval import report


@pytest.fixture
def saved(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """The figures that would have been saved, in order (no file is written)."""
    figures: list[Figure] = []
    monkeypatch.setattr(Figure, "savefig", lambda figure, *a, **k: figures.append(figure))
    return figures


def row(method: str, accuracy: float, mass: float) -> demo.Row:
    return demo.Row(method, accuracy, 0.5, mass, None, None, 10)


def test_sweep_lines_run_in_the_order_of_their_x_values(saved, tmp_path: Path):
    # α is not monotone in λ: 0.1 -> α 0.30, 0.2 -> α 0.10, 0.3 -> α 0.20
    sweep = [
        (kad.Dual(lam=0.1), row("a", 0.5, 0.30)),
        (kad.Dual(lam=0.2), row("b", 0.6, 0.10)),
        (kad.Dual(lam=0.3), row("c", 0.7, 0.20)),
    ]
    demo.plot_sweep(sweep, [row("base", 0.2, 0.0), row("proxy", 0.4, 1.0)], tmp_path / "s.png")
    by_mass, by_parameter = saved[0].axes
    for axes in (by_mass, by_parameter):
        xs = list(axes.lines[0].get_xdata())
        assert xs == sorted(xs)


def summary(rule: str, params: dict, accuracy: float) -> dict:
    return {
        "base": "B", "proxy": "Q", "rule": rule, "params": params, "task": "gsm8k", "n": 4,
        "accuracy": accuracy, "correct": int(4 * accuracy), "deferral_rate": 0.0,
        "mean_alpha": 0.0, "acceptance": None,
    }  # fmt: skip


def test_report_axes_stay_within_the_data_and_0_to_100(saved, tmp_path: Path):
    summaries = [
        summary("base", {}, 1.0),
        summary("proxy", {}, 0.0),
        summary("dual", {"lam": 0.4, "loss": "nll"}, 1.0),
        summary("nudging", {"lam": 0.4}, 0.0),
        summary("primal", {"budget": 0.9, "loss": "nll"}, 0.5),
    ]
    report.plot_accuracy(
        summaries, (("dual", "o-", "KAD dual"), ("nudging", "s--", "Nudging")), "lam", "λ",
        tmp_path / "a.png",
    )  # fmt: skip
    report.plot_accuracy(summaries, (("primal", "o-", "KAD primal"),), "budget", "b", tmp_path)
    report.plot_deferral(summaries, tmp_path / "d.png")
    for figure in saved:
        for axes in figure.axes:
            low, high = axes.get_ylim()
            assert 0 <= low < high <= 100
    low, high = saved[1].axes[0].get_ylim()  # primal at 50 %, base 100 %, proxy 0 %
    assert (low, high) == (0, 100)
