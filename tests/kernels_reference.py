"""Helpers for the kernels' tests: an independent packer written straight from the layout description, and tolerances.

The packer deliberately does not call tinyserve_kernels.layout.pack: if both shared a mistake, a round trip would hide it.
Layout (tinyserve_kernels/layout.py): qweight [K, N // 8] int32; within word j of a row, reading the 4-bit nibbles from the
lowest bits up gives the codes of columns 8j + 0, 8j + 2, 8j + 4, 8j + 6, 8j + 1, 8j + 3, 8j + 5, 8j + 7.
W[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n].
"""

import torch

NIBBLE_COLUMNS = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i (bits 4i .. 4i+3) of a word holds column NIBBLE_COLUMNS[i]


def plain_pack(codes: list[list[int]]) -> torch.Tensor:
    """Rows of integer codes (0..15, a multiple of 8 per row) -> int32 words, one nibble at a time."""
    rows = []
    for row in codes:
        words = []
        for j in range(len(row) // 8):
            word = 0
            for i, column in enumerate(NIBBLE_COLUMNS):
                word += row[8 * j + column] * 16**i
            if word >= 2**31:  # store the unsigned 32-bit value in a signed int32
                word -= 2**32
            words.append(word)
        rows.append(words)
    return torch.tensor(rows, dtype=torch.int32)


def random_layer(K: int, N: int, G: int, seed: int = 0):
    """Random codes, zero points and fp16 scales for a [K, N] layer; returns the packed tensors and fp32 W [K, N].

    The packed tensors come from plain_pack; W is computed here from the integers, not from tinyserve_kernels.layout.
    """
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (K, N), generator=g)
    z = torch.randint(0, 16, (K // G, N), generator=g)
    s = (torch.rand(K // G, N, generator=g) * 0.02 + 0.001).half()
    W = (q - z.repeat_interleave(G, dim=0)).float() * s.float().repeat_interleave(G, dim=0)
    return plain_pack(q.tolist()), plain_pack(z.tolist()), s, W


def assert_matches(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """y (rounded to `dtype` by the kernel) against an fp32 reference, relative to the reference's largest entry.

    bf16 keeps 8 significant bits (relative rounding up to 2^-9), fp16 11 (2^-12); the bounds leave room for a few
    roundings and a different summation order, and are orders of magnitude below what a layout mistake produces.
    """
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}[dtype]
    scale = ref.abs().max().item()
    err = (y.float() - ref).abs().max().item()
    assert err <= tol * scale, f"max error {err:.4g} exceeds {tol} x {scale:.4g}"
