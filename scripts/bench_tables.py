"""Markdown tables for BENCHMARKS.md from `kad bench --out` JSON files (no figure typed by hand).

Usage:
    python scripts/bench_tables.py RESULTS.json [...]            the tables of each run
    python scripts/bench_tables.py --targets RESULTS.json [...]  the targets, a column per run
    python scripts/bench_tables.py --sampling sampling.json      scripts/gpu_sampling.py output
"""

from __future__ import annotations

import json
import sys


def fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def load(path: str):
    with open(path) as f:
        return json.load(f)


def tables(path: str) -> str:
    results = load(path)
    pair, meta = results["pair"], results["meta"]
    out = [
        f"`{meta['command']}` ({meta['date']}, copy bandwidth "
        f"{meta['bandwidth_bytes_per_s'] / 1e9:,.0f} GB/s)",
        "",
    ]
    for batch in results["batches"]:
        b = batch["batch"]
        out += [
            f"**{pair['base']} + {pair['proxy']}, batch {b}** (plain KAD roofline "
            f"{fmt(batch['plain_roofline_tokens_per_s'])} tokens/s)",
            "",
            "| path | tokens/s | roofline tokens/s | % roofline | tokens/round |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in batch["rows"]:
            out.append(
                f"| {row['path']} | {fmt(row['tokens_per_s'])} | "
                f"{fmt(row['roofline_tokens_per_s'])} | {fmt(row['roofline_pct'])} | "
                f"{fmt(row.get('tokens_per_round'), 2)} |"
            )
        split = batch["split"]
        out += [
            "",
            f"Batch {b}, one round in ms (γ = 0 is plain KAD; parts timed alone as graph "
            "replays; the round's own work: uniforms, mixing, warping, acceptance, commits over "
            "fixed p, q; round − parts < 0: the proxy's last step ran beside the base verify)",
            "",
            "| γ | proxy × (γ+1) | base over γ+1 | round's own work | round − parts | round |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for g, total in split["round_s"].items():
            out.append(
                f"| {g} | {fmt((int(g) + 1) * split['proxy_step_s'] * 1e3, 2)} | "
                f"{fmt(split['base_step_s'][g] * 1e3, 2)} | {fmt(split['mix_s'][g] * 1e3, 3)} | "
                f"{fmt(split['host_s'][g] * 1e3, 2)} | {fmt(total * 1e3, 2)} |"
            )
        out.append(f"\nA round's own work, primal at γ = 0: {split['mix_primal_s'] * 1e3:.3f} ms.")
        if "mix_sample_s" in split:  # runs before it was measured lack it
            out.append(
                "A round's own work, dual sampled (T = 1, top-p 0.9) at γ = 0: "
                f"{split['mix_sample_s'] * 1e3:.3f} ms."
            )
        if batch["curve"]:
            grid = list(next(iter(batch["curve"].values())))
            out += [
                "",
                f"Batch {b}, speculative KAD tokens/s at acceptance a, from the measured rounds",
                "",
                "| γ | " + " | ".join(f"a={a}" for a in grid) + " |",
                "|---:|" + "---:|" * len(grid),
            ]
            for g, curve in batch["curve"].items():
                out.append(f"| {g} | " + " | ".join(fmt(curve[a]) for a in grid) + " |")
        profile = batch.get("profile")
        if profile:
            totals = ", ".join(f"{k} {v / 1e3:.2f} ms" for k, v in profile["us_per_call"].items())
            out += [
                "",
                f"Kernel profile of one plain KAD round at batch {b}: {totals}; "
                f"{profile['kernels_per_call']:.0f} kernels.",
                "",
                "| kernel | calls | µs |",
                "|---|---:|---:|",
            ]
            out += [
                f"| `{k['kernel']}` | {k['count']:.0f} | {fmt(k['us'])} |" for k in profile["top"]
            ]
        out.append("")
    return "\n".join(out)


def targets(paths: list[str]) -> str:
    """One row per target, one column per run: the measured value and whether it is met."""
    runs = [load(p) for p in paths]
    names = list(dict.fromkeys(t["target"] for r in runs for t in r["targets"]))
    heads = [f"{r['pair']['base']} + {r['pair']['proxy']}" for r in runs]
    out = ["| target | goal | " + " | ".join(heads) + " |", "|---|---:|" + "---|" * len(runs)]
    for name in names:
        cells, goal = [], None
        for r in runs:
            t = next((t for t in r["targets"] if t["target"] == name), None)
            goal = goal or (t and t["goal"])
            cells.append(
                "—" if t is None else f"{t['value']:.2f} ({'met' if t['met'] else 'missed'})"
            )
        out.append(f"| {name} | {goal} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def sampling(path: str) -> str:
    """The decision timings of scripts/gpu_sampling.py, in ms per call (CUDA graph replays)."""
    rows = load(path)
    keys = [k for k in rows[0] if k.endswith(" ms")]
    out = [
        "| vocabulary | batch | γ | " + " | ".join(k[:-3] for k in keys) + " |",
        "|---|---:|---:|" + "---:|" * len(keys),
    ]
    for row in rows:
        cells = [fmt(row[k], 3) if isinstance(row.get(k), float) else "—" for k in keys]
        out.append(
            f"| {row['family']} ({row['vocab']:,}) | {row['batch']} | {row['gamma']} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    if sys.argv[1] == "--targets":
        print(targets(sys.argv[2:]))
    elif sys.argv[1] == "--sampling":
        print(sampling(sys.argv[2]))
    else:
        print("\n\n".join(tables(p) for p in sys.argv[1:]))
