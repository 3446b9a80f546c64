"""The packed layout against hand-computed words and a round trip."""

import pytest
import torch

from tinyserve_kernels.layout import AWQ_ORDER, SHIFTS, check_shapes, dequantize, pack, pack_linear, unpack


def test_shifts_follow_the_awq_order():
    # Column 8j + c sits at bit shift 4 * (c // 2) + 16 * (c % 2).
    assert SHIFTS == tuple(4 * (c // 2) + 16 * (c % 2) for c in range(8))
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)


def test_pack_hand_computed_words():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [15, 0, 0, 0, 0, 0, 0, 15]])
    # Nibbles from the lowest bits up hold columns 0, 2, 4, 6, 1, 3, 5, 7.
    # Row 0: 1, 3, 5, 7, 2, 4, 6, 8 -> 0x86427531. Row 1: column 0 -> nibble 0, column 7 -> nibble 7: 0xF000000F.
    expected = [0x86427531, 0xF000000F]
    words = pack(codes)
    assert words.dtype == torch.int32 and words.shape == (2, 1)
    assert [w & 0xFFFFFFFF for w in words[:, 0].tolist()] == expected


@pytest.mark.parametrize("rows,cols", [(1, 8), (5, 72), (64, 200)])
def test_pack_unpack_round_trip(rows, cols):
    codes = torch.randint(0, 16, (rows, cols), dtype=torch.int32)
    assert torch.equal(unpack(pack(codes)), codes)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack(torch.zeros(2, 7, dtype=torch.int32))
    with pytest.raises(ValueError, match="0..15"):
        pack(torch.full((1, 8), 16))


@pytest.mark.parametrize("K,N,G", [(64, 72, 32), (192, 8, 64), (96, 16, -1)])
def test_dequantize_formula(K, N, G):
    g = K if G == -1 else G
    q = torch.randint(0, 16, (K, N))
    z = torch.randint(0, 16, (K // g, N))
    s = torch.rand(K // g, N).half()
    W = dequantize(pack(q), pack(z), s, G)
    expected = (q - z.repeat_interleave(g, 0)).float() * s.float().repeat_interleave(g, 0)
    assert W.dtype == torch.float16
    torch.testing.assert_close(W.float(), expected, rtol=1e-3, atol=1e-3)


def test_pack_linear_transposes_from_torch_orientation():
    N, K, G = 16, 64, 32
    codes = torch.randint(0, 16, (N, K))
    zeros = torch.randint(0, 16, (N, K // G))
    scales = torch.rand(N, K // G)
    qw, qz, s = pack_linear(codes, zeros, scales)
    W = dequantize(qw, qz, s, G)  # [K, N]
    expected = (codes - zeros.repeat_interleave(G, 1)) * s.float().repeat_interleave(G, 0).t()  # s: [K // G, N]
    torch.testing.assert_close(W.float(), expected.t().float(), rtol=1e-3, atol=1e-3)


def test_check_shapes_names_the_layer():
    q = pack(torch.zeros(64, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="layers.3.mlp.up_proj: group size 48"):
        check_shapes(q, pack(torch.zeros(1, 16, dtype=torch.int32)), torch.zeros(1, 16).half(), 48, "layers.3.mlp.up_proj")
