"""CPU INT4 path (torch's int4 op, dequantize + bf16 matmul, cached dense) and the dispatcher, against the reference.

Weights come from the independent packer in kernels_reference.py, so a layout mistake cannot cancel itself out.
"""

import pytest
import torch

from tinyserve_kernels import cpu, dispatch
from tinyserve_kernels.dispatch import CPU_DEQUANT_MIN_M, CPU_INT4PACK_MAX_M, CUDA_DEQUANT_MIN_M, CUDA_GEMV_MAX_M, choose_path
from tinyserve_kernels.layout import dequantize, pack, unpack
from kernels_reference import assert_matches, plain_pack, random_layer

# dequant_matmul reads the op's packed layout of AVX-512 builds; on other CPUs (AVX2) dispatch never calls it
avx512_layout = pytest.mark.skipif(not cpu.packed_layout_is_known(), reason="this CPU's int4 op packs another layout (AVX2): dequant_matmul is not used")


def test_plain_packer_agrees_with_hand_computed_word():
    # Columns 0..7 hold 1..8: nibbles from the lowest bits up hold columns 0, 2, 4, 6, 1, 3, 5, 7 -> 0x86427531.
    assert plain_pack([[1, 2, 3, 4, 5, 6, 7, 8]]).tolist() == [[0x86427531 - 2**32]]


def test_zero_point_conversion_to_torch_convention():
    # Ours: (q - z) * s. Torch's op: (q - 8) * scale + zero. With scale = s and zero = (8 - z) * s they agree for every
    # code q and zero point z.
    z = torch.arange(16).repeat_interleave(16).view(1, 256)
    s = (torch.rand(1, 256) + 0.1).half()
    scale, zero = cpu.torch_scale_zero(pack(z), s)
    q = torch.arange(16).repeat(16).view(1, 256).float()
    torch.testing.assert_close((q - 8) * scale + zero, (q - z) * s.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("K,N,G", [(64, 72, 32), (576, 200, 64), (1536, 1536, 128), (576, 1536, 576)])
def test_int4_op_layout_exact_in_fp32(K, N, G):
    # The op also accepts fp32 activations and scales: with no bf16 rounding anywhere, conversion and packing must
    # reproduce the reference to fp32 accuracy (this isolates layout and zero-point mistakes from bf16 effects).
    qw, qz, s, W = random_layer(K, N, G, seed=K + N)
    w = cpu.pack_for_cpu(qw, qz, s, G)
    scale, zero = cpu.torch_scale_zero(qz, s)
    reps = G // w.op_group
    sz32 = torch.nn.functional.pad(torch.stack([scale, zero], -1), (0, 0, 0, w.packed.shape[0] - N)).repeat_interleave(reps, 0)
    x = torch.randn(3, K)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, w.packed, w.op_group, sz32.contiguous())[:, :N]
    assert_matches(y, x @ W, torch.float32)


# (M, K, N, G, x dtype, bias, dense cache): every value of the grid appears.
CPU_CASES = [
    (1, 64, 72, 32, torch.bfloat16, True, False),
    (3, 576, 200, 64, torch.float32, False, False),
    (17, 1536, 1536, 128, torch.bfloat16, True, False),
    (64, 576, 72, 32, torch.float32, True, True),
    (1, 1536, 200, 64, torch.float32, False, True),
    (17, 64, 1536, 64, torch.float32, True, True),
    (64, 1536, 200, 32, torch.bfloat16, False, False),
    (CPU_DEQUANT_MIN_M, 576, 200, 64, torch.bfloat16, True, False),
]


@pytest.mark.parametrize("M,K,N,G,dtype,bias,cache", CPU_CASES)
def test_cpu_entry_point_matches_reference(M, K, N, G, dtype, bias, cache):
    qw, qz, s, W = random_layer(K, N, G, seed=M + K)
    w = dispatch.prepare(qw, qz, s, G, cpu_dense_cache=cache)
    x = torch.randn(2, M, K).to(dtype)  # a leading batch dimension: [..., K]
    b = torch.randn(N).to(dtype) if bias else None
    y = dispatch.int4_linear(x, w, b)
    assert y.shape == (2, M, N) and y.dtype == dtype
    ref = x.float() @ W + (b.float() if bias else 0.0)
    assert_matches(y, ref, torch.bfloat16)  # the CPU path computes in bf16 whatever x's dtype


@pytest.mark.parametrize("K,N,G", [(64, 72, 32), (576, 1536, 64)])
def test_every_cpu_path_gives_the_same_answer(K, N, G):
    qw, qz, s, W = random_layer(K, N, G, seed=7)
    w = dispatch.prepare(qw, qz, s, G, cpu_dense_cache=True)
    x = torch.randn(5, K).bfloat16()
    ref = x.float() @ W
    assert_matches(cpu.int4pack_linear(x, w.int4pack), ref, torch.bfloat16)
    assert_matches(cpu.dense_linear(x, w.dense, N), ref, torch.bfloat16)
    if cpu.packed_layout_is_known():  # AVX-512 builds; dispatch falls back to the op elsewhere
        assert_matches(cpu.dequant_matmul(x, w.int4pack), ref, torch.bfloat16)
    else:
        assert not w.int4pack.decodable


@avx512_layout
def test_dequant_matmul_reproduces_the_ops_weights_across_chunks(monkeypatch):
    # Several column chunks and a padded tail (N = 200 -> 256): W is the op's own (q - 8) * scale + zero.
    monkeypatch.setattr(cpu, "CHUNK_WEIGHTS", 64 * 64)
    K, N, G = 64, 200, 32
    qw, qz, s, W = random_layer(K, N, G, seed=11)
    w = cpu.pack_for_cpu(qw, qz, s, G)
    x = torch.eye(K)  # x = I returns W itself, rounded to bf16
    op_scale, op_zero = w.scale_zero[..., 0].float(), w.scale_zero[..., 1].float()  # [K // G, Np]
    q = unpack(qw).float()
    expected = (q - 8) * op_scale[:, :N].repeat_interleave(G, 0) + op_zero[:, :N].repeat_interleave(G, 0)
    assert torch.equal(cpu.dequant_matmul(x, w).float(), expected.to(torch.bfloat16).float())


def test_group_sizes_the_op_cannot_take():
    # G = 96: the op takes 32, so each scale is repeated for 3 sub-groups. G = K = 80: no op group size divides it.
    qw, qz, s, W = random_layer(192, 64, 96, seed=1)
    w = dispatch.prepare(qw, qz, s, 96)
    assert w.int4pack.op_group == 32 and w.dense is None
    x = torch.randn(4, 192)
    assert_matches(dispatch.int4_linear(x, w), x @ W, torch.bfloat16)
    qw, qz, s, W = random_layer(80, 16, 80, seed=2)
    w = dispatch.prepare(qw, qz, s, -1)
    assert w.int4pack is None and w.dense is not None and w.group_size == 80
    x = torch.randn(3, 80)
    assert_matches(dispatch.int4_linear(x, w), x @ W, torch.bfloat16)


def test_prepare_releases_raw_tensors_on_cpu_and_reports_bytes():
    K, N, G = 576, 1536, 64
    qw, qz, s, _ = random_layer(K, N, G)
    w = dispatch.prepare(qw, qz, s, G)
    assert (w.in_features, w.out_features, w.group_size) == (K, N, G)
    assert w.qweight is None and w.dense is None
    assert w.nbytes == K * N // 2 + (K // G) * N * 2 * 2  # packed nibbles + bf16 (scale, zero) pairs
    cached = dispatch.prepare(qw, qz, s, G, cpu_dense_cache=True)
    assert cached.nbytes == w.nbytes + K * N * cpu.DENSE_DTYPE.itemsize  # bf16, or fp32 where bf16 GEMMs are emulated


def test_dispatch_picks_path_by_device_and_m():
    assert [choose_path("cpu", m) for m in (1, CPU_INT4PACK_MAX_M)] == ["int4pack"] * 2
    assert choose_path("cpu", CPU_INT4PACK_MAX_M + 1) == "int4pack"  # no cache: the op until dequantizing pays
    assert choose_path("cpu", CPU_INT4PACK_MAX_M + 1, has_dense=True) == "cpu_dense_cached"
    assert choose_path("cpu", CPU_DEQUANT_MIN_M) == "cpu_dequant"
    assert choose_path("cpu", CPU_DEQUANT_MIN_M, can_dequant=False) == "int4pack"
    assert choose_path("cpu", 1, has_int4pack=False) == "cpu_dense_cached"
    assert [choose_path("cuda", m) for m in (1, 3, CUDA_GEMV_MAX_M)] == ["gemv"] * 3
    assert choose_path("cuda", CUDA_GEMV_MAX_M + 1) == "gemm"
    assert choose_path("cuda", CUDA_DEQUANT_MIN_M) == "dequant_matmul"
    assert choose_path("cuda", 1, group_size=40) == "dequant_matmul"


def test_int4_linear_runs_the_chosen_cpu_path(monkeypatch):
    calls = []
    for name in ("int4pack_linear", "dequant_matmul", "dense_linear"):
        real = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, _n=name, _r=real: calls.append(_n) or _r(*a))
    qw, qz, s, _ = random_layer(64, 72, 32)
    w = dispatch.prepare(qw, qz, s, 32)
    cached = dispatch.prepare(qw, qz, s, 32, cpu_dense_cache=True)
    for M in (1, CPU_INT4PACK_MAX_M + 1, CPU_DEQUANT_MIN_M):
        dispatch.int4_linear(torch.randn(M, 64), w)
    # without the AVX-512 layout, large M stays on the op
    assert calls == ["int4pack_linear", "int4pack_linear", "dequant_matmul" if cpu.packed_layout_is_known() else "int4pack_linear"]
    calls.clear()
    for M in (1, CPU_INT4PACK_MAX_M + 1, CPU_DEQUANT_MIN_M):
        dispatch.int4_linear(torch.randn(M, 64), cached)
    assert calls == ["int4pack_linear", "dense_linear", "dense_linear"]


def test_bad_input_is_rejected_with_a_message():
    qw, qz, s, _ = random_layer(64, 72, 32)
    w = dispatch.prepare(qw, qz, s, 32)
    with pytest.raises(ValueError, match="expects 64"):
        dispatch.int4_linear(torch.randn(2, 63), w)
    with pytest.raises(ValueError, match="does not divide"):
        dispatch.prepare(qw, qz, s, 48)


def test_raw_custom_op_and_its_fake_impl():
    qw, qz, s, W = random_layer(64, 72, 32)
    x, b = torch.randn(2, 3, 64), torch.randn(72)
    y = torch.ops.tinyserve.int4_linear(x, qw, qz, s, 32, b)
    assert_matches(y, x @ W + b, torch.float32)
    torch.library.opcheck(dispatch.int4_linear_raw, (x, qw, qz, s, 32, b))
    w = cpu.pack_for_cpu(qw, qz, s, 32)
    torch.library.opcheck(cpu._dequant_matmul, (x[0].bfloat16(), w.packed, w.scale_zero, 72))


@pytest.mark.parametrize("M,cache", [(1, False), (CPU_DEQUANT_MIN_M, False), (CPU_DEQUANT_MIN_M, True)])
def test_entry_point_traces_under_torch_compile(M, cache):
    qw, qz, s, W = random_layer(64, 72, 32)
    w = dispatch.prepare(qw, qz, s, 32, cpu_dense_cache=cache)
    f = torch.compile(lambda t: dispatch.int4_linear(t, w), backend="eager", fullgraph=True)
    x = torch.randn(M, 64).bfloat16()
    assert_matches(f(x), x.float() @ W, torch.bfloat16)
    g = torch.compile(lambda t: torch.ops.tinyserve.int4_linear(t, qw, qz, s, 32, None), backend="eager", fullgraph=True)
    assert_matches(g(x.float()), x.float() @ W, torch.float32)


def test_reference_dequant_agrees_with_independent_packer():
    qw, qz, s, W = random_layer(128, 40, 64)
    assert torch.equal(unpack(qw), unpack(pack(unpack(qw))))
    torch.testing.assert_close(dequantize(qw, qz, s, 64).float(), W, rtol=1e-3, atol=1e-4)
