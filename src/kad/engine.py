"""The decoding loop: KV caches per model, and one verify round per step.

Every model keeps its own KV cache and attention mask over the batch. Prompts are left-padded;
position ids count the valid tokens of each row, so models whose prompt lengths differ stay
aligned on the shared continuation. A row's rejected speculative positions become masked holes
(free rollback, no re-prefill); positions rejected by every row are cropped.

A step is one round (SPEC section 6) with draft length γ ≥ 0: the proxy drafts γ tokens, the
base verifies γ + 1 positions in one forward, the rule mixes them into π, and verification emits
1..γ + 1 tokens. Plain decoding is γ = 0: one proxy step, one base step, one token from π̃.
The engine never looks inside the rule: it hands it (p, q*, q) and gets back a `Mix`.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from inspect import signature

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kad.outputs import Generation, GenerationStats, StepEvent
from kad.rules import Rule
from kad.sampling import Warp, make_generators, sample, uniform
from kad.speculative import AutoGamma, acceptance_probability, accepted_lengths, next_token


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax in float32 ``[..., V]``; NaN logits count as −inf, and a row with no finite
    logit becomes uniform rather than NaN."""
    logits = logits.float()
    logits = torch.where(torch.isnan(logits), -torch.inf, logits)
    dead = torch.isneginf(logits).all(dim=-1, keepdim=True)
    logits = torch.where(dead, torch.zeros_like(logits), logits)
    return torch.log_softmax(logits, dim=-1)


@functools.cache
def _crop_takes_a_count(cache_type: type) -> bool:
    """transformers ≥ 5.23: ``crop(tokens_to_remove)`` (negative); before: ``crop(max_length)``."""
    return "tokens_to_remove" in signature(cache_type.crop).parameters


def _crop(cache, length: int) -> None:
    """Cut a transformers cache back to ``length`` positions (the API changed in transformers 5)."""
    current = cache.get_seq_length()
    if length >= current:
        return
    if _crop_takes_a_count(type(cache)):
        cache.crop(length - current)
    else:
        cache.crop(length)


def left_pad(
    rows: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each prompt but its last token, left-padded: ids ``[B, w]``, mask ``[B, w]`` (bool, True
    on real tokens), and the last tokens ``[B]``, still to feed; w = the longest prompt − 1."""
    width = max(len(r) - 1 for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, row in enumerate(rows):
        n = len(row) - 1
        if n:
            ids[b, width - n :] = torch.tensor(row[:-1])
            mask[b, width - n :] = True
    last = torch.tensor([r[-1] for r in rows], device=device)
    return ids.to(device), mask.to(device), last


def prompt_positions(mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions ``[B, w]`` of left-padded prompts: a row's valid tokens count from 0."""
    return (mask.long().cumsum(dim=-1) - 1).clamp_min(0)


class ModelRunner:
    """One model's KV cache over a batch: prefill, forward new tokens, roll back, drop rows."""

    def __init__(self, model: PreTrainedModel, vocab_size: int) -> None:
        self.model = model
        self.vocab_size = vocab_size
        self.device = model.get_input_embeddings().weight.device
        self.cache = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # [B, L]
        self.next_pos = torch.zeros(0, dtype=torch.long, device=self.device)  # [B]

    def prefill(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Cache every prompt token but the last; return the last ones ``[B]``, still to feed."""
        ids, mask, last = left_pad(rows, self.device)
        self.mask = mask.long()
        self.next_pos = self.mask.sum(dim=-1)
        self.cache = None
        if ids.shape[1]:
            out = self.model(
                input_ids=ids,
                attention_mask=self.mask,
                position_ids=prompt_positions(mask),
                use_cache=True,
            )
            self.cache = out.past_key_values
        return last

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` ``[B, n]``; return next-token log-probs ``[B, n, V]`` (float32)."""
        tokens = tokens.to(self.device)
        n = tokens.shape[1]
        mask = torch.cat([self.mask, torch.ones_like(tokens)], dim=-1)
        positions = self.next_pos.unsqueeze(-1) + torch.arange(n, device=self.device)
        out = self.model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache, self.mask = out.past_key_values, mask
        self.next_pos = self.next_pos + n
        return log_probs(out.logits[..., : self.vocab_size])

    def rollback(self, kept: torch.Tensor, span: int, longest: int | None = None) -> None:
        """Of the last ``span`` positions, keep the first ``kept[b]`` of each row ``[B]``.
        ``longest`` = max(kept) when the caller knows it (saves a host read)."""
        if span == 0:
            return
        kept = kept.to(self.device)
        self.mask[:, -span:] = (torch.arange(span, device=self.device) < kept.unsqueeze(-1)).long()
        self.next_pos = self.next_pos - span + kept
        drop = span - (int(kept.max()) if longest is None else longest)
        if drop > 0:
            _crop(self.cache, self.mask.shape[1] - drop)
            self.mask = self.mask[:, :-drop]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows ``[B']``."""
        rows = rows.to(self.device)
        self.mask, self.next_pos = self.mask[rows], self.next_pos[rows]
        if self.cache is not None:
            self.cache.batch_select_indices(rows)


@dataclass
class _RowState:
    """Host-side bookkeeping of one sequence."""

    max_new_tokens: int
    token_ids: list[int] = field(default_factory=list)
    proxy_share: list[float] = field(default_factory=list)
    alphas: list[float] = field(default_factory=list)
    tvs: list[float] = field(default_factory=list)
    unfilled: list[float] = field(default_factory=list)
    emitted_text: str = ""
    finish_reason: str | None = None
    text: str = ""
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_hist: list[int] = field(default_factory=list)
    predicted: list[float] = field(default_factory=list)
    gammas: list[int] = field(default_factory=list)
    base_forwards: int = 0


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class DecodeSession:
    """Step-wise decoding of a batch; `step()` runs one round and reports each row's new output.

    Roles: ``runners["base"]``, ``runners["proxy"]`` and optionally ``runners["proxy_base"]``,
    whose prompts are ``prompt_ids[role]`` (one list of ids per row).
    """

    def __init__(
        self,
        runners: dict[str, ModelRunner],
        prompt_ids: dict[str, list[list[int]]],
        *,
        rule: Rule,
        warp: Warp,
        max_new_tokens: list[int],
        seeds: list[int],
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: set[int],
        stop: Sequence[str] = (),
        speculative: int | str | None = None,
    ) -> None:
        self.runners = runners
        self.rule, self.warp = rule, warp
        self.tokenizer, self.eos_ids, self.stop = tokenizer, eos_ids, tuple(s for s in stop if s)
        self.speculative = speculative
        self.auto = AutoGamma() if speculative == "auto" else None
        self.states = [_RowState(max_new_tokens=n) for n in max_new_tokens]
        self.active = list(range(len(self.states)))  # batch position -> row index
        self.pending = {role: r.prefill(prompt_ids[role]) for role, r in runners.items()}  # [B]
        self.base_device = runners["base"].device
        self.generators = make_generators(seeds, self.base_device)
        self._finish_empty_budgets()

    @property
    def done(self) -> bool:
        return not self.active

    def _finish_empty_budgets(self) -> None:
        for row in list(self.active):
            if self.states[row].max_new_tokens <= 0:
                self.states[row].finish_reason = "length"
        self._drop_finished()

    @torch.inference_mode()
    def cancel(self, row: int) -> None:
        """Stop decoding a row (e.g. its client went away); it keeps what it has."""
        if row in self.active and self.states[row].finish_reason is None:
            self.states[row].finish_reason = "cancelled"
            self._drop_finished()

    def _drop_finished(self) -> None:
        keep = [i for i, row in enumerate(self.active) if self.states[row].finish_reason is None]
        if len(keep) == len(self.active):
            return
        index = torch.tensor(keep, dtype=torch.long)
        for role, runner in self.runners.items():
            runner.select(index)
            self.pending[role] = self.pending[role][index.to(runner.device)]
        self.generators = [self.generators[i] for i in keep]
        self.active = [self.active[i] for i in keep]

    def _gamma(self) -> int:
        if self.speculative is None:
            return 0
        gamma = self.auto.choose() if self.auto else int(self.speculative)
        room = min(
            self.states[row].max_new_tokens - len(self.states[row].token_ids) for row in self.active
        )
        return max(0, min(gamma, room - 1))

    @torch.inference_mode()
    def step(self) -> list[StepEvent]:
        """One round: draft γ tokens with the proxy, verify them with the base, emit 1..γ+1."""
        if self.done:
            return []
        gamma = self._gamma()
        base, proxy = self.runners["base"], self.runners["proxy"]
        proxy_base = self.runners.get("proxy_base")
        dev = self.base_device
        generators = None if self.warp.greedy else self.generators

        t0 = time.perf_counter()
        current = self.pending["proxy"]
        q_steps, draft_probs, drafts = [], [], []
        for i in range(gamma + 1):
            q_i = proxy.forward(current.unsqueeze(-1))[:, 0].to(dev).exp()  # [B, V]
            q_steps.append(q_i)
            if i < gamma:
                q_warped = self.warp(q_i)
                current = sample(q_warped, generators)
                draft_probs.append(q_warped)
                drafts.append(current)
        t1 = time.perf_counter()
        drafted = (
            torch.stack(drafts, dim=1)
            if drafts
            else torch.zeros(len(self.active), 0, dtype=torch.long, device=dev)
        )  # [B, γ]

        def verify_inputs(role: str) -> torch.Tensor:
            return torch.cat([self.pending[role].to(dev).unsqueeze(-1), drafted], dim=-1)

        p = base.forward(verify_inputs("base")).to(dev).exp()  # [B, γ+1, V]
        t2 = time.perf_counter()
        q = torch.stack(q_steps, dim=1)  # [B, γ+1, V]
        q_base = None
        if proxy_base is not None:
            q_base = proxy_base.forward(verify_inputs("proxy_base")).to(dev).exp()
        mix = self.rule.mix(p, q, q_base)
        target = self.warp(mix.pi)  # [B, γ+1, V]
        q_tilde = torch.stack(draft_probs, dim=1) if draft_probs else target[:, :0]
        uniforms = (
            torch.stack([uniform(generators, dev) for _ in range(gamma)], dim=-1)
            if generators is not None and gamma
            else None
        )  # [B, γ]
        accepted = accepted_lengths(drafted, target[:, :gamma], q_tilde, uniforms)
        token = next_token(accepted, target, q_tilde, generators)  # [B]

        emitted = torch.cat([drafted, torch.zeros_like(token).unsqueeze(-1)], dim=-1)
        emitted.scatter_(1, accepted.unsqueeze(-1), token.unsqueeze(-1))  # [B, γ+1]
        chosen = emitted.unsqueeze(-1)
        share = mix.alpha * q.gather(-1, chosen).squeeze(-1) / mix.pi.gather(-1, chosen).squeeze(-1)
        tv = 0.5 * (mix.pi - q).abs().sum(dim=-1)  # [B, γ+1]
        predicted = acceptance_probability(target[:, :gamma], q_tilde)  # [B, γ]

        fields = [emitted, share, mix.alpha, tv]
        if mix.unfilled is not None:
            fields.append(mix.unfilled)
        fields.append(torch.cat([predicted, torch.zeros_like(tv[:, :1])], dim=-1))
        packed = torch.cat(
            [
                torch.stack([f.double() for f in fields], dim=1).flatten(1),
                accepted.double()[:, None],
            ],
            dim=-1,
        )  # [B, F·(γ+1) + 1]
        values = packed.tolist()  # the round's one host synchronisation
        width = gamma + 1
        columns = [[row[f * width : (f + 1) * width] for row in values] for f in range(len(fields))]
        accepted_rows = [int(row[-1]) for row in values]
        kept = accepted + 1
        for role, runner in self.runners.items():
            runner.rollback(kept, gamma + 1, longest=max(accepted_rows) + 1)
            self.pending[role] = token.to(runner.device)
        self._update_auto(gamma, accepted_rows, lambda: self._step_costs(gamma, t0, t1, t2))
        return self._record(
            gamma,
            [[int(t) for t in row] for row in columns[0]],
            accepted_rows,
            columns[1],
            columns[2],
            columns[3],
            columns[4] if mix.unfilled is not None else None,
            [row[:gamma] for row in columns[-1]],
        )

    def _update_auto(
        self, gamma: int, accepted: list[int], costs: Callable[[], tuple[float, float]]
    ) -> None:
        """Feed auto γ the round's acceptance (accepted / judged drafts) and ``costs()``: the
        seconds of one proxy step and of the base verify."""
        if self.auto is None or gamma == 0:
            return
        judged = sum(min(k + 1, gamma) for k in accepted)
        self.auto.update(sum(accepted) / judged, *costs())

    def _step_costs(self, gamma: int, t0: float, t1: float, t2: float) -> tuple[float, float]:
        """Seconds of one proxy step and of the base verify of γ + 1 tokens, for auto γ: here
        the host clock around the forwards (synchronous on a CPU)."""
        return (t1 - t0) / (gamma + 1), t2 - t1

    def _record(self, gamma, emitted, accepted, share, alpha, tv, unfilled, predicted):
        events = []
        for b, row in enumerate(self.active):
            state = self.states[row]
            k = accepted[b]
            state.base_forwards += 1
            if self.speculative is not None and gamma > 0:
                judged = min(k + 1, gamma)
                state.rounds += 1
                state.gammas.append(gamma)
                state.drafted += judged
                state.accepted += k
                if len(state.accepted_hist) <= gamma:
                    state.accepted_hist.extend([0] * (gamma + 1 - len(state.accepted_hist)))
                state.accepted_hist[k] += 1
                state.predicted.extend(predicted[b][:judged])
            new_ids: list[int] = []
            for i in range(k + 1):
                token = emitted[b][i]
                new_ids.append(token)
                state.token_ids.append(token)
                state.proxy_share.append(share[b][i])
                state.alphas.append(alpha[b][i])
                state.tvs.append(tv[b][i])
                if unfilled is not None:
                    state.unfilled.append(unfilled[b][i])
                if token in self.eos_ids:
                    state.finish_reason = "stop"
                    break
                if len(state.token_ids) >= state.max_new_tokens:
                    state.finish_reason = "length"
                    break
            events.append(self._text_event(row, state, new_ids))
        self._drop_finished()
        return events

    def _text_event(self, row: int, state: _RowState, new_ids: list[int]) -> StepEvent:
        """Decode the row's text, cut it at a stop string, and report what is new.

        Text that could still become a stop string, or an incomplete UTF-8 character, is held
        back until it is settled."""
        ids = state.token_ids
        if state.finish_reason == "stop" and ids and ids[-1] in self.eos_ids:
            ids = ids[:-1]
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            text = text[: min(hits)]
            state.finish_reason = "stop"
        state.text = text
        settled = text
        if state.finish_reason is None:
            settled = text.rstrip("\ufffd")
            hold = max((len(s) - 1 for s in self.stop), default=0)
            if hold:
                settled = settled[: max(len(state.emitted_text), len(settled) - hold)]
        delta = settled[len(state.emitted_text) :] if settled.startswith(state.emitted_text) else ""
        state.emitted_text += delta
        return StepEvent(row, new_ids, delta, state.finish_reason is not None, state.finish_reason)

    def results(self) -> list[Generation]:
        """One Generation per row, in the order of the prompts."""
        return [self._generation(state) for state in self.states]

    def _generation(self, state: _RowState) -> Generation:
        has_alpha = not any(math.isnan(a) for a in state.alphas)
        stats = GenerationStats(
            tokens=len(state.token_ids),
            deferral_rate=_mean([float(a > 0) for a in state.alphas]) if has_alpha else None,
            mean_alpha=_mean(state.alphas) if has_alpha else None,
            mean_tv=_mean(state.tvs),
            mean_unfilled=_mean(state.unfilled),
            base_forwards=state.base_forwards,
            tokens_per_base_forward=(
                len(state.token_ids) / state.base_forwards if state.base_forwards else None
            ),
        )
        if self.speculative is not None:
            stats.rounds = state.rounds
            stats.drafted = state.drafted
            stats.accepted = state.accepted
            stats.acceptance = state.accepted / state.drafted if state.drafted else None
            stats.mean_accepted = state.accepted / state.rounds if state.rounds else None
            stats.accepted_hist = state.accepted_hist
            stats.predicted_acceptance = _mean(state.predicted)
            stats.gamma_mean = _mean([float(g) for g in state.gammas])
        return Generation(
            text=state.text,
            token_ids=list(state.token_ids),
            finish_reason=state.finish_reason or "length",
            stats=stats,
            proxy_share=list(state.proxy_share),
        )
