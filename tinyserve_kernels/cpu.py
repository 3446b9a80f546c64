"""CPU INT4 linear: torch's int4 weight-only kernel for small M, dequantize + bf16 matmul (oneDNN) for large M.

torch ships `aten._convert_weight_to_int4pack_for_cpu` / `aten._weight_int4pack_mm_for_cpu` (AVX-512/AVX2 kernels,
bf16 activations, fp32 accumulation). Its convention differs from ours:

    ours (tinyserve_kernels/layout.py):  W[k, n] = (q - z) * s                    q, z in 0..15, s fp16, per group of G rows of K
    torch's int4pack op:       W[k, n] = (q - 8) * scale + zero         scale_and_zero [K // G, N, 2] in bf16

Expanding ours, (q - z) * s = (q - 8) * s + (8 - z) * s, so scale = s and zero = (8 - z) * s, computed in fp32 and
then rounded to bf16. Where bf16 rounding enters on this path (everything else is exact or fp32):
  1. the scale: fp16 -> bf16 (relative error up to 2^-9), and zero = (8 - z) * s, rounded once to bf16;
  2. the activations, rounded to bf16 when the caller passes fp32;
  3. the output, rounded to bf16 (then cast back to the caller's dtype).
The kernel forms each weight in fp32 as (q - 8) * scale + zero and accumulates in fp32.

Constraints of the op and how they are met: N must be a multiple of 16 (we pad N to a multiple of 64 with zero
columns, which also gives the op's 64-column blocks a single layout, and slice the output); the op's group size must
be 32, 64, 128 or 256 (a larger G that one of them divides is expressed by repeating its scales; otherwise the layer
is kept as a dense bf16 weight, see prepare in dispatch.py).

Large M: the op dequantizes each weight block once per 4 rows of x, so its cost grows with M and a dense bf16 GEMM
(AMX/AVX-512 through oneDNN) wins beyond a few rows. Two ways to get the dense weight are offered: dequantize per
call in cache-sized column chunks (no memory cost) or a bf16 copy cached at load time (2 bytes per weight: an
explicit option of prepare), held prepacked in oneDNN's layout (hold_dense). On CPUs without bf16 GEMMs (AVX2 only)
the cached copy is fp32 (4 bytes per weight), and the per-call dequantize is not offered (the op packs another
layout). The thresholds live in dispatch.py and come from scripts/bench_kernels.py.
"""

from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from tinyserve_kernels.layout import dequantize, unpack

OP_GROUP_SIZES = (256, 128, 64, 32)  # group sizes the int4pack op accepts, largest first
N_BLOCK = 64  # the op packs N in blocks of 64 columns on AVX-512 builds; we pad N to a multiple of it
INNER_K_TILES = 2  # ignored by the CPU conversion; the CUDA variant of the op takes the same argument
# The row count oneDNN picks its packed weight layout for (hold_dense): 32, 128 and 512 ran alike at 9-512 rows, 1 slower.
DENSE_PACK_ROWS = 128
# Whether dense weights are held prepacked for oneDNN (hold_dense, dense_linear). A constant, not a test of the tensor:
# under torch.compile the weight is a fake tensor that does not say it is a oneDNN one.
PREPACK_DENSE = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
# The dense prompt weights' dtype: bf16 where oneDNN runs bf16 GEMMs (AVX512-BF16, AMX); fp32 elsewhere, where a bf16
# matmul is emulated (AVX2 only: a 512-token prefill's 120 dense matmuls averaged 636 ms in bf16, 6.1 ms in fp32).
DENSE_DTYPE = torch.bfloat16 if PREPACK_DENSE else torch.float32


@dataclass(frozen=True, eq=False)
class CpuPacked:
    """One INT4 linear in the layout of torch's CPU int4 op."""

    packed: torch.Tensor  # [Np, K // 2] uint8 (Np = N rounded up to a multiple of 64), op-specific nibble order
    scale_zero: torch.Tensor  # [K // op_group, Np, 2] bf16: (scale, zero) with W = (q - 8) * scale + zero
    op_group: int  # group size given to the op (divides the layer's group size)
    out_features: int  # N, before padding
    decodable: bool  # whether dequant_matmul can read this build's packed layout (packed_layout_is_known)


def op_group_size(group_size: int) -> int | None:
    """The largest group size the op accepts that divides ours (a scale repeated per sub-group is the same weight)."""
    return next((g for g in OP_GROUP_SIZES if group_size % g == 0), None)


def torch_scale_zero(qzeros: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our (integer zero point z, scale s) -> torch's (scale, zero), both [K // G, N] fp32: scale = s, zero = (8 - z) * s."""
    z = unpack(qzeros).float()
    s = scales.float()
    return s, (8.0 - z) * s


def pack_for_cpu(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> CpuPacked:
    """Convert the file layout to the op's layout (once, at load time). The group size must have an op_group_size."""
    N = scales.shape[1]
    op_group = op_group_size(group_size)
    if op_group is None:
        raise ValueError(f"group size {group_size} is not a multiple of 32: torch's CPU int4 op cannot take it")
    Np = -(-N // N_BLOCK) * N_BLOCK
    codes = unpack(qweight).t()  # [N, K] int32 in 0..15
    scale, zero = torch_scale_zero(qzeros, scales)  # [K // G, N]
    if Np != N:
        codes = F.pad(codes, (0, 0, 0, Np - N))
        scale, zero = F.pad(scale, (0, Np - N)), F.pad(zero, (0, Np - N))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), INNER_K_TILES)
    reps = group_size // op_group
    scale_zero = torch.stack([scale, zero], dim=-1).repeat_interleave(reps, dim=0).to(torch.bfloat16).contiguous()
    return CpuPacked(packed, scale_zero, op_group, N, packed_layout_is_known())


def int4pack_linear(x: torch.Tensor, w: CpuPacked) -> torch.Tensor:
    """x [M, K] -> [M, N] bf16 through torch's int4 op (x is rounded to bf16 first)."""
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), w.packed, w.op_group, w.scale_zero)
    return y if y.shape[1] == w.out_features else y[:, : w.out_features]


@cache
def packed_layout_is_known() -> bool:
    """Whether dequant_matmul can read this build's op layout: checked once on a probe, not assumed.

    On AVX-512 builds each 64-column block stores, for every k, 32 bytes whose low nibbles are columns 0..31 and high
    nibbles columns 32..63. AVX2 and generic builds use other arrangements; there dequant_matmul is not used and
    large M falls back to the op itself (or to a cached dense weight).
    """
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (2 * N_BLOCK, 64), dtype=torch.int32, generator=g)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INNER_K_TILES)
    if tuple(packed.shape) != (2 * N_BLOCK, 32):
        return False
    decoded = _decode_codes(packed.view(2, 64, 32), torch.empty((64, 2, N_BLOCK), dtype=torch.uint8))  # [K, 2, 64]
    return torch.equal(decoded.reshape(64, 2 * N_BLOCK).t().int(), codes)


def _decode_codes(blocks: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """blocks [B, K, 32] uint8 (B 64-column blocks in the AVX-512 op layout) -> out [K, B, 64] uint8 codes."""
    b = blocks.transpose(0, 1)  # [K, B, 32]
    torch.bitwise_and(b, 15, out=out[..., : N_BLOCK // 2])
    torch.bitwise_right_shift(b, 4, out=out[..., N_BLOCK // 2 :])
    return out


CHUNK_WEIGHTS = 2**21  # weights dequantized per step of dequant_matmul: a few MB, so the passes stay in cache


def dequant_matmul(x: torch.Tensor, w: CpuPacked) -> torch.Tensor:
    """x [M, K] @ W -> [M, N] bf16, dequantizing W per call in column chunks (only when w.decodable).

    Each chunk is decoded from the op's layout to W = (q - 8) * scale + zero (the op's own numbers, computed in fp32
    by addcmul on bf16 operands and rounded once to bf16) into a reused cache-sized buffer, then multiplied by a bf16
    GEMM. Nothing the size of the whole weight is ever allocated, and each elementwise pass runs out of cache.
    A custom op, so that torch.compile sees one call (dynamo cannot trace the strided out= writes inside).
    """
    return torch.ops.tinyserve.cpu_dequant_matmul(x, w.packed, w.scale_zero, w.out_features)


@torch.library.custom_op("tinyserve::cpu_dequant_matmul", mutates_args=())
def _dequant_matmul(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, out_features: int) -> torch.Tensor:
    Np, K = packed.shape[0], packed.shape[1] * 2
    ng = scale_zero.shape[0]
    blocks = packed.view(Np // N_BLOCK, K, N_BLOCK // 2)
    scale = scale_zero[..., 0].contiguous()  # [K // g, Np]; contiguous operands keep addcmul vectorized
    zero = scale_zero[..., 1].contiguous()
    x = x.to(torch.bfloat16)
    out = torch.empty((x.shape[0], Np), dtype=torch.bfloat16)
    n_blocks = Np // N_BLOCK
    step = min(n_blocks, max(1, CHUNK_WEIGHTS // (K * N_BLOCK)))  # 64-column blocks per chunk
    codes_buf = torch.empty(K * step * N_BLOCK, dtype=torch.uint8)
    w_buf = torch.empty(K * step * N_BLOCK, dtype=torch.bfloat16)
    for b0 in range(0, n_blocks, step):
        nb = min(step, n_blocks - b0)
        cols = slice(b0 * N_BLOCK, (b0 + nb) * N_BLOCK)
        # Contiguous views (also for a short last chunk): oneDNN's GEMM is much slower on a strided weight.
        c = codes_buf[: K * nb * N_BLOCK].view(K, nb, N_BLOCK)
        wc = w_buf[: K * nb * N_BLOCK].view(K, nb * N_BLOCK)
        _decode_codes(blocks[b0 : b0 + nb], c)
        wc.copy_(c.view(torch.int8).sub_(8).view(K, nb * N_BLOCK))  # q - 8 in -8..7, exact in bf16
        wg = wc.view(ng, K // ng, nb * N_BLOCK)
        torch.addcmul(zero[:, None, cols], wg, scale[:, None, cols], out=wg)
        out[:, cols] = x @ wc
    return out[:, :out_features].contiguous() if Np != out_features else out


@_dequant_matmul.register_fake
def _(x, packed, scale_zero, out_features):
    return x.new_empty((x.shape[0], out_features), dtype=torch.bfloat16)


def hold_dense(weight_kn: torch.Tensor) -> torch.Tensor:
    """A dense weight [K, N] (bf16; fp32 on CPUs without bf16 GEMMs) as dense_linear takes it: prepacked in oneDNN's
    GEMM layout where this torch has oneDNN with bf16 (a matmul on the plain weight repacks it on every call: 1.2-1.4x
    slower at 100-512 rows on cold weights, BENCHMARKS.md, "Prepacked dense prompt weights"), else as it is."""
    if PREPACK_DENSE:
        return torch.ops.mkldnn._reorder_linear_weight(weight_kn.t().contiguous(), DENSE_PACK_ROWS)
    return weight_kn


def dense_copy(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
               dtype: torch.dtype = DENSE_DTYPE) -> torch.Tensor:
    """The packed weight (file layout) as a dense [K, N] (bf16 or fp32), held as dense_linear takes it (hold_dense):
    computed in fp32, rounded once."""
    return hold_dense(dequantize(qweight, qzeros, scales.float(), group_size).to(dtype))


def dense_linear(x: torch.Tensor, weight: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [M, K] @ a dense weight held by hold_dense (N' >= N columns, padded ones dropped) -> [M, N] in the weight's
    dtype (x is rounded to it first)."""
    x = x.to(weight.dtype)
    y = torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "") if PREPACK_DENSE else x @ weight
    return y if y.shape[1] == out_features else y[:, :out_features]


def quantize_int8_rows(weight: torch.Tensor, rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (codes [N, K] int8, scales [N] fp32): weight-only int8 with one symmetric scale per output row,
    max|w| / 127, round to nearest, `rows` rows at a time (bounded memory). W[n, :] = codes[n, :] * scales[n]."""
    N = weight.shape[0]
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(N, dtype=torch.float32, device=weight.device)
    for a in range(0, N, rows):
        w = weight[a : a + rows].to(torch.float32, copy=True)  # a copy even for fp32 weights: divided in place below
        s = w.abs().amax(dim=1).clamp_(min=1e-12).div_(127.0)
        q[a : a + rows] = w.div_(s[:, None]).round_().clamp_(-127, 127)
        scales[a : a + rows] = s
    return q, scales

