"""The memory-bandwidth roofline of decoding (SPEC section 8).

At small batch a decoding step is bound by the bytes it reads: each forward reads a model's
weights once, and each row's KV cache once. A plain KAD step runs both models once per token;
a speculative round reads the base once for up to γ + 1 tokens and the proxy γ + 1 times.

    roofline tokens/s = tokens per step · peak bandwidth / bytes read per step

Bytes read per forward: every weight except an untied input embedding (a step looks up B of
its rows, not the table), quantized projections at their quantized bytes (codes, scales, zeros),
plus the KV cache of every row at the mean context length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from kad.fast.graphs import seconds
from kad.fast.quant import weight_bytes
from kad.speculative import expected_tokens


@dataclass(frozen=True)
class ModelBytes:
    """What one forward of a model reads: weights, and K and V per cached token."""

    weights: int
    kv_per_token: int

    def step(self, batch: int, context: float) -> float:
        """Bytes read by one forward of ``batch`` rows over ``context`` cached tokens each."""
        return self.weights + batch * context * self.kv_per_token


def model_bytes(model: PreTrainedModel) -> ModelBytes:
    """Weight bytes read per forward and KV bytes per token, from the model's own tensors."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = weight_bytes(model)
    if embed is not head:  # untied: only B rows of the input table are read
        total -= embed.numel() * embed.element_size()
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * embed.element_size()
    return ModelBytes(weights=total, kv_per_token=per_token)


def mean_context(prompt_tokens: int, new_tokens: int) -> float:
    """Mean cached length over a generation: the prompt plus half the new tokens."""
    return prompt_tokens + new_tokens / 2


def plain_roofline(bandwidth: float, models: list[ModelBytes], batch: int, context: float) -> float:
    """Tokens/s when every model runs once per token: B · bandwidth / Σ bytes per step."""
    return batch * bandwidth / sum(m.step(batch, context) for m in models)


def speculative_roofline(
    bandwidth: float,
    base: ModelBytes,
    proxy: ModelBytes,
    batch: int,
    context: float,
    gamma: int,
    tokens_per_round: float,
) -> float:
    """Tokens/s of rounds that emit ``tokens_per_round`` per row, each reading the base once
    and the proxy γ + 1 times."""
    round_bytes = base.step(batch, context) + (gamma + 1) * proxy.step(batch, context)
    return batch * tokens_per_round * bandwidth / round_bytes


def tokens_per_second_at(acceptance: float, gamma: int, round_seconds: float, batch: int) -> float:
    """Tokens/s of rounds lasting ``round_seconds`` at a per-draft acceptance rate:
    B · (1 − a^{γ+1}) / (1 − a) / t_round."""
    return batch * expected_tokens(acceptance, gamma) / round_seconds


def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 20) -> float:
    """Peak memory bandwidth in bytes/s, measured by a device-to-device copy of ``nbytes``
    (default 1 GiB on a GPU, 64 MiB on a CPU): bytes read plus bytes written over the median
    time."""
    if nbytes is None:
        nbytes = 1 << 30 if device.type == "cuda" else 1 << 26
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    for _ in range(3):  # warm-up
        dst.copy_(src)
    return 2 * nbytes / seconds(lambda: dst.copy_(src), device, repeats)
