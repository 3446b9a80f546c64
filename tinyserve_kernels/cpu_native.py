"""Our CPU kernels (csrc/): the INT4 linear, the int8 lm_head, decode attention and the whole-step Decoder, built
into one C++ library on first use and called through direct Python bindings (csrc/bindings.cpp).

    w = repack(qweight, qzeros, scales, G)      # once, at load time: NativePacked
    y = linear(x, w, bias)                      # x [M, K] fp32/bf16 -> y [M, N] in x's dtype
    h = repack_int8(qweight8, scales8)          # weight-only int8 rows [N, K] + scales [N]: NativeInt8
    y = int8_linear(x, h, bias)
    o = decode_attention(q, k, v, lengths)      # q [M, Hkv, R, D] over cache views k, v [M, Hkv, L, D]
    load("native").Decoder(...)                 # every layer of a step in one call (tinyserve/runtime/backends/cpu_native.py)

Why our own: torch's int4 op decodes the weights again for every few rows of x and reaches about half the memory
bandwidth at one row. Ours decodes each weight once for all rows and sums codes times x in exact integer dot products
(x as 14-bit block floating point per group; see cpu_int4.cpp), so a row's result does not depend on M, on the other
rows, on the thread count or on the engine (AMX, AVX512-BF16, AVX512F, portable: bit-identical).

The build (torch.utils.cpp_extension, -O3 -march=native) lands in torch's extension cache, keyed by the sources and
this CPU's flags. A failed build logs one warning and `available()` is False: the eager backend's torch ops run instead.
"""

import hashlib
import logging
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

from tinyserve_kernels.layout import unpack

CSRC = Path(__file__).parent / "csrc"
# One library: the ops (each includes csrc/cpu_common.h) and their direct Python bindings.
SOURCES = (CSRC / "cpu_int4.cpp", CSRC / "cpu_int8.cpp", CSRC / "cpu_attention.cpp", CSRC / "cpu_decode.cpp", CSRC / "bindings.cpp")
HEADERS = (CSRC / "cpu_common.h", CSRC / "ops.h")
BLOCK_N = 16  # columns per block of the packed layout
K_ALIGN = 32  # INT4 group rows are padded to a multiple of this
INT8_K_ALIGN = 64  # the int8 layout pads K to a multiple of this (its x group, XG in cpu_int8.cpp)
INT8_GROUP_N = 64  # the int8 layout pads N to a multiple of this (4 blocks: the AMX engine's unit)
META_BYTES = 64  # per group and block: 16 fp16 scales, 16 zero points (u8), 16 zero bytes
ENGINES = ("portable", "avx512f", "avx512bf16", "amx")  # index = the op's engine() value
STALE_LOCK_S = 300  # a build takes 10-20 s: a lock this old belongs to a build that was killed

# Build variants: name -> extra compiler flags. "native" is what the runtime uses; the tests also build the engines
# below the native one (on a machine that can run them) to check each against the reference.
VARIANTS = {
    "native": ["-march=native"],
    "avx512bf16": ["-march=native", "-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8"],
    "avx512f": ["-march=native", "-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8", "-mno-avx512bf16", "-mno-avx512vnni"],
    "portable": ["-march=x86-64-v2"],
}

log = logging.getLogger("tinyserve_kernels.cpu_native")


@dataclass(frozen=True, eq=False)
class NativePacked:
    """One INT4 linear in the kernel's layout (see tinyserve_kernels/csrc/cpu_int4.cpp)."""

    packed: torch.Tensor  # [ceil(N / 16), K // G, Gp * 8 + 64] uint8, Gp = G rounded up to a multiple of 32
    group_size: int  # G
    in_features: int  # K
    out_features: int  # N


def repack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> NativePacked:
    """File layout (tinyserve_kernels/layout.py) -> the kernel's layout. Exact: codes, zero points and fp16 scales are copied.

    qweight [K, N // 8] int32, qzeros [K // G, N // 8] int32, scales [K // G, N] fp16 (G already resolved).
    """
    K, N, G = qweight.shape[0], scales.shape[1], group_size
    NG, NB = K // G, -(-N // BLOCK_N)
    Gp = -(-G // K_ALIGN) * K_ALIGN
    q = unpack(qweight).to(torch.uint8).view(NG, G, N)
    q = F.pad(q, (0, NB * BLOCK_N - N, 0, Gp - G))  # zero codes in padded rows and columns
    # Row 8o + 4h + j of a group: octet o, nibble h (0 low, 1 high) of byte 4 * column + j.
    q = q.view(NG, Gp // 8, 2, 4, NB, BLOCK_N)  # [g, o, h, j, block, column]
    byte = q[:, :, 0] | (q[:, :, 1] << 4)  # [g, o, j, block, column]
    codes = byte.permute(3, 0, 1, 4, 2).reshape(NB, NG, Gp * 8)  # [block, g, o, column, j]
    s = F.pad(scales.to(torch.float16), (0, NB * BLOCK_N - N)).view(NG, NB, BLOCK_N).transpose(0, 1)
    z = F.pad(unpack(qzeros), (0, NB * BLOCK_N - N)).to(torch.uint8).view(NG, NB, BLOCK_N).transpose(0, 1)
    meta = torch.cat([s.contiguous().view(torch.uint8), z, torch.zeros(NB, NG, META_BYTES - 48, dtype=torch.uint8)], dim=-1)
    return NativePacked(torch.cat([codes, meta], dim=-1).contiguous(), G, K, N)


def linear(x: torch.Tensor, w: NativePacked, bias: torch.Tensor | None = None, variant: str = "native") -> torch.Tensor:
    """x [M, K] (fp32 or bf16; other dtypes are computed in bf16) @ W + bias -> [M, N] in x's dtype."""
    ops = _ops(variant)
    if x.dtype is torch.float32 or x.dtype is torch.bfloat16:
        return ops.int4_mm(x, w.packed, bias, w.out_features, w.group_size)
    return ops.int4_mm(x.to(torch.bfloat16), w.packed, bias, w.out_features, w.group_size).to(x.dtype)


@dataclass(frozen=True, eq=False)
class NativeInt8:
    """One weight-only int8 linear (one scale per output row) in the kernel's layout (see tinyserve_kernels/csrc/cpu_int8.cpp)."""

    packed: torch.Tensor  # [Np // 16, Kp // 4, 64] uint8 (code + 128), Np = N rounded up to 64, Kp = K rounded up to 64
    scales: torch.Tensor  # [Np] fp32 (zero in padded columns)
    in_features: int  # K
    out_features: int  # N


def repack_int8(qweight: torch.Tensor, scales: torch.Tensor) -> NativeInt8:
    """qweight [N, K] int8, scales [N] (any float dtype) -> the kernel's layout. Exact: codes and scale values are
    copied (a bf16 or fp16 scale is exact in fp32). Block b, quad j, byte 4c + e holds qweight[16b + c, 4j + e] + 128."""
    N, K = qweight.shape
    Np, Kp = -(-N // INT8_GROUP_N) * INT8_GROUP_N, -(-K // INT8_K_ALIGN) * INT8_K_ALIGN
    q = F.pad(qweight.to(torch.int16), (0, Kp - K, 0, Np - N)) + 128  # code 128 (q = 0) in padded rows and columns
    packed = q.to(torch.uint8).view(Np // BLOCK_N, BLOCK_N, Kp // 4, 4).transpose(1, 2).contiguous()  # [block, quad, column, e]
    s = F.pad(scales.float(), (0, Np - N)).contiguous()
    return NativeInt8(packed.view(Np // BLOCK_N, Kp // 4, 4 * BLOCK_N), s, K, N)


def unpack_int8(w: NativeInt8) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of repack_int8: qweight [N, K] int8 and scales [N] fp32."""
    NB, J, _ = w.packed.shape
    q = w.packed.view(NB, J, BLOCK_N, 4).transpose(1, 2).reshape(NB * BLOCK_N, 4 * J).to(torch.int16) - 128
    return q[: w.out_features, : w.in_features].to(torch.int8).contiguous(), w.scales[: w.out_features].clone()


def int8_linear(x: torch.Tensor, w: NativeInt8, bias: torch.Tensor | None = None, variant: str = "native") -> torch.Tensor:
    """x [M, K] (fp32 or bf16; other dtypes are computed in bf16) @ (q * s)^T + bias -> [M, N] in x's dtype."""
    ops = _ops(variant)
    if x.dtype is torch.float32 or x.dtype is torch.bfloat16:
        return ops.int8_mm(x, w.packed, w.scales, bias, w.out_features)
    return ops.int8_mm(x.to(torch.bfloat16), w.packed, w.scales, bias, w.out_features).to(x.dtype)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, variant: str = "native") -> torch.Tensor:
    """Decode attention (csrc/cpu_attention.cpp): q [M, Hkv, R, D] (the R query heads sharing kv head h), k and v
    [M, Hkv, L, D] (views of the cache are fine: unit stride along D), lengths [M] int64 (row m attends to positions
    0..lengths[m]-1). fp32 or bf16. Returns [M, Hkv, R, D] in q's dtype, softmax(q k^T / sqrt(D)) v per row and head."""
    return _ops(variant).decode_attention(q, k, v, lengths, q.shape[-1] ** -0.5)


def decode_attention_fits(R: int, D: int, dtype: torch.dtype) -> bool:
    """Whether decode_attention takes R query heads per kv head, head dim D and this dtype (attention_fits, ops.h)."""
    return 1 <= R <= 8 and D % 16 == 0 and D <= 256 and dtype in (torch.float32, torch.bfloat16)


def _ops(variant: str):
    """Where to call int4_mm and int8_mm: their direct Python bindings (csrc/bindings.cpp: ~1.7 us less per call than
    torch.ops, at 10-30 us per SmolLM2 call), or their torch.ops registrations while torch.compile traces (those have
    fakes)."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops, namespace(variant))
    return load(variant)


def namespace(variant: str) -> str:
    return "tinyserve_cpu" if variant == "native" else f"tinyserve_cpu_{variant}"


def has_fast_isa() -> bool:
    """Whether this CPU has AVX512-BF16 and VNNI, the instructions of the two fast engines (AMX and AVX512-BF16)."""
    return {"avx512_bf16", "avx512_vnni"} <= set(_cpu_flags().split())


@cache
def available() -> bool:
    """Whether the kernels are built (now, or cached) and loaded. Compiles on first use (a log line says so, 15-30 s on
    2 cores). Never raises: a failed build logs one warning and returns False."""
    try:
        load("native")
    except Exception as e:  # a missing compiler or ninja, a failed compile or load: fall back, never crash
        log.warning("the CPU INT4 kernel could not be built (%s: %s); using torch's int4 op instead (slower for batched "
                    "decode). Set TINYSERVE_CPU_KERNEL=0 to skip the attempt.", type(e).__name__, str(e).strip().splitlines()[-1:] or "")
        return False
    return True


def engine(variant: str = "native") -> str:
    """Which engine the built variant runs (it builds the variant if needed)."""
    load(variant)
    return ENGINES[getattr(torch.ops, namespace(variant)).engine()]


@cache
def load(variant: str):
    """Build (or find in torch's extension cache) and load one variant: its ops are registered in torch.ops, and the
    returned Python module holds their direct bindings. Raises on failure."""
    from torch.utils import cpp_extension

    # -fopenmp: at::parallel_for is an inline OpenMP loop, sequential in code built without it (the process's
    # libgomp is torch's own: the loader resolves the extension's libgomp.so.1 to the copy torch already loaded).
    flags = ["-O3", "-fopenmp", *VARIANTS[variant], f"-DTS_NAMESPACE={namespace(variant)}"]
    name = f"tinyserve_cpu_{variant}_{_build_key(flags)}"
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    fresh = not any(build_dir.glob(f"{name}*.so"))
    lock = build_dir / "lock"  # torch's build lock: a build killed midway leaves it, and later loads would wait forever
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        log.warning("removing a stale build lock %s (a build was interrupted)", lock)
        lock.unlink(missing_ok=True)
    if fresh:
        log.warning("compiling the CPU INT4 and int8 kernels (%s) into %s: once per machine and source version, 15-30 s ...", variant, build_dir)
    t0 = time.perf_counter()
    module = cpp_extension.load(name, [str(f) for f in SOURCES], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                                is_python_module=True, verbose=False)
    # Shape-only implementations, so torch.compile can trace through the ops.
    torch.library.register_fake(f"{namespace(variant)}::int4_mm")(_int4_mm_fake)
    torch.library.register_fake(f"{namespace(variant)}::int8_mm")(_int8_mm_fake)
    torch.library.register_fake(f"{namespace(variant)}::decode_attention")(_attention_fake)
    if fresh:
        log.warning("CPU kernels (%s) built in %.0f s: engine %s", variant, time.perf_counter() - t0,
                    ENGINES[getattr(torch.ops, namespace(variant)).engine()])
    return module


def _int4_mm_fake(x, packed, bias, N, G):
    return x.new_empty((x.shape[0], N))


def _int8_mm_fake(x, packed, scales, bias, N):
    return x.new_empty((x.shape[0], N))


def _attention_fake(q, k, v, lengths, scale):
    return torch.empty_like(q)


def _build_key(flags: list[str]) -> str:
    """Source, flags, torch version and this CPU's feature flags: -march=native code must not run on another CPU that
    shares the cache directory, and an edited source must not load a stale library."""
    h = hashlib.sha256()
    for f in (*SOURCES, *HEADERS):
        h.update(f.read_bytes())
    h.update(" ".join(flags).encode())
    h.update(torch.__version__.encode())
    h.update(_cpu_flags().encode())
    return h.hexdigest()[:12]


@cache
def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() + platform.machine()
