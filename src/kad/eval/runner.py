"""`kad eval`: run one task under one rule, one JSONL line per example, then a summary.

A results folder holds one method (model family + rule + decoding settings, in ``run.json``)
and any number of tasks: ``<task>.jsonl`` (a line per example, appended as each finishes) and
``<task>.summary.json``. Generation tasks stream every example through the aligner's runtime
(continuous batching: an example's slot goes to the next one the round it finishes); likelihood
tasks are scored in batches. A rerun skips the examples already in the JSONL, so an interrupted
run loses only the examples in flight; a folder written with other settings is refused.

Data-parallel runs (`kad.eval.data_parallel`): rank r of N takes the examples whose index i has
i mod N == r and appends its records to ``<task>.rank<r>.jsonl``. When a task ends (every run,
single-process too), rank 0 merges every record into ``<task>.jsonl`` in the order of the task's
examples (records of examples beyond ``limit`` after them), removes the rank files and writes the
summary: the files of a single process. Examples found in the merged file or in any rank file
(of any N) count as done, so a rerun with any number of ranks resumes.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from kad.errors import KadError
from kad.eval.data_parallel import Ranks
from kad.eval.tasks import Example, Task
from kad.outputs import jsonable
from kad.progress import TaskProgress, resume_message
from kad.rules import Rule, make_rule, rule_slug

RUN_FILE = "run.json"
SUMMARY_SUFFIX = ".summary.json"
# Settings that define a method: a folder's records are only comparable if these agree.
IDENTITY_KEYS = (
    "base",
    "proxy",
    "proxy_base",
    "quantize",
    "rule",
    "params",
    "shots",
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "seed",
    "speculative",
)


def method_name(rule: str, params: dict[str, Any]) -> str:
    """A short folder-safe name, the registry's `rule_slug`: ``dual-lam0.4``, ``primal-b0.9``,
    ``dual-squared-mu0.5``, ``primal-b0.9-fractional``, ``proxy-referenced-delta0.1``."""
    return rule_slug(make_rule(rule, **params))


def read_records(path: Path, mend: bool = True) -> list[dict[str, Any]]:
    """The complete lines of a results JSONL. A torn last line (an interrupted write) is cut
    off the file, so that appending continues cleanly, unless ``mend`` is False."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    records, good_bytes = [], 0
    for line in raw.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good_bytes += len(line)
    if mend and good_bytes != len(raw):
        with path.open("r+b") as handle:
            handle.truncate(good_bytes)
    return records


def rank_path(out_dir: Path, task: str, rank: int) -> Path:
    """Where rank ``rank`` of a data-parallel run appends its records of ``task``."""
    return out_dir / f"{task}.rank{rank}.jsonl"


def rank_files(out_dir: Path, task: str) -> list[Path]:
    """The rank files of ``task`` in ``out_dir`` (of any number of ranks), by rank."""
    pattern = re.compile(rf"{re.escape(task)}\.rank(\d+)\.jsonl")
    ranked = []
    for path in out_dir.glob(f"{task}.rank*.jsonl"):
        if match := pattern.fullmatch(path.name):
            ranked.append((int(match.group(1)), path))
    return [path for _, path in sorted(ranked)]


def read_done(out_dir: Path, task: str, mend: bool = True) -> dict[str, dict[str, Any]]:
    """Every record of ``task`` written so far, by id: those of ``<task>.jsonl``, then those of
    the rank files that it lacks (an id in several files: its first record); torn last lines
    cut off unless ``mend`` is False (`read_records`)."""
    done: dict[str, dict[str, Any]] = {}
    for path in [out_dir / f"{task}.jsonl", *rank_files(out_dir, task)]:
        for record in read_records(path, mend):
            done.setdefault(record["id"], record)
    return done


def write_atomically(path: Path, text: str) -> None:
    """``path`` holds ``text`` or what it held before, never a part of it (temp file, rename)."""
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


def check_run_file(out_dir: Path, run: dict[str, Any]) -> None:
    """Write ``run.json``, or check that the folder's existing one has the same settings
    (`check_same_run`). Ranks may call it at once: the file is written whole."""
    path = out_dir / RUN_FILE
    if not path.exists():
        write_atomically(path, json.dumps(run, indent=2) + "\n")
        return
    check_same_run(out_dir, run)


def check_same_run(out_dir: Path, run: dict[str, Any]) -> None:
    """`KadError` unless ``out_dir`` holds no ``run.json`` or one with the settings of ``run``
    (`IDENTITY_KEYS`; a key a file written before it existed lacks reads as None)."""
    path = out_dir / RUN_FILE
    if not path.is_file():
        return
    try:
        existing = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise KadError(f"{path} is not a run file kad wrote; use another --out folder") from None
    changed = [k for k in IDENTITY_KEYS if existing.get(k) != run.get(k)]
    if changed:
        detail = ", ".join(f"{k}: {existing.get(k)!r} -> {run.get(k)!r}" for k in changed)
        raise KadError(
            f"{out_dir} holds results of a run with other settings ({detail}); "
            "use another --out folder to keep both"
        )


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def pooled_stats(stats: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """The decoding statistics of several generations (`GenerationStats` dicts), pooled over
    all their generated tokens: the one definition `kad eval`, `kad report` and `kad demo` use.

    ``deferral_rate`` (share of tokens whose step had α > 0), ``mean_alpha`` (mean α per token:
    the share of the base's probability handed to the proxy) and ``mean_tv``: token-weighted
    over the generations that have them (None where none has: rules without α), so that a
    5-token answer counts 5 tokens, not as much as a 256-token one, and the figure is that of
    every step taken. ``acceptance``: accepted drafts / drafted (speculative decoding, else
    None); ``tokens_per_base_forward``: tokens / base forwards.
    """

    def token_weighted(key: str) -> float | None:
        pairs = [(s[key], s["tokens"]) for s in stats if s.get(key) is not None]
        tokens = sum(n for _, n in pairs)
        return sum(value * n for value, n in pairs) / tokens if tokens else None

    drafted = sum(s.get("drafted") or 0 for s in stats)
    accepted = sum(s.get("accepted") or 0 for s in stats)
    forwards = sum(s.get("base_forwards") or 0 for s in stats)
    tokens = sum(s["tokens"] for s in stats if s.get("base_forwards"))
    return {
        "deferral_rate": token_weighted("deferral_rate"),
        "mean_alpha": token_weighted("mean_alpha"),
        "mean_tv": token_weighted("mean_tv"),
        "acceptance": accepted / drafted if drafted else None,
        "tokens_per_base_forward": tokens / forwards if forwards else None,
    }


def summarize(records: Sequence[dict[str, Any]], run: dict[str, Any], task: str) -> dict[str, Any]:
    """Accuracy (mean per-example score) and the decoding statistics pooled over the examples'
    tokens (`pooled_stats`)."""
    stats = [r["stats"] for r in records if r.get("stats")]
    tokens = sum(s["tokens"] for s in stats)
    seconds = sum(r["seconds"] for r in records)
    return {
        **run,
        "task": task,
        "n": len(records),
        "correct": sum(bool(r["correct"]) for r in records),
        "accuracy": _mean([float(r["score"]) for r in records]),
        **pooled_stats(stats),
        "mean_tokens": tokens / len(stats) if stats else None,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds if stats and seconds > 0 else None,
    }


def _generation_record(
    task: Task,
    example_id: str,
    example: Example,
    prompt_ids: dict[str, list[int]],
    out: Any,
    seconds: float,
) -> dict[str, Any]:
    correct = task.score(out.text, example)
    return {
        "id": example_id,
        "prompt_ids": prompt_ids,
        "output": out.text,
        "output_ids": out.token_ids,
        "finish_reason": out.finish_reason,
        "extracted": task.extract(out.text, example),
        "gold": task.gold(example),
        "correct": correct,
        "score": float(correct),
        "stats": out.stats.to_dict(),
        "seconds": seconds,
    }


def _stream_generations(
    aligner: Any, task: Task, todo: Sequence[tuple[str, Example]], rule: Rule, decoding: dict
) -> Iterator[dict[str, Any]]:
    """Decode every example through one session of the runtime; yield each example's record
    as soon as it finishes. ``seconds`` is the wall time since the previous record, so the
    records' seconds add up to the run's."""
    prompts = [task.prompt(example) for _, example in todo]
    prompt_ids = aligner.encode_prompts(prompts)  # tokenized once: what each model reads
    options = {**decoding, "stop": [*task.stop, *(decoding.get("stop") or [])]}
    session = aligner.start(prompts, rule=rule, prompt_ids=prompt_ids, **options)
    last = time.perf_counter()
    while not session.done:
        for event in session.step():
            if not event.finished:
                continue
            now = time.perf_counter()
            i = event.row
            example_id, example = todo[i]
            out = session.sequences[i].generation()
            ids = {role: rows[i] for role, rows in prompt_ids.items()}
            yield _generation_record(task, example_id, example, ids, out, now - last)
            last = now


def _likelihood_records(
    aligner: Any, task: Any, batch: Sequence[tuple[str, Example]], rule: Rule
) -> list[dict[str, Any]]:
    """Score every answer of every example in one ``Aligner.score`` call."""
    started = time.perf_counter()
    prompts, continuations, spans = [], [], []
    for _, example in batch:
        answers, _ = task.choices(example)
        spans.append((len(continuations), len(continuations) + len(answers)))
        prompts += [task.prompt(example)] * len(answers)
        continuations += answers
    logprobs = aligner.score(prompts, continuations, rule=rule)
    seconds = (time.perf_counter() - started) / len(batch)
    prompt_ids = aligner.encode_prompts([task.prompt(example) for _, example in batch])
    records = []
    for i, ((example_id, example), (lo, hi)) in enumerate(zip(batch, spans, strict=True)):
        answers, labels = task.choices(example)
        scores = logprobs[lo:hi]
        best = max(range(len(scores)), key=scores.__getitem__)
        records.append(
            {
                "id": example_id,
                "prompt_ids": {role: rows[i] for role, rows in prompt_ids.items()},
                "output": answers[best].strip(),
                "extracted": best,
                "gold": task.gold(example),
                "correct": bool(labels[best]),
                "score": task.metric(scores, example),
                "logprobs": scores,
                "labels": labels,
                "stats": None,
                "seconds": seconds,
            }
        )
    return records


def merge_records(
    out_dir: Path, task: str, example_ids: Sequence[str], run: dict[str, Any]
) -> dict[str, Any]:
    """Gather every record of ``task`` (`read_done`) into ``<task>.jsonl``: those of
    ``example_ids`` in that order, then the others as found; remove the rank files; write and
    return the summary over ``example_ids``."""
    done = read_done(out_dir, task)
    selected = [done[i] for i in example_ids if i in done]
    wanted = set(example_ids)
    others = [r for i, r in done.items() if i not in wanted]
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in selected + others]
    write_atomically(out_dir / f"{task}.jsonl", "".join(lines))
    for path in rank_files(out_dir, task):
        path.unlink()
    summary = summarize(selected, run, task)
    write_atomically(
        out_dir / f"{task}{SUMMARY_SUFFIX}", json.dumps(jsonable(summary), indent=2) + "\n"
    )
    return summary


def run_eval(
    aligner: Any,
    task: Task,
    rule: Rule,
    out_dir: str | os.PathLike[str],
    run: dict[str, Any],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    decoding: dict[str, Any] | None = None,
    progress: bool = True,
    label: str | None = None,
    ranks: Ranks | None = None,
) -> dict[str, Any]:
    """Evaluate ``task`` under ``rule`` into ``<out_dir>/<task>.jsonl``; returns and writes the
    summary over the first ``limit`` examples.

    ``run`` describes the method (models, rule, params, decoding: see ``IDENTITY_KEYS``);
    ``decoding`` holds the keyword arguments for ``Aligner.start``; ``batch_size``: prompts
    scored together by likelihood tasks (generation tasks stream through the runtime).
    ``label``: what progress calls the run (default: the task's name; a sweep names its point).
    ``ranks``: this process's place in a data-parallel run (every rank calls `run_eval` with
    the same arguments and gets the same summary); None: a single process. Only rank 0 shows
    progress.
    """
    ranks = ranks or Ranks()
    if batch_size < 1:
        raise KadError(f"batch size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise KadError(f"limit must be >= 1, got {limit}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_run_file(out, run)
    examples = [(task.example_id(ex, i), ex) for i, ex in enumerate(task.examples(data_dir, limit))]
    if not examples:
        raise KadError(f"task {task.name} has no examples")
    path = out / f"{task.name}.jsonl"
    done = read_done(out, task.name)
    ranks.barrier()  # every rank has read (and mended) the files before any appends
    todo = [pair for i, pair in enumerate(examples) if ranks.owns(i) and pair[0] not in done]
    kept = [done[i] for n, (i, _) in enumerate(examples) if ranks.owns(n) and i in done]
    shown = progress and ranks.main

    def accuracy(records: Sequence[dict[str, Any]]) -> float | None:
        return _mean([float(r["score"]) for r in records])

    found = sum(example_id in done for example_id, _ in examples)
    resumed = resume_message(label or task.name, found, len(examples), path)
    if resumed and shown:
        print(resumed, file=sys.stderr, flush=True)
    share = len(todo) + len(kept)
    title = ranks.label(label or task.name)
    bar = TaskProgress(title, share, len(kept), accuracy(kept), enabled=shown)
    sink_path = path if ranks.world == 1 else rank_path(out, task.name, ranks.rank)
    with bar, sink_path.open("a", encoding="utf-8") as sink:
        if not todo:
            groups: Iterator[Sequence[dict[str, Any]]] = iter(())
        elif task.kind == "likelihood":
            groups = (
                _likelihood_records(aligner, task, batch, rule)
                for batch in _batches(todo, batch_size)
            )
        else:
            groups = ([r] for r in _stream_generations(aligner, task, todo, rule, decoding or {}))
        for records in groups:
            rows = [jsonable(r) for r in records]
            for row in rows:
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            sink.flush()
            kept += rows
            bar.update(len(kept), accuracy(kept))
    ranks.barrier()  # every rank's records are on disk
    summary = None
    if ranks.main:
        summary = merge_records(out, task.name, [i for i, _ in examples], run)
    return ranks.from_main(summary)
