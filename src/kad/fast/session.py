"""`FastSession`: the engine's decoding session with each round fused on the device.

A round (SPEC section 6, γ ≥ 0) is one function of the runners' state: γ proxy steps that draft
from the warped q̃ (argmax when greedy), one base verify over γ + 1 positions, the proxy's last
step (on a GPU beside the verify, on a second stream: in plain KAD the two models' forwards
overlap), the rule's mixture π and its warped π̃, acceptance with probability min(1, π̃/q̃) (when
greedy: a draft stands while it is argmax π), the residual or bonus token, and the rollback of
both caches. It never reads a value on the host, so on CUDA it is captured as one graph per
(batch, γ, rule, warp) and a round is one replay followed by one copy of its results to the host.
On a CPU the same function runs eagerly.

Sampled rounds draw from `kad.sampling.counter_uniform`: a row's uniforms are a function of its
seed, its position (the base's valid-token count at the round's start) and a stream id (3j for
the draft at offset j, 3j + 1 for its acceptance test, 3γ + 2 for the residual or bonus token).
A row's draws therefore do not depend on its batch, and a replayed graph draws fresh numbers.
They differ from the engine's per-row generators: the same seed gives other samples than the
engine's round, from the same distribution.

The implicit-reward rule (a third model) and runners without a static cache take the engine's
round (`DecodeSession.step`), which also reads the host once per round.
"""

from __future__ import annotations

import math

import torch

from kad.engine import DecodeSession, ModelRunner
from kad.fast.graphs import Graph, compiled_uniforms, restored
from kad.fast.runner import StaticRunner
from kad.rules import Mix, Rule
from kad.sampling import Warp, counter_uniform, sample_inverse_cdf
from kad.speculative import (
    AutoGamma,
    acceptance_probability,
    accepted_lengths,
    next_distribution,
)

GREEDY = Warp()

FIELDS = 6  # emitted token, proxy share, α, TV(π, q*), unfilled budget, predicted acceptance


def fused_round(
    base: StaticRunner,
    proxy: StaticRunner,
    rule: Rule,
    gamma: int,
    pending_base: torch.Tensor,
    pending_proxy: torch.Tensor,
    beside: torch.cuda.Stream | None = None,
    warp: Warp = GREEDY,
    seeds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One round on the device. pending_* ``[B]``: each model's next input token; ``beside``: a
    CUDA stream for the proxy's last step, concurrent with the base verify; ``warp`` and, when
    it samples, the rows' ``seeds`` ``[B]`` int64.

    Returns (packed ``[B, FIELDS·(γ+1) + 1]`` float64: the per-position fields of `decide`, then
    the accepted count; the next pending token ``[B]``; whether the rule reports an unfilled
    budget).
    """
    draws = None if warp.greedy else Draws(seeds, base.next_pos, gamma, base.compiled)
    current = pending_proxy
    q_steps, q_tilde, drafts = [], [], []
    for j in range(gamma):
        q_j = _proxy_step(proxy, current)  # [B, V]
        q_steps.append(q_j)
        if draws is None:
            current = q_j.argmax(dim=-1)  # greedy draft: argmax of the unwarped q*
        else:
            q_tilde.append(warp(q_j))
            current = sample_inverse_cdf(q_tilde[-1], draws.uniform(3 * j))
        drafts.append(current)
    batch = pending_base.shape[0]
    drafted = (
        torch.stack(drafts, dim=1)
        if drafts
        else torch.zeros(batch, 0, dtype=torch.long, device=pending_base.device)
    )  # [B, γ]
    verify = torch.cat([pending_base.unsqueeze(-1), drafted], dim=-1)  # [B, γ+1]
    if beside is None:
        q_steps.append(_proxy_step(proxy, current))
        p = base.logits(verify).exp()  # [B, γ+1, V]
    else:
        main = torch.cuda.current_stream(pending_base.device)
        beside.wait_stream(main)
        with torch.cuda.stream(beside):
            q_last = _proxy_step(proxy, current)
        p = base.logits(verify).exp()
        main.wait_stream(beside)
        q_last.record_stream(main)
        q_steps.append(q_last)
    q = torch.stack(q_steps, dim=1)  # [B, γ+1, V]
    if draws is None:
        fields, accepted, token, has_unfilled = decide(p, q, drafted, rule)
    else:
        fields, accepted, token, has_unfilled = decide_sampled(
            p, q, drafted, rule, warp, torch.stack(q_tilde, dim=1) if q_tilde else None, draws
        )
    kept = accepted + 1
    base.commit(kept, gamma + 1)
    proxy.retract(kept, gamma + 1)
    packed = torch.cat([fields.flatten(1), accepted.unsqueeze(-1).to(fields.dtype)], dim=-1)
    return packed.double(), token, has_unfilled


class Draws:
    """A round's uniforms, all drawn at its start: row b's draw for stream k is
    counter_uniform(seed_b, position_b, k), position_b being the row's base valid-token count
    when the round starts, for the 3γ + 3 streams of a round of γ drafts (module doc).
    ``compiled``: hash with the compiled `counter_uniform` (one kernel; the same values)."""

    def __init__(
        self,
        seeds: torch.Tensor,
        positions: torch.Tensor,
        gamma: int,
        compiled: bool = False,
    ) -> None:
        uniforms = compiled_uniforms() if compiled else counter_uniform
        streams = torch.arange(3 * gamma + 3, device=seeds.device)  # [S]
        self.table = uniforms(seeds.unsqueeze(-1), positions.unsqueeze(-1), streams)  # [B, S]

    def uniform(self, stream: int) -> torch.Tensor:
        return self.table[:, stream]  # [B]


def _proxy_step(proxy: StaticRunner, tokens: torch.Tensor) -> torch.Tensor:
    """Feed ``tokens`` ``[B]`` to the proxy and commit them; q* of the next position ``[B, V]``."""
    q = proxy.logits(tokens.unsqueeze(-1))[:, 0].exp()
    proxy.advance(1)
    return q


def decide(
    p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, rule: Rule
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Mix and verify greedily: p, q ``[B, γ+1, V]``, drafted ``[B, γ]``.

    A draft stands while it is argmax π; the token after the accepted ones is argmax π there.
    Returns (fields ``[B, γ+1, FIELDS]``: emitted token, proxy share α q*_v / π_v, α, TV(π, q*),
    unfilled budget (NaN if the rule has none), predicted acceptance Σ_v min(π̃_v, q̃_v) (0 or 1
    for one-hot π̃, q̃; 0 past the drafts); accepted ``[B]``; token ``[B]``; has unfilled).
    """
    gamma = drafted.shape[1]
    mix = rule.mix(p, q, None)
    top = mix.pi.argmax(dim=-1)  # [B, γ+1] greedy target
    agree = drafted == top[:, :gamma]  # [B, γ]
    accepted = agree.long().cumprod(dim=-1).sum(dim=-1)  # [B]
    token = top.gather(1, accepted.unsqueeze(-1)).squeeze(-1)  # [B]
    return _fields(mix, q, drafted, accepted, token, agree)


def decide_sampled(
    p: torch.Tensor,
    q: torch.Tensor,
    drafted: torch.Tensor,
    rule: Rule,
    warp: Warp,
    q_tilde: torch.Tensor | None,
    draws: Draws,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Mix and verify by sampling: p, q ``[B, γ+1, V]``; drafted ``[B, γ]`` drawn from q_tilde
    ``[B, γ, V]`` (None when γ = 0). Draft j stands when its uniform (stream 3j + 1) is below
    π̃_j(x_j) / q̃_j(x_j); the next token is drawn (stream 3γ + 2) from the residual at the first
    rejection, or from π̃_{γ+1}. Returns what `decide` returns; the predicted acceptance is
    Σ_v min(π̃_v, q̃_v)."""
    gamma = drafted.shape[1]
    mix = rule.mix(p, q, None)
    target = warp(mix.pi)  # [B, γ+1, V] π̃
    if q_tilde is None:
        q_tilde = target[:, :0]
    tests = [draws.uniform(3 * j + 1) for j in range(gamma)]
    uniforms = torch.stack(tests, dim=-1) if tests else None  # [B, γ]
    accepted = accepted_lengths(drafted, target[:, :gamma], q_tilde, uniforms)  # [B]
    after = next_distribution(accepted, target, q_tilde)  # [B, V]
    token = sample_inverse_cdf(after, draws.uniform(3 * gamma + 2))
    predicted = acceptance_probability(target[:, :gamma], q_tilde)  # [B, γ]
    return _fields(mix, q, drafted, accepted, token, predicted)


def _fields(
    mix: Mix,
    q: torch.Tensor,
    drafted: torch.Tensor,
    accepted: torch.Tensor,
    token: torch.Tensor,
    predicted: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Per-position fields ``[B, γ+1, FIELDS]`` of a decided round (see `decide`), with the
    accepted counts, the next token and whether the rule reports an unfilled budget."""
    emitted = torch.cat([drafted, token.unsqueeze(-1)], dim=-1)
    emitted.scatter_(1, accepted.unsqueeze(-1), token.unsqueeze(-1))  # [B, γ+1]
    chosen = emitted.unsqueeze(-1)
    share = mix.alpha * q.gather(-1, chosen).squeeze(-1) / mix.pi.gather(-1, chosen).squeeze(-1)
    tv = 0.5 * (mix.pi - q).abs().sum(dim=-1)  # [B, γ+1]
    unfilled = mix.unfilled if mix.unfilled is not None else torch.full_like(tv, math.nan)
    predicted = torch.cat([predicted.to(tv.dtype), torch.zeros_like(tv[:, :1])], dim=-1)
    columns = [emitted, share, mix.alpha, tv, unfilled, predicted]
    fields = torch.stack([c.to(tv.dtype) for c in columns], dim=-1)  # [B, γ+1, FIELDS]
    return fields, accepted, token, mix.unfilled is not None


class FastSession(DecodeSession):
    """A `DecodeSession` whose rounds over two `StaticRunner`s are fused (module doc)."""

    fused = False  # until __init__ has its runners (the base class may drop rows before)

    def __init__(
        self,
        runners: dict[str, ModelRunner | StaticRunner],
        prompt_ids: dict[str, list[list[int]]],
        *,
        max_new_tokens: list[int],
        seeds: list[int],
        speculative: int | str | None = None,
        **kwargs,
    ) -> None:
        longest_draft = AutoGamma().gamma_max if speculative == "auto" else int(speculative or 0)
        for runner in runners.values():
            if isinstance(runner, StaticRunner):
                runner.reserve(max(max_new_tokens, default=0) + longest_draft + 1)
        super().__init__(
            runners,
            prompt_ids,
            max_new_tokens=max_new_tokens,
            seeds=seeds,
            speculative=speculative,
            **kwargs,
        )
        self.fused = set(runners) == {"base", "proxy"} and all(
            isinstance(r, StaticRunner) for r in runners.values()
        )
        self.seeds = list(seeds)  # by row
        # The runners' batch row of each active row. Fused rounds keep finished rows in the
        # runners' batch (their outputs are ignored) until half of it is finished: shrinking the
        # batch moves the caches and re-captures the graphs, so it is done rarely.
        self.slot_of = list(range(len(self.active)))
        self._active_seeds: tuple[tuple, torch.Tensor] | None = None
        on_gpu = self.fused and runners["base"].device.type == "cuda"
        self.beside = runners["base"].side_stream() if on_gpu else None

    def step(self):
        """One round; see `DecodeSession.step`. Fused rounds sync with the host once."""
        if self.done or not self.fused:
            return super().step()
        gamma = self._gamma()
        base, proxy = self.runners["base"], self.runners["proxy"]
        with torch.inference_mode():
            for runner in (base, proxy):
                runner.ensure_room(gamma + 1)
            packed, token, has_unfilled = self._run_round(base, proxy, gamma)
            values = packed.tolist()  # the round's one host synchronisation
            token = token.clone()
        width = gamma + 1
        longest = max(int(row[-1]) for row in values) + 1  # over every batch row, finished too
        values = [values[slot] for slot in self.slot_of]  # the active rows
        rows = [row[: FIELDS * width] for row in values]
        field = [[row[f::FIELDS] for row in rows] for f in range(FIELDS)]
        accepted = [int(row[-1]) for row in values]
        for runner in (base, proxy):
            runner.length += longest
        self.pending = {"base": token, "proxy": token}
        self._update_auto(gamma, accepted, lambda: self._step_costs(gamma, 0.0, 0.0, 0.0))
        return self._record(
            gamma,
            [[int(t) for t in row] for row in field[0]],
            accepted,
            field[1],
            field[2],
            field[3],
            field[4] if has_unfilled else None,
            [row[:gamma] for row in field[5]],
        )

    def _step_costs(self, gamma: int, t0: float, t1: float, t2: float) -> tuple[float, float]:
        """Device time of a proxy step and of a base verify (host clocks only time the launches
        of asynchronous GPU work)."""
        base, proxy = self.runners["base"], self.runners["proxy"]
        if isinstance(base, StaticRunner) and isinstance(proxy, StaticRunner):
            return proxy.step_seconds(1), base.step_seconds(gamma + 1)
        return super()._step_costs(gamma, t0, t1, t2)

    def _drop_finished(self) -> None:
        """Forget finished rows; shrink the runners' batch only once half of it is finished."""
        if not self.fused:
            return super()._drop_finished()
        keep = [i for i, row in enumerate(self.active) if self.states[row].finish_reason is None]
        if len(keep) == len(self.active):
            return
        self.active = [self.active[i] for i in keep]
        self.slot_of = [self.slot_of[i] for i in keep]
        self.generators = [self.generators[i] for i in keep]
        batch = self.runners["base"].batch
        if self.active and len(self.active) > batch // 2:
            return
        index = torch.tensor(self.slot_of, dtype=torch.long)
        for role, runner in self.runners.items():
            runner.select(index)
            self.pending[role] = self.pending[role][index.to(runner.device)]
        self.slot_of = list(range(len(self.active)))

    def _row_seeds(self) -> torch.Tensor:
        """Each batch row's seed ``[B]`` on the device (0 for finished rows), copied there only
        when the rows change."""
        key = (tuple(self.active), tuple(self.slot_of))
        if self._active_seeds is None or self._active_seeds[0] != key:
            values = [0] * self.runners["base"].batch
            for row, slot in zip(self.active, self.slot_of, strict=True):
                values[slot] = self.seeds[row]
            self._active_seeds = (key, torch.tensor(values).to(self.base_device))
        return self._active_seeds[1]

    def _run_round(self, base: StaticRunner, proxy: StaticRunner, gamma: int):
        pend_base, pend_proxy, seeds = (
            self.pending["base"],
            self.pending["proxy"],
            self._row_seeds(),
        )
        if not (base.use_graphs and proxy.use_graphs):
            return fused_round(
                base, proxy, self.rule, gamma, pend_base, pend_proxy, self.beside, self.warp, seeds
            )
        key = ("round", proxy.epoch, base.batch, gamma, self.rule, self.warp)
        graph = base.graphs.get(key)
        if graph is None:
            base.drop_graphs([k for k in base.graphs if k[0] == "round" and k[1] != proxy.epoch])
            inputs = (pend_base.clone(), pend_proxy.clone(), seeds.clone())

            def run():
                return fused_round(
                    base, proxy, self.rule, gamma, *inputs[:2], self.beside, self.warp, inputs[2]
                )

            def warmup():
                with restored(base.state() + proxy.state()):
                    run()

            graph = Graph(run, warmup, base.device, inputs, base.graph_pool())
            base.graphs[key] = graph
        for buffer, value in zip(graph.inputs, (pend_base, pend_proxy, seeds), strict=True):
            buffer.copy_(value)
        return graph.replay()
