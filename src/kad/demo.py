"""`kad demo`: KAD on the built-in world, measured on held-out problems, offline.

The world (``kad.world``, ``assets/MODEL_CARD.md``) is a tiny base p that computes well but has
never seen the instruction format, and a small aligned proxy q* that knows the format but errs on
arithmetic. The demo decodes the first n held-out test problems greedily with eight rules, scores
the ``#### <answer>`` line of each generation (exact match), and prints:

- three generations of one problem (base alone, proxy alone, KAD dual), each token coloured by
  where its probability came from;
- a table per rule: accuracy, deferral rate (share of steps with α > 0), mean α (the share of
  the base's probability handed to the proxy), both token-weighted as `kad eval` pools them
  (`kad.eval.runner.pooled_stats`), and, in speculative mode, the acceptance rate and tokens
  per base forward.

Decoding is speculative with draft length ``GAMMA``: greedy speculative decoding emits exactly
the tokens of plain greedy decoding, so one pass gives both the accuracy of greedy decoding and
the acceptance statistics. The table's speculative columns appear only when the generations carry
them. Torch runs on one CPU thread for the demo (see `one_cpu_thread`). Progress goes to stderr:
a bar on a terminal, a line per method otherwise (`kad.progress.TaskProgress`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text
from transformers.utils import logging as transformers_logging

from kad.aligner import Aligner
from kad.display import DEFERRAL_LEGEND, deferral_text
from kad.errors import KadError
from kad.eval.runner import pooled_stats
from kad.outputs import Generation
from kad.progress import TaskProgress
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
    deferral_rate: share of generated tokens whose step had α > 0; mean_alpha: mean α per
    generated token. Both token-weighted over all the generations (`pooled_stats`, as in
    `kad eval`'s summaries) and None for rules without α (implicit reward).
    acceptance: accepted drafts / drafted; tokens_per_base_forward: tokens / base forwards
    (None without speculative decoding).
    """

    method: str
    accuracy: float
    deferral_rate: float | None
    mean_alpha: float | None
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
    pooled = pooled_stats([g.stats.to_dict() for g in generations])
    speculative = pooled["acceptance"] is not None
    return Row(
        method=method,
        accuracy=sum(correct) / len(problems),
        deferral_rate=pooled["deferral_rate"],
        mean_alpha=pooled["mean_alpha"],
        acceptance=pooled["acceptance"],
        tokens_per_base_forward=pooled["tokens_per_base_forward"] if speculative else None,
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
    title: str,
    progress: bool,
) -> tuple[list[Row], dict[str, list[Generation]]]:
    """Evaluate every method; with ``progress``, on stderr: a bar on a terminal, else a line
    as each method finishes (``kad demo: 3/8 methods, nudging λ=0.4: accuracy 0.438, 9 s``)."""
    rows, generations = [], {}
    with TaskProgress(title, len(methods), unit="methods", enabled=progress, every_s=0) as bar:
        for method, rule in methods:
            row, gens = evaluate(aligner, problems, rule, method)
            rows.append(row)
            generations[method] = gens
            bar.update(len(rows), row.accuracy, detail=f"{method}:")
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
        cells.append("–" if r.mean_alpha is None else f"{r.mean_alpha:.3f}")
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
        by_alpha = sorted((row.mean_alpha, 100 * row.accuracy) for _, row in points)
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


def check_plot_path(path: str) -> Path:
    """``path`` as a place for a PNG plot: ends in .png, is no folder, and a file can be written
    there (tried: created, then removed); else a `KadError` saying which."""
    plot = Path(path).expanduser()
    if plot.suffix.lower() != ".png":
        raise KadError(f"--sweep takes a .png path, got {path!r}")
    if plot.is_dir():
        raise KadError(f"--sweep {path} is a folder: give a file name ending in .png")
    if not plot.parent.is_dir():
        what = "is not a folder" if plot.parent.exists() else "does not exist"
        raise KadError(f"--sweep {path}: the folder {plot.parent} {what}")
    existed = plot.exists()
    try:
        with plot.open("ab"):
            pass
    except OSError as err:
        raise KadError(f"--sweep {path}: cannot write there ({err.strerror})") from None
    if not existed:
        plot.unlink()
    return plot


def run_demo(as_json: bool = False, sweep: str | None = None, n: int = 200) -> list[Row]:
    """The demo: examples and table on the first n held-out test problems (see module doc).
    Its arguments are checked before anything runs."""
    if n < 1:
        raise KadError(f"--n must be at least 1, got {n}")
    plot = check_plot_path(sweep) if sweep is not None else None
    console = Console(highlight=False)
    problems = heldout_problems(n, "test")
    aligner = load_world()
    shown = f"kad demo, {n} problems"  # what progress calls the runs
    with one_cpu_thread():
        rows, generations = run_methods(aligner, problems, METHODS, shown, not as_json)
        sweep_rows: list[Row] = []
        if plot is not None:
            methods = sweep_methods()
            done = {rule: row for (_, rule), row in zip(METHODS, rows, strict=True)}
            todo = [(label, rule) for label, rule in methods if rule not in done]
            new_rows, _ = run_methods(aligner, problems, todo, f"{shown}, sweep", not as_json)
            done |= {rule: row for (_, rule), row in zip(todo, new_rows, strict=True)}
            rules = [rule for _, rule in methods]
            sweep_rows = [done[rule] for rule in rules]
            plot_sweep(list(zip(rules, sweep_rows, strict=True)), rows[:2], plot)
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
