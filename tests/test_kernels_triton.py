"""Triton INT4 kernels (GEMM, GEMV, dequant) against the pure-torch reference.

Without CUDA they run through TRITON_INTERPRET=1 (set in conftest.py). The interpreter costs milliseconds per program
and K step, so the issue's grid (M 1/3/17/64, K 64/576/1536, N 72/200/1536, G 32/64/128 dividing K, split-K 1/2/4,
fp16/bf16, bias or not) is covered by a list in which every value appears, rather than by the full cross product;
tile configs are pinned in most cases so that one shape does not turn into thousands of interpreted programs.
"""

import pytest
import torch

from tinyserve_kernels.dequant import dequantize_triton
from tinyserve_kernels.gemm import _configs as gemm_configs, _prune as gemm_prune, int4_gemm, valid_block_k
from tinyserve_kernels.gemv import GEMV_MAX_M, _prune as gemv_prune, int4_gemv
from tinyserve_kernels.layout import dequantize
from tinyserve_kernels.triton_common import interpreting
from kernels_reference import assert_matches, random_layer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
def gpu(test):
    """Marked `gpu` and skipped without CUDA; runs on the GPU machine when one is lent."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


def round_like_kernel(W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W rounded to the activation dtype as the kernel does it: to nearest on a GPU; Triton 3.9's interpreter
    truncates fp32 -> bf16 (toward zero, even with fp_downcast_rounding="rtne"), so the reference does the same there."""
    if dtype == torch.bfloat16 and interpreting():
        return (W.float().view(torch.int32) & -65536).view(torch.float32)
    return W.to(dtype).float()


def make_case(M, K, N, G, dtype, bias, seed=0):
    qw, qz, s, W = random_layer(K, N, G, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(M, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    # The kernels round the dequantized weight to the activation dtype before the fp32-accumulated product.
    ref = x.float() @ round_like_kernel(W, dtype) + (b.float() if bias else 0.0)
    to = lambda t: None if t is None else t.to(DEVICE)
    return to(x), to(qw), to(qz), to(s), to(b), ref


# (M, K, N, G, split_k, dtype, bias, config): every value of the grid appears at least once.
GEMM_CASES = [
    (1, 64, 72, 32, 1, torch.float16, True, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)),
    (3, 576, 200, 64, 2, torch.bfloat16, False, dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)),
    (17, 1536, 72, 128, 4, torch.float16, True, dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8)),
    (64, 64, 200, 64, 2, torch.bfloat16, True, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=3)),  # 4x4 tiles: grouped order
    (17, 576, 1536, 32, 1, torch.bfloat16, False, dict(BLOCK_M=32, BLOCK_N=256, BLOCK_K=32, GROUP_M=8)),
    (64, 1536, 200, 32, 4, torch.float16, False, dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=32, GROUP_M=8)),
    (3, 1536, 1536, 64, 4, torch.float16, True, dict(BLOCK_M=16, BLOCK_N=512, BLOCK_K=64, GROUP_M=8)),
    # Autotuned path (the interpreter keeps the first config that survives pruning).
    (17, 576, 72, 64, 1, torch.bfloat16, True, None),
    (64, 1536, 200, 128, 2, torch.float16, False, None),
]


@pytest.mark.parametrize("M,K,N,G,split_k,dtype,bias,config", GEMM_CASES)
def test_gemm_matches_reference(M, K, N, G, split_k, dtype, bias, config):
    x, qw, qz, s, b, ref = make_case(M, K, N, G, dtype, bias)
    y = int4_gemm(x, qw, qz, s, G, b, split_k=split_k, config=config)
    assert y.shape == (M, N) and y.dtype == dtype
    assert_matches(y.cpu(), ref, dtype)


# (M, K, N, G, split_k, dtype, bias, config)
GEMV_CASES = [
    (1, 64, 72, 32, 1, torch.bfloat16, False, dict(BLOCK_N=64, BLOCK_K=32)),
    (1, 1536, 1536, 128, 4, torch.float16, True, dict(BLOCK_N=512, BLOCK_K=128)),
    (1, 576, 200, 64, 2, torch.bfloat16, True, dict(BLOCK_N=256, BLOCK_K=64)),
    (3, 576, 72, 32, 4, torch.float16, False, dict(BLOCK_N=128, BLOCK_K=32)),
    (3, 1536, 200, 64, 1, torch.bfloat16, True, dict(BLOCK_N=256, BLOCK_K=64)),
    (GEMV_MAX_M, 64, 1536, 64, 2, torch.bfloat16, False, dict(BLOCK_N=512, BLOCK_K=64)),
    (1, 576, 72, 64, 1, torch.float16, True, None),
    (5, 1536, 200, 128, 2, torch.bfloat16, False, None),
]


@pytest.mark.parametrize("M,K,N,G,split_k,dtype,bias,config", GEMV_CASES)
def test_gemv_matches_reference(M, K, N, G, split_k, dtype, bias, config):
    x, qw, qz, s, b, ref = make_case(M, K, N, G, dtype, bias)
    y = int4_gemv(x, qw, qz, s, G, b, split_k=split_k, config=config)
    assert y.shape == (M, N) and y.dtype == dtype
    assert_matches(y.cpu(), ref, dtype)


def test_split_k_is_deterministic_and_agrees_with_one_split():
    x, qw, qz, s, b, ref = make_case(3, 576, 200, 32, torch.float16, True, seed=3)
    cfg = dict(BLOCK_M=16, BLOCK_N=256, BLOCK_K=32, GROUP_M=8)
    runs = [int4_gemm(x, qw, qz, s, 32, b, split_k=4, config=cfg) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    one = int4_gemm(x, qw, qz, s, 32, b, split_k=1, config=cfg)
    assert_matches(runs[0].cpu(), one.float().cpu(), torch.float16)
    gemv_runs = [int4_gemv(x, qw, qz, s, 32, b, split_k=4, config=dict(BLOCK_N=256, BLOCK_K=32)) for _ in range(2)]
    assert torch.equal(gemv_runs[0], gemv_runs[1])


@pytest.mark.parametrize("K,N,G,dtype", [(64, 72, 32, torch.float16), (576, 200, 64, torch.bfloat16), (192, 16, 48, torch.float16)])
def test_dequant_kernel_matches_layout_reference(K, N, G, dtype):
    qw, qz, s, W = random_layer(K, N, G, seed=5)
    out = dequantize_triton(qw.to(DEVICE), qz.to(DEVICE), s.to(DEVICE), G, dtype).cpu()
    assert out.dtype == dtype
    assert torch.equal(out.float(), round_like_kernel(W, dtype))  # same fp32 math, one rounding


def test_gemm_pruning_keeps_only_tiles_inside_a_group(monkeypatch):
    import tinyserve_kernels.gemm
    import tinyserve_kernels.gemv

    monkeypatch.setattr(tinyserve_kernels.gemm, "interpreting", lambda: False)  # see the whole pruned list
    monkeypatch.setattr(tinyserve_kernels.gemv, "interpreting", lambda: False)
    configs = gemm_configs()
    for G in (32, 64, 128):
        kept = gemm_prune(configs, {"M": 17, "N": 1536}, G=G)
        assert kept and all(valid_block_k(c.kwargs["BLOCK_K"], G) for c in kept)
        assert all(c.kwargs["BLOCK_M"] <= 32 for c in kept)  # M = 17 needs no 64- or 128-row tiles
        assert any(c.kwargs["BLOCK_K"] == 64 for c in kept) == (G >= 64)
        kept_v = gemv_prune(tinyserve_kernels.gemv._configs(), {"N": 72}, G=G)
        assert kept_v and all(G % c.kwargs["BLOCK_K"] == 0 and c.kwargs["BLOCK_N"] <= 128 for c in kept_v)
    assert gemm_prune(configs, {"M": 1, "N": 64}, G=16)[0].kwargs["BLOCK_K"] == 16


def test_bad_arguments_are_rejected():
    x, qw, qz, s, _, _ = make_case(2, 64, 72, 32, torch.float16, False)
    with pytest.raises(ValueError, match="does not divide the group size"):
        int4_gemm(x, qw, qz, s, 32, config=dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=8))
    with pytest.raises(ValueError, match="1..16 rows"):
        int4_gemv(torch.zeros(17, 64, dtype=torch.float16, device=DEVICE), qw, qz, s, 32)


# ---- GPU only: real compilation, autotuning, the dispatcher's CUDA paths and CUDA-graph capture ----

@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 16, 17, 64, 300])
def test_gpu_entry_point_all_paths(M, dtype):
    from tinyserve_kernels import dispatch

    x, qw, qz, s, b, ref = make_case(M, 1536, 576, 64, dtype, True, seed=M)
    w = dispatch.prepare(qw, qz, s, 64)
    assert_matches(dispatch.int4_linear(x, w, b).cpu(), ref, dtype)


@gpu
def test_gpu_autotuned_kernels():
    for M, G in [(1, 128), (7, 64), (33, 32), (128, 128)]:
        x, qw, qz, s, b, ref = make_case(M, 4096, 1024, G, torch.float16, False, seed=M)
        y = int4_gemv(x, qw, qz, s, G, split_k=4) if M <= GEMV_MAX_M else int4_gemm(x, qw, qz, s, G, split_k=2)
        assert_matches(y.cpu(), ref, torch.float16)


@gpu
def test_gpu_cuda_graph_capture_of_entry_point():
    from tinyserve_kernels import dispatch

    x, qw, qz, s, b, ref = make_case(4, 2048, 512, 128, torch.float16, True)
    w = dispatch.prepare(qw, qz, s, 128)
    static_x = x.clone()
    dispatch.int4_linear(static_x, w, b)  # warm up: autotuning must not happen during capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = dispatch.int4_linear(static_x, w, b)
    static_x.copy_(x * 2)
    graph.replay()
    torch.cuda.synchronize()
    ref2 = (x * 2).cpu().float() @ dequantize(qw.cpu(), qz.cpu(), s.cpu(), 128).float() + b.cpu().float()
    assert_matches(static_y.cpu(), ref2, torch.float16)


@gpu
def test_gpu_torch_compile_reduce_overhead():
    from tinyserve_kernels import dispatch

    x, qw, qz, s, b, ref = make_case(1, 1024, 256, 64, torch.bfloat16, False)
    w = dispatch.prepare(qw, qz, s, 64)
    f = torch.compile(lambda t: dispatch.int4_linear(t, w), mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        y = f(x)
    assert_matches(y.cpu(), ref, torch.bfloat16)
