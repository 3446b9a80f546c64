"""Pieces shared by the Triton INT4 kernels: nibble unpacking, the split-K reduction, interpreter quirks.

Packed layout (see tinyserve_kernels/layout.py): column 8j + c of a row sits in int32 word j at bit shift 4 * (c // 2) + 16 * (c % 2).
"""

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels through its numpy interpreter (TRITON_INTERPRET=1, the CPU-only CI)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Triton 3.9's interpreter computes tl.dot on bf16 operands from their raw bits (garbage results; fp16 is fine).
    (It also truncates fp32 -> bf16 casts instead of rounding to nearest; the tests' reference models that.)

    Under the interpreter the kernels therefore upcast bf16 tiles to fp32 right before tl.dot. The weights are still
    rounded to bf16 first, so the numbers match what the compiled kernel computes on a GPU (fp32 accumulation).
    """
    return interpreting() and dtype == torch.bfloat16


@triton.jit
def unpack_int4(words, ROWS: tl.constexpr, COLS: tl.constexpr):
    """[ROWS, COLS // 8] int32 words -> [ROWS, COLS] int32 codes in 0..15, columns in natural order.

    Each word is repeated 8 times along the columns (broadcast + reshape keeps row-major order, so column n of the
    result holds word n // 8), then shifted by the AWQ bit offset of column n % 8 and masked. The shift is arithmetic
    on int32, so the sign bits it drags in are removed by the mask.
    """
    repeated = tl.reshape(tl.broadcast_to(words[:, :, None], (ROWS, COLS // 8, 8)), (ROWS, COLS))
    c = tl.arange(0, COLS) % 8
    shifts = (c // 2) * 4 + (c % 2) * 16
    return (repeated >> shifts[None, :]) & 0xF


@triton.jit
def _sum_partials_kernel(
    partials_ptr,  # [SPLIT_K, M, N] fp32, contiguous
    bias_ptr,  # [N] or a dummy when HAS_BIAS is False
    out_ptr,  # [M, N] in the activation dtype, row stride stride_om
    M,
    N,
    stride_om,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Partials are summed in split order 0, 1, 2, ...: the result does not depend on which program finished first.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(partials_ptr + s * M * N + offs, mask=mask, other=0.0)
    n = offs % N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=mask, other=0.0).to(tl.float32)
    m = offs // N
    tl.store(out_ptr + m * stride_om + n, acc.to(out_ptr.dtype.element_ty), mask=mask)


def sum_partials(partials: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """Deterministic split-K epilogue: out = sum over splits of partials (+ bias), rounded once to out's dtype.

    partials: [SPLIT_K, M, N] fp32; bias: [N] or None; out: [M, N].
    """
    split_k, M, N = partials.shape
    BLOCK = 1024
    grid = (triton.cdiv(M * N, BLOCK),)
    _sum_partials_kernel[grid](
        partials, bias if bias is not None else partials, out, M, N, out.stride(0),
        SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=BLOCK,
    )
    return out
