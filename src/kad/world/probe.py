"""The premise probe: is the base sure on arithmetic and unsure on format, the proxy the reverse?

Teacher-forced on the gold instruction answer of each problem (``a op b = c`` lines, ``#### N``,
``<|end|>``), with the base reading the question as web text (``BASE_TEMPLATE``) and the aligned
proxy through its chat template, exactly as the engine feeds them. Every answer token gets a class:

- ``setup``:      operands and operators (reading the problem);
- ``arithmetic``: the digits of a result ``c`` (computing);
- ``layout``:     spaces, ``=``, line breaks;
- ``format``:     ``####``, the space after it, and ``<|end|>`` (the instruction format);
- ``answer``:     the digits after ``####`` (restating the last result).

Per class and per model it reports the mean probability of the gold token, how often the gold
token is the argmax, and for the base the share of positions where its top probability is below
0.4 (where KAD with λ = 0.4 defers everything).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kad.world.tokenizer import BASE_TEMPLATE, END_OF_TURN, render_turn

CLASSES: tuple[str, ...] = ("setup", "arithmetic", "layout", "format", "answer")
_EQUATION = re.compile(r"(\d+) (\S) (\d+) = (\d+)")


def char_classes(solution: str) -> list[str]:
    """The class of every character of a gold answer."""
    classes: list[str] = []
    for line in solution.split("\n"):
        if classes:
            classes.append("layout")  # the line break before this line
        match = _EQUATION.fullmatch(line)
        if match is None:  # the final line: #### N
            classes.extend("answer" if char.isdigit() else "format" for char in line)
            continue
        line_classes = ["layout"] * len(line)
        for group, kind in ((1, "setup"), (2, "setup"), (3, "setup"), (4, "arithmetic")):
            line_classes[match.start(group) : match.end(group)] = [kind] * len(match.group(group))
        classes.extend(line_classes)
    return classes


def token_classes(offsets: list[tuple[int, int]], classes: list[str]) -> list[str]:
    """A token's class is that of its first character other than layout (layout if none)."""
    out = []
    for start, end in offsets:
        kinds = [c for c in classes[start:end] if c != "layout"]
        out.append(kinds[0] if kinds else "layout")
    return out


@torch.no_grad()
def _gold_probs(
    model: AutoModelForCausalLM, prompts: list[list[int]], answers: list[list[int]], pad: int
) -> list[torch.Tensor]:
    """Per problem, the next-token distributions at each answer position ``[T, V]``."""
    rows = [p + a for p, a in zip(prompts, answers, strict=True)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    probs = torch.softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    return [
        probs[i, len(p) - 1 : len(p) - 1 + len(a)]
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
    ]


def premise_probe(
    base_dir: Path, proxy_dir: Path, problems: list[dict[str, object]], batch: int = 50
) -> dict[str, dict[str, float]]:
    """``{class: {metric: value}}`` over the gold answers of ``problems`` (see the module doc)."""
    tokenizer = AutoTokenizer.from_pretrained(str(proxy_dir))
    base = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
    proxy = AutoModelForCausalLM.from_pretrained(str(proxy_dir)).eval()
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    sums: dict[str, dict[str, float]] = {c: {} for c in CLASSES}
    for start in range(0, len(problems), batch):
        chunk = problems[start : start + batch]
        answers, kinds = [], []
        for problem in chunk:
            solution = str(problem["solution"])
            encoded = tokenizer(solution, return_offsets_mapping=True, add_special_tokens=False)
            answers.append([*encoded["input_ids"], end])
            kinds.append(
                [*token_classes(encoded["offset_mapping"], char_classes(solution)), "format"]
            )
        base_prompts = [
            tokenizer(BASE_TEMPLATE.format(prompt=p["question"]), add_special_tokens=False)[
                "input_ids"
            ]
            for p in chunk
        ]
        proxy_prompts = [
            tokenizer(render_turn(str(p["question"])), add_special_tokens=False)["input_ids"]
            for p in chunk
        ]
        base_probs = _gold_probs(base, base_prompts, answers, tokenizer.pad_token_id)
        proxy_probs = _gold_probs(proxy, proxy_prompts, answers, tokenizer.pad_token_id)
        for answer, kind, p, q in zip(answers, kinds, base_probs, proxy_probs, strict=True):
            gold = torch.tensor(answer)
            p_gold, q_gold = p.gather(-1, gold[:, None])[:, 0], q.gather(-1, gold[:, None])[:, 0]
            p_top = p.max(dim=-1)
            stats = {
                "base_p_gold": p_gold,
                "base_top1": (p_top.indices == gold).float(),
                "base_unsure": (p_top.values < 0.4).float(),
                "proxy_p_gold": q_gold,
                "proxy_top1": (q.argmax(dim=-1) == gold).float(),
            }
            for t, k in enumerate(kind):
                sums[k]["count"] = sums[k].get("count", 0.0) + 1
                for name, values in stats.items():
                    sums[k][name] = sums[k].get(name, 0.0) + values[t].item()
    return {
        k: {"tokens": int(v["count"])}
        | {name: round(total / v["count"], 4) for name, total in v.items() if name != "count"}
        for k, v in sums.items()
        if v
    }
