"""One rank's shard of a Llama-family model's tensors (`kad.fast.llama.LlamaFamily`).

The KV heads are split over the N ranks as evenly as they go, the first ranks taking one more
(`split`: 5 KV heads over 2 ranks are 3 + 2, over 4 ranks 2 + 1 + 1 + 1), and each rank takes
the query heads that read its KV heads (with GQA, query head h reads KV head h // (H/Hkv)). Rank
r, holding KV heads k0 .. k1 − 1, holds on its own device:

- attention: those KV heads and the query heads k0·H/Hkv .. k1·H/Hkv − 1 of the fused ``qkv``
  (rows, with their biases), and the matching columns of ``o`` (its bias on rank 0 only, as the
  outputs are summed);
- MLP: its part of the rows of gate and of up (split like the heads; ``gate_up`` stays one
  product) and the matching columns of ``down`` (its bias on rank 0);
- OLMo2's whole-projection q/k norms: the weights of its own heads;
- whole: the embedding, the norms, the output head.

The sums after ``o`` and ``down`` add up partial products, so an uneven split is as exact as an
even one. Each rank holds at least one KV head: N above the KV heads is refused
(`check_sizes`), where vLLM would replicate KV heads.

The output head is replicated rather than split by vocabulary: every rank then computes the same
full logits with no gather of ``[B, γ+1, V]`` float32 logits (a gather that grows with the batch
and γ, while the head's bytes stay fixed, under 2 % of a 70B model's); the rules read the whole
distribution on every rank anyway.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import replace

import torch

from kad.errors import KadError
from kad.fast.llama import Layer, Linear, LlamaFamily


def split(size: int, world: int) -> list[tuple[int, int]]:
    """Each rank's part start..end of ``size`` things (KV heads, MLP columns), as even as it
    goes: the first size % world ranks take one more."""
    step, extra = divmod(size, world)
    bounds = [rank * step + min(rank, extra) for rank in range(world + 1)]
    return list(itertools.pairwise(bounds))


def check_sizes(
    kv_heads: int | None, width: int | None, world: int, name: str = "the base"
) -> None:
    """`KadError` unless every one of ``world`` ranks gets at least one of ``name``'s
    ``kv_heads`` KV heads and of its MLP ``width`` columns (None: not known, not checked)."""
    for label, size in (("KV heads", kv_heads), ("MLP width (intermediate_size)", width)):
        if size is not None and world > size:
            raise KadError(
                f"tensor_parallel={world} is more than {name}'s {label} ({size}): each rank "
                f"holds at least one; choose at most {size}"
            )


def _rows(t: torch.Tensor | None, blocks: list[tuple[int, int]], device: torch.device):
    """The rows start..end of each block of ``t``, stacked, as a fresh tensor on ``device``."""
    if t is None:
        return None
    return torch.cat([t[start:end] for start, end in blocks]).to(device).contiguous()


def _columns(layer: Linear, start: int, end: int, keep_bias: bool, device: torch.device):
    """Columns start..end of a row-parallel projection; its bias only where ``keep_bias``."""
    bias = layer.bias.to(device) if keep_bias and layer.bias is not None else None
    return Linear(layer.weight[:, start:end].to(device).contiguous(), bias)


def shard_family(net: LlamaFamily, rank: int, world: int, device: torch.device) -> LlamaFamily:
    """Rank ``rank``'s shard of ``net`` on ``device`` (module doc); ``net`` is left whole."""
    arch = net.arch
    width = net.layers[0].gate_up.weight.shape[0] // 2
    check_sizes(arch.kv_heads, width, world)
    for layer in net.layers:
        if any(type(p) is not Linear for p in (layer.qkv, layer.o, layer.gate_up, layer.down)):
            raise KadError("tensor parallelism does not shard quantized linear layers yet")
    d, group = arch.head_dim, arch.heads // arch.kv_heads
    kv0, kv1 = split(arch.kv_heads, world)[rank]
    q0, q1 = kv0 * group * d, kv1 * group * d  # this rank's q rows (and o columns)
    k0, k1 = kv0 * d, kv1 * d  # its rows within k (and within v)
    q_width, kv_width = arch.heads * d, arch.kv_heads * d
    v_width = q_width + kv_width
    qkv_blocks = [(q0, q1), (q_width + k0, q_width + k1), (v_width + k0, v_width + k1)]
    m0, m1 = split(width, world)[rank]
    full_qk = arch.qk_norm == "full"
    layers = []
    for w in net.layers:
        layers.append(
            Layer(
                qkv=Linear(
                    _rows(w.qkv.weight, qkv_blocks, device), _rows(w.qkv.bias, qkv_blocks, device)
                ),
                o=_columns(w.o, q0, q1, rank == 0, device),
                gate_up=Linear(
                    _rows(w.gate_up.weight, [(m0, m1), (width + m0, width + m1)], device),
                    _rows(w.gate_up.bias, [(m0, m1), (width + m0, width + m1)], device),
                ),
                down=_columns(w.down, m0, m1, rank == 0, device),
                norm_attn=w.norm_attn.to(device),
                norm_mlp=w.norm_mlp.to(device),
                q_norm=_rows(w.q_norm, [(q0, q1)], device) if full_qk else _to(w.q_norm, device),
                k_norm=_rows(w.k_norm, [(k0, k1)], device) if full_qk else _to(w.k_norm, device),
            )
        )
    shard = copy.copy(net)
    shard.arch = replace(
        arch,
        heads=(kv1 - kv0) * group,
        kv_heads=kv1 - kv0,
        whole_heads=(arch.heads, arch.kv_heads),
    )
    shard.layers = layers
    shard.embed = net.embed.to(device)
    shard.norm = net.norm.to(device)
    tied = net.head.data_ptr() == net.embed.data_ptr()
    shard.head = shard.embed[: net.head.shape[0]] if tied else net.head.to(device)
    shard.rotary = copy.deepcopy(net.rotary).to(device)
    shard.device = device
    return shard


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def shard_bytes(net: LlamaFamily) -> int:
    """Bytes of a shard's tensors (what one rank holds of the model's weights)."""
    tensors = [net.embed, net.norm, net.head]
    for w in net.layers:
        for p in (w.qkv, w.o, w.gate_up, w.down):
            tensors += [p.weight] + ([p.bias] if p.bias is not None else [])
        tensors += [t for t in (w.norm_attn, w.norm_mlp, w.q_norm, w.k_norm) if t is not None]
    seen = {t.data_ptr(): t for t in tensors}  # a tied head is the embedding
    return sum(t.numel() * t.element_size() for t in seen.values())
