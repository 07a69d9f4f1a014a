"""`FastSession`: the engine's decoding session with each greedy round fused on the device.

A round (SPEC section 6, γ ≥ 0) is one function of the runners' state: γ + 1 proxy steps with
argmax drafting, one base verify over γ + 1 positions (on a GPU the proxy's last step, which the
verify does not need, runs beside it on a second stream: in plain KAD the two models' forwards
overlap), the rule's mixture π, greedy acceptance
(a draft stands while it is argmax π), and the rollback of both caches. It never reads a value on
the host, so on CUDA it is captured as one graph per (batch, γ, rule) and a round is one replay
followed by one copy of its results to the host. On a CPU the same function runs eagerly.

Sampling (temperature > 0, per-row generators), the implicit-reward rule (a third model) and
runners without a static cache take the engine's round (`DecodeSession.step`): each forward is a
graph replay, mixing and sampling run on the device, and the round reads the host once.
"""

from __future__ import annotations

import math

import torch

from kad.engine import DecodeSession, ModelRunner
from kad.fast.graphs import Graph, restored
from kad.fast.runner import StaticRunner
from kad.rules import Rule
from kad.speculative import AutoGamma

FIELDS = 6  # emitted token, proxy share, α, TV(π, q*), unfilled budget, predicted acceptance


def fused_round(
    base: StaticRunner,
    proxy: StaticRunner,
    rule: Rule,
    gamma: int,
    pending_base: torch.Tensor,
    pending_proxy: torch.Tensor,
    beside: torch.cuda.Stream | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One greedy round on the device. pending_* ``[B]``: each model's next input token;
    ``beside``: a CUDA stream for the proxy's last step, concurrent with the base verify.

    Returns (packed ``[B, FIELDS·(γ+1) + 1]`` float64: the per-position fields of `decide`, then
    the accepted count; the next pending token ``[B]``; whether the rule reports an unfilled
    budget).
    """
    current = pending_proxy
    q_steps, drafts = [], []
    for _ in range(gamma):
        q_i = _proxy_step(proxy, current)  # [B, V]
        q_steps.append(q_i)
        current = q_i.argmax(dim=-1)  # greedy draft: argmax of the unwarped q*
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
    fields, accepted, token, has_unfilled = decide(p, torch.stack(q_steps, dim=1), drafted, rule)
    kept = accepted + 1
    base.commit(kept, gamma + 1)
    proxy.retract(kept, gamma + 1)
    packed = torch.cat([fields.flatten(1), accepted.unsqueeze(-1).to(fields.dtype)], dim=-1)
    return packed.double(), token, has_unfilled


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
    emitted = torch.cat([drafted, token.unsqueeze(-1)], dim=-1)
    emitted.scatter_(1, accepted.unsqueeze(-1), token.unsqueeze(-1))  # [B, γ+1]
    chosen = emitted.unsqueeze(-1)
    share = mix.alpha * q.gather(-1, chosen).squeeze(-1) / mix.pi.gather(-1, chosen).squeeze(-1)
    tv = 0.5 * (mix.pi - q).abs().sum(dim=-1)  # [B, γ+1]
    unfilled = mix.unfilled if mix.unfilled is not None else torch.full_like(tv, math.nan)
    predicted = torch.cat([agree.to(tv.dtype), torch.zeros_like(tv[:, :1])], dim=-1)
    columns = [emitted, share, mix.alpha, tv, unfilled, predicted]
    fields = torch.stack([c.to(tv.dtype) for c in columns], dim=-1)  # [B, γ+1, FIELDS]
    return fields, accepted, token, mix.unfilled is not None


class FastSession(DecodeSession):
    """A `DecodeSession` whose greedy rounds over two `StaticRunner`s are fused (module doc)."""

    def __init__(
        self,
        runners: dict[str, ModelRunner | StaticRunner],
        prompt_ids: dict[str, list[list[int]]],
        *,
        max_new_tokens: list[int],
        speculative: int | str | None = None,
        **kwargs,
    ) -> None:
        longest_draft = AutoGamma().gamma_max if speculative == "auto" else int(speculative or 0)
        for runner in runners.values():
            if isinstance(runner, StaticRunner):
                runner.reserve(max(max_new_tokens, default=0) + longest_draft + 1)
        super().__init__(
            runners, prompt_ids, max_new_tokens=max_new_tokens, speculative=speculative, **kwargs
        )
        self.fused = (
            self.warp.greedy
            and set(runners) == {"base", "proxy"}
            and all(isinstance(r, StaticRunner) for r in runners.values())
        )
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
        rows = [row[: FIELDS * width] for row in values]
        field = [[row[f::FIELDS] for row in rows] for f in range(FIELDS)]
        accepted = [int(row[-1]) for row in values]
        longest = max(accepted) + 1
        for runner in (base, proxy):
            runner.length += longest
        base.forwards += 1
        proxy.forwards += width
        self.pending = {"base": token, "proxy": token}
        if self.auto is not None and gamma > 0:
            judged = sum(min(k + 1, gamma) for k in accepted)
            self.auto.update(
                sum(accepted) / judged, proxy.step_seconds(1), base.step_seconds(gamma + 1)
            )
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

    def _run_round(self, base: StaticRunner, proxy: StaticRunner, gamma: int):
        pend_base, pend_proxy = self.pending["base"], self.pending["proxy"]
        if not (base.use_graphs and proxy.use_graphs):
            return fused_round(base, proxy, self.rule, gamma, pend_base, pend_proxy, self.beside)
        key = ("round", proxy.epoch, base.batch, gamma, self.rule)
        graph = base.graphs.get(key)
        if graph is None:
            base.drop_graphs([k for k in base.graphs if k[0] == "round" and k[1] != proxy.epoch])
            inputs = (pend_base.clone(), pend_proxy.clone())

            def run():
                return fused_round(base, proxy, self.rule, gamma, *inputs, self.beside)

            def warmup():
                with restored(base.state() + proxy.state()):
                    run()

            graph = Graph(run, warmup, base.device, inputs, base.graph_pool())
            base.graphs[key] = graph
        graph.inputs[0].copy_(pend_base)
        graph.inputs[1].copy_(pend_proxy)
        return graph.replay()
