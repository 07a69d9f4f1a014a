"""Decode attention on CUDA as two Triton kernels behind the torch op ``torch.ops.kad.
decode_attention`` (opaque to Inductor, so it runs inside compiled layers and CUDA graphs).

It computes what `kad.fast.llama.attend` computes for the few query tokens of a decoding step
(n ≤ `kad.fast.llama.DECODE_TOKENS`: a plain step, or a speculative verify of γ + 1 tokens),
``softmax(q kᵀ / √D, causal) v`` with grouped KV heads, straight from the pool's caches:

- **split over the context** (flash-decoding): program (b, h, s) takes KV head h of batch row b,
  with its whole group of G = H / Hkv query heads × n tokens as one ``[G·n, D]`` tile, over the
  s-th of ``splits`` equal parts of the columns the row uses. A batch of one row still spreads
  over the GPU's SMs, and a row reads only its own columns ``0 .. max(cols[b])``, not its width
  bucket's (the round's graph is captured for a bucket; the kernel stops where the row ends).
  Each part keeps an online softmax (running max m, sum l) and writes ``o = Σ p v / l`` and
  ``lse = m + log l`` (base 2) in float32;
- **combined** by a second kernel, one program per query row: ``out = Σ_s 2^(lse_s − M) o_s /
  Σ_s 2^(lse_s − M)``, M = max_s lse_s, written as ``[B, n, H·D]`` (with one part, as at large
  batches, the first kernel writes it itself).

Query i of row b sees the columns c ≤ cols[b, i] (its position, clamped to the width: exactly
the mask ``attend`` is given). Head dims that are not a power of two are padded to one in
registers (tiles of at least 16). Float32 inputs multiply in IEEE float32 (not TF32), so the
float32 GPU check covers the kernel. Imported by `kad.fast.runner.StaticRunner` on a CUDA device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _out_offset(b, kv_head, m, n, heads, GROUP: tl.constexpr, D: tl.constexpr):
    """Where query row m of (row b, KV head) starts in out ``[B, n, H·D]``: head kv_head·G +
    m // n, token m % n."""
    return (b * n + m % n) * (heads * D) + (kv_head * GROUP + m // n) * D


@triton.jit
def _split_kernel(
    q_ptr,  # [B, H, n, D]
    k_ptr,  # [R, Hkv, S, D] pool caches (D contiguous, v the same strides)
    v_ptr,
    rows_ptr,  # [B] pool row of each batch row
    cols_ptr,  # [B, n] last visible column of each query
    o_ptr,  # float32 [B, Hkv, SPLITS, G·n, D]
    lse_ptr,  # float32 [B, Hkv, SPLITS, G·n]
    out_ptr,  # [B, n, H·D] (written here when SPLITS = 1)
    n,
    heads,
    scale,  # 1/√D · log2(e)
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kr,
    stride_kh,
    stride_ks,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    m = tl.arange(0, BLOCK_M)  # query row: head kv_head·G + m // n, token m % n
    d = tl.arange(0, BLOCK_D)
    dims = d < D
    real = m < GROUP * n
    token = m % n
    head = kv_head * GROUP + m // n
    last = tl.load(cols_ptr + b * n + token, mask=real, other=-1)  # [BM]
    used = tl.max(last, axis=0) + 1  # columns this row reads
    part = tl.cdiv(tl.cdiv(used, SPLITS), BLOCK_N) * BLOCK_N
    lo = split * part
    hi = tl.minimum(lo + part, used)

    q_rows = q_ptr + b * stride_qb + head * stride_qh + token * stride_qn
    q = tl.load(q_rows[:, None] + d[None, :], mask=real[:, None] & dims[None, :], other=0.0)
    row = tl.load(rows_ptr + b)
    k_base = k_ptr + row * stride_kr + kv_head * stride_kh
    v_base = v_ptr + row * stride_kr + kv_head * stride_kh
    top = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max (base-2 scores)
    total = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    n_off = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        c = start + n_off  # [BN]
        inside = c < hi
        seen_cols = inside[:, None] & dims[None, :]
        k = tl.load(k_base + c[:, None] * stride_ks + d[None, :], mask=seen_cols, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BM, BN]
        s = tl.where(inside[None, :] & (c[None, :] <= last[:, None]), s, float("-inf"))
        new_top = tl.maximum(top, tl.max(s, axis=1))
        safe = tl.where(new_top == float("-inf"), 0.0, new_top)
        p = tl.exp2(s - safe[:, None])
        alpha = tl.exp2(top - safe)
        total = total * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + c[:, None] * stride_ks + d[None, :], mask=seen_cols, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        top = new_top

    seen = total > 0
    o = acc / tl.where(seen, total, 1.0)[:, None]
    if SPLITS == 1:  # the whole context in one part: the output itself
        out = out_ptr + _out_offset(b, kv_head, m, n, heads, GROUP, D)  # [BM]
        written = real[:, None] & dims[None, :]
        tl.store(out[:, None] + d[None, :], o.to(out_ptr.dtype.element_ty), mask=written)
    else:
        rows_out = ((b * tl.num_programs(1) + kv_head) * SPLITS + split) * (GROUP * n) + m
        lse = tl.where(seen, top + tl.log2(tl.where(seen, total, 1.0)), float("-inf"))
        tl.store(lse_ptr + rows_out, lse, mask=real)
        tl.store(o_ptr + rows_out[:, None] * D + d[None, :], o, mask=real[:, None] & dims[None, :])


@triton.jit
def _combine_kernel(
    o_ptr,  # float32 [B, Hkv, SPLITS, G·n, D]
    lse_ptr,  # float32 [B, Hkv, SPLITS, G·n]
    out_ptr,  # [B, n, H·D]
    n,
    heads,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    m = tl.program_id(2)  # one query row (`_out_offset`)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, BLOCK_D)
    dims = d < D
    rows = (b * tl.num_programs(1) + kv_head) * SPLITS + s  # [SPLITS] partial rows
    lse = tl.load(lse_ptr + rows * (GROUP * n) + m)  # [SPLITS]; split 0 always sees column 0
    weight = tl.exp2(lse - tl.max(lse, axis=0))  # empty splits: 0
    o = tl.load(
        o_ptr + (rows * (GROUP * n) + m)[:, None] * D + d[None, :],
        mask=(weight > 0)[:, None] & dims[None, :],
        other=0.0,
    )  # [SPLITS, BD]
    acc = tl.sum(weight[:, None] * o, axis=0) / tl.sum(weight, axis=0)  # [D]
    out = out_ptr + _out_offset(b, kv_head, m, n, heads, GROUP, D) + d
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=dims)


def _splits(batch: int, kv_heads: int, columns: int, block_n: int, device: torch.device) -> int:
    """Parts of the context per (row, KV head): enough programs for two per SM (a CPU, under
    Triton's interpreter, counts as 4), a power of two, no more than the pool's column blocks."""
    cuda = device.type == "cuda"
    sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 4
    want = triton.next_power_of_2(triton.cdiv(2 * sms, batch * kv_heads))
    return max(1, min(want, triton.next_power_of_2(triton.cdiv(columns, block_n)), 64))


@torch.library.custom_op("kad::decode_attention", mutates_args=())
def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor,
    cols: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """q ``[B, H, n, D]``; k_cache, v_cache ``[R, Hkv, S, D]`` (the same strides, D contiguous);
    rows ``[B]`` the pool row of each batch row; cols ``[B, n]`` each query's last visible column
    (< S) → ``[B, n, H·D]`` in q's dtype (module doc)."""
    batch, heads, n, dim = q.shape
    kv_heads = k_cache.shape[1]
    if q.stride(-1) != 1:
        q = q.contiguous()
    group = heads // kv_heads
    block_m = max(16, triton.next_power_of_2(group * n))
    block_d = max(16, triton.next_power_of_2(dim))
    block_n = 64 if block_d <= 64 else 32
    splits = _splits(batch, kv_heads, k_cache.shape[2], block_n, q.device)
    parts = (batch, kv_heads, splits, group * n) if splits > 1 else (1, 1, 1, 1)
    o = torch.empty(*parts, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(parts, dtype=torch.float32, device=q.device)
    out = torch.empty(batch, n, heads * dim, dtype=q.dtype, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _split_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, rows, cols.contiguous(), o, lse, out, n, heads, dim**-0.5 * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2),
        GROUP=group, D=dim, SPLITS=splits, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=block_d, PRECISION=precision, num_warps=4, num_stages=2,
    )  # fmt: skip
    if splits > 1:
        _combine_kernel[(batch, kv_heads, group * n)](
            o, lse, out, n, heads, GROUP=group, D=dim, SPLITS=splits, BLOCK_D=block_d, num_warps=2
        )
    return out


@decode_attention.register_fake
def _(q, k_cache, v_cache, rows, cols):
    batch, heads, n, dim = q.shape
    return q.new_empty(batch, n, heads * dim)
