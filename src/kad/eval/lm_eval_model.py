"""The lm-evaluation-harness model ``kad``: any lm-eval task decoded or scored under π.

    lm_eval --model kad --model_args base=B,proxy=Q,rule=dual,lam=0.4 --tasks gsm8k

``generate_until`` decodes with `Aligner.generate` (greedy unless the task samples) and
``loglikelihood`` scores with `Aligner.score`: log π(continuation | context), and whether greedy
decoding under π produces the continuation. Both models read lm-eval's context verbatim; with
``proxy_chat=true`` the proxy reads it as one user turn of its chat template instead.

The models load at the first request, so that lm-eval, which builds its model before it reads
its tasks' data, fails on missing data before any weights load; `run_lm_eval_cli` turns a dataset
that is not in the cache while offline (``HF_HUB_OFFLINE=1``) into one line naming it.

Importing this module registers the model (``@register_model("kad")``). lm-eval releases that
discover the ``lm_eval.models`` entry point of the kad-align package import it themselves;
with older ones (0.4.x up to 0.4.13), run ``kad lm-eval <lm_eval arguments>``.
Needs the optional extra: ``pip install "kad-align[lm-eval]"``.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from kad.aligner import Aligner
from kad.errors import KadError
from kad.models import Prompt, Raw
from kad.rules import RULES, Rule, make_rule

logger = logging.getLogger(__name__)
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def rule_from_args(rule: str, values: dict[str, Any]) -> Rule:
    """The rule of lm-eval's model args: each value read as its registry parameter's kind
    (lm-eval passes numbers as int or float, ``true`` as a bool or a string), then checked by
    the registry. A parameter the registry does not know is an error."""
    kinds = {p.name: p.kind for spec in RULES.values() for p in spec.params}
    parsed: dict[str, Any] = {}
    for name, value in values.items():
        if name not in kinds:
            raise KadError(f"unknown rule parameter {name!r}: the rules take {', '.join(kinds)}")
        if isinstance(value, str) and kinds[name] is bool and value.lower() in _TRUE + _FALSE:
            value = value.lower() in _TRUE
        elif isinstance(value, str) and kinds[name] is float:
            try:
                value = float(value)
            except ValueError:
                raise KadError(f"{name} must be a number, got {value!r}") from None
        elif isinstance(value, int) and not isinstance(value, bool) and kinds[name] is bool:
            value = bool(value) if value in (0, 1) else value
        parsed[name] = value
    return make_rule(rule, **parsed)


@register_model("kad")
class KadLM(LM):
    """lm-eval's view of an `Aligner` and a rule. Model args: base, proxy, proxy_base, rule,
    the rule's parameters (lam, budget, beta, loss, mu, delta, fractional: those of the
    registry, `rule_from_args`), max_new_tokens (when the task sets no max_gen_toks),
    batch_size, speculative, seed, device, dtype, proxy_chat."""

    def __init__(
        self,
        base: str,
        proxy: str,
        proxy_base: str | None = None,
        rule: str = "dual",
        lam: float | None = None,
        budget: float | None = None,
        beta: float | None = None,
        loss: str = "nll",
        mu: float | None = None,
        delta: float | None = None,
        fractional: bool | None = None,
        max_new_tokens: int = 256,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        speculative: int | str | None = None,
        seed: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        proxy_chat: bool = False,
    ) -> None:
        super().__init__()
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's default device is cuda:0; like its hf model, fall back to the CPU.
            logger.warning("device %s is not available: running on the CPU", device)
            device = "cpu"
        values = {"lam": lam, "budget": budget, "beta": beta, "loss": loss, "mu": mu}
        self.rule = rule_from_args(str(rule), {**values, "delta": delta, "fractional": fractional})
        needed_base = proxy_base is not None and self.rule.needs_proxy_base
        self.models = (str(base), str(proxy), str(proxy_base) if needed_base else None)
        self.runtime = {"dtype": dtype, "device": device}
        # "auto" (lm-eval's adaptive batch size) becomes max_batch_size, else 8.
        auto = isinstance(batch_size, str) and batch_size.startswith("auto")
        self.batch_size = int(max_batch_size or 8) if auto else int(batch_size)
        if self.batch_size < 1:
            raise KadError(f"batch_size must be >= 1, got {batch_size!r}")
        self.max_new_tokens = int(max_new_tokens)
        self.speculative = speculative
        self.seed = seed
        self.proxy_chat = bool(proxy_chat)

    @cached_property
    def aligner(self) -> Aligner:
        """The models, loaded at the first use (see the module's doc)."""
        aligner = Aligner.from_pretrained(*self.models, **self.runtime)
        self._device = aligner.members["base"].model.device  # lm-eval's `LM.device`
        return aligner

    def _prompt(self, context: str) -> Prompt:
        """lm-eval's context for each model; an empty context becomes the BOS (or EOS) token."""
        tokenizer = self.aligner.tokenizer
        text = context or tokenizer.bos_token or tokenizer.eos_token
        proxy = [{"role": "user", "content": text}] if self.proxy_chat else Raw(text)
        return Prompt(base=Raw(text), proxy=proxy)

    def _greedy_flags(self, prompts: Sequence[Prompt], continuations: Sequence[str]) -> list[bool]:
        """Whether greedy decoding under π emits each continuation's tokens: decode step by
        step and drop a row at its first wrong token, so a miss costs one step."""
        targets = [
            self.aligner.tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations
        ]
        session = self.aligner.start(
            list(prompts),
            rule=self.rule,
            max_new_tokens=max(len(t) for t in targets),
            temperature=0.0,
        )
        emitted: list[list[int]] = [[] for _ in targets]
        while not session.done:
            for event in session.step():
                emitted[event.row] += event.token_ids
                target = targets[event.row]
                got = emitted[event.row]
                if not event.finished and (got != target[: len(got)] or len(got) >= len(target)):
                    session.cancel(event.row)
        return [got[: len(t)] == t for got, t in zip(emitted, targets, strict=True)]

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple]:
        """(log π(continuation | context), is greedy) per request."""
        results: list[tuple[float, bool]] = []
        for start in tqdm(range(0, len(requests), self.batch_size), disable=disable_tqdm):
            batch = [r.args for r in requests[start : start + self.batch_size]]
            prompts = [self._prompt(context) for context, _ in batch]
            continuations = [continuation for _, continuation in batch]
            logprobs = self.aligner.score(prompts, continuations, rule=self.rule)
            greedy = self._greedy_flags(prompts, continuations)
            results += list(zip(logprobs, greedy, strict=True))
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list:
        """log π(text | BOS) per request; the text must fit the models' context windows."""
        texts = [r.args[0] for r in requests]
        results: list[float] = []
        for start in tqdm(range(0, len(texts), self.batch_size), disable=disable_tqdm):
            batch = texts[start : start + self.batch_size]
            results += self.aligner.score([self._prompt("") for _ in batch], batch, rule=self.rule)
        return results

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Decode each context until one of its ``until`` strings (cut off) or max_gen_toks.
        Requests with the same generation settings are batched together."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            key = json.dumps(request.args[1], sort_keys=True, default=str)
            groups.setdefault(key, []).append(index)
        outputs: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm)
        for indices in groups.values():
            settings = dict(requests[indices[0]].args[1])
            until = settings.pop("until", None) or []
            stops = [until] if isinstance(until, str) else list(until)
            sample = bool(settings.get("do_sample", False))
            options = {
                "max_new_tokens": int(settings.get("max_gen_toks", self.max_new_tokens)),
                "temperature": float(settings.get("temperature", 1.0)) if sample else 0.0,
                "top_p": float(settings.get("top_p", 1.0)) if sample else 1.0,
            }
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                generations = self.aligner.generate(
                    [self._prompt(requests[i].args[0]) for i in chunk],
                    rule=self.rule,
                    stop=stops,
                    seed=self.seed,
                    speculative=self.speculative,
                    **options,
                )
                for i, generation in zip(chunk, generations, strict=True):
                    outputs[i] = generation.text
                bar.update(len(chunk))
        bar.close()
        return outputs


@contextmanager
def missing_datasets_named() -> Iterator[None]:
    """Within: while offline (``HF_HUB_OFFLINE``), a Hub dataset that `datasets.load_dataset`
    does not find in the cache is a `KadError` naming it and how to fetch it, rather than
    datasets' ConnectionError deep in lm-eval (a missing local file keeps its own error)."""
    import datasets

    load = datasets.load_dataset
    not_cached = (ConnectionError, datasets.exceptions.DatasetNotFoundError)

    def load_or_name(path: str, name: str | None = None, *args: Any, **kwargs: Any) -> Any:
        try:
            return load(path, name, *args, **kwargs)
        except not_cached:
            if not datasets.config.HF_HUB_OFFLINE:
                raise
            call = ", ".join(repr(a) for a in (path, name) if a is not None)
            raise KadError(
                f"lm-eval's dataset {path}{f' ({name})' if name else ''} is not in the Hugging "
                f"Face cache ({datasets.config.HF_DATASETS_CACHE}) and HF_HUB_OFFLINE=1 forbids "
                "downloading it: fetch it once with network access, e.g. HF_HUB_OFFLINE=0 python "
                f'-c "import datasets; datasets.load_dataset({call})", then run again'
            ) from None

    datasets.load_dataset = load_or_name
    try:
        yield
    finally:
        datasets.load_dataset = load


def run_lm_eval_cli(args: Sequence[str]) -> None:
    """lm-eval's own command line, with the ``kad`` model registered (this module imported)
    and a dataset missing offline named (`missing_datasets_named`)."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *args]
    with missing_datasets_named():
        cli_evaluate()
