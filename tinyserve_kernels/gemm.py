"""Tiled INT4 dequant GEMM in Triton (prefill): y = x @ dequantize(qweight, qzeros, scales) + bias.

Each program computes a [BLOCK_M, BLOCK_N] tile of y. Per K tile it loads the packed [BLOCK_K, BLOCK_N // 8] words,
unpacks and dequantizes them in registers (one row of scales and zero points per tile, because BLOCK_K divides the
group size), rounds them to the activation dtype and feeds tl.dot with an fp32 accumulator. Optional split-K runs
SPLIT_K programs over disjoint K ranges that write fp32 partials, summed afterwards in a fixed order (deterministic).

Shapes: x [M, K] fp16/bf16 · qweight [K, N // 8] int32 · qzeros [K // G, N // 8] int32 · scales [K // G, N] · y [M, N].
"""

import torch
import triton
import triton.language as tl

from tinyserve_kernels.layout import PACK_FACTOR
from tinyserve_kernels.triton_common import dot_in_fp32, interpreting, sum_partials, unpack_int4


def _configs() -> list[triton.Config]:
    configs = []
    for bm, bn, bk, warps, stages in [
        (16, 64, 64, 4, 4),
        (16, 128, 64, 4, 4),
        (32, 64, 64, 4, 4),
        (32, 128, 32, 4, 4),
        (64, 64, 64, 4, 3),
        (64, 128, 32, 4, 4),
        (64, 128, 64, 8, 3),
        (64, 256, 32, 8, 3),
        (128, 64, 64, 4, 3),
        (128, 128, 32, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 256, 32, 8, 3),
        (128, 256, 64, 8, 3),
    ]:
        configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages))
    return configs


def valid_block_k(block_k: int, group_size: int) -> bool:
    """A K tile must lie inside one quantization group, so that it needs one row of scales and zero points."""
    return group_size % block_k == 0


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    args = {**named_args, **kwargs}  # positional arguments arrive in named_args, constexpr keywords in kwargs
    G, M, N = args["G"], args["M"], args["N"]
    m_cap = max(16, triton.next_power_of_2(M))  # a 128-row tile for M = 17 would be mostly masked out
    n_cap = max(64, triton.next_power_of_2(N))
    kept = [
        c for c in configs
        if valid_block_k(c.kwargs["BLOCK_K"], G) and c.kwargs["BLOCK_M"] <= m_cap and c.kwargs["BLOCK_N"] <= n_cap
    ]
    if not kept:  # tiny groups (G = 16): the smallest tiles, with BLOCK_K = 16
        kept = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 8}, num_warps=4, num_stages=2)]
    # Benchmarking configs through the numpy interpreter measures nothing: take the first valid one.
    return kept[:1] if interpreting() else kept


@triton.jit
def _int4_gemm_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_om,
    M_BUCKET,  # next power of two of M: only the autotuning key, so tuned configs are reused across nearby M
    G: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped program order: GROUP_M row tiles share each column tile while it is hot in L2 (Triton tutorial 03).
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    NW: tl.constexpr = BLOCK_N // 8  # packed words per tile row
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = pid_n * NW + tl.arange(0, NW)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_w = offs_w < N // 8
    rk = tl.arange(0, BLOCK_K)

    # This split's K tiles: a contiguous range (K is a multiple of G, G of BLOCK_K: no K tail to mask).
    k_tiles = K // BLOCK_K
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    kt_start = pid_k * per_split
    kt_end = min(kt_start + per_split, k_tiles)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(kt_start, kt_end):
        offs_k = kt * BLOCK_K + rk
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        words = tl.load(qw_ptr + offs_k[:, None] * (N // 8) + offs_w[None, :], mask=mask_w[None, :], other=0)
        g = (kt * BLOCK_K) // G
        zwords = tl.load(qz_ptr + g * (N // 8) + offs_w, mask=mask_w, other=0)
        scale = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        q = unpack_int4(words, BLOCK_K, BLOCK_N)  # [BLOCK_K, BLOCK_N]
        z = unpack_int4(zwords[None, :], 1, BLOCK_N)  # [1, BLOCK_N]
        # (q - z) is exact in fp32; one rounding to the activation dtype, as in the reference dequant.
        w = ((q - z).to(tl.float32) * scale[None, :]).to(x.dtype)
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc)
        else:
            acc = tl.dot(x, w, acc)

    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])
    else:
        # fp32 partials [SPLIT_K, M, N], summed in split order by sum_partials.
        part = out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(part, acc, mask=mask_m[:, None] & mask_n[None, :])


_int4_gemm_tuned = triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "G"], prune_configs_by={"early_config_prune": _prune})(
    _int4_gemm_kernel
)


def choose_split_k(M: int, N: int, K: int, block_m: int, block_n: int, block_k: int, num_sms: int) -> int:
    """Split K only when the output tiles alone would leave most SMs idle, and keep >= 4 K tiles per split."""
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    split = 1
    while split < 4 and tiles * split * 2 <= num_sms and (K // block_k) // (split * 2) >= 4:
        split *= 2
    return split


def int4_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    split_k: int = 1,
    config: dict | None = None,
) -> torch.Tensor:
    """y = x @ W + bias for x [M, K] (fp16 or bf16, row-major in K) and the packed W; returns [M, N] in x's dtype.

    `config` (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) bypasses autotuning: tests use it to cover
    tile shapes, and a caller that has tuned offline can pin one.
    """
    M, K = x.shape
    N = qweight.shape[1] * PACK_FACTOR
    G = group_size
    if x.stride(1) != 1:
        x = x.contiguous()
    if K % G or G % 16:
        raise ValueError(f"int4_gemm needs a group size that divides K and is a multiple of 16, got G={G}, K={K}")
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return out
    target = out if split_k == 1 else torch.empty((split_k, M, N), device=x.device, dtype=torch.float32)
    args = (x, qweight, qzeros, scales, bias if bias is not None else scales, target, M, N, K, x.stride(0), target.stride(-2), triton.next_power_of_2(M))
    flags = dict(G=G, HAS_BIAS=bias is not None and split_k == 1, SPLIT_K=split_k, DOT_FP32=dot_in_fp32(x.dtype))

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), split_k)

    if config is None:
        _int4_gemm_tuned[grid](*args, **flags)
    else:
        cfg = dict(config)
        if not valid_block_k(cfg["BLOCK_K"], G):
            raise ValueError(f"BLOCK_K={cfg['BLOCK_K']} does not divide the group size {G}")
        _int4_gemm_kernel[grid](*args, **flags, **cfg)
    if split_k > 1:
        sum_partials(target, bias, out)
    return out
