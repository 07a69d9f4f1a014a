"""A compact forward for Llama-family models over a static KV cache.

It computes what the transformers model computes, from the transformers model's own weights (no
copy), for the decoder shapes of Llama (and SmolLM2, Llama 3.x), Qwen2, Qwen3 and OLMo2:

- RMSNorm ``w · x / √(mean(x²) + ε)`` (OLMo2 multiplies in float32 before the cast back);
- attention with grouped KV heads (GQA), rotary positions (RoPE, the model's own tables), and
  per-head (Qwen3) or whole-projection (OLMo2) RMSNorm of queries and keys;
- a SwiGLU MLP ``down(silu(gate(x)) · up(x))``;
- pre-norm residual blocks, or OLMo2's norm-after blocks ``x + norm(f(x))``.

Projections that read the same input run as one matrix product: q, k, v as ``qkv`` and gate, up
as ``gate_up``. The fused weight is made once per model, and the model's own q/k/v (gate/up)
weights become row slices of it, so it costs no memory and the model itself is unchanged.

The KV cache of one layer is a tensor ``[B, Hkv, S, D]``, one row per sequence: a step writes its
keys and values at each row's columns ``cols`` ``[B, n]`` and attends to the columns that
``mask`` marks visible. Everything is
a pure tensor function of its arguments (no module calls), so one compiled graph serves every
layer of a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.distributed import ProcessGroup
from torch.distributed import _functional_collectives as funcol
from transformers import PreTrainedModel

from kad.errors import KadError
from kad.fast.quant import QuantizedLinear, QuantLinear, quantized_linear

SUPPORTED_TYPES: tuple[str, ...] = ("llama", "qwen2", "qwen3", "olmo2")
# A step of at most this many tokens a row is decode-sized: it runs the compiled layer, and on
# CUDA attends by the split-context kernel of `kad.fast.triton_attention`.
DECODE_TOKENS = 16
# RoPE variants whose tables depend on the position only (not on the sequence length).
STATIC_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class Arch:
    """The static facts of a decoder layer."""

    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    post_norm: bool  # OLMo2: x + norm(attn(x)), x + norm(mlp(x))
    qk_norm: str | None  # "head" (Qwen3), "full" (OLMo2) or None
    weight_first: bool  # RMSNorm multiplies by w in float32, then casts (OLMo2)
    # tensor parallelism: the whole model's (heads, KV heads); the two above are then this rank's
    whole_heads: tuple[int, int] | None = None

    @property
    def qkv_sizes(self) -> tuple[int, int, int]:
        """Output widths of q, k, v inside the fused ``qkv`` projection."""
        kv = self.kv_heads * self.head_dim
        return (self.heads * self.head_dim, kv, kv)


class Linear(NamedTuple):
    weight: torch.Tensor  # [out, in]
    bias: torch.Tensor | None


class Layer(NamedTuple):
    """One decoder layer's tensors. norm_attn/norm_mlp are the input and post-attention norms
    of pre-norm models, and the post-attention and post-feed-forward norms of OLMo2. The
    projections of a quantized model are `kad.fast.quant` types."""

    qkv: Linear | QuantLinear  # q, k, v stacked: [(H + 2·Hkv)·D, E]
    o: Linear | QuantLinear
    gate_up: Linear | QuantLinear  # gate, up stacked: [2·I, E]
    down: Linear | QuantLinear
    norm_attn: torch.Tensor
    norm_mlp: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None


def unsupported_reason(model: PreTrainedModel) -> str | None:
    """Why the compact forward cannot run this model, or None if it can."""
    config = model.config
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_TYPES:
        return f"architecture {kind!r} is not one of {', '.join(SUPPORTED_TYPES)}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} is not silu"
    if getattr(config, "use_sliding_window", False):
        return "sliding-window attention"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in STATIC_ROPE_TYPES:
        return f"RoPE type {rope_type!r} depends on the sequence length"
    if len({p.device for p in model.parameters()}) > 1:
        return "its weights are spread over several devices (device_map)"
    decoder = getattr(model, "model", None)
    if getattr(decoder, "rotary_emb", None) is None:
        return "the model has no rotary embedding module"
    block = decoder.layers[0]
    projections = (block.self_attn.q_proj, block.mlp.gate_proj, block.mlp.down_proj)
    if not all(
        type(m) is QuantizedLinear or (type(m) is torch.nn.Linear and m.weight.is_floating_point())
        for m in projections
    ):
        return "its linear layers are quantised (not by kad) or custom modules"
    return None


def _linear(module: torch.nn.Module) -> Linear | QuantLinear:
    if isinstance(module, QuantizedLinear):
        return module.packed
    bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
    return Linear(module.weight.detach(), bias)


def _fused(modules: list[torch.nn.Linear]) -> Linear:
    """One projection ``[Σ out, in]`` for linears that read the same input. The modules'
    weights (and biases) become row slices of it, so no memory is added; made once per model."""
    cached = getattr(modules[0], "_kad_fused", None)
    if cached is not None:
        return cached
    has_bias = [m.bias is not None for m in modules]
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors: the model stays usable
        weight = torch.cat([m.weight.detach() for m in modules])
        bias = torch.cat([m.bias.detach() for m in modules]) if all(has_bias) else None
        start = 0
        for m in modules:
            end = start + m.weight.shape[0]
            m.weight.data = weight[start:end]
            if bias is not None:
                m.bias.data = bias[start:end]
            start = end
    if any(has_bias) and bias is None:  # some projections have a bias, some not
        zeros = [
            m.bias.detach() if m.bias is not None else weight.new_zeros(m.weight.shape[0])
            for m in modules
        ]
        bias = torch.cat(zeros)
    fused = Linear(weight, bias)
    object.__setattr__(modules[0], "_kad_fused", fused)
    return fused


def _weight(module: torch.nn.Module | None) -> torch.Tensor | None:
    return None if module is None else module.weight.detach()


class LlamaFamily:
    """The tensors of a transformers Llama-family model, read by the functions below."""

    def __init__(self, model: PreTrainedModel, vocab_size: int) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise KadError(f"the static-cache forward cannot run this model: {reason}")
        config = model.config
        decoder = model.model
        first = decoder.layers[0].self_attn
        post_norm = config.model_type == "olmo2"
        qk = {"qwen3": "head", "olmo2": "full"}.get(config.model_type)
        self.arch = Arch(
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
            head_dim=first.head_dim,
            eps=float(config.rms_norm_eps),
            post_norm=post_norm,
            qk_norm=qk,
            weight_first=post_norm,
        )
        self.layers = [
            Layer(
                qkv=_fused(
                    [block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj]
                ),
                o=_linear(block.self_attn.o_proj),
                gate_up=_fused([block.mlp.gate_proj, block.mlp.up_proj]),
                down=_linear(block.mlp.down_proj),
                norm_attn=_weight(
                    block.post_attention_layernorm if post_norm else block.input_layernorm
                ),
                norm_mlp=_weight(
                    block.post_feedforward_layernorm
                    if post_norm
                    else block.post_attention_layernorm
                ),
                q_norm=_weight(getattr(block.self_attn, "q_norm", None)),
                k_norm=_weight(getattr(block.self_attn, "k_norm", None)),
            )
            for block in decoder.layers
        ]
        self.embed = model.get_input_embeddings().weight.detach()  # [V_model, E]
        self.norm = decoder.norm.weight.detach()  # [E]
        self.head = model.get_output_embeddings().weight.detach()[:vocab_size]  # [V, E] view
        self.rotary = decoder.rotary_emb
        self.dtype = self.embed.dtype
        self.device = self.embed.device

    def rope_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[length, D]`` for positions 0..length-1, from the model's own RoPE module
        (so every RoPE variant and dtype convention matches the model's)."""
        probe = torch.zeros(1, 1, dtype=self.dtype, device=self.device)
        positions = torch.arange(length, device=self.device).unsqueeze(0)
        cos, sin = self.rotary(probe, positions)
        return cos[0], sin[0]

    def kv_shape(self, batch: int, slots: int) -> tuple[int, int, int, int]:
        return (batch, self.arch.kv_heads, slots, self.arch.head_dim)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_first: bool) -> torch.Tensor:
    """w · x / √(mean(x²) + ε) over the last dim, in float32; cast back before (Llama) or after
    (OLMo2) the multiplication by w."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight_first:
        return (weight * h).to(x.dtype)
    return weight * h.to(x.dtype)


def linear(x: torch.Tensor, layer: Linear | QuantLinear) -> torch.Tensor:
    if isinstance(layer, Linear):
        return F.linear(x, layer.weight, layer.bias)
    return quantized_linear(x, layer)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x · cos + rotate_half(x) · sin; x ``[B, h, n, D]``, cos/sin ``[B, 1, n, D]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def attend(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """softmax(q kᵀ / √D, masked) v with grouped KV heads, without repeating the cache.

    q ``[B, H, n, D]``; k_cache, v_cache ``[B, Hkv, S, D]``; mask ``[B, 1, 1, n, S]`` (True =
    visible). Query head h reads KV head h // (H / Hkv), as transformers' repeat_kv does.
    Returns ``[B, n, H·D]``.
    """
    batch, heads, n, dim = q.shape
    kv_heads, slots = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    grouped = q.reshape(batch, kv_heads, group * n, dim)
    scores = torch.matmul(grouped, k_cache.transpose(-1, -2)) * dim**-0.5  # [B, Hkv, g·n, S]
    scores = scores.view(batch, kv_heads, group, n, slots).masked_fill(~mask, -torch.inf)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs.view(batch, kv_heads, group * n, slots), v_cache)  # [B, Hkv, g·n, D]
    return out.view(batch, heads, n, dim).transpose(1, 2).reshape(batch, n, heads * dim)


def layer_forward(
    x: torch.Tensor,
    w: Layer,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cols: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor,
    arch: Arch,
    start: int = 0,
    slots: torch.Tensor | None = None,
    group: ProcessGroup | None = None,
) -> torch.Tensor:
    """One decoder layer: x ``[B, n, E]`` -> ``[B, n, E]``, for the pool rows start..start+B−1
    (or, given ``slots`` ``[B]``, for those rows of the pool).

    Writes this step's keys and values into the pool's k_cache/v_cache ``[R, Hkv, S, D]`` at each
    row's columns ``cols`` ``[B, n]`` (in place, on the whole pool tensor: a compiled step then
    writes only those columns), then attends over the first W columns of its rows that ``mask``
    ``[B, 1, 1, n, W]`` shows (rows start..start+B−1 are read as views, ``slots`` gathered).
    ``cols`` are the tokens' positions clamped to W − 1, so query (b, i) sees the columns ≤ cols[b,
    i]: a decode-sized step on CUDA attends by that rule straight from the pool (no mask, no
    views; `kad.fast.triton_attention`). cos/sin ``[B, 1, n, D]`` are the RoPE tables at each
    token's position.
    ``group``: tensor parallelism (`kad.parallel`): ``w`` holds this rank's heads and MLP
    columns, and the outputs of o and down are summed over the group (one all-reduce each).
    """
    batch, n, _ = x.shape
    eps, wf = arch.eps, arch.weight_first
    h = x if arch.post_norm else rms_norm(x, w.norm_attn, eps, wf)
    q, k, v = linear(h, w.qkv).split(arch.qkv_sizes, dim=-1)
    if arch.qk_norm == "full" and group is not None:
        q, k = sharded_qk_norm(q, k, w, arch, group)
    elif arch.qk_norm == "full":
        q, k = rms_norm(q, w.q_norm, eps, wf), rms_norm(k, w.k_norm, eps, wf)
    q = q.view(batch, n, arch.heads, arch.head_dim)
    k = k.view(batch, n, arch.kv_heads, arch.head_dim)
    v = v.view(batch, n, arch.kv_heads, arch.head_dim)
    if arch.qk_norm == "head":
        q, k = rms_norm(q, w.q_norm, eps, wf), rms_norm(k, w.k_norm, eps, wf)
    q = rope(q.transpose(1, 2), cos, sin)  # [B, H, n, D]
    k = rope(k.transpose(1, 2), cos, sin)  # [B, Hkv, n, D]
    if slots is None:
        rows = (torch.arange(batch, device=x.device) + start).unsqueeze(-1)  # [B, 1]
    else:
        rows = slots.unsqueeze(-1)
    k_cache[rows, :, cols] = k.transpose(1, 2)  # [B, n, Hkv, D] at (row, column)
    v_cache[rows, :, cols] = v
    if q.is_cuda and n <= DECODE_TOKENS:  # cols: each query's last visible column
        attended = torch.ops.kad.decode_attention(q, k_cache, v_cache, rows[:, 0], cols)
    else:
        width = mask.shape[-1]
        if slots is None:
            k_rows = k_cache[start : start + batch, :, :width]  # [B, Hkv, W, D] views
            v_rows = v_cache[start : start + batch, :, :width]
        else:
            k_rows = k_cache[slots, :, :width]  # [B, Hkv, W, D] gathered
            v_rows = v_cache[slots, :, :width]
        attended = attend(q, k_rows, v_rows, mask)
    attn = summed(linear(attended, w.o), group)
    if arch.post_norm:
        x = x + rms_norm(attn, w.norm_attn, eps, wf)
        return x + rms_norm(swiglu(x, w, group), w.norm_mlp, eps, wf)
    x = x + attn
    return x + swiglu(rms_norm(x, w.norm_mlp, eps, wf), w, group)


def swiglu(h: torch.Tensor, w: Layer, group: ProcessGroup | None = None) -> torch.Tensor:
    """down(silu(gate(h)) · up(h)), with gate and up as one product (summed over ``group``)."""
    gate, up = linear(h, w.gate_up).chunk(2, dim=-1)
    return summed(linear(F.silu(gate) * up, w.down), group)


def summed(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """x summed over the ranks of ``group`` (an all-reduce, capturable in a CUDA graph on
    NCCL); x itself without a group."""
    return x if group is None else funcol.all_reduce(x, "sum", group)


def sharded_qk_norm(
    q: torch.Tensor, k: torch.Tensor, w: Layer, arch: Arch, group: ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor]:
    """OLMo2's RMSNorm over the whole q (k) projection when each rank holds some heads:
    the sums of squares of q and k ``[B, n, 2]`` are summed over the ranks in one all-reduce.
    q ``[B, n, H·D]``, k ``[B, n, Hkv·D]`` (this rank's heads)."""
    squares = torch.stack([q.float().pow(2).sum(-1), k.float().pow(2).sum(-1)], dim=-1)
    squares = summed(squares, group)  # [B, n, 2]
    heads, kv_heads = arch.whole_heads or (arch.heads, arch.kv_heads)
    widths = (heads * arch.head_dim, kv_heads * arch.head_dim)  # of the whole q and k
    out = []
    for i, (x, weight) in enumerate(((q, w.q_norm), (k, w.k_norm))):
        h = x.float() * torch.rsqrt(squares[..., i : i + 1] / widths[i] + arch.eps)
        out.append((weight * h).to(x.dtype) if arch.weight_first else weight * h.to(x.dtype))
    return out[0], out[1]
