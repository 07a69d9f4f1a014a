"""`kad bench` results as rich tables (one set per batch size, then acceptance and targets),
and as JSON."""

from __future__ import annotations

import json
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
        table = Table(title=f"batch {batch['batch']}: decode tokens/s (median)")
        for col in ("path", "tokens/s", "roofline", "% roofline", "tokens/round", "acceptance"):
            table.add_column(col, justify="left" if col == "path" else "right")
        for r in batch["rows"]:
            table.add_row(
                r["path"],
                _fmt(r["tokens_per_s"]),
                _fmt(r["roofline_tokens_per_s"]),
                _fmt(r["roofline_pct"]),
                _fmt(r.get("tokens_per_round"), 2),
                _fmt(r.get("acceptance"), 2),
            )
        console.print(table)
        split = batch["split"]
        table = Table(title=f"batch {batch['batch']}: one round, ms (γ = 0 is plain KAD)")
        for col in ("γ", "proxy ×(γ+1)", "base verify", "round's own", "round − parts", "round"):
            table.add_column(col, justify="right")
        for g, total in split["round_s"].items():
            table.add_row(
                str(g),
                _fmt((g + 1) * split["proxy_step_s"] * 1e3, 2),
                _fmt(split["base_step_s"][g] * 1e3, 2),
                _fmt(split["mix_s"][g] * 1e3, 3),
                _fmt(split["host_s"][g] * 1e3, 2),
                _fmt(total * 1e3, 2),
            )
        console.print(table)
        extra = [
            ("primal, greedy", "mix_primal_s"),
            ("dual, T=1 top-p 0.9", "mix_sample_s"),
        ]
        console.print(
            ", ".join(f"{name} at γ = 0: {split[key] * 1e3:.3f} ms" for name, key in extra)
            + " (a round's own work: uniforms, mixing, warping, acceptance, commits)"
        )
        if batch["curve"]:
            table = Table(title=f"batch {batch['batch']}: speculative KAD tokens/s at acceptance a")
            table.add_column("γ", justify="right")
            for a in ACCEPTANCE_GRID:
                table.add_column(f"a={a}", justify="right")
            for g, values in batch["curve"].items():
                table.add_row(str(g), *(_fmt(values[a]) for a in ACCEPTANCE_GRID))
            console.print(table)
        if batch.get("profile"):
            prof = batch["profile"]
            totals = ", ".join(f"{k} {v / 1e3:.2f} ms" for k, v in prof["us_per_call"].items())
            console.print(
                f"kernel profile of one plain KAD round (launched eagerly, device time): {totals}; "
                f"{prof['kernels_per_call']:.0f} kernels"
            )
            table = Table(title="top kernels per round")
            for col in ("kernel", "calls", "µs"):
                table.add_column(col)
            for k in prof["top"]:
                table.add_row(k["kernel"], _fmt(k["count"], 0), _fmt(k["us"]))
            console.print(table)
        if batch["checks"]:
            console.print(
                f"{meta['dtype'] if meta else ''} greedy agreement, tokens until the first "
                f"difference (of {batch['checks']['new_tokens']}; random weights have near-ties "
                f"that rounding flips: identity is checked in float32): {batch['checks']}"
            )
    if results.get("acceptance"):
        table = Table(title="measured acceptance, real models (greedy)")
        for col in ("pair", "rule", "γ", "acceptance", "tokens/base forward"):
            table.add_column(col)
        for r in results["acceptance"]:
            table.add_row(
                r["pair"],
                r["rule"],
                str(r["gamma"]),
                _fmt(r["acceptance"], 3),
                _fmt(r["tokens_per_base_forward"], 2),
            )
        console.print(table)
    if results.get("targets"):
        table = Table(title="targets")
        for col in ("target", "measured", "goal", "met"):
            table.add_column(col)
        for t in results["targets"]:
            met = {True: "[green]yes[/]", False: "[red]no[/]", None: "—"}[t["met"]]
            table.add_row(t["target"], _fmt(t["value"], 2), _fmt(t["goal"], 1), met)
        console.print(table)


def to_json(results: dict[str, Any]) -> str:
    return json.dumps(results, indent=2, default=str)
