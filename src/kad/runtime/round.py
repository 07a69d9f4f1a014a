"""One decoding round for a batch of slots, whatever their rules and sampling parameters.

A round (SPEC section 6, draft length γ ≥ 0; plain decoding is γ = 0) over the pool's first B
slots, every row with its own rule, warp and seed from the `SlotTable`:

1. draft: γ proxy steps, each drawing x_j from the row's warped q̃_j (greedy rows: its argmax);
2. verify: one base forward over (pending, x_1..x_γ), the proxy's step on x_γ (on a GPU beside
   it, on a second stream), and the proxy's base when some row's rule reads it;
3. mix: π of each row under its own rule (`kad.rules.mix_rows`), warped to π̃ (`warp_rows`);
4. accept x_j while u_j < π̃_j(x_j) / q̃_j(x_j) (greedy rows: while x_j = argmax π), then draw
   the next token from the residual norm(max(0, π̃ − q̃)) at the first rejection, or from
   π̃_{γ+1} (greedy: argmax π);
5. commit the pending token and the accepted drafts in every model (`Runner.advance`); rows
   that are not decoding (padding of the batch bucket, rows still prefilling) commit nothing.

Uniforms are `counter_uniform(seed, step, stream)`: ``step`` is the row's count of emitted
tokens at the round's start, the stream 3j for draft j, 3j + 1 for its test, 3γ + 2 for the
next token. A row's draws therefore depend only on its own seed and progress, never on its batch
or on when it joined. The round reads nothing on the host: on a GPU it is captured once per
(batch bucket, γ, models, attention width, `Work`) and replayed; its results come back in one
tensor. `Work` names the formulas a round computes: a batch of one rule runs only that rule's
formula (and its rows' losses), the sort of top-k/top-p only when some row cuts, the softmax of
a temperature only when some row has T ∉ {0, 1}; what a row does not need leaves its values
unchanged, so a row's result never depends on what else its round computes.

Tensor parallelism (`kad.parallel`): every rank runs the same round. A base runner with an
``agree`` method (the sharded one) makes every rank take rank 0's drafts (before the base reads
them) and rank 0's accepted counts and next tokens (before anything is committed), so no rank's
caches or tokens can drift from the others even where kernels round differently.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

from kad.rules import RULES, Rule, mix_rows, spec_of
from kad.runtime.pool import SlotTable
from kad.runtime.runner import Runner
from kad.sampling import Warp, counter_uniform, sample_inverse_cdf, warp_rows
from kad.speculative import acceptance_probability, accepted_lengths, next_distribution

FIELDS = 6  # per position: emitted token, proxy share, α, TV(π, q*), unfilled budget, predicted


class Work(NamedTuple):
    """What a round computes over the vocabulary: the rule kinds and loss ids whose formulas
    run (None: every one), whether top-k/top-p's sort runs (some row cuts) and whether the
    temperature's softmax runs (some row has T ∉ {0, 1})."""

    kinds: tuple[int, ...] | None
    losses: tuple[int, ...] | None
    cut: bool
    temper: bool

    @classmethod
    def of(cls, rules: Iterable[Rule], warps: Iterable[Warp]) -> Work:
        """The work of a batch of rows with these rules and warps: one rule kind runs its own
        formula for its rows' losses; several kinds run every formula (one graph for any mix,
        rather than one per combination)."""
        rules = list(rules)
        kinds = {spec_of(rule).kind for rule in rules}
        losses = {rule.columns().get("loss") for rule in rules} - {None}  # type: ignore[attr-defined]
        warps = list(warps)
        cut, temper = any(w.cuts for w in warps), any(w.tempers for w in warps)
        if len(kinds) != 1:
            return cls(None, None, cut, temper)
        return cls(tuple(kinds), tuple(sorted(losses)) or None, cut, temper)

    @property
    def needs_proxy_base(self) -> bool:
        """Whether the named rules read the proxy's base (every-rule work: not assumed)."""
        kinds = self.kinds or ()
        return any(spec.needs_proxy_base for spec in RULES.values() if spec.kind in kinds)


ALL = Work(None, None, True, True)  # every formula, the cut and the softmax: any batch


def decode_round(
    runners: dict[str, Runner],
    table: SlotTable,
    batch: int,
    gamma: int,
    *,
    width: int | None = None,
    live: dict[str, Sequence[int]] | None = None,
    work: Work = ALL,
    beside: torch.cuda.Stream | None = None,
    uniforms=counter_uniform,
) -> torch.Tensor:
    """One round over slots 0..batch−1; returns ``[B, FIELDS·(γ+1) + 1]`` float64: per
    position the `FIELDS` (position-major), then the accepted draft count.

    ``width``: as in `Runner.forward`; ``live``: per model, the batch rows whose outputs matter
    (None: every row; runners may skip the others); ``work``: the formulas to compute, which
    must cover every row's rule, loss and warp (`Work.of` the batch's rows); ``beside``: a CUDA
    stream for the proxy's last step; ``uniforms``: `counter_uniform` or its compiled form (the
    same values)."""
    base, proxy = runners["base"], runners["proxy"]
    proxy_base = runners.get("proxy_base")
    agree = getattr(base, "agree", None)  # tensor parallelism: rank 0's values (module doc)
    live = live or {}
    rules, warps = table.rules[:batch], table.warps[:batch]  # [B, 1 + C], [B, 3]
    active = table.active[:batch]  # [B] bool
    dev = table.active.device
    streams = torch.arange(3 * gamma + 3, device=dev)
    draws = uniforms(table.seeds[:batch, None], table.steps[:batch, None], streams)  # [B, S]
    ones = torch.ones(batch, dtype=torch.long, device=dev)

    current = table.pending["proxy"][:batch]
    q_steps, q_tilde, drafts = [], [], []
    for j in range(gamma):
        q_j = proxy.forward(0, current.unsqueeze(-1), width=width, live=live.get("proxy"))[
            :, 0
        ].exp()
        proxy.advance(0, ones)
        q_steps.append(q_j)  # [B, V]
        q_tilde.append(warp_rows(q_j, warps, work.cut, work.temper))
        current = sample_inverse_cdf(q_tilde[-1], draws[:, 3 * j])
        if agree is not None:
            current = agree(current)
        drafts.append(current)
    drafted = (
        torch.stack(drafts, dim=1)
        if drafts
        else torch.zeros(batch, 0, dtype=torch.long, device=dev)
    )  # [B, γ]

    def verify_inputs(role: str) -> torch.Tensor:
        return torch.cat([table.pending[role][:batch].unsqueeze(-1), drafted], dim=-1)  # [B, γ+1]

    if beside is None:
        q_steps.append(
            proxy.forward(0, current.unsqueeze(-1), width=width, live=live.get("proxy"))[:, 0].exp()
        )
        p = base.forward(
            0, verify_inputs("base"), width=width, live=live.get("base")
        ).exp()  # [B, γ+1, V]
    else:
        main = torch.cuda.current_stream(dev)
        beside.wait_stream(main)
        with torch.cuda.stream(beside):
            q_last = proxy.forward(0, current.unsqueeze(-1), width=width)[:, 0].exp()
        p = base.forward(0, verify_inputs("base"), width=width).exp()
        main.wait_stream(beside)
        q_last.record_stream(main)
        q_steps.append(q_last)
    proxy.advance(0, ones)
    q = torch.stack(q_steps, dim=1)  # [B, γ+1, V]
    q_base = None
    if proxy_base is not None:
        rows = live.get("proxy_base")
        q_base = proxy_base.forward(0, verify_inputs("proxy_base"), width=width, live=rows).exp()

    mix = mix_rows(p, q, q_base, rules, work.kinds, work.losses)
    target = warp_rows(mix.pi, warps, work.cut, work.temper)  # [B, γ+1, V] π̃
    q_tilde_all = torch.stack(q_tilde, dim=1) if q_tilde else target[:, :0]  # [B, γ, V]
    tests = draws[:, 1 : 3 * gamma : 3]  # [B, γ] stream 3j + 1
    accepted = accepted_lengths(drafted, target[:, :gamma], q_tilde_all, tests)  # [B]
    after = next_distribution(accepted, target, q_tilde_all)  # [B, V]
    token = sample_inverse_cdf(after, draws[:, 3 * gamma + 2])  # [B]
    if agree is not None:
        accepted, token = agree(torch.stack([accepted, token])).unbind(0)  # [2, B]

    kept = (accepted + 1) * active  # [B]
    base.advance(0, kept)
    proxy.advance(0, kept - (gamma + 1))
    if proxy_base is not None:
        proxy_base.advance(0, kept * table.uses_proxy_base[:batch])
    for role in runners:
        pending = table.pending[role][:batch]
        pending.copy_(torch.where(active, token, pending))
    table.steps[:batch] += kept

    emitted = torch.cat([drafted, token.unsqueeze(-1)], dim=-1)
    emitted.scatter_(1, accepted.unsqueeze(-1), token.unsqueeze(-1))  # [B, γ+1]
    chosen = emitted.unsqueeze(-1)
    share = mix.alpha * q.gather(-1, chosen).squeeze(-1) / mix.pi.gather(-1, chosen).squeeze(-1)
    tv = 0.5 * (mix.pi - q).abs().sum(dim=-1)  # [B, γ+1]
    predicted = acceptance_probability(target[:, :gamma], q_tilde_all)  # [B, γ]
    predicted = torch.cat([predicted, torch.zeros_like(tv[:, :1])], dim=-1)
    columns = [emitted, share, mix.alpha, tv, mix.unfilled, predicted]
    fields = torch.stack([c.double() for c in columns], dim=-1)  # [B, γ+1, FIELDS]
    return torch.cat([fields.flatten(1), accepted.double().unsqueeze(-1)], dim=-1)
