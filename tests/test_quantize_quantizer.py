"""The group quantizer: formula against hand-computed values, agreement with the packed layout, settings errors."""

import pytest
import torch

from tinyserve_kernels.layout import dequantize, pack_linear
from tinyserve_quantize.clip_search import clip_ratios, refit_bounds, search_clip
from tinyserve_quantize.quantizer import QuantizationError, QuantSpec, fake_quantize, map_chunks, quantize_weight


def test_fake_quant_formula_hand_computed():
    # One group of 4 (G = K = 4), 4 bits: min -1, max 2 -> scale 3/15 = 0.2, zero = round(1 / 0.2) = 5.
    w = torch.tensor([[-1.0, 0.0, 0.45, 2.0]])
    codes, zeros, scales = quantize_weight(w, QuantSpec(4, -1))
    s = float(torch.tensor(0.2).half())  # the scale is stored (and applied) in fp16
    assert zeros.tolist() == [[5]]
    assert scales.dtype == torch.float16 and float(scales) == s
    # w / s + 5: -1 -> 0, 0 -> 5, 0.45 -> round(2.25) + 5 = 7, 2 -> 15.
    assert codes.tolist() == [[0, 5, 7, 15]]
    expected = (torch.tensor([0, 5, 7, 15]) - 5) * s
    torch.testing.assert_close(fake_quantize(w, QuantSpec(4, -1))[0], expected.float())


def test_fake_quant_3bit_and_clamped_zero():
    # All-positive group: lo = 1 > 0, so -round(lo / scale) < 0 and the zero clamps to 0; codes stay in 0..7.
    w = torch.tensor([[1.0, 2.0, 3.0, 8.0]])
    codes, zeros, scales = quantize_weight(w, QuantSpec(3, -1))
    assert zeros.tolist() == [[0]] and int(codes.max()) <= 7 and int(codes.min()) >= 0
    s = float(scales)
    assert s == pytest.approx(7 / 7, rel=1e-3)
    assert codes.tolist() == [[1, 2, 3, 7]]  # 8 / 1 = 8 clamps to the top code 7


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("N,K,G", [(8, 64, 32), (24, 192, 64), (16, 256, 128), (40, 96, -1)])
def test_fake_quant_equals_packed_dequant(bits, N, K, G):
    """Fake quantization is bit-identical to packing and dequantizing with the layout's reference."""
    torch.manual_seed(N + K)
    w = torch.randn(N, K) * torch.rand(1, K) * 3
    spec = QuantSpec(bits, G)
    codes, zeros, scales = quantize_weight(w, spec)
    assert int(codes.max()) <= 2**bits - 1 and int(zeros.max()) <= 2**bits - 1
    qweight, qzeros, s = pack_linear(codes, zeros, scales)
    W = dequantize(qweight, qzeros, s, G)  # [K, N] fp16
    torch.testing.assert_close(W.t().float(), fake_quantize(w, spec).half().float(), rtol=0, atol=0)
    # And the error is what a b-bit grid allows: half a step per weight, plus the fp16 rounding of the step
    # accumulated over 2^b - 1 steps (the grid's ends can sit that much inside the group's min / max).
    step = scales.float().repeat_interleave(K if G == -1 else G, dim=1)
    slack = (2**bits - 1) * 2.0**-11
    assert ((fake_quantize(w, spec) - w).abs() <= step * (0.5 + slack) + 1e-6).all()


def test_fake_quant_with_clip_bounds_clamps():
    w = torch.tensor([[-1.0, -0.2, 0.3, 1.0]])
    lo, hi = torch.tensor([[-0.5]]), torch.tensor([[0.5]])
    out = fake_quantize(w, QuantSpec(4, -1), lo, hi)
    half_step = 0.5 * (0.5 - -0.5) / 15  # the grid's ends sit within half a step of the bounds (rounded zero)
    assert float(out.min()) >= -0.5 - half_step - 1e-3 and float(out.max()) <= 0.5 + half_step + 1e-3
    assert float(out.max()) < 0.9  # 1.0 was clamped, not reproduced


def test_group_size_must_divide_in_features_and_names_the_layer():
    with pytest.raises(QuantizationError, match=r"model.layers.3.mlp.down_proj: group size 128 does not divide in_features 192"):
        QuantSpec(4, 128).group(192, "model.layers.3.mlp.down_proj")


@pytest.mark.parametrize("bits,group", [(5, 64), (2, 64), (4, 48), (4, 0)])
def test_unsupported_settings(bits, group):
    with pytest.raises(QuantizationError, match="not supported"):
        QuantSpec(bits, group)


def test_map_chunks_keeps_order_one_thread_per_worker_and_the_callers_modes():
    def probe(i):
        x = torch.ones(3)
        return i, torch.get_num_threads(), torch.is_inference_mode_enabled(), x.is_inference()

    before = torch.get_num_threads()
    with torch.inference_mode():
        got = map_chunks(probe, range(7))
    assert [g[0] for g in got] == list(range(7))
    assert all(g[1] == 1 and g[2] and g[3] for g in got)
    assert torch.get_num_threads() == before
    assert not any(g[2] for g in map_chunks(probe, range(3)))


@pytest.mark.parametrize("N,K,G", [(37, 96, 32), (300, 128, 64)])
def test_searches_give_the_same_bits_on_one_core_and_on_two(N, K, G):
    torch.manual_seed(N)
    W, X = torch.randn(N, K), torch.randn(400, K) * torch.rand(K) * 3
    H_fit, H_val = X[:300].t() @ X[:300] / 300, X[300:].t() @ X[300:] / 100
    spec = QuantSpec(4, G)

    def run():  # (the clip search and refit are chunked small ops only: no GEMM whose sums follow the thread count)
        clip = search_clip(W, H_fit, H_val, spec, clip_ratios())
        refit = refit_bounds(W, clip.lo, clip.hi, H_fit, H_val, spec)
        return clip.lo, clip.hi, *refit[:2]

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run()  # map_chunks runs the chunks in order on this thread
    finally:
        torch.set_num_threads(n)
    torch.set_num_threads(2)
    try:
        two = run()
    finally:
        torch.set_num_threads(n)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
