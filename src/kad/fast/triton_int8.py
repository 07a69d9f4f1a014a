"""The int8 weight-only product on CUDA, ``y = (x qᵀ) · s``, as a Triton kernel behind the torch
op ``torch.ops.kad.int8_mm`` (opaque to Inductor, so it runs inside compiled layers and CUDA
graphs as one kernel).

Each program computes a ``[BLOCK_M, BLOCK_N]`` tile of y: it walks the inputs BLOCK_K at a time,
loads the int8 codes of its BLOCK_N output channels once, widens them to x's dtype in registers
and accumulates the tensor-core product in float32; the per-channel scale multiplies the tile at
the end. Decode-sized products (M ≤ 16 rows) take narrow tiles so that a small projection still
spreads over the GPU's SMs; larger ones (prefill chunks, M > 64) dequantize and use cuBLAS.
Imported on the first quantization onto a CUDA device (Triton is not needed elsewhere).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kad.fast.quant import DEQUANTIZED_ROWS


@triton.jit
def _int8_mm_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # int8 [N, K]
    s_ptr,  # float32 [N]
    y_ptr,  # [M, N]
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rm[:, None] * stride_xm  # [BM, 1]
    w_rows = w_ptr + rn[:, None] * stride_wn  # [BN, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        cols = k + rk[None, :]  # [1, BK]
        a = tl.load(x_rows + cols, mask=(rm[:, None] < M) & (cols < K), other=0.0)
        b = tl.load(w_rows + cols, mask=(rn[:, None] < N) & (cols < K), other=0)  # [BN, BK]
        acc += tl.dot(a, tl.trans(b.to(a.dtype)))
    scale = tl.load(s_ptr + rn, mask=rn < N, other=0.0)
    acc = acc * scale[None, :]
    y = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def _tiles(m: int, n: int) -> tuple[int, int, int, int, int]:
    """BLOCK_M, BLOCK_N, BLOCK_K, warps, stages for an [m, ·] x [·, n] product."""
    if m <= 16:
        return 16, 32 if n >= 8192 else 16, 512, 4, 4
    return 64, 64, 128, 4, 3


@torch.library.custom_op("kad::int8_mm", mutates_args=())
def int8_mm(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(x qᵀ) · s``: x ``[M, K]`` (bfloat16 or float16), codes int8 ``[N, K]``, scale float32
    ``[N]`` -> ``[M, N]`` in x's dtype."""
    m, k = x.shape
    n = codes.shape[0]
    if m > DEQUANTIZED_ROWS or x.dtype == torch.float32:
        return (torch.mm(x, codes.t().to(x.dtype)).float() * scale).to(x.dtype)
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m, block_n, block_k, warps, stages = _tiles(m, n)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _int8_mm_kernel[grid](
        x, codes, scale, y, m, n, k, x.stride(0), codes.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return y


@int8_mm.register_fake
def _(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], codes.shape[0])
