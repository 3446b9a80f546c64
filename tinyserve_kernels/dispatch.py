"""The one INT4 linear entry point. It picks the implementation by device and by M (rows of x) in choose_path.

    w = prepare(qweight, qzeros, scales, group_size)   # once, at load time, on the device the layer runs on
    y = int4_linear(x, w, bias)                         # x: [..., K] -> y: [..., N], in x's dtype

Two entry points, one per way of holding the weight:
- int4_linear(x, w): the runtime's call, with weights converted once by prepare (on CPU to the layout of our own
  kernel, tinyserve_kernels/cpu_native.py, where it wins, else to torch's int4 layout).
- torch.ops.tinyserve.int4_linear(x, qweight, qzeros, scales, group_size, bias): the raw file tensors, registered with
  torch.library.custom_op and a fake implementation, so torch.compile and CUDA-graph capture see one opaque op with a
  known output shape instead of tracing into Triton launches and autotuning. On CUDA int4_linear goes through it. On
  CPU int4_linear calls torch's int4 op and matmuls directly (torch.compile traces them), its per-call dequant path
  is its own custom op (tinyserve::cpu_dequant_matmul), and the raw op there is the slow-but-exact reference path
  (it dequantizes the whole weight every call): CPU callers should prepare.

Thresholds are rows of x (M = x.numel() // K). See BENCHMARKS.md, "INT4 kernels (issue 3)", for the runs behind them.
"""

from dataclasses import dataclass

import torch

from tinyserve_kernels import cpu, cpu_native
from tinyserve_kernels.layout import PACK_FACTOR, check_shapes, dequantize, resolve_group_size

# CPU, chosen with scripts/bench_kernels.py on the 2-core dev VM (BENCHMARKS.md, "INT4 kernels (issue 3)"):
# up to this M torch's int4 op beats a bf16 matmul, even one on a dense weight cached at load time (it won at
# M = 1, 2, 4, 8 and lost at 16 on all six SmolLM2 and Llama-2-7B shapes measured).
CPU_INT4PACK_MAX_M = 8
# From this M on, with no cached dense weight, dequantizing per call + a bf16 matmul beats the int4 op (it won at
# M = 96 and 128 on all six shapes measured, at 64 on one of six).
CPU_DEQUANT_MIN_M = 96
# Our own kernel (tinyserve_kernels/cpu_native.py, AMX engine), same benchmark: up to this M it beats a cached dense bf16 weight
# (it won at M = 1..32 on all five SmolLM2 shapes, fused ones included, and lost at 64 on one of five). Its row results
# do not depend on M (row invariance), so batched decode up to this many rows is one call. With no dense copy it is
# used at every M: it beat per-call dequantize + matmul at M = 16..1024 on the three Llama-2-7B shapes (1.1-30x) but
# one, a tie (4096x4096 at M = 1024). Rechecked with the cached weight prepacked for oneDNN (cpu.hold_dense), 1 thread:
# ours still won at M = 16..32 on all five and lost at 48 on four ("Prepacked dense prompt weights").
CPU_NATIVE_MAX_M = 32

# CUDA: provisional, not yet measured (no GPU was lent to the session that wrote this). GEMV_MAX_M is the largest M
# one padded 16-row tensor-core tile covers; DEQUANT_MIN_M follows vLLM's AWQ heuristic (dequantize + cuBLAS from
# 256 rows). scripts/bench_kernels.py prints all three CUDA paths per M so a GPU run can set them.
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
    native: cpu_native.NativePacked | None = None  # CPU: our kernel's layout (then int4pack is None)
    dense: torch.Tensor | None = None  # CPU: bf16, as cpu.hold_dense keeps it, when cached at load time or G unsupported

    @property
    def nbytes(self) -> int:
        """Bytes this layer holds on its device (what a one-row call reads, plus any cached dense weight)."""
        tensors = [self.qweight, self.qzeros, self.scales, self.dense]
        if self.int4pack is not None:
            tensors += [self.int4pack.packed, self.int4pack.scale_zero]
        if self.native is not None:
            tensors.append(self.native.packed)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def prepare(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int, cpu_dense_cache: bool = False,
    native: bool | None = None,
) -> Int4Weights:
    """Check the packed tensors and convert them for their device (they must already be on it).

    cpu_dense_cache (CPU only): also keep a dense bf16 copy of the weight, 2 bytes per weight on top of ~0.5 for the
    INT4 form, so that prompts of more than CPU_INT4PACK_MAX_M rows run a plain bf16 matmul instead of dequantizing
    every call. Worth it for small models (SmolLM2-135M: ~0.2 GB); for 7B-class models it would add ~13 GB.
    native (CPU only): hold the weight for our own kernel instead of torch's op; None: where it wins
    (tinyserve_kernels.cpu_native.use_by_default). Otherwise a group size torch's CPU op cannot take (not a multiple of 32) is
    held as dense bf16.
    """
    K = qweight.shape[0]
    G = resolve_group_size(group_size, K)
    check_shapes(qweight, qzeros, scales, G)
    N = qweight.shape[1] * PACK_FACTOR
    if qweight.device.type != "cpu":
        return Int4Weights(qweight, qzeros, scales, G, K, N)
    use_native = native if native is not None else cpu_native.use_by_default()
    op_takes_g = cpu.op_group_size(G) is not None
    dense = None
    if cpu_dense_cache or not (use_native or op_takes_g):  # without a packed form the dense weight is the only one
        dense = cpu.hold_dense(dequantize(qweight, qzeros, scales.float(), G).to(torch.bfloat16))  # one rounding
    if use_native:
        return Int4Weights(None, None, None, G, K, N, native=cpu_native.repack(qweight, qzeros, scales, G), dense=dense)
    if not op_takes_g:
        return Int4Weights(None, None, None, G, K, N, dense=dense)
    return Int4Weights(None, None, None, G, K, N, int4pack=cpu.pack_for_cpu(qweight, qzeros, scales, G), dense=dense)


def choose_path(
    device_type: str, M: int, *, group_size: int = 128, has_int4pack: bool = True, has_dense: bool = False, can_dequant: bool = True,
    has_native: bool = False,
) -> str:
    """The kernel for M rows of x: the single place where the choice by device and M is made.

    group_size matters on CUDA (the fused kernels need a multiple of 16); on CPU, what prepare built: has_native
    (our kernel's form), has_int4pack (torch's int4 form: none for group sizes the op cannot take), has_dense (a cached
    dense copy), can_dequant (this torch build's int4 layout is one dequant_matmul can read).
    """
    if device_type == "cuda":
        if group_size % 16:
            return "dequant_matmul"
        if M <= CUDA_GEMV_MAX_M:
            return "gemv"
        return "gemm" if M < CUDA_DEQUANT_MIN_M else "dequant_matmul"
    if has_native:
        return "native" if M <= CPU_NATIVE_MAX_M or not has_dense else "cpu_dense_cached"
    if not has_int4pack:
        return "cpu_dense_cached"
    if M <= CPU_INT4PACK_MAX_M:
        return "int4pack"
    if has_dense:
        return "cpu_dense_cached"
    return "cpu_dequant" if M >= CPU_DEQUANT_MIN_M and can_dequant else "int4pack"


def cpu_invariant_rows(w: Int4Weights | None) -> int:
    """How many rows of x one CPU call may take while each row's result stays bit-identical to a one-row call (what
    batch-invariant decode groups rows by). Our kernel is row-invariant by construction on its whole path (every M
    when no dense copy is held); torch's op path is grouped by CPU_INT4PACK_MAX_M, beyond which a dense GEMM with
    another summation order takes over. None (a model without INT4 weights): CPU_INT4PACK_MAX_M as well."""
    if w is not None and w.native is not None:
        return CPU_NATIVE_MAX_M if w.dense is not None else 1 << 30
    return CPU_INT4PACK_MAX_M


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
    path = choose_path(
        "cpu", x2.shape[0], has_int4pack=packed is not None, has_dense=w.dense is not None,
        can_dequant=packed is not None and packed.decodable, has_native=w.native is not None,
    )
    if path == "native":
        y = cpu_native.linear(x2, w.native, bias)  # bias added in fp32 before the one rounding
        return y.to(x.dtype).view(*x.shape[:-1], w.out_features)
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
