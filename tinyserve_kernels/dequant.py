"""Triton dequantization of the packed layout to a dense [K, N] weight, for "dequantize, then cuBLAS" at large M.

At large M the GEMM is compute-bound: one pass that writes W in fp16/bf16 (K * N * 2 bytes, amortized over M rows)
lets cuBLAS's tensor-core GEMM do the rest. dispatch.py picks this path above a threshold on M.

Shapes: qweight [K, N // 8] int32 · qzeros [K // G, N // 8] int32 · scales [K // G, N] -> W [K, N].
"""

import torch
import triton
import triton.language as tl

from tinyserve_kernels.layout import PACK_FACTOR
from tinyserve_kernels.triton_common import unpack_int4


@triton.jit
def _dequant_kernel(
    qw_ptr, qz_ptr, s_ptr, out_ptr,
    K, N,
    G: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    NW: tl.constexpr = BLOCK_N // 8
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = pid_n * NW + tl.arange(0, NW)
    mask_k = offs_k < K
    mask_n = offs_n < N
    mask_w = offs_w < N // 8
    words = tl.load(qw_ptr + offs_k[:, None] * (N // 8) + offs_w[None, :], mask=mask_k[:, None] & mask_w[None, :], other=0)
    # Rows of one tile may span several groups (any G): gather scales and zero points per row.
    g = offs_k // G
    zwords = tl.load(qz_ptr + g[:, None] * (N // 8) + offs_w[None, :], mask=mask_k[:, None] & mask_w[None, :], other=0)
    scale = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
    q = unpack_int4(words, BLOCK_K, BLOCK_N)
    z = unpack_int4(zwords, BLOCK_K, BLOCK_N)
    w = (q - z).to(tl.float32) * scale.to(tl.float32)
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_n[None, :])


def dequantize_triton(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """The packed weight as a dense [K, N] tensor of `dtype`, computed in fp32 and rounded once (as layout.dequantize)."""
    K = qweight.shape[0]
    N = qweight.shape[1] * PACK_FACTOR
    out = torch.empty((K, N), device=qweight.device, dtype=dtype)
    BLOCK_K, BLOCK_N = 32, 128
    grid = (triton.cdiv(K, BLOCK_K), triton.cdiv(N, BLOCK_N))
    _dequant_kernel[grid](qweight, qzeros, scales, out, K, N, G=group_size, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N)
    return out
