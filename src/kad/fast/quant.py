"""Weight-only quantization of the decoder's linear projections, per model.

Formats (`FORMATS`), applied to the fused ``qkv``, ``o``, fused ``gate_up`` and ``down``
projections of every decoder layer; embeddings, norms and the output head stay in the model's
dtype, and activations, the KV cache and the softmax are unchanged:

- ``int8``: symmetric, per output channel: ``w ≈ s · q``, ``s = max|w_row| / 127``,
  q = round(w / s) in −127..127 (1 byte a weight plus 4 bytes a row);
- ``int4``: asymmetric, per group of ``GROUP`` = 128 inputs of a row (the whole row when it is
  shorter): ``w ≈ s · (q − 8) + z``, ``s = (max − min) / 15``, ``z = min + 8 s``, q in 0..15
  (half a byte a weight plus s and z, 2 bytes each, a group).

Kernels: on CUDA, int8 runs a Triton kernel of `kad.fast.triton_int8` (the int8 codes are read
once and widened in registers) and int4 torch's tinygemm kernel ``torch._weight_int4pack_mm``
(its packed layout); both are plain ops inside the compiled, CUDA-graph-captured layer. On a CPU
each projection dequantizes its weight and multiplies (``F.linear``): slow, exact to the formula.

`quantize_model` replaces each projection module of a transformers model by a `QuantizedLinear`
holding a view of the fused quantized tensors, so transformers' own forward runs the same
quantized weights; the float weights are freed layer by layer (a model may be loaded on the host
and quantized onto the GPU one layer at a time).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from kad.errors import KadError

FORMATS: tuple[str, ...] = ("none", "int8", "int4")
ROLES: tuple[str, ...] = ("base", "proxy", "proxy_base")
GROUP = 128  # int4: inputs per (s, z) pair
INNER_K_TILES = 8  # tinygemm's packing: in must be a multiple of 16 · 8
DEQUANTIZED_ROWS = 64  # int8 on CUDA: products of more rows (prefill) dequantize and use cuBLAS


class Int8Linear(NamedTuple):
    """``w ≈ s · q`` per output channel (symmetric)."""

    codes: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # float32 [out]
    bias: torch.Tensor | None  # [out]


class Int4Linear(NamedTuple):
    """``w ≈ s · (q − 8) + z`` per group of ``group`` inputs of a row (asymmetric)."""

    codes: torch.Tensor  # CPU: uint8 [out, in/2] (input 2j in the high half of byte j);
    # CUDA: tinygemm's packing, int32 [out/8, in/128, 32, 4]
    scale_zero: torch.Tensor  # [in/group, out, 2]: s and z, the activations' dtype
    group: int
    bias: torch.Tensor | None  # [out]


QuantLinear = Int8Linear | Int4Linear


def parse_quantize(quantize: Mapping[str, str | None] | None) -> dict[str, str]:
    """``{"base": "int8", "proxy": "int4"}`` -> the roles to quantize and their formats ("none"
    and None dropped). A role or format not known is a one-line `KadError` naming the choices."""
    if quantize is None:
        return {}
    if not isinstance(quantize, Mapping):
        raise KadError(f"quantize must be a dict such as {{'base': 'int8'}}, got {quantize!r}")
    chosen = {}
    for role, fmt in quantize.items():
        if role not in ROLES:
            raise KadError(f"quantize: unknown model {role!r}: choose from {', '.join(ROLES)}")
        fmt = "none" if fmt is None else fmt
        if fmt not in FORMATS:
            raise KadError(
                f"quantize: unknown format {fmt!r} for the {role}: choose one of "
                f"{', '.join(FORMATS)}"
            )
        if fmt != "none":
            chosen[role] = fmt
    return chosen


# ----- formats
def quantize_weight(
    weight: torch.Tensor, fmt: str, bias: torch.Tensor | None = None, group: int = GROUP
) -> QuantLinear:
    """Quantize a weight ``[out, in]`` (and keep its bias) in format ``fmt``, on its device."""
    if fmt == "int8":
        return _int8(weight, bias)
    if fmt == "int4":
        return _int4(weight, bias, group)
    raise KadError(f"unknown quantization format {fmt!r}: choose one of {', '.join(FORMATS[1:])}")


def _int8(weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # [out]
    codes = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    if weight.is_cuda:
        from kad.fast import triton_int8  # noqa: F401  (registers torch.ops.kad.int8_mm)
    return Int8Linear(codes, scale, bias)


def _int4(weight: torch.Tensor, bias: torch.Tensor | None, group: int) -> Int4Linear:
    out, inputs = weight.shape
    group = min(group, inputs)
    if inputs % group or group % 2:
        raise KadError(f"int4: {inputs} inputs are not a whole number of groups of {group}")
    if weight.is_cuda and (weight.dtype != torch.bfloat16 or inputs % (16 * INNER_K_TILES)):
        raise KadError(
            f"int4 on CUDA (tinygemm) needs bfloat16 and inputs a multiple of "
            f"{16 * INNER_K_TILES}; got {weight.dtype} and {inputs}"
        )
    w = weight.float().view(out, inputs // group, group)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # [out, in/group]
    scale = ((hi - lo) / 15).clamp(min=1e-6).to(weight.dtype)
    zero = (lo + 8 * scale.float()).to(weight.dtype)  # rounded as stored, q fits them
    q = ((w - zero.float()[..., None]) / scale.float()[..., None] + 8).round().clamp(0, 15)
    q = q.to(torch.uint8).view(out, inputs)
    codes = (q[:, ::2] << 4) | q[:, 1::2]  # [out, in/2]
    if weight.is_cuda:
        codes = torch._convert_weight_to_int4pack(codes.contiguous(), INNER_K_TILES)
    scale_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
    return Int4Linear(codes, scale_zero, group, bias)


def dequantize(layer: QuantLinear) -> torch.Tensor:
    """The float weight ``[out, in]`` (float32) the quantized one stands for (host layouts)."""
    if isinstance(layer, Int8Linear):
        return layer.codes.float() * layer.scale[:, None]
    if layer.codes.dtype != torch.uint8:
        raise KadError("dequantize reads the host layout of int4 (quantize on the CPU)")
    out = layer.scale_zero.shape[1]
    q = torch.stack([layer.codes >> 4, layer.codes & 15], dim=-1).view(out, -1).float()
    groups = q.shape[1] // layer.group
    scale, zero = layer.scale_zero.float().unbind(-1)  # [in/group, out] each
    w = (q.view(out, groups, layer.group) - 8) * scale.t()[..., None] + zero.t()[..., None]
    return w.view(out, -1)


def quantized_linear(x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
    """``x Wᵀ + b`` with the quantized W: x ``[..., in]`` -> ``[..., out]``, in x's dtype."""
    rows = x.reshape(-1, x.shape[-1])  # [M, in]
    if not x.is_cuda:
        y = F.linear(rows, dequantize(layer).to(x.dtype))
    elif isinstance(layer, Int8Linear):
        y = torch.ops.kad.int8_mm(rows, layer.codes, layer.scale)
    else:  # a row slice's scale_zero is strided: dense for tinygemm (free when it is)
        y = torch._weight_int4pack_mm(
            rows.contiguous(), layer.codes, layer.group, layer.scale_zero.contiguous()
        )
    if layer.bias is not None:
        y = y + layer.bias
    return y.view(*x.shape[:-1], y.shape[-1])


def rows(layer: QuantLinear, start: int, end: int) -> QuantLinear:
    """The output channels start..end−1 of a quantized projection, as views (no copy)."""
    bias = None if layer.bias is None else layer.bias[start:end]
    if isinstance(layer, Int8Linear):
        return Int8Linear(layer.codes[start:end], layer.scale[start:end], bias)
    host = layer.codes.dtype == torch.uint8
    codes = layer.codes[start:end] if host else layer.codes[start // 8 : end // 8]  # 8 rows a tile
    return Int4Linear(codes, layer.scale_zero[:, start:end], layer.group, bias)


def nbytes(layer: QuantLinear) -> int:
    """Bytes a product reads: codes, scales (and zeros), bias."""
    tensors = [t for t in layer if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


# ----- models
class QuantizedLinear(torch.nn.Module):
    """A projection of a transformers model, quantized: its forward is `quantized_linear`.

    ``packed`` may be a view of a fused projection (q of qkv, gate of gate_up), whose whole
    tensors the compact forward reads through ``_kad_fused`` (as `kad.fast.llama._fused` does)."""

    def __init__(self, packed: QuantLinear, in_features: int) -> None:
        super().__init__()
        self.packed = packed
        self.in_features = in_features
        self.out_features = _out(packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.packed)

    def extra_repr(self) -> str:
        kind = "int8" if isinstance(self.packed, Int8Linear) else f"int4, group {self.packed.group}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"


def _out(layer: QuantLinear) -> int:
    return layer.codes.shape[0] if isinstance(layer, Int8Linear) else layer.scale_zero.shape[1]


def format_of(model: PreTrainedModel) -> str:
    """ "int8", "int4" or "none": how the model's projections are stored."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            return "int8" if isinstance(module.packed, Int8Linear) else "int4"
    return "none"


def weight_bytes(model: PreTrainedModel) -> int:
    """Bytes of the model's weights: its parameters and its quantized projections (the views of
    one fused projection add up to it)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    quantized = (m for m in model.modules() if isinstance(m, QuantizedLinear))
    return params + sum(nbytes(m.packed) for m in quantized)


def _groups(block: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, list[str]]]:
    """(parent, names): the projections of a decoder layer that read one input, in fused order."""
    yield block.self_attn, ["q_proj", "k_proj", "v_proj"]
    yield block.self_attn, ["o_proj"]
    yield block.mlp, ["gate_proj", "up_proj"]
    yield block.mlp, ["down_proj"]


@torch.no_grad()
def quantize_layer(block: torch.nn.Module, fmt: str) -> None:
    """Quantize one decoder layer's projections in place (on their device): each group of
    projections that read one input is fused, quantized once, and each module replaced by a
    `QuantizedLinear` over its rows; the float weights are then unreferenced."""
    for parent, names in _groups(block):
        modules = [getattr(parent, n) for n in names]
        weight = torch.cat([m.weight.detach() for m in modules])  # [Σ out, in]
        biases = [m.bias for m in modules]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat(
                [
                    b.detach() if b is not None else weight.new_zeros(m.weight.shape[0])
                    for b, m in zip(biases, modules, strict=True)
                ]
            )
        fused = quantize_weight(weight, fmt, bias)
        del weight
        start = 0
        for name, m in zip(names, modules, strict=True):
            end = start + m.weight.shape[0]
            replaced = QuantizedLinear(rows(fused, start, end), m.weight.shape[1])
            setattr(parent, name, replaced)
            start = end
        object.__setattr__(getattr(parent, names[0]), "_kad_fused", fused)


def check_quantizable(model: PreTrainedModel, fmt: str) -> None:
    """`KadError` unless the compact forward runs ``model`` and ``fmt`` is a format."""
    from kad.fast.llama import unsupported_reason

    if fmt not in FORMATS[1:]:
        raise KadError(f"unknown quantization format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if format_of(model) != "none":
        raise KadError(f"the model is already quantized ({format_of(model)})")
    reason = unsupported_reason(model)
    if reason is not None:
        raise KadError(
            f"cannot quantize this model ({fmt}): the compact forward needs it: {reason}"
        )


def quantize_model(
    model: PreTrainedModel, fmt: str, device: torch.device | str | None = None
) -> PreTrainedModel:
    """Quantize ``model``'s decoder projections in place, layer by layer; with ``device``, each
    layer is moved there first (and the rest of the model after), so that only one layer is ever
    on the device in float. Returns the model."""
    check_quantizable(model, fmt)
    for block in model.model.layers:
        if device is not None:
            block.to(device)
        quantize_layer(block, fmt)
    if device is not None:
        model.to(device)
    return model
