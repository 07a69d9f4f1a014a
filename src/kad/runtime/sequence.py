"""A sequence: one prompt's request and its decoding state, from admission to its Generation.

Lifecycle: ``waiting`` (queued, no slot) -> ``prefilling`` (has a slot; its prompt is cached in
chunks, model by model) -> ``running`` (decoded in every round) -> ``finished`` (its slot is
freed in the round it finishes). Everything here is host-side bookkeeping; the device state of a
slot lives in the runners and the `SlotTable`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kad.outputs import Generation, GenerationStats, StepEvent
from kad.rules import Rule
from kad.sampling import Warp

_ids = itertools.count()


@dataclass(frozen=True)
class Request:
    """What a sequence asks for: its prompt as each model reads it, and how to decode it.

    speculative: None (plain), a draft length γ ≥ 1 or "auto"; the round's γ is shared by the
    batch (`kad.runtime.scheduler` says how each row's setting is honoured)."""

    prompt_ids: dict[str, list[int]]  # role -> token ids
    rule: Rule
    warp: Warp
    seed: int
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    speculative: int | str | None = None


def _mean(values: Seq[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass(eq=False)
class Sequence:
    """A request in the runtime (module doc)."""

    request: Request
    id: int = field(default_factory=lambda: next(_ids))
    status: str = "waiting"
    slot: int | None = None
    admitted_round: int = 0  # the runtime's round count when it took its slot
    cached: dict[str, int] = field(default_factory=dict)  # role -> tokens in its cache
    token_ids: list[int] = field(default_factory=list)
    proxy_share: list[float] = field(default_factory=list)
    alphas: list[float] = field(default_factory=list)
    tvs: list[float] = field(default_factory=list)
    unfilled: list[float] = field(default_factory=list)
    predicted: list[float] = field(default_factory=list)
    gammas: list[int] = field(default_factory=list)
    accepted_hist: list[int] = field(default_factory=list)
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    base_forwards: int = 0
    text: str = ""
    emitted_text: str = ""
    finish_reason: str | None = None
    _decoded: str = ""  # text of the tokens before _read, decoded incrementally
    _prefix: int = 0  # decoding window: tokens _prefix.. give context to tokens _read..
    _read: int = 0
    _searched: int = 0  # characters of _decoded already searched for stop strings

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def prefill_left(self, role: str) -> list[int]:
        """Prompt tokens still to cache in ``role`` (all but the last, which is fed next)."""
        return self.request.prompt_ids[role][:-1][self.cached.get(role, 0) :]

    def record(
        self,
        gamma: int,
        row: list[float],
        fields: int,
        eos_ids: set[int],
        tokenizer: PreTrainedTokenizerBase,
    ) -> StepEvent:
        """Take this row's part of a round (``row``: `FIELDS` per position, position-major,
        then the accepted count); return what is new, with ``row`` = this sequence's id."""
        k = int(row[-1])
        per = [row[i * fields : (i + 1) * fields] for i in range(gamma + 1)]
        self.base_forwards += 1
        if self.request.speculative is not None and gamma > 0:
            judged = min(k + 1, gamma)
            self.rounds += 1
            self.gammas.append(gamma)
            self.drafted += judged
            self.accepted += k
            if len(self.accepted_hist) <= gamma:
                self.accepted_hist.extend([0] * (gamma + 1 - len(self.accepted_hist)))
            self.accepted_hist[k] += 1
            self.predicted.extend(per[i][5] for i in range(judged))
        new_ids: list[int] = []
        for i in range(k + 1):
            token, share, alpha, tv, unfilled, _ = per[i]
            token = int(token)
            new_ids.append(token)
            self.token_ids.append(token)
            self.proxy_share.append(share)
            self.alphas.append(alpha)
            self.tvs.append(tv)
            if not math.isnan(unfilled):
                self.unfilled.append(unfilled)
            if token in eos_ids:
                self.finish_reason = "stop"
                break
            if len(self.token_ids) >= self.request.max_new_tokens:
                self.finish_reason = "length"
                break
        return self.text_event(new_ids, eos_ids, tokenizer)

    def text_event(
        self, new_ids: list[int], eos_ids: set[int], tokenizer: PreTrainedTokenizerBase
    ) -> StepEvent:
        """Decode what is new, cut the text at a stop string, and report what is new.

        While decoding, text is decoded incrementally over a window of the last tokens (a few
        tokens of context, as vLLM's detokenizer does), so a step costs the same at any length,
        and a stop string is searched in the new text only; the finished text is decoded whole.
        Text that could still become a stop string, or an incomplete UTF-8 character, is held
        back until it is settled."""
        stop = [s for s in self.request.stop if s]
        ids = self.token_ids
        end = (
            len(ids) - 1
            if self.finish_reason == "stop" and ids and ids[-1] in eos_ids
            else len(ids)
        )
        if self.finish_reason is None:
            before = tokenizer.decode(ids[self._prefix : self._read], skip_special_tokens=False)
            window = tokenizer.decode(ids[self._prefix : end], skip_special_tokens=False)
            if len(window) > len(before) and not window.endswith("\ufffd"):
                self._decoded += window[len(before) :]
                self._prefix, self._read = self._read, end
            text, since = self._decoded, self._searched
        else:
            text, since = tokenizer.decode(ids[:end], skip_special_tokens=False), 0
        longest = max((len(s) for s in stop), default=0)
        start = max(0, since - longest + 1)
        hits = [i for i in (text.find(s, start) for s in stop) if i >= 0]
        self._searched = len(text)
        if hits:
            text = text[: min(hits)]
            self.finish_reason = "stop"
        self.text = text
        settled = text
        if self.finish_reason is None:
            settled = text.rstrip("\ufffd")
            if longest > 1:
                settled = settled[: max(len(self.emitted_text), len(settled) - longest + 1)]
        delta = settled[len(self.emitted_text) :] if settled.startswith(self.emitted_text) else ""
        self.emitted_text += delta
        done = self.finish_reason is not None
        return StepEvent(self.id, new_ids, delta, done, self.finish_reason)

    def generation(self) -> Generation:
        """The sequence's result so far (final once it has finished)."""
        has_alpha = not any(math.isnan(a) for a in self.alphas)
        stats = GenerationStats(
            tokens=len(self.token_ids),
            deferral_rate=_mean([float(a > 0) for a in self.alphas]) if has_alpha else None,
            mean_alpha=_mean(self.alphas) if has_alpha else None,
            mean_tv=_mean(self.tvs),
            mean_unfilled=_mean(self.unfilled),
            base_forwards=self.base_forwards,
            tokens_per_base_forward=(
                len(self.token_ids) / self.base_forwards if self.base_forwards else None
            ),
        )
        if self.request.speculative is not None:
            stats.rounds = self.rounds
            stats.drafted = self.drafted
            stats.accepted = self.accepted
            stats.acceptance = self.accepted / self.drafted if self.drafted else None
            stats.mean_accepted = self.accepted / self.rounds if self.rounds else None
            stats.accepted_hist = self.accepted_hist
            stats.predicted_acceptance = _mean(self.predicted)
            stats.gamma_mean = _mean([float(g) for g in self.gammas])
        return Generation(
            text=self.text,
            token_ids=list(self.token_ids),
            finish_reason=self.finish_reason or "length",
            stats=stats,
            proxy_share=list(self.proxy_share),
        )
