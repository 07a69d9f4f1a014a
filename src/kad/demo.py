"""`kad demo`: KAD on the built-in world, measured on held-out problems, offline.

The world (``kad.world``, ``assets/MODEL_CARD.md``) is a tiny base p that computes well but has
never seen the instruction format, and a small aligned proxy q* that knows the format but errs on
arithmetic. The demo decodes the first n held-out test problems greedily with eight rules, scores
the ``#### <answer>`` line of each generation (exact match), and prints:

- three generations of one problem (base alone, proxy alone, KAD dual), each token coloured by
  where its probability came from;
- a table per rule: accuracy, deferral rate (share of steps with α > 0), deferred mass (mean α),
  and, in speculative mode, the acceptance rate and tokens per base forward.

Decoding is speculative with draft length ``GAMMA``: greedy speculative decoding emits exactly
the tokens of plain greedy decoding, so one pass gives both the accuracy of greedy decoding and
the acceptance statistics. The table's speculative columns appear only when the generations carry
them. Torch runs on one CPU thread for the demo (see `one_cpu_thread`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from transformers.utils import logging as transformers_logging

from kad.aligner import Aligner
from kad.display import DEFERRAL_LEGEND, deferral_text
from kad.errors import KadError
from kad.outputs import Generation
from kad.rules import (
    BaseOnly,
    Dual,
    ImplicitReward,
    Nudging,
    Primal,
    ProxyOnly,
    ProxyReferenced,
    Rule,
)
from kad.world import builtin_aligner, heldout_problems, score

GAMMA = 4  # draft length of the speculative pass
MAX_NEW_TOKENS = 64  # the longest gold answer is 56 tokens with <|end|> (6000 held-out problems)
METHODS: tuple[tuple[str, Rule], ...] = (
    ("base", BaseOnly()),
    ("proxy", ProxyOnly()),
    ("nudging λ=0.4", Nudging(lam=0.4)),
    ("implicit reward β=1", ImplicitReward(beta=1.0)),
    ("KAD dual λ=0.4", Dual(lam=0.4)),
    ("KAD primal b=0.9", Primal(budget=0.9)),
    ("KAD primal b=0.9 fractional", Primal(budget=0.9, fractional=True)),
    ("proxy-referenced δ=0.1", ProxyReferenced(delta=0.1)),
)
SWEEP_LAMBDAS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)
SWEEP_BUDGETS: tuple[float, ...] = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


@dataclass(frozen=True)
class Row:
    """One rule's results over a set of problems.

    accuracy: share of generations whose ``#### <answer>`` line holds the answer.
    deferral_rate: share of generated tokens whose step had α > 0; deferred_mass: mean α.
    Both are token-weighted and None for rules without α (implicit reward).
    acceptance: accepted drafts / drafted; tokens_per_base_forward: tokens / base forwards
    (None without speculative decoding).
    """

    method: str
    accuracy: float
    deferral_rate: float | None
    deferred_mass: float | None
    acceptance: float | None
    tokens_per_base_forward: float | None
    problems: int

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(
    method: str, generations: Sequence[Generation], problems: Sequence[dict[str, object]]
) -> Row:
    """Score generations against their problems' answers and pool their statistics."""
    if len(generations) != len(problems) or not problems:
        raise KadError(f"{len(generations)} generations for {len(problems)} problems")
    correct = [score(g.text, p["answer"]) for g, p in zip(generations, problems, strict=True)]
    tokens = sum(g.stats.tokens for g in generations)

    def token_weighted(field: str) -> float | None:
        values = [(getattr(g.stats, field), g.stats.tokens) for g in generations]
        if tokens == 0 or any(v is None for v, _ in values):
            return None
        return sum(v * n for v, n in values) / tokens

    drafted = [g.stats.drafted for g in generations]
    speculative = all(d is not None for d in drafted) and sum(drafted) > 0
    forwards = sum(g.stats.base_forwards for g in generations)
    return Row(
        method=method,
        accuracy=sum(correct) / len(problems),
        deferral_rate=token_weighted("deferral_rate"),
        deferred_mass=token_weighted("mean_alpha"),
        acceptance=sum(g.stats.accepted for g in generations) / sum(drafted)
        if speculative
        else None,
        tokens_per_base_forward=tokens / forwards if speculative and forwards else None,
        problems=len(problems),
    )


def load_world() -> Aligner:
    """The built-in base, aligned proxy and proxy base; the base reads questions as web text.
    On the CPU even where a GPU exists: models of 1-2 MB gain nothing from it, and the GPU path
    would spend longer compiling than the demo takes."""
    transformers_logging.disable_progress_bar()  # the loading bars of three tiny models
    return builtin_aligner(device="cpu")


def evaluate(
    aligner: Aligner,
    problems: Sequence[dict[str, object]],
    rule: Rule,
    method: str,
    speculative: int | None = GAMMA,
) -> tuple[Row, list[Generation]]:
    """Greedy generations for every problem under ``rule``, and their Row."""
    generations = aligner.generate(
        [str(p["question"]) for p in problems],
        rule=rule,
        max_new_tokens=MAX_NEW_TOKENS,
        speculative=speculative,
    )
    return summarize(method, generations, problems), generations


def sweep_methods() -> list[tuple[str, Rule]]:
    """Dual and nudging over SWEEP_LAMBDAS, primal over SWEEP_BUDGETS."""
    return (
        [(f"KAD dual λ={lam}", Dual(lam=lam)) for lam in SWEEP_LAMBDAS]
        + [(f"nudging λ={lam}", Nudging(lam=lam)) for lam in SWEEP_LAMBDAS]
        + [(f"KAD primal b={b}", Primal(budget=b)) for b in SWEEP_BUDGETS]
    )


def run_methods(
    aligner: Aligner,
    problems: Sequence[dict[str, object]],
    methods: Sequence[tuple[str, Rule]],
    console: Console,
    progress: bool,
) -> tuple[list[Row], dict[str, list[Generation]]]:
    """Evaluate every method, with a progress bar on ``console`` when ``progress``."""
    rows, generations = [], {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not progress,
    ) as bar:
        task = bar.add_task(f"{len(problems)} held-out problems", total=len(methods))
        for method, rule in methods:
            bar.update(task, description=method)
            row, gens = evaluate(aligner, problems, rule, method)
            rows.append(row)
            generations[method] = gens
            bar.advance(task)
    return rows, generations


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def render_table(rows: Sequence[Row], title: str, caption: str | None = None) -> Table:
    """The results table; the speculative columns only when some row has them."""
    speculative = any(r.acceptance is not None for r in rows)
    table = Table(title=title, caption=caption, title_justify="left", caption_justify="left")
    table.add_column("method", no_wrap=True)
    table.add_column("accuracy", justify="right")
    table.add_column("deferral rate", justify="right")
    table.add_column("mean α", justify="right")
    if speculative:
        table.add_column("acceptance", justify="right")
        table.add_column("tok/fwd", justify="right")
    for r in rows:
        cells = [r.method, _percent(r.accuracy), _percent(r.deferral_rate)]
        cells.append("–" if r.deferred_mass is None else f"{r.deferred_mass:.3f}")
        if speculative:
            cells.append(_percent(r.acceptance))
            tpf = r.tokens_per_base_forward
            cells.append("–" if tpf is None else f"{tpf:.2f}")
        table.add_row(*cells)
    return table


def example_index(generations: dict[str, list[Generation]], problems: Sequence[dict]) -> int | None:
    """The first problem the proxy alone gets wrong, or None if it gets them all right."""
    proxy = generations["proxy"]
    return next((i for i, p in enumerate(problems) if not score(proxy[i].text, p["answer"])), None)


def render_examples(
    console: Console,
    aligner: Aligner,
    generations: dict[str, list[Generation]],
    problems: Sequence[dict[str, object]],
) -> None:
    """Base alone, proxy alone and KAD on one problem, coloured by deferral."""

    i = example_index(generations, problems)
    if i is None:
        i, why = 0, "the proxy alone solves all of them"
    else:
        why = "the first one the proxy alone gets wrong"
    problem = problems[i]
    console.rule(f"held-out problem {i + 1} ({why})")
    console.print(str(problem["question"]), markup=False, highlight=False)
    console.print(Text(f"answer: {problem['answer']}", style="bold"))
    for method in ("base", "proxy", "KAD dual λ=0.4"):
        generation = generations[method][i]
        verdict = "correct" if score(generation.text, problem["answer"]) else "wrong"
        console.print(Text(f"\n{method} ({verdict}):", style="bold"))
        console.print(
            deferral_text(aligner.tokenizer, generation.token_ids, generation.proxy_share)
        )
    console.print(Text("\ncolours: ") + DEFERRAL_LEGEND)


def plot_sweep(sweep: Sequence[tuple[Rule, Row]], reference: Sequence[Row], path: Path) -> None:
    """Two panels: accuracy against mean α, and against the rule's λ or b; base and proxy alone
    as horizontal lines. Each line joins its points in the order of its x value (α is not
    monotone in λ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_mass, by_parameter) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    styles = {"dual": ("KAD dual (λ)", "o"), "primal": ("KAD primal (b)", "s")}
    styles["nudging"] = ("nudging (λ)", "^")
    for family, (label, marker) in styles.items():
        points = sorted(
            (
                (getattr(rule, "lam", None) or getattr(rule, "budget", 0.0), row)
                for rule, row in sweep
                if rule.name == family
            ),
            key=lambda point: point[0],
        )
        if not points:
            continue
        by_alpha = sorted((row.deferred_mass, 100 * row.accuracy) for _, row in points)
        line = by_mass.plot(*zip(*by_alpha, strict=True), marker=marker)
        by_parameter.plot(
            [x for x, _ in points], [100 * row.accuracy for _, row in points], marker=marker,
            label=label, color=line[0].get_color(),
        )  # fmt: skip
    for axes in (by_mass, by_parameter):
        for row, style in zip(reference, ("--", ":"), strict=False):
            axes.axhline(100 * row.accuracy, linestyle=style, color="gray", label=row.method)
    by_mass.set_xlabel("mean α (share of the base's probability handed to the proxy)")
    by_mass.set_ylabel(f"exact-match accuracy (%), {reference[0].problems} held-out problems")
    by_parameter.set_xlabel("threshold λ (dual, nudging) or budget b (primal)")
    by_parameter.legend(loc="lower right", fontsize=8)
    figure.suptitle("KAD on the built-in world: λ and b sweeps")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


@contextmanager
def one_cpu_thread() -> Iterator[None]:
    """Run torch on one CPU thread, then restore the thread count.

    The world's models are tiny: on 2 cores, intra-op threads cost more in synchronisation than
    they save, and when another process competes for the cores they slow decoding down
    several-fold (measured: `kad demo` in 31 s on one thread against 121 s on two, with
    another job running).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_demo(as_json: bool = False, sweep: str | None = None, n: int = 200) -> list[Row]:
    """The demo: examples and table on the first n held-out test problems (see module doc)."""
    if n < 1:
        raise KadError(f"--n must be at least 1, got {n}")
    if sweep is not None and not sweep.lower().endswith(".png"):
        raise KadError(f"--sweep takes a .png path, got {sweep!r}")
    console = Console(highlight=False)
    status = Console(stderr=True)
    problems = heldout_problems(n, "test")
    aligner = load_world()
    with one_cpu_thread():
        rows, generations = run_methods(aligner, problems, METHODS, status, not as_json)
        sweep_rows: list[Row] = []
        if sweep is not None:
            methods = sweep_methods()
            done = {rule: row for (_, rule), row in zip(METHODS, rows, strict=True)}
            todo = [(label, rule) for label, rule in methods if rule not in done]
            new_rows, _ = run_methods(aligner, problems, todo, status, not as_json)
            done |= {rule: row for (_, rule), row in zip(todo, new_rows, strict=True)}
            rules = [rule for _, rule in methods]
            sweep_rows = [done[rule] for rule in rules]
            plot_sweep(list(zip(rules, sweep_rows, strict=True)), rows[:2], Path(sweep))
    if as_json:
        report: dict[str, object] = {"rows": [r.to_dict() for r in rows]}
        if sweep is not None:
            report["sweep"] = [r.to_dict() for r in sweep_rows]
        print(json.dumps(report, indent=2, allow_nan=False, ensure_ascii=False))
        return rows
    render_examples(console, aligner, generations, problems)
    title = f"Exact match of the #### line on {n} held-out problems"
    caption = (
        f"Greedy, decoded speculatively (γ={GAMMA}: the same tokens as plain greedy). "
        "Deferral rate: share of steps with α > 0; mean α: share of the base's probability "
        "handed to the proxy; tok/fwd: tokens per base forward."
    )
    console.print()
    console.print(render_table(rows, title, caption))
    if sweep is not None:
        console.print(render_table(sweep_rows, "λ and b sweep"))
        console.print(f"sweep plot saved to {sweep}")
    return rows


__all__ = ["METHODS", "Row", "evaluate", "load_world", "one_cpu_thread", "run_demo", "summarize"]
