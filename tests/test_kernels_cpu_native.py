"""Our CPU INT4 kernel (tinyserve_kernels/cpu_native.py, tinyserve_kernels/csrc/cpu_int4.cpp) against the pure-torch reference, and the
int8 lm_head op built with it (tinyserve_kernels/csrc/cpu_int8.cpp; the tests at the end) against x @ (q * s)^T.

Every engine this CPU can run is built (native = the best one, then each one below it: avx512bf16, avx512f,
portable) and checked on odd shapes, fp32 and bf16 activations, with and without bias; then row invariance (row i
of a batch is bit-identical to a one-row call, for every M) and that all engines give the same bits. Builds go to
torch's extension cache (~15 s each the first time, milliseconds after). Without a compiler or ninja, or on a
non-x86 CPU for the x86 variants, the tests skip with the reason. Also: the cpu-native backend's linears around these
kernels (NativeInt4Linear, NativeInt8Linear), and when the runtime may use the kernels (TINYSERVE_CPU_KERNEL, a failed
build).
"""

import os
from functools import cache

import pytest
import torch
import torch.nn.functional as F

from tinyserve_kernels import cpu, cpu_native
from tinyserve_kernels.layout import dequantize
from kernels_reference import assert_matches, random_layer as make_layer
from native_variants import ALL_VARIANTS, need, variants

random_layer = cache(make_layer)  # each shape packed once (the reference packer is plain Python) and shared read-only

M_LIST = (1, 2, 3, 5, 8, 13, 16, 17)
# (K, N, G): K in 64, 576, 1536 with every G of 32, 64, 128 that divides it; N in 72, 200 (not multiples of 16) and 1536.
SHAPES = [(64, 72, 32), (64, 200, 64), (576, 72, 32), (576, 200, 64), (576, 1536, 64), (1536, 200, 32), (1536, 72, 64), (1536, 1536, 128)]
# The portable engine is plain C++ (software FMA without -mfma): keep its shapes small.
SMALL_SHAPES = [(64, 72, 32), (576, 200, 64), (1536, 72, 128)]


def x_bits(G: int) -> int:
    """Bits of the kernel's block floating-point x for groups of G rows (cpu_int4.cpp, xbits): 14, fewer for huge G."""
    Gp, b = -(-G // 32) * 32, 14
    while b > 1 and 30 * Gp * 2**b >= 2**31:
        b -= 1
    return b


def quantize_x(x: torch.Tensor, G: int) -> torch.Tensor:
    """x as the kernel sees it, written from the arithmetic in cpu_int4.cpp's comment: per row and group of G, with
    2^E <= max |x| < 2^(E+1), x rounded half to even to a multiple of 2^(E + 1 - B); groups with max |x| < 2^-100 are
    zero, groups holding an inf or NaN are NaN. fp64 [M, K]."""
    M, K = x.shape
    xg = x.double().view(M, K // G, G)
    amax = xg.abs().amax(-1, keepdim=True)
    E = torch.frexp(amax).exponent - 1  # frexp: amax = m * 2^exponent, 0.5 <= m < 1
    step = torch.pow(2.0, (E + 1 - x_bits(G)).double())
    q = torch.round(xg / step) * step  # torch.round rounds half to even
    q = torch.where(amax < 2.0**-100, torch.zeros_like(q), q)
    q = torch.where(xg.isfinite().all(-1, keepdim=True), q, torch.full_like(q, float("nan")))
    return q.view(M, K)


def reference(x: torch.Tensor, qw, qz, s, G: int, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_x(x) @ dequantize(...) (+ bias) in fp64, and a per-element error bound: the kernel's fp32 steps
    (1e-5 of sum |x| |W|, far above their ~2^-24 * K / G) plus the output's one rounding when it is bf16."""
    W = dequantize(qw, qz, s.float(), G).double()  # [K, N]
    xq = quantize_x(x, G)
    ref = xq @ W + (bias.double() if bias is not None else 0.0)
    bound = 1e-5 * (xq.abs() @ W.abs()) + 1e-6
    if x.dtype == torch.bfloat16:
        bound = bound + ref.abs() * 2.0**-8
    return ref, bound


def check(y: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> None:
    err = (y.double() - ref).abs()
    bad = err > bound
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} outputs off; worst {err.max().item():.4g} (bound there {bound.flatten()[err.argmax()].item():.4g})"


@pytest.mark.parametrize(
    "variant,K,N,G", [(v, *shape) for v in ALL_VARIANTS for shape in (SMALL_SHAPES if v == "portable" else SHAPES)]
)
def test_matches_reference_on_odd_shapes(variant, K, N, G):
    need(variant)
    qw, qz, s, W = random_layer(K, N, G, seed=K + N + G)
    assert torch.equal(dequantize(qw, qz, s.float(), G), W)  # the reference agrees with the independent packer
    w = cpu_native.repack(qw, qz, s, G)
    g = torch.Generator().manual_seed(G)
    for i, M in enumerate(M_LIST):
        dtype = (torch.float32, torch.bfloat16)[i % 2]
        bias = torch.randn(N, generator=g).to(dtype) if i % 3 else None
        x = torch.randn(M, K, generator=g).to(dtype)
        y = cpu_native.linear(x, w, bias, variant=variant)
        assert y.shape == (M, N) and y.dtype == dtype
        check(y, *reference(x, qw, qz, s, G, bias))


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_dtypes_with_and_without_bias(variant, dtype):
    need(variant)
    K, N, G = 576, 200, 32
    qw, qz, s, _ = random_layer(K, N, G, seed=3)
    w = cpu_native.repack(qw, qz, s, G)
    for bias in (None, torch.randn(N).to(dtype)):
        x = torch.randn(5, K).to(dtype)
        check(cpu_native.linear(x, w, bias, variant=variant), *reference(x, qw, qz, s, G, bias))


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_rows_do_not_depend_on_the_batch(variant):
    # Row i of an M-row call, bit for bit, equals the one-row call on x[i]: what lets continuous batching decode
    # many sequences in one call without changing any sequence's greedy output.
    need(variant)
    K, N, G = (576, 200, 64) if variant == "portable" else (1536, 200, 64)
    qw, qz, s, _ = random_layer(K, N, G, seed=5)
    w = cpu_native.repack(qw, qz, s, G)
    bias = torch.randn(N)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(max(M_LIST), K).to(dtype)
        singles = torch.cat([cpu_native.linear(x[i : i + 1], w, bias, variant=variant) for i in range(len(x))])
        for M in M_LIST:
            assert torch.equal(cpu_native.linear(x[:M], w, bias, variant=variant), singles[:M]), (dtype, M)


def test_engines_agree_bit_for_bit():
    # The inner sums are exact integers and the fp32 steps after them are the same in every engine, so every engine
    # (AMX tiles, VNNI, the AVX512BW emulation, plain C++) gives the same bits, fp32 and bf16 outputs alike.
    names = variants()
    if len(names) < 2:
        pytest.skip("fewer than two engines can be built on this CPU")
    K, N, G = 576, 200, 64
    qw, qz, s, _ = random_layer(K, N, G, seed=9)
    w = cpu_native.repack(qw, qz, s, G)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, K).to(dtype)
        ys = {cpu_native.engine(v): cpu_native.linear(x, w, variant=v) for v in names}
        first = next(iter(ys.values()))
        assert all(torch.equal(y, first) for y in ys.values()), (dtype, list(ys))
        check(first, *reference(x, qw, qz, s, G, None))
    # Against x itself (not its quantized form): each x off by at most 2^-14 of its group's largest |x|.
    W = dequantize(qw, qz, s.float(), G).double()
    x = torch.randn(5, K) * torch.logspace(-3, 3, K)  # groups spanning magnitudes
    amax = x.double().abs().view(5, K // G, G).amax(-1, keepdim=True).expand(5, K // G, G).reshape(5, K)
    bound = 2.0**-14 * (amax @ W.abs()) + 1e-5 * (x.double().abs() @ W.abs())
    assert ((cpu_native.linear(x, w).double() - x.double() @ W).abs() <= bound).all()


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_x_edge_cases(variant):
    # A zero group, a group far below fp32's resolution of the others, an inf and a NaN (each poisons its own row
    # only), huge values, and one group per row (G = K = 4608: fewer bits of x so that no int32 sum overflows).
    need(variant)
    K, N, G = 128, 72, 32
    qw, qz, s, _ = random_layer(K, N, G, seed=11)
    w = cpu_native.repack(qw, qz, s, G)
    x = torch.randn(6, K)
    x[0, :32] = 0
    x[1, 32:64] *= 2.0**-110
    x[2, 5] = float("inf")
    x[3, 70] = float("nan")
    x[4] *= 1e30
    y = cpu_native.linear(x, w, variant=variant)
    assert y[2].isnan().all() and y[3].isnan().all()
    keep = [0, 1, 4, 5]
    check(y[keep], *reference(x[keep], qw, qz, s, G, None))
    if variant != "portable":
        K = G = 4608
        assert x_bits(G) == 13
        qw, qz, s, _ = random_layer(K, N, G, seed=12)
        x = torch.randn(3, K) * 100
        check(cpu_native.linear(x, cpu_native.repack(qw, qz, s, G), variant=variant), *reference(x, qw, qz, s, G, None))


def test_repack_is_exact_and_aligned():
    # Codes, fp16 scales and zero points are copied, not recomputed: x = I returns W exactly (fp32 output).
    need("native")
    K, N, G = 64, 72, 32
    qw, qz, s, W = random_layer(K, N, G, seed=2)
    w = cpu_native.repack(qw, qz, s, G)
    assert w.packed.shape == (-(-N // 16), K // G, 32 * 8 + 64) and w.packed.data_ptr() % 64 == 0
    assert torch.equal(cpu_native.linear(torch.eye(K), w), W)


def test_group_size_not_a_multiple_of_32():
    # G = 48: each group is zero-padded to 64 rows inside the kernel's layout.
    need("native")
    K, N, G = 576, 72, 48
    qw, qz, s, _ = random_layer(K, N, G, seed=4)
    w = cpu_native.repack(qw, qz, s, G)
    x = torch.randn(3, K)
    check(cpu_native.linear(x, w), *reference(x, qw, qz, s, G, None))


def test_bad_input_is_rejected():
    need("native")
    qw, qz, s, _ = random_layer(64, 72, 32)
    w = cpu_native.repack(qw, qz, s, 32)
    with pytest.raises(RuntimeError, match="does not match K"):
        cpu_native.linear(torch.randn(2, 96), w)
    with pytest.raises(RuntimeError, match="2-D"):
        cpu_native.linear(torch.randn(2, 2, 64), w)


def test_native_int4_linear_picks_the_kernel_by_rows():
    """The cpu-native backend's INT4 linear (tinyserve/runtime/backends/cpu_native.py): our kernel up to NATIVE_MAX_ROWS rows,
    the dense bf16 copy beyond when it holds one, else our kernel at every M; [..., K] inputs, the bias added."""
    need("native")
    from tinyserve.runtime.backends.cpu_native import NATIVE_MAX_ROWS, NativeInt4Linear

    K, N, G = 576, 200, 64
    qw, qz, s, W = random_layer(K, N, G, seed=6)
    w = cpu_native.repack(qw, qz, s, G)
    dense = cpu.hold_dense(dequantize(qw, qz, s.float(), G).to(torch.bfloat16))
    b = torch.randn(N).bfloat16()
    held, plain = NativeInt4Linear(w, dense, b), NativeInt4Linear(w, None, b)
    assert held.nbytes == plain.nbytes == w.packed.numel() + 2 * N  # what a one-row call reads: never the dense copy
    x = torch.randn(2, 3, K).bfloat16()  # a leading batch dimension
    y = held(x)
    assert y.shape == (2, 3, N) and torch.equal(y.view(6, N), cpu_native.linear(x.view(6, K), w, b))
    g = torch.Generator().manual_seed(16)
    for M in (1, NATIVE_MAX_ROWS, NATIVE_MAX_ROWS + 1, 300):
        x = torch.randn(M, K, generator=g).bfloat16()
        native = cpu_native.linear(x, w, b)
        from_dense = cpu.dense_linear(x, dense, N) + b
        check(native, *reference(x, qw, qz, s, G, b))
        assert_matches(from_dense, x.float() @ W + b.float(), torch.bfloat16)
        assert not torch.equal(native, from_dense), M  # the two paths can be told apart
        assert torch.equal(held(x), native if M <= NATIVE_MAX_ROWS else from_dense), M
        assert torch.equal(plain(x), native), M
    x = torch.randn(NATIVE_MAX_ROWS + 1, K, generator=g)  # fp32 in, fp32 out, on either path
    assert held(x).dtype == plain(x).dtype == torch.float32


def test_switch_values(monkeypatch):
    from tinyserve.runtime.backends import ENV_SWITCH, cpu_kernel_mode

    cases = [("0", "off"), ("off", "off"), ("false", "off"), ("no", "off"), (" OFF ", "off"), ("1", "on"), ("on", "on"),
             ("true", "on"), ("yes", "on"), ("On", "on"), ("auto", "auto"), ("", "auto"), ("maybe", "auto")]
    for value, expected in cases:
        monkeypatch.setenv(ENV_SWITCH, value)
        assert cpu_kernel_mode() == expected, value
    monkeypatch.delenv(ENV_SWITCH)
    assert cpu_kernel_mode() == "auto"


def test_when_the_kernels_are_usable(monkeypatch):
    """off never builds; auto rules a CPU without AVX512-BF16 and VNNI out before any build, and needs one of the two
    fast engines; on takes any engine that builds."""
    from tinyserve.runtime.backends import cpu_kernels_usable

    calls = []
    engine = {"name": "amx"}
    monkeypatch.setattr(cpu_native, "load", lambda variant: calls.append(("load", variant)))
    monkeypatch.setattr(cpu_native, "available", lambda: calls.append("available") or True)
    monkeypatch.setattr(cpu_native, "engine", lambda variant="native": calls.append("engine") or engine["name"])
    monkeypatch.setattr(cpu_native, "has_fast_isa", lambda: False)
    assert not cpu_kernels_usable("off") and not cpu_kernels_usable("auto")
    assert calls == []
    assert cpu_kernels_usable("on")  # any engine, asked for
    monkeypatch.setattr(cpu_native, "has_fast_isa", lambda: True)
    for name, usable in (("amx", True), ("avx512bf16", True), ("avx512f", False), ("portable", False)):
        engine["name"] = name
        assert cpu_kernels_usable("auto") == usable and cpu_kernels_usable("on"), name
    calls.clear()
    assert not cpu_kernels_usable("off") and calls == []


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, caplog, tiny_int4_dir):
    from tinyserve.runtime.backends import cpu_kernels_usable
    from tinyserve.runtime.runner import ModelRunner, RunnerConfig

    def fail(variant):
        raise OSError("ninja is required to load C++ extensions")

    monkeypatch.setattr(cpu_native, "load", fail)
    monkeypatch.setenv("TINYSERVE_CPU_KERNEL", "on")
    cpu_native.available.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="tinyserve_kernels.cpu_native"):
            assert not cpu_kernels_usable("on") and not cpu_native.available()
            r = ModelRunner(tiny_int4_dir, RunnerConfig(device="cpu", dtype="bfloat16", max_seq_len=32))
        records = [rec for rec in caplog.records if rec.name == "tinyserve_kernels.cpu_native"]
        assert len(records) == 1 and "ninja is required" in records[0].getMessage()
        assert r.backend.name == "eager"  # the torch ops run instead
        slot = r.alloc_slot()
        assert r.prefill(slot, [5, 6, 7]).shape == (r.cfg.vocab_size,)
    finally:
        cpu_native.available.cache_clear()


# ---- the int8 lm_head op (tinyserve_kernels/csrc/cpu_int8.cpp): weight-only int8 rows [N, K], one scale per row ------------------

# (K, N): K a multiple of 32 (64, SmolLM2's 576) or not (100: zero-padded to 128); N never a multiple of 64.
INT8_SHAPES = [(64, 72), (576, 200), (576, 1000), (100, 130)]
INT8_M = (1, 2, 3, 9, 16, 17, 33)  # 9 and more: more than one 8-row AMX chunk


@cache
def int8_layer(K: int, N: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, K] int8 in -127..127 and bf16 scales [N], as the backends hold the lm_head (cpu.quantize_int8_rows, scales in bf16)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    s = (torch.rand(N, generator=g) * 0.02 + 1e-3).bfloat16()
    return q, s


def int8_reference(x: torch.Tensor, q, s, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_x(x) (groups of 64, K zero-padded to them, as cpu_int8.cpp) @ (q * s)^T (+ bias) in fp64, and a
    per-element error bound: the kernel's fp32 steps (1e-5 of sum |x| |W|) plus the output's one rounding when bf16."""
    W = q.double() * s.double()[:, None]  # [N, K]
    K = x.shape[1]
    xq = quantize_x(F.pad(x.float(), (0, -K % 64)), 64)[:, :K]
    ref = xq @ W.T + (bias.double() if bias is not None else 0.0)
    bound = 1e-5 * (xq.abs() @ W.abs().T) + 1e-6
    if x.dtype == torch.bfloat16:
        bound = bound + ref.abs() * 2.0**-8
    return ref, bound


@pytest.mark.parametrize("variant,K,N", [(v, *shape) for v in ALL_VARIANTS for shape in INT8_SHAPES])
def test_int8_matches_reference_on_odd_shapes(variant, K, N):
    need(variant)
    q, s = int8_layer(K, N, seed=K + N)
    w = cpu_native.repack_int8(q, s)
    g = torch.Generator().manual_seed(N)
    for i, M in enumerate(INT8_M):
        for dtype in (torch.bfloat16, torch.float32):
            bias = torch.randn(N, generator=g).to(dtype) if i % 2 else None
            x = torch.randn(M, K, generator=g).to(dtype)
            y = cpu_native.int8_linear(x, w, bias, variant=variant)
            assert y.shape == (M, N) and y.dtype == dtype
            check(y, *int8_reference(x, q, s, bias))


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_int8_rows_do_not_depend_on_the_batch(variant):
    # Row r of any batch, bit for bit, equals the one-row call on that row: whatever M is, wherever the row sits
    # (inside or past the first 16-row AMX chunk), whatever the other rows hold, and with 1 or 2 threads.
    need(variant)
    K, N = (576, 200) if variant == "portable" else (576, 1000)
    q, s = int8_layer(K, N, seed=11)
    w = cpu_native.repack_int8(q, s)
    bias = torch.randn(N)
    g = torch.Generator().manual_seed(12)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(40, K, generator=g).to(dtype)
        singles = torch.cat([cpu_native.int8_linear(x[i : i + 1], w, bias, variant=variant) for i in range(len(x))])
        for M in (*INT8_M, 32, 40):
            assert torch.equal(cpu_native.int8_linear(x[:M], w, bias, variant=variant), singles[:M]), (dtype, M)
        perm = torch.randperm(len(x), generator=g)  # every row in another position, next to other rows
        assert torch.equal(cpu_native.int8_linear(x[perm], w, bias, variant=variant), singles[perm]), dtype
        others = torch.randn(20, K, generator=g).to(dtype) * 100  # other rows of another magnitude
        for pos in (0, 7, 16, 19):
            batch = others.clone()
            batch[pos] = x[3]
            assert torch.equal(cpu_native.int8_linear(batch, w, bias, variant=variant)[pos], singles[3]), (dtype, pos)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert torch.equal(cpu_native.int8_linear(x[:17], w, bias, variant=variant), singles[:17]), n
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs")
def test_kernels_run_on_torchs_threads():
    # at::parallel_for is an inline OpenMP loop: built without -fopenmp it silently runs on one thread.
    need("native")
    op = getattr(torch.ops, cpu_native.namespace("native")).parallel_threads
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert op(64) == n
    finally:
        torch.set_num_threads(threads)


def test_int8_agrees_with_torchs_op_and_engines_bit_for_bit():
    # torch's _weight_int8pack_mm takes x as it is and sums in fp32; ours holds x to 2^-14 of each 64-group's largest
    # |x| (cpu_int8.cpp): the bf16 outputs differ by about one rounding step of the largest products' scale. The
    # engines' sums are exact integers: they agree bit for bit.
    need("native")
    K, N = 576, 1000
    q, s = int8_layer(K, N, seed=13)
    w = cpu_native.repack_int8(q, s)
    x = torch.randn(5, K).bfloat16()
    y = cpu_native.int8_linear(x, w)
    t = torch.ops.aten._weight_int8pack_mm(x, q, s)
    scale = x.float().abs() @ (q.float().abs() * s.float()[:, None]).T
    assert ((y.float() - t.float()).abs() <= t.float().abs() * 2.0**-7 + scale * 2.0**-12).all()
    for dtype in (torch.float32, torch.bfloat16):
        xs = torch.randn(9, K).to(dtype)
        ys = {cpu_native.engine(v): cpu_native.int8_linear(xs, w, variant=v) for v in variants()}
        first = next(iter(ys.values()))
        assert all(torch.equal(v, first) for v in ys.values()), (dtype, list(ys))
        check(first, *int8_reference(xs, q, s, None))


def test_int8_repack_is_exact_and_aligned():
    # Codes and scales are copied: x = I (fp32 output) returns (q * s)^T exactly, padding included.
    need("native")
    K, N = 100, 72
    q, s = int8_layer(K, N, seed=14)
    w = cpu_native.repack_int8(q, s)
    assert w.packed.shape == (128 // 16, 128 // 4, 64) and w.packed.dtype == torch.uint8 and w.packed.data_ptr() % 64 == 0
    assert w.scales.shape == (128,) and w.scales.dtype == torch.float32 and not w.scales[N:].any()
    assert torch.equal(cpu_native.int8_linear(torch.eye(K), w), (q.float() * s.float()[:, None]).T)
    q2, s2 = cpu_native.unpack_int8(w)
    assert torch.equal(q2, q) and torch.equal(s2, s.float())


def test_int8_bad_input_is_rejected():
    need("native")
    w = cpu_native.repack_int8(*int8_layer(64, 72))
    with pytest.raises(RuntimeError, match="does not match K"):
        cpu_native.int8_linear(torch.randn(2, 96), w)
    with pytest.raises(RuntimeError, match="2-D"):
        cpu_native.int8_linear(torch.randn(2, 2, 64), w)


def test_torch_compile_traces_the_registered_ops():
    """Eager calls take the direct Python bindings; under torch.compile the calls go to the torch.ops registrations
    (their fake implementations give dynamo the shapes, so the whole function is one graph). Same bits either way."""
    need("native")
    qw, qz, s, _ = random_layer(576, 200, 64, seed=5)
    w4 = cpu_native.repack(qw, qz, s, 64)
    w8 = cpu_native.repack_int8(*int8_layer(200, 72))
    bias = torch.randn(200)

    k, v = torch.randn(2, 3, 2, 20, 64).unbind(0)
    lengths = torch.tensor([20, 7, 1])

    def layers(x):
        h = cpu_native.linear(x, w4, bias)  # [3, 200]
        a = cpu_native.decode_attention(h[:, :128].reshape(3, 2, 1, 64), k, v, lengths)  # [3, 2, 1, 64]
        return cpu_native.int8_linear(torch.cat([a.reshape(3, 128), h[:, 128:]], 1).relu(), w8)

    x = torch.randn(3, 576)
    compiled = torch.compile(layers, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), layers(x))


def test_int8_lm_head_forms_agree():
    # The lm_head's int8 rows (cpu.quantize_int8_rows) as the cpu-native backend holds them (NativeInt8Linear: our
    # layout and kernel) and as the eager backend does (Int8Linear: torch's op), both with the scales rounded to bf16:
    # the same codes and scales, outputs within the two kernels' difference (as the test above).
    need("native")
    from tinyserve.runtime.backends.cpu_native import NativeInt8Linear
    from tinyserve.runtime.backends.eager import Int8Linear

    g = torch.Generator().manual_seed(15)
    weight = torch.randn(200, 576, generator=g)
    q, s = cpu.quantize_int8_rows(weight, rows=64)  # several blocks of rows
    assert torch.equal(weight, torch.randn(200, 576, generator=torch.Generator().manual_seed(15)))  # not divided in place (a tied embedding)
    assert q.shape == (200, 576) and q.dtype == torch.int8 and q.abs().max() <= 127 and s.dtype == torch.float32
    torch.testing.assert_close(s, weight.abs().amax(1) / 127, rtol=1e-6, atol=0)
    assert ((q.float() * s[:, None] - weight).abs() <= s[:, None] * (0.5 + 1e-5)).all()  # round to nearest
    ours = NativeInt8Linear(cpu_native.repack_int8(q, s.to(torch.bfloat16)))
    theirs = Int8Linear(q, s.to(torch.bfloat16))
    q2, s2 = cpu_native.unpack_int8(ours.w)
    assert torch.equal(q2, theirs.qweight) and torch.equal(s2, theirs.scales.float())
    assert ours.nbytes == 256 * 576 + 256 * 4
    x = torch.randn(2, 3, 576).bfloat16()  # a leading batch dimension
    y = ours(x)
    assert y.shape == (2, 3, 200) and torch.equal(y.view(6, 200), cpu_native.int8_linear(x.view(6, 576), ours.w))
    t = theirs(x).float()
    assert t.shape == (2, 3, 200)
    scale = x.float().abs() @ (q.float().abs() * theirs.scales.float()[:, None]).T
    assert ((y.float() - t).abs() <= t.abs() * 2.0**-7 + scale * 2.0**-12).all()


ATTN_SHAPES = [(1, 3, 3, 7, 64), (5, 2, 1, 37, 128), (3, 1, 8, 130, 48), (4, 4, 4, 17, 16)]  # (M, Hkv, R, L, D)


def attention_case(M, Hkv, R, L, D, dtype, seed=0):
    """q, and k / v as views of a longer cache (the runtime's layout: [M, Hkv, S, D] sliced to L), lengths 1..L."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(M, Hkv, R, D, generator=g).to(dtype)
    k = torch.randn(M, Hkv, L + 5, D, generator=g).to(dtype)[:, :, :L]
    v = torch.randn(M, Hkv, L + 5, D, generator=g).to(dtype)[:, :, :L]
    lengths = torch.randint(1, L + 1, (M,), generator=g)
    lengths[0] = L
    return q, k, v, lengths


def attention_reference(q, k, v, lengths):
    mask = (torch.arange(k.shape[2])[None] < lengths[:, None])[:, None, None, :]
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ATTN_SHAPES)
def test_decode_attention_matches_sdpa(variant, dtype, shape):
    need(variant)
    q, k, v, lengths = attention_case(*shape, dtype)
    out = cpu_native.decode_attention(q, k, v, lengths, variant=variant)
    assert out.shape == q.shape and out.dtype == dtype
    ref = attention_reference(q, k, v, lengths)
    # fp32: a few ulp of the inputs' scale; bf16: the output's one rounding (2^-8 relative) on top.
    tol = 1e-5 if dtype == torch.float32 else 2.0**-8 * ref.abs().max().item() + 1e-5
    assert (out.double() - ref).abs().max().item() <= tol


def test_decode_attention_rows_do_not_depend_on_the_batch():
    """A row's output is the same bits alone, in a batch, and over any padded length L >= its own length."""
    need("native")
    q, k, v, lengths = attention_case(6, 3, 3, 70, 64, torch.bfloat16, seed=1)
    full = cpu_native.decode_attention(q, k, v, lengths)
    for m in range(6):
        n = int(lengths[m])
        for L in (n, min(70, n + 33)):
            alone = cpu_native.decode_attention(q[m : m + 1], k[m : m + 1, :, :L], v[m : m + 1, :, :L], lengths[m : m + 1])
            assert torch.equal(alone[0], full[m]), (m, L)


def test_decode_attention_engines_agree():
    """The AVX-512 engines run the same code (same bits); the portable build sums in another order (close)."""
    need("native")
    q, k, v, lengths = attention_case(4, 2, 3, 90, 64, torch.float32, seed=2)
    base = cpu_native.decode_attention(q, k, v, lengths)
    for variant in variants()[1:]:
        out = cpu_native.decode_attention(q, k, v, lengths, variant=variant)
        if variant == "portable":
            torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(out, base), variant


def test_decode_attention_bad_input_is_rejected():
    need("native")
    q, k, v, lengths = attention_case(2, 2, 3, 10, 64, torch.float32)
    with pytest.raises(RuntimeError, match="lengths must be in 1..L"):
        cpu_native.decode_attention(q, k, v, torch.tensor([0, 3]))
    with pytest.raises(RuntimeError, match="lengths must be in 1..L"):
        cpu_native.decode_attention(q, k, v, torch.tensor([11, 3]))
    with pytest.raises(RuntimeError, match="share a dtype"):
        cpu_native.decode_attention(q.bfloat16(), k, v, lengths)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cpu_native.decode_attention(q[..., :40], k[..., :40], v[..., :40], lengths)
    assert not cpu_native.decode_attention_fits(9, 64, torch.bfloat16) and not cpu_native.decode_attention_fits(3, 72, torch.float32)
    assert cpu_native.decode_attention_fits(3, 64, torch.bfloat16) and not cpu_native.decode_attention_fits(3, 64, torch.float16)
