"""The INT4 linear of the torch-op paths: one entry point that picks the kernel by device and by M (rows of x).

    w = prepare(qweight, qzeros, scales, group_size)   # once, at load time, on the device the layer runs on
    y = int4_linear(x, w, bias)                         # x: [..., K] -> y: [..., N], in x's dtype

On CUDA int4_linear calls torch.ops.tinyserve.int4_linear on the file tensors (Triton GEMV/GEMM or dequant + cuBLAS),
a custom op with a fake implementation so CUDA-graph capture and torch.compile see one opaque call. On CPU it calls
torch's int4 op, a dense copy cached at load time (bf16; fp32 on CPUs without bf16 GEMMs), or a per-call dequant + matmul (tinyserve_kernels/cpu.py).
Our own CPU kernels (cpu_native.py) are not chosen here: the cpu-native backend holds them (tinyserve/runtime/backends/).
Thresholds are rows of x, from scripts/bench_kernels.py (BENCHMARKS.md, "INT4 kernels (issue 3)").
"""

from dataclasses import dataclass

import torch

from tinyserve_kernels import cpu
from tinyserve_kernels.layout import PACK_FACTOR, check_shapes, dequantize, resolve_group_size

# CPU: torch's int4 op beats a bf16 matmul (even on a cached dense weight) up to this M; its rows are also
# batch-invariant only up to here (beyond it a dense GEMM with another summation order takes over).
CPU_INT4PACK_MAX_M = 8
# CPU without a cached dense weight: from this M, per-call dequantize + bf16 matmul beats the int4 op.
CPU_DEQUANT_MIN_M = 96
# CUDA, provisional (no GPU has measured them yet): one padded 16-row tensor-core tile for the GEMV; dequantize +
# cuBLAS from 256 rows as vLLM's AWQ heuristic.
CUDA_GEMV_MAX_M = 16
CUDA_DEQUANT_MIN_M = 256


@dataclass(frozen=True, eq=False)  # eq=False: compare layers by identity, never tensor by tensor
class Int4Weights:
    """One packed INT4 linear prepared for its device (see tinyserve_kernels/layout.py for the file layout)."""

    qweight: torch.Tensor | None  # [K, N // 8] int32, file layout (kept on CUDA; released on CPU after conversion)
    qzeros: torch.Tensor | None  # [K // G, N // 8] int32 (idem)
    scales: torch.Tensor | None  # [K // G, N] fp16 (idem)
    group_size: int  # G (already resolved: never -1)
    in_features: int  # K
    out_features: int  # N
    int4pack: cpu.CpuPacked | None = None  # CPU: torch's int4 layout (None when the op cannot take this group size)
    dense: torch.Tensor | None = None  # CPU: cpu.DENSE_DTYPE, as cpu.hold_dense keeps it, when cached at load time or G unsupported

    @property
    def nbytes(self) -> int:
        """Bytes this layer holds on its device (what a one-row call reads, plus any cached dense weight)."""
        tensors = [self.qweight, self.qzeros, self.scales, self.dense]
        if self.int4pack is not None:
            tensors += [self.int4pack.packed, self.int4pack.scale_zero]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def prepare(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int, cpu_dense_cache: bool = False) -> Int4Weights:
    """Check the packed tensors and convert them for their device (they must already be on it).

    cpu_dense_cache (CPU only): also keep a dense copy of the weight (cpu.DENSE_DTYPE: 2 bytes per weight on top of ~0.5, 4 in fp32) so
    prompts of more than CPU_INT4PACK_MAX_M rows run a plain dense matmul instead of dequantizing every call. A group
    size torch's CPU op cannot take (not a multiple of 32) is held dense only.
    """
    K = qweight.shape[0]
    G = resolve_group_size(group_size, K)
    check_shapes(qweight, qzeros, scales, G)
    N = qweight.shape[1] * PACK_FACTOR
    if qweight.device.type != "cpu":
        return Int4Weights(qweight, qzeros, scales, G, K, N)
    op_takes_g = cpu.op_group_size(G) is not None
    dense = None
    if cpu_dense_cache or not op_takes_g:
        dense = cpu.dense_copy(qweight, qzeros, scales, G)
    packed = cpu.pack_for_cpu(qweight, qzeros, scales, G) if op_takes_g else None
    return Int4Weights(None, None, None, G, K, N, int4pack=packed, dense=dense)


def choose_path(device_type: str, M: int, *, group_size: int = 128, has_int4pack: bool = True, has_dense: bool = False,
                can_dequant: bool = True) -> str:
    """The kernel for M rows of x. group_size matters on CUDA (the fused kernels need a multiple of 16); on CPU, what
    prepare built: torch's int4 form (none for group sizes the op cannot take), a cached dense copy, and whether this
    torch build's int4 layout is one dequant_matmul can read."""
    if device_type == "cuda":
        if group_size % 16:
            return "dequant_matmul"
        if M <= CUDA_GEMV_MAX_M:
            return "gemv"
        return "gemm" if M < CUDA_DEQUANT_MIN_M else "dequant_matmul"
    if not has_int4pack:
        return "cpu_dense_cached"
    if M <= CPU_INT4PACK_MAX_M:
        return "int4pack"
    if has_dense:
        return "cpu_dense_cached"
    return "cpu_dequant" if M >= CPU_DEQUANT_MIN_M and can_dequant else "int4pack"


def int4_linear(x: torch.Tensor, w: Int4Weights, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequantize(w) + bias, in x's dtype. x: [..., K] -> [..., N].

    CPU: bf16 or fp32 activations (computed in bf16, see tinyserve_kernels/cpu.py); CUDA: fp16 or bf16.
    """
    if x.shape[-1] != w.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the layer expects {w.in_features}")
    if w.qweight is not None:
        return torch.ops.tinyserve.int4_linear(x, w.qweight, w.qzeros, w.scales, w.group_size, bias)
    x2 = x.reshape(-1, w.in_features)
    packed = w.int4pack
    path = choose_path("cpu", x2.shape[0], has_int4pack=packed is not None, has_dense=w.dense is not None,
                       can_dequant=packed is not None and packed.decodable)
    if path == "int4pack":
        y = cpu.int4pack_linear(x2, packed)
    elif path == "cpu_dense_cached":
        y = cpu.dense_linear(x2, w.dense, w.out_features)
    else:
        y = cpu.dequant_matmul(x2, packed)
    y = y.to(x.dtype).view(*x.shape[:-1], w.out_features)
    return y if bias is None else y + bias.to(x.dtype)


@torch.library.custom_op("tinyserve::int4_linear", mutates_args=())
def int4_linear_raw(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ dequantize(qweight, qzeros, scales, group_size) + bias on the raw file tensors. x: [..., K] -> [..., N]."""
    K = qweight.shape[0]
    N = qweight.shape[1] * PACK_FACTOR
    G = resolve_group_size(group_size, K)
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if x.device.type != "cuda":
        y = x2 @ dequantize(qweight, qzeros, scales.float(), G).to(x.dtype)  # W in fp32, rounded once to x's dtype
        if bias is not None:
            y = y + bias.to(x.dtype)
        return y.view(*x.shape[:-1], N)
    # Triton is imported only here: CPU-only platforms need not have it.
    from tinyserve_kernels.dequant import dequantize_triton
    from tinyserve_kernels.gemm import choose_split_k as gemm_split_k, int4_gemm
    from tinyserve_kernels.gemv import choose_split_k as gemv_split_k, int4_gemv

    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    b = bias.to(x.dtype) if bias is not None else None
    path = choose_path("cuda", M, group_size=G)
    if M == 0:
        y = x2.new_empty((0, N))
    elif path == "gemv":
        y = int4_gemv(x2, qweight, qzeros, scales, G, b, split_k=gemv_split_k(N, K, G, sms))
    elif path == "gemm":
        y = int4_gemm(x2, qweight, qzeros, scales, G, b, split_k=gemm_split_k(M, N, K, 64, 128, min(G, 64), sms))
    else:
        W = dequantize_triton(qweight, qzeros, scales, G, x.dtype)  # [K, N]
        y = torch.addmm(b, x2, W) if b is not None else x2 @ W
    return y.view(*x.shape[:-1], N)


@int4_linear_raw.register_fake
def _(x, qweight, qzeros, scales, group_size, bias=None):
    return x.new_empty((*x.shape[:-1], qweight.shape[1] * PACK_FACTOR))
