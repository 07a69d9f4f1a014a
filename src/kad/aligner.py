"""`Aligner`: a base model, its aligned proxy (and optionally the proxy's base), ready to decode."""

from __future__ import annotations

import os
import random
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kad.engine import DecodeSession, ModelRunner
from kad.errors import ContextLengthError, KadError, PromptError
from kad.fast import FastSession, StaticRunner, make_runner
from kad.models import (
    Prompt,
    PromptPart,
    PromptRenderer,
    Raw,
    Template,
    context_length,
    eos_ids,
    load_causal_lm,
    resolve_device,
    resolve_dtype,
    shared_vocab_size,
)
from kad.outputs import Generation
from kad.rules import Dual, Rule, make_rule
from kad.sampling import Warp
from kad.speculative import parse_speculative

PromptLike = str | Raw | Prompt | Sequence[dict]
MAX_RUNNER_SETS = 4  # static runner sets an Aligner keeps between sessions (each holds KV caches)


@dataclass
class _RunnerSet:
    """Static runners kept between sessions, and the session decoding with them (if any)."""

    runners: dict[str, StaticRunner]
    holder: weakref.ref | None = None

    @property
    def free(self) -> bool:
        session = self.holder() if self.holder is not None else None
        return session is None or session.done


@dataclass
class Member:
    """One model of the family with the way it renders prompts."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    renderer: PromptRenderer

    @property
    def context(self) -> int:
        return context_length(self.model)


class Aligner:
    """A base model p steered by an aligned proxy q* that shares its vocabulary.

    ``proxy_base`` (q, the proxy before alignment) is needed only by the implicit-reward rule.
    """

    def __init__(
        self,
        base: Member,
        proxy: Member,
        proxy_base: Member | None = None,
        *,
        fast: bool | None = None,
    ) -> None:
        self.members = {"base": base, "proxy": proxy}
        # Static KV caches and compiled steps (kad.fast): None = on a CUDA device, for the
        # architectures the compact forward supports; the engine's runners otherwise.
        self.fast = fast
        # Sets of static runners kept between sessions (their buffers and CUDA graphs stay
        # valid), each with the session that holds it now.
        self._runner_sets: list[_RunnerSet] = []
        if proxy_base is not None:
            self.members["proxy_base"] = proxy_base
        self.vocab_size = shared_vocab_size(
            [m.tokenizer for m in self.members.values()],
            [m.model.get_output_embeddings().weight.shape[0] for m in self.members.values()],
        )
        proxy_eos = eos_ids(proxy.model, proxy.tokenizer)
        self.eos_ids = {
            i for i in eos_ids(base.model, base.tokenizer) | proxy_eos if i < self.vocab_size
        }
        if not self.eos_ids & proxy_eos:
            warnings.warn(
                "none of the proxy's EOS ids lies in the shared vocabulary: generations will "
                "stop only at max_new_tokens or a stop string",
                stacklevel=2,
            )

    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike,
        proxy: str | os.PathLike,
        proxy_base: str | os.PathLike | None = None,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        device_map: str | dict | None = None,
        base_template: Template = None,
        proxy_template: Template = None,
        fast: bool | None = None,
        max_rows: int | None = None,
        max_context: int | None = None,
        memory_fraction: float | None = None,
    ) -> Aligner:
        """Load the models from local directories, GGUF files, or Hub ids (online only).

        dtype None: float32 on CPU, bfloat16 on a GPU. Templates: None (the proxy uses its chat
        template, the base raw text), a string with ``{prompt}``, or a callable. fast: the
        static-cache path of `kad.fast` (None: on a GPU, for Llama, Qwen2/3 and OLMo2 models).
        """
        target = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, target)

        loaded: dict[str, tuple[PreTrainedModel, PreTrainedTokenizerBase]] = {}

        def load(spec, chat: bool, template: Template) -> Member:
            key = str(spec)
            if key not in loaded:  # one model in two roles is loaded once
                loaded[key] = load_causal_lm(
                    spec, dtype=torch_dtype, device=target, device_map=device_map
                )
            model, tokenizer = loaded[key]
            return Member(model, tokenizer, PromptRenderer(tokenizer, chat, template))

        members = [load(base, False, base_template), load(proxy, True, proxy_template)]
        if proxy_base is not None:
            members.append(load(proxy_base, True, proxy_template))
        return cls(*members, fast=fast)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer that decodes the shared continuation (the proxy's)."""
        return self.members["proxy"].tokenizer

    def encode_prompts(self, prompts: Sequence[PromptLike]) -> dict[str, list[list[int]]]:
        """Token ids of every prompt as each model renders it. q (proxy_base) reads the proxy's."""
        ids: dict[str, list[list[int]]] = {role: [] for role in self.members}
        for prompt in prompts:
            if isinstance(prompt, Prompt):
                parts = {
                    "base": prompt.base if prompt.base is not None else prompt.proxy,
                    "proxy": prompt.proxy if prompt.proxy is not None else prompt.base,
                }
            else:
                parts = {"base": prompt, "proxy": prompt}
            for role in ("base", "proxy"):
                ids[role].append(self.members[role].renderer.encode(parts[role]))
            if "proxy_base" in ids:
                ids["proxy_base"].append(ids["proxy"][-1])
        for role, rows in ids.items():
            context = self.members[role].context
            for i, row in enumerate(rows):
                if len(row) >= context:
                    raise ContextLengthError(
                        f"prompt {i} is {len(row)} tokens for the {role} model, whose context "
                        f"holds {context}: shorten it"
                    )
        return ids

    def _runners(self, rule: Rule) -> dict[str, ModelRunner | StaticRunner]:
        """A KV cache per model the rule reads (q only for rules that need it).

        Static runners come from a set that no unfinished session holds, so their buffers and
        captured graphs serve the next call; up to `MAX_RUNNER_SETS` sets are kept (sessions
        that run side by side, as in a server, each need one). Engine runners are made fresh."""
        roles = [r for r in self.members if r != "proxy_base" or rule.needs_proxy_base]
        free = [entry for entry in self._runner_sets if entry.free]
        for entry in free:
            if set(roles) <= set(entry.runners):
                return {role: entry.runners[role] for role in roles}
        runners = {
            role: make_runner(self.members[role].model, self.vocab_size, fast=self.fast)
            for role in roles
        }
        if all(isinstance(r, StaticRunner) for r in runners.values()):
            if len(self._runner_sets) >= MAX_RUNNER_SETS and free:
                self._runner_sets.remove(free[0])  # a set for other roles: replace it
            if len(self._runner_sets) < MAX_RUNNER_SETS:
                self._runner_sets.append(_RunnerSet(dict(runners)))
        return runners

    def _hold(self, session: DecodeSession) -> None:
        """Mark the kept set of ``session``'s runners busy while it decodes."""
        for entry in self._runner_sets:
            if any(r is entry.runners.get(role) for role, r in session.runners.items()):
                entry.holder = weakref.ref(session)

    def _check_rule(self, rule: Rule | str) -> Rule:
        if isinstance(rule, str):
            rule = make_rule(rule)
        if not isinstance(rule, Rule):
            raise KadError(f"rule must be a kad rule such as kad.Dual(), got {rule!r}")
        if rule.needs_proxy_base and "proxy_base" not in self.members:
            raise KadError(
                f"the {rule.name} rule needs the proxy's unaligned base model: "
                "load it with proxy_base= (CLI: --proxy-base)"
            )
        return rule

    def start(
        self,
        prompts: PromptLike | Sequence[PromptLike],
        rule: Rule | str | None = None,
        max_new_tokens: int | Sequence[int] = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | Sequence[int] | None = None,
        stop: str | Sequence[str] | None = None,
        speculative: int | str | None = None,
    ) -> DecodeSession:
        """A step-wise decoding session over a batch of prompts (see `generate`).

        ``max_new_tokens`` may also be one budget per prompt."""
        batch = _as_batch(prompts)
        if not batch:
            raise PromptError("no prompts were given")
        rule = self._check_rule(Dual() if rule is None else rule)
        warp = Warp(temperature=temperature, top_k=top_k, top_p=top_p)
        limits = _budgets(max_new_tokens, len(batch))
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        seeds = _seeds(seed, len(batch))
        with torch.inference_mode():
            prompt_ids = self.encode_prompts(batch)
            runners = self._runners(rule)
            budgets = [
                min(
                    [limits[i]] + [self.members[r].context - len(prompt_ids[r][i]) for r in runners]
                )
                for i in range(len(batch))
            ]
            session = FastSession(
                runners,
                prompt_ids,
                rule=rule,
                warp=warp,
                max_new_tokens=budgets,
                seeds=seeds,
                tokenizer=self.tokenizer,
                eos_ids=self.eos_ids,
                stop=stops,
                speculative=parse_speculative(speculative),
            )
            self._hold(session)
            return session

    def generate(
        self,
        prompts: PromptLike | Sequence[PromptLike],
        rule: Rule | str | None = None,
        max_new_tokens: int | Sequence[int] = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | Sequence[int] | None = None,
        stop: str | Sequence[str] | None = None,
        speculative: int | str | None = None,
        progress: bool = False,
    ) -> list[Generation]:
        """Decode a batch of prompts under ``rule`` (default: KAD dual, λ = 0.4).

        A prompt is user text (each model renders it its own way), a list of chat messages, or a
        `Prompt` with one rendering per model. temperature 0 is greedy; ``seed`` (one int for
        every row, or one per row) makes sampling reproducible and independent of the batch.
        ``speculative``: None (plain), a draft length γ ≥ 1, or "auto". Returns one `Generation`
        per prompt.
        """
        session = self.start(
            prompts, rule, max_new_tokens, temperature, top_p, top_k, seed, stop, speculative
        )
        with torch.inference_mode(), _progress(progress, len(session.states)) as bar:
            task = bar.add_task("decoding", total=len(session.states)) if bar else None
            while not session.done:
                events = session.step()
                if bar is not None:
                    bar.update(task, advance=sum(e.finished for e in events))
        return session.results()

    def score(
        self,
        prompts: PromptLike | Sequence[PromptLike],
        continuations: str | Sequence[str],
        rule: Rule | str | None = None,
    ) -> list[float]:
        """Teacher-forced log π(continuation | prompt), summed over the continuation's tokens.

        The continuation is tokenized once with the shared vocabulary (no special tokens) and
        scored position by position under the unwarped mixture π of ``rule``.
        """
        batch = _as_batch(prompts)
        conts = [continuations] if isinstance(continuations, str) else list(continuations)
        if len(batch) != len(conts):
            raise KadError(f"{len(batch)} prompts but {len(conts)} continuations")
        rule = self._check_rule(Dual() if rule is None else rule)
        cont_ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in conts]
        if any(not ids for ids in cont_ids):
            raise KadError("a continuation to score is empty")
        with torch.inference_mode():
            prompt_ids = self.encode_prompts(batch)
            for role, rows in prompt_ids.items():
                context = self.members[role].context
                for i, row in enumerate(rows):
                    if len(row) + len(cont_ids[i]) > context:
                        raise ContextLengthError(
                            f"prompt {i} with its continuation is over the {role} model's "
                            f"context of {context} tokens"
                        )
            width = max(len(c) for c in cont_ids)
            targets = torch.zeros(len(batch), width, dtype=torch.long)  # [B, n] right-padded
            valid = torch.zeros(len(batch), width, dtype=torch.bool)
            for i, ids in enumerate(cont_ids):
                targets[i, : len(ids)] = torch.tensor(ids)
                valid[i, : len(ids)] = True
            dists = {}
            for role, runner in self._runners(rule).items():
                last = runner.prefill(prompt_ids[role])
                inputs = torch.cat([last.cpu().unsqueeze(-1), targets[:, :-1]], dim=-1)
                dists[role] = runner.forward(inputs).exp().cpu()  # [B, n, V]
            pi = rule.mix(dists["base"], dists["proxy"], dists.get("proxy_base")).pi
            token_logp = torch.log(pi.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
            return (token_logp * valid).sum(dim=-1).tolist()


def _as_batch(prompts: Any) -> list[PromptLike]:
    """One prompt (str, Raw, Prompt or a list of messages) or a list of them -> a list."""
    if isinstance(prompts, (str, Raw, Prompt)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(m, dict) for m in prompts):
        return [prompts]  # one chat
    return prompts


def _budgets(max_new_tokens: int | Sequence[int], batch: int) -> list[int]:
    """One token budget per row, each an integer >= 1."""
    limits = [max_new_tokens] * batch if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != batch:
        raise KadError(f"{len(limits)} max_new_tokens values for {batch} prompts")
    for value in limits:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KadError(f"max_new_tokens must be an integer >= 1, got {value!r}")
    return limits


def _seeds(seed: int | Sequence[int] | None, batch: int) -> list[int]:
    if seed is None:
        return [random.randrange(2**62) for _ in range(batch)]
    if isinstance(seed, int):
        return [seed] * batch
    seeds = list(seed)
    if len(seeds) != batch:
        raise KadError(f"{len(seeds)} seeds for {batch} prompts")
    return seeds


def _progress(enabled: bool, total: int):
    """A rich progress bar over finished sequences, or a null context."""
    if not enabled:
        from contextlib import nullcontext

        return nullcontext(None)
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
    )


__all__ = ["Aligner", "Member", "PromptPart"]
