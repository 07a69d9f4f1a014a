"""The slot pool: how many sequences fit, and each slot's decoding parameters on the device.

Each model's KV cache is ``rows`` slots × its context, allocated once (`plan_pool` sizes it from
a memory budget or from the user's ``max_rows`` / ``max_context``). `SlotTable` holds, per slot,
everything a round reads besides the caches, as device tensors at fixed addresses (so a captured
round reads the current values): the rule and its parameters, the warp, the seed, the count of
emitted tokens, the pending input token of each model, and whether the slot is decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from kad import rules
from kad.errors import KadError
from kad.fast.graphs import to_device
from kad.fast.quant import weight_bytes

CPU_BUDGET = 2**30  # bytes of KV pool on a CPU when nobody says
CPU_ROWS = 64
GPU_ROWS = 256
DEFAULT_CONTEXT = 4096
DEFAULT_MEMORY_FRACTION = 0.85


def kv_bytes_per_token(model: PreTrainedModel, kv_heads: int | None = None) -> int:
    """Bytes of keys and values one token takes in ``model``'s cache (in ``kv_heads`` of its
    KV heads, a tensor-parallel shard, when given)."""
    config = model.config
    text = getattr(config, "text_config", None) or config
    layers = getattr(text, "num_hidden_layers", None) or text.n_layer
    heads = getattr(text, "num_attention_heads", None) or text.n_head
    kv_heads = kv_heads or getattr(text, "num_key_value_heads", None) or heads
    hidden = getattr(text, "hidden_size", None) or text.n_embd
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    size = model.get_input_embeddings().weight.element_size()  # the cache's dtype
    return int(layers) * 2 * int(kv_heads) * int(head_dim) * size


@dataclass(frozen=True)
class PoolPlan:
    """Slots per model and each model's columns (its context within the pool)."""

    rows: int
    contexts: dict[str, int]
    bytes: int  # KV bytes of all models' pools


def plan_pool(
    models: dict[str, PreTrainedModel],
    model_contexts: dict[str, int],
    *,
    max_rows: int | None = None,
    max_context: int | None = None,
    memory_fraction: float | None = None,
    device: torch.device | None = None,
    kv_heads: dict[str, int] | None = None,
) -> PoolPlan:
    """Size the pool. Each model gets min(max_context, its own context) columns. Rows:
    ``max_rows``, or as many as the budget holds: on a GPU ``memory_fraction`` of the device
    memory less what is already used (weights), on a CPU 1 GiB, or ``memory_fraction`` of the
    host memory less the models' weights (`weight_bytes`: quantized projections count their
    quantized bytes); at most 256 (GPU) or 64 (CPU). ``device``: where the pools live
    (default: the first model's); ``kv_heads``: role -> the KV heads its pool holds (tensor
    parallelism: a rank's shard of them)."""
    if max_rows is not None and (
        isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1
    ):
        raise KadError(f"max_rows must be an integer >= 1, got {max_rows!r}")
    if max_context is not None and (
        isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 2
    ):
        raise KadError(f"max_context must be an integer >= 2, got {max_context!r}")
    if memory_fraction is not None and not 0.0 < memory_fraction <= 1.0:
        raise KadError(f"memory_fraction must be in (0, 1], got {memory_fraction!r}")
    wanted = DEFAULT_CONTEXT if max_context is None else max_context
    contexts = {role: min(wanted, model_contexts[role]) for role in models}
    held = kv_heads or {}
    per_row = sum(kv_bytes_per_token(m, held.get(r)) * contexts[r] for r, m in models.items())
    if device is None:
        device = next(iter(models.values())).get_input_embeddings().weight.device
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        fraction = DEFAULT_MEMORY_FRACTION if memory_fraction is None else memory_fraction
        budget, cap = int(total * fraction) - (total - free), GPU_ROWS
    else:
        budget, cap = CPU_BUDGET, CPU_ROWS
        if memory_fraction is not None:
            distinct = {id(m): m for m in models.values()}.values()  # one model in two roles
            budget = int(memory_fraction * _host_memory()) - sum(map(weight_bytes, distinct))
    fit = budget // per_row if per_row else cap
    rows = max_rows if max_rows is not None else min(cap, fit)
    if rows < 1 or (device.type == "cuda" and rows > fit):
        gib = per_row / 2**30
        raise KadError(
            f"the KV pool does not fit: one sequence of {max(contexts.values())} tokens needs "
            f"{gib:.2f} GiB across the models and {max(budget, 0) / 2**30:.2f} GiB are left; "
            "lower max_context (--max-context) or max_rows (--max-rows), or raise "
            "memory_fraction (--memory-fraction)"
        )
    return PoolPlan(rows, contexts, rows * per_row)


def _host_memory() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class SlotTable:
    """Per-slot decoding state on the device ``[R, ...]`` (module doc). Rows of a batch are
    read as views of the first B slots; the host writes a slot when a sequence takes it, with
    writes that never wait for the device (`to_device`, ``fill_``)."""

    def __init__(self, rows: int, roles: list[str], device: torch.device) -> None:
        self.rules = torch.zeros(rows, 1 + len(rules.COLUMNS), device=device)  # rule_row's
        self.warps = torch.zeros(rows, 3, device=device)  # temperature, top_k, top_p
        self.seeds = torch.zeros(rows, dtype=torch.long, device=device)
        self.steps = torch.zeros(rows, dtype=torch.long, device=device)  # tokens emitted
        self.active = torch.zeros(rows, dtype=torch.bool, device=device)  # decoding now
        self.uses_proxy_base = torch.zeros(rows, dtype=torch.long, device=device)  # 0 or 1
        self.pending = {role: torch.zeros(rows, dtype=torch.long, device=device) for role in roles}

    def tensors(self) -> list[torch.Tensor]:
        """Everything a round mutates here (for warm-ups that must undo it)."""
        return [self.steps, *self.pending.values()]

    def write(
        self, slot: int, rule_row: list[float], warp_row: list[float], seed: int, uses: bool
    ) -> None:
        """A sequence takes ``slot``: its parameters, not yet decoding."""
        self.rules[slot].copy_(to_device(rule_row, self.rules.device), non_blocking=True)
        self.warps[slot].copy_(to_device(warp_row, self.warps.device), non_blocking=True)
        self.seeds[slot].fill_(seed)
        self.steps[slot].fill_(0)
        self.uses_proxy_base[slot].fill_(int(uses))
        self.active[slot].fill_(False)

    def start(self, slot: int, pending: dict[str, int]) -> None:
        """The slot's prompt is cached: feed each model its last prompt token next, decode."""
        for role, token in pending.items():
            self.pending[role][slot].fill_(token)
        self.active[slot].fill_(True)

    def move(self, src: int, dst: int) -> None:
        for tensor in (
            self.rules,
            self.warps,
            self.seeds,
            self.steps,
            self.active,
            self.uses_proxy_base,
            *self.pending.values(),
        ):
            tensor[dst] = tensor[src]
        self.active[src].fill_(False)

    def clear(self, slot: int) -> None:
        self.active[slot].fill_(False)
