"""The CUDA kernels of `kad.fast` (Triton), run on CPU by Triton's interpreter against the
reference computations they replace: the split-context decode attention against
`kad.fast.llama.attend`, the int8 weight-only product against dequantize-and-matmul.

The interpreter multiplies float32 and float16 tiles correctly (its bfloat16 products are not
reliable), so the kernels are checked in those dtypes here and in bfloat16 by the GPU check.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def kernels():
    """The kernel modules, interpreted on CPU (conftest sets TRITON_INTERPRET there)."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU, and Triton's interpreter is off")
    attention = importlib.import_module("kad.fast.triton_attention")
    int8 = importlib.import_module("kad.fast.triton_int8")
    return attention, int8


# (batch, heads, kv heads, head dim, tokens, pool columns): one KV head per query head, groups
# of 4 and of 5 (Qwen3-14B's 40/8), a speculative verify of γ + 1 = 6 tokens, head dim 128, and
# head dims that are not a power of two (the built-in proxy's 24).
SHAPES = [
    (1, 8, 2, 64, 1, 300),
    (3, 4, 4, 32, 4, 200),
    (2, 10, 2, 64, 6, 150),
    (2, 4, 1, 128, 2, 70),
    (1, 4, 4, 24, 3, 120),
    (2, 2, 1, 80, 1, 100),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_attention_equals_attend(kernels, shape, dtype) -> None:
    attention, _ = kernels
    batch, heads, kv_heads, dim, n, slots = shape
    gen = torch.Generator().manual_seed(sum(shape))
    pool_rows = batch + 2
    q = torch.randn(batch, heads, n, dim, generator=gen).to(dtype)
    k_cache = torch.randn(pool_rows, kv_heads, slots, dim, generator=gen).to(dtype)
    v_cache = torch.randn(pool_rows, kv_heads, slots, dim, generator=gen).to(dtype)
    rows = torch.randperm(pool_rows, generator=gen)[:batch]  # rows need not be consecutive
    width = slots - 10  # a width bucket narrower than the pool
    lengths = torch.randint(0, width, (batch,), generator=gen)
    lengths[0] = width - 2  # a row whose drafts run past the width: clamped, as the runner does
    positions = lengths[:, None] + torch.arange(n)  # [B, n]
    cols = positions.clamp(max=width - 1)
    mask = (torch.arange(width) <= positions.unsqueeze(-1))[:, None, None]  # [B, 1, 1, n, W]
    expected = attention_reference(q, k_cache[rows, :, :width], v_cache[rows, :, :width], mask)
    got = attention.decode_attention(q, k_cache, v_cache, rows, cols)
    assert got.dtype == dtype and got.shape == expected.shape
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.float(), expected, atol=tolerance, rtol=tolerance)


def attention_reference(q, k_rows, v_rows, mask) -> torch.Tensor:
    """`kad.fast.llama.attend` in float32 (the kernel keeps its scores in float32)."""
    from kad.fast.llama import attend

    return attend(q.float(), k_rows.float(), v_rows.float(), mask)


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_int8_product_equals_dequantized_matmul(kernels, rows) -> None:
    _, int8 = kernels
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=gen).half()
    codes = torch.randint(-127, 128, (40, 96), generator=gen, dtype=torch.int8)
    scale = torch.rand(40, generator=gen) / 100
    expected = (x.float() @ codes.float().t()) * scale
    got = int8.int8_mm(x, codes, scale)
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-3)
