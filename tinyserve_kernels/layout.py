"""The packed INT4 weight format: AutoAWQ's "GEMM" layout, defined once for the whole project.

With K = in_features, N = out_features and G = group size (G = K for per-output-channel groups):

    qweight: [K, N // 8]      int32   8 four-bit codes per word, see AWQ_ORDER
    qzeros:  [K // G, N // 8] int32   integer zero points, packed the same way
    scales:  [K // G, N]      fp16
    W[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]        y = x @ W + bias

Within one int32 word j, the code of column 8j + c sits at bit shift 4 * (c // 2) + 16 * (c % 2): reading the
nibbles from the lowest bits up gives columns [0, 2, 4, 6, 1, 3, 5, 7]. This odd order is what AutoAWQ, vLLM and
transformers use (it lets their CUDA kernels convert two nibbles to two fp16 values with one LOP3 instruction).

3-bit codes are stored in the same 4-bit containers (values 0..7); only config.json's `bits` says so.

The functions here are the pure-torch reference every other part of the project (quantizer, loader, kernels' tests)
is checked against. They favour obviousness over speed.
"""

import torch

PACK_FACTOR = 8  # 4-bit codes per int32 word
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ_ORDER[i]: the column whose code sits in nibble i (bits 4i..4i+3)
# SHIFTS[c]: bit shift of column c of a word; the inverse permutation of AWQ_ORDER, times 4.
SHIFTS = tuple(4 * AWQ_ORDER.index(c) for c in range(PACK_FACTOR))

SUPPORTED_BITS = (3, 4)


def resolve_group_size(group_size: int, in_features: int) -> int:
    """-1 means one group over all of K (per output channel)."""
    return in_features if group_size == -1 else group_size


def pack(codes: torch.Tensor) -> torch.Tensor:
    """[R, N] integer codes in 0..15 -> [R, N // 8] int32 words in AWQ order."""
    rows, cols = codes.shape
    if cols % PACK_FACTOR:
        raise ValueError(f"cannot pack {cols} columns: the packed layout needs a multiple of {PACK_FACTOR}")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > 15):
        raise ValueError("codes must lie in 0..15 to be packed into 4-bit nibbles")
    c = c.view(rows, cols // PACK_FACTOR, PACK_FACTOR)
    shifts = torch.tensor(SHIFTS, dtype=torch.int64, device=codes.device)
    words = (c << shifts).sum(dim=-1)  # [R, N/8] int64 holding an unsigned 32-bit value
    # Reinterpret the unsigned 32-bit value as signed int32 (the top nibble can set bit 31).
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack(words: torch.Tensor) -> torch.Tensor:
    """[R, N // 8] int32 words in AWQ order -> [R, N] int32 codes in 0..15."""
    rows, n_words = words.shape
    shifts = torch.tensor(SHIFTS, dtype=torch.int32, device=words.device)
    codes = (words.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF  # arithmetic shift, masked: sign bits drop out
    return codes.reshape(rows, n_words * PACK_FACTOR)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Packed tensors -> W [K, N] in scales' dtype (so y = x @ W). Computed in fp32, rounded once at the end."""
    K = qweight.shape[0]
    G = resolve_group_size(group_size, K)
    check_shapes(qweight, qzeros, scales, G)
    q = unpack(qweight).float()  # [K, N]
    z = unpack(qzeros).float().repeat_interleave(G, dim=0)  # [K, N]
    s = scales.float().repeat_interleave(G, dim=0)  # [K, N]
    return ((q - z) * s).to(scales.dtype)


def check_shapes(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int, name: str = "") -> None:
    """Raise a ValueError naming the layer when the three tensors do not form one packed linear."""
    where = f"{name}: " if name else ""
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"{where}qweight and qzeros must be int32, got {qweight.dtype} and {qzeros.dtype}")
    if qweight.dim() != 2 or qzeros.dim() != 2 or scales.dim() != 2:
        raise ValueError(f"{where}qweight, qzeros and scales must be 2-D")
    K, N = qweight.shape[0], qweight.shape[1] * PACK_FACTOR
    G = resolve_group_size(group_size, K)
    if G <= 0 or K % G:
        raise ValueError(f"{where}group size {group_size} does not divide in_features {K}")
    if tuple(scales.shape) != (K // G, N):
        raise ValueError(f"{where}scales has shape {tuple(scales.shape)}, expected {(K // G, N)}")
    if tuple(qzeros.shape) != (K // G, N // PACK_FACTOR):
        raise ValueError(f"{where}qzeros has shape {tuple(qzeros.shape)}, expected {(K // G, N // PACK_FACTOR)}")


def pack_linear(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A quantized nn.Linear weight in PyTorch's [out, in] orientation -> (qweight, qzeros, scales) in the file layout.

    codes:  [N, K]      integer codes
    zeros:  [N, K // G] integer zero points
    scales: [N, K // G] float
    """
    return pack(codes.t().contiguous()), pack(zeros.t().contiguous()), scales.t().contiguous().to(torch.float16)
