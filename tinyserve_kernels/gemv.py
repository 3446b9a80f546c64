"""Split-K INT4 GEMV in Triton (decode, M from 1 to GEMV_MAX_M rows): y = x @ dequantize(W) + bias.

Decode is memory-bound: the packed weight is read once and everything else is small. One program owns a BLOCK_N
column strip and one of SPLIT_K contiguous K ranges, and handles all M rows of x at once, so every packed word is
loaded exactly once per call. Splitting K gives small-N layers (N = 576 on SmolLM2) enough programs to fill the GPU.
With SPLIT_K > 1 the partials are fp32 [SPLIT_K, M, N], summed in a fixed order (deterministic) with the bias and
the cast fused into that sum; with SPLIT_K = 1 the program writes y directly.

M = 1 multiplies and reduces along K on CUDA cores (tl.dot needs 16 rows); 2..16 rows are padded to one 16-row tile
and use tl.dot, which costs the same as one row on tensor cores while the weight stream is the bottleneck.

Shapes: x [M, K] fp16/bf16 · qweight [K, N // 8] int32 · qzeros [K // G, N // 8] int32 · scales [K // G, N] · y [M, N].
"""

import torch
import triton
import triton.language as tl

from tinyserve_kernels.layout import PACK_FACTOR
from tinyserve_kernels.triton_common import dot_in_fp32, interpreting, sum_partials, unpack_int4

GEMV_MAX_M = 16  # rows handled by one padded 16-row tile


def _configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
        for bn, bk, w, st in [
            (64, 128, 4, 3),
            (128, 64, 4, 3),
            (128, 128, 4, 3),
            (256, 32, 4, 4),
            (256, 64, 8, 3),
            (256, 128, 8, 3),
            (512, 32, 8, 4),
            (64, 32, 2, 4),
            (128, 32, 4, 4),
        ]
    ]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    args = {**named_args, **kwargs}  # positional arguments arrive in named_args, constexpr keywords in kwargs
    G, N = args["G"], args["N"]
    n_cap = max(64, triton.next_power_of_2(N))
    kept = [c for c in configs if G % c.kwargs["BLOCK_K"] == 0 and c.kwargs["BLOCK_N"] <= n_cap]
    if not kept:  # tiny groups (G = 16)
        kept = [triton.Config({"BLOCK_N": 64, "BLOCK_K": 16}, num_warps=2, num_stages=2)]
    return kept[:1] if interpreting() else kept


@triton.jit
def _int4_gemv_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_om,
    G: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,  # 1, or 16 for 2..16 rows
    DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    NW: tl.constexpr = BLOCK_N // 8
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = pid_n * NW + tl.arange(0, NW)
    mask_n = offs_n < N
    mask_w = offs_w < N // 8
    rk = tl.arange(0, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    mask_m = rm < M

    k_tiles = K // BLOCK_K
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    kt_start = pid_k * per_split
    kt_end = min(kt_start + per_split, k_tiles)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # M = 1: products are accumulated elementwise and summed over K once after the loop, so the K loop does no
    # cross-thread reductions.
    acc_k = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for kt in range(kt_start, kt_end):
        offs_k = kt * BLOCK_K + rk
        words = tl.load(qw_ptr + offs_k[:, None] * (N // 8) + offs_w[None, :], mask=mask_w[None, :], other=0)
        g = (kt * BLOCK_K) // G
        zwords = tl.load(qz_ptr + g * (N // 8) + offs_w, mask=mask_w, other=0)
        scale = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        q = unpack_int4(words, BLOCK_K, BLOCK_N)
        z = unpack_int4(zwords[None, :], 1, BLOCK_N)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        # Round the weight to the activation dtype like the GEMM and the reference, then accumulate in fp32.
        w = ((q - z).to(tl.float32) * scale[None, :]).to(x.dtype)
        if BLOCK_M == 1:
            acc_k += x.to(tl.float32).reshape(BLOCK_K, 1) * w.to(tl.float32)
        elif DOT_FP32:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc)
        else:
            acc = tl.dot(x, w, acc)

    if BLOCK_M == 1:
        acc = tl.sum(acc_k, axis=0)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # fp32 partials [SPLIT_K, M, N], summed in split order by sum_partials.
        tl.store(out_ptr + pid_k * M * N + rm[:, None] * N + offs_n[None, :], acc, mask=mask)


_int4_gemv_tuned = triton.autotune(configs=_configs(), key=["N", "K", "G", "BLOCK_M", "SPLIT_K"], prune_configs_by={"early_config_prune": _prune})(
    _int4_gemv_kernel
)


def choose_split_k(N: int, K: int, group_size: int, num_sms: int) -> int:
    """Enough column strips x K splits for ~2 waves on the GPU (assuming 128-column strips), >= 2 K tiles per split."""
    strips = triton.cdiv(N, 128)
    k_tiles = K // min(group_size, 128)
    split = 1
    while strips * split < 2 * num_sms and split * 2 <= 32 and k_tiles // (split * 2) >= 2:
        split *= 2
    return split


def int4_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    split_k: int = 1,
    config: dict | None = None,
) -> torch.Tensor:
    """y = x @ W + bias for x [M, K] with M <= GEMV_MAX_M (fp16 or bf16); returns [M, N] in x's dtype.

    `config` (BLOCK_N, BLOCK_K, num_warps, num_stages) bypasses autotuning.
    """
    M, K = x.shape
    N = qweight.shape[1] * PACK_FACTOR
    G = group_size
    if not 1 <= M <= GEMV_MAX_M:
        raise ValueError(f"int4_gemv handles 1..{GEMV_MAX_M} rows, got {M}")
    if K % G or G % 16:
        raise ValueError(f"int4_gemv needs a group size that divides K and is a multiple of 16, got G={G}, K={K}")
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    target = out if split_k == 1 else torch.empty((split_k, M, N), device=x.device, dtype=torch.float32)
    args = (x, qweight, qzeros, scales, bias if bias is not None else scales, target, M, N, K, x.stride(0), target.stride(-2))
    flags = dict(
        G=G, HAS_BIAS=bias is not None and split_k == 1, SPLIT_K=split_k, BLOCK_M=1 if M == 1 else 16,
        DOT_FP32=dot_in_fp32(x.dtype),
    )

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), split_k)

    if config is None:
        _int4_gemv_tuned[grid](*args, **flags)
    else:
        if G % config["BLOCK_K"]:
            raise ValueError(f"BLOCK_K={config['BLOCK_K']} does not divide the group size {G}")
        _int4_gemv_kernel[grid](*args, **flags, **config)
    if split_k > 1:
        sum_partials(target, bias, out)
    return out
