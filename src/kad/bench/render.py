"""`kad bench` results as rich tables (one set per batch size, then acceptance and targets),
and as JSON."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.table import Table

from kad.bench.run import ACCEPTANCE_GRID


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _table(title: str, columns: Iterable[str], rows: Iterable[Iterable[str]]) -> Table:
    """A table whose first column is left-aligned and the others right-aligned."""
    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def render(results: dict[str, Any], console: Console) -> None:
    """The results as rich tables; the targets table comes last."""
    meta, pair = results.get("meta"), results.get("pair")
    if meta and pair:
        console.print(
            f"[bold]{pair['base']}[/] + [bold]{pair['proxy']}[/] on {meta['device']} "
            f"({meta['dtype']}), torch {meta['torch']}, transformers {meta['transformers']}, "
            f"{meta['date']}; prompt {meta['prompt_tokens']}, new {meta['new_tokens']} tokens; "
            f"peak bandwidth (copy) {meta['bandwidth_bytes_per_s'] / 1e9:,.0f} GB/s; "
            f"bytes/forward {pair['base_bytes_per_forward'] / 1e9:.2f} + "
            f"{pair['proxy_bytes_per_forward'] / 1e9:.2f} GB"
        )
    check = results.get("float32_check")
    if check:
        cases = ", ".join(
            f"{label} {'equal' if c['equal'] else 'DIFFERENT ' + str(c['agree'])}"
            for label, c in check["cases"].items()
        )
        console.print(
            f"float32 check, compact forward ({check['runner']}, graphed: {check['graphed']}) vs "
            f"transformers' forward, {check['new_tokens']} greedy tokens x 2 rows: "
            f"{cases}; max |Δ log p| of a decode step {check['max_logprob_diff_decode']:.2e}"
        )
    for batch in results.get("batches", []):
        render_batch(batch, meta["dtype"] if meta else "", console)
    if results.get("acceptance"):
        rows = (
            (
                r["pair"],
                r["rule"],
                str(r["gamma"]),
                _fmt(r["acceptance"], 3),
                _fmt(r["tokens_per_base_forward"], 2),
            )
            for r in results["acceptance"]
        )
        columns = ("pair", "rule", "γ", "acceptance", "tokens/base forward")
        console.print(_table("measured acceptance, real models (greedy)", columns, rows))
    if results.get("targets"):
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: "—"}
        rows = (
            (t["target"], _fmt(t["value"], 2), _fmt(t["goal"], 1), met[t["met"]])
            for t in results["targets"]
        )
        console.print(_table("targets", ("target", "measured", "goal", "met"), rows))


def tokens_table(batch: dict[str, Any], roofline: str) -> Table:
    """A batch size's rows: tokens/s beside the roofline (column ``roofline``), tokens a round
    and acceptance."""
    rows = (
        (
            r["path"],
            _fmt(r["tokens_per_s"]),
            _fmt(r["roofline_tokens_per_s"]),
            _fmt(r["roofline_pct"]),
            _fmt(r.get("tokens_per_round"), 2),
            _fmt(r.get("acceptance"), 2),
        )
        for r in batch["rows"]
    )
    columns = ("path", "tokens/s", roofline, "% roofline", "tokens/round", "acceptance")
    return _table(f"batch {batch['batch']}: decode tokens/s (median)", columns, rows)


def render_batch(batch: dict[str, Any], dtype: str, console: Console) -> None:
    """One batch size: tokens/s, the split of a round, the acceptance curve, the profile."""
    b = batch["batch"]
    console.print(tokens_table(batch, "roofline"))
    split = batch["split"]
    rows = (
        (
            str(g),
            _fmt((g + 1) * split["proxy_step_s"] * 1e3, 2),
            _fmt(split["base_step_s"][g] * 1e3, 2),
            _fmt(split["mix_s"][g] * 1e3, 3),
            _fmt(split["host_s"][g] * 1e3, 2),
            _fmt(total * 1e3, 2),
        )
        for g, total in split["round_s"].items()
    )
    columns = ("γ", "proxy ×(γ+1)", "base verify", "round's own", "round − parts", "round")
    console.print(_table(f"batch {b}: one round, ms (γ = 0 is plain KAD)", columns, rows))
    console.print(
        f"a round's own work (uniforms, mixing, warping, acceptance, commits) at γ = 0: primal "
        f"greedy {split['mix_primal_s'] * 1e3:.3f} ms, dual T=1 top-p 0.9 "
        f"{split['mix_sample_s'] * 1e3:.3f} ms"
    )
    if batch["curve"]:
        rows = (
            (str(g), *(_fmt(values[a]) for a in ACCEPTANCE_GRID))
            for g, values in batch["curve"].items()
        )
        columns = ("γ", *(f"a={a}" for a in ACCEPTANCE_GRID))
        title = f"batch {b}: speculative KAD tokens/s at acceptance a"
        console.print(_table(title, columns, rows))
    profile = batch.get("profile")
    if profile:
        totals = ", ".join(f"{k} {v / 1e3:.2f} ms" for k, v in profile["us_per_call"].items())
        console.print(
            f"kernel profile of one plain KAD round (launched eagerly, device time): {totals}; "
            f"{profile['kernels_per_call']:.0f} kernels"
        )
        rows = ((k["kernel"], _fmt(k["count"], 0), _fmt(k["us"])) for k in profile["top"])
        console.print(_table("top kernels per round", ("kernel", "calls", "µs"), rows))
    if batch["checks"]:
        console.print(
            f"{dtype} greedy agreement, tokens until the first difference (of "
            f"{batch['checks']['new_tokens']}; random weights have near-ties that rounding "
            f"flips: identity is checked in float32): {batch['checks']}"
        )


def to_json(results: dict[str, Any]) -> str:
    return json.dumps(results, indent=2, default=str)
