"""The Llama-style decoder (Llama-2/3, SmolLM2, Mistral-style, Qwen2/2.5) as pure functions of weights and inputs.

No device placement, no globals, no cache allocation: the runner owns those and passes buffers in. Families differ
only by data (biases present or not, RoPE settings), never by code paths.

Shapes: H hidden size, Hq query heads, Hkv key/value heads, D head dim, R = Hq // Hkv, I intermediate size,
V vocabulary, T prompt tokens, M sequences in a decode batch, S max_seq_len of the cache, L attended length.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import tinyserve_kernels
from tinyserve_kernels import cpu_native
from tinyserve.config import ModelConfig, RopeConfig


@dataclass
class DenseLinear:
    weight: torch.Tensor  # [N, K] (PyTorch orientation)
    bias: torch.Tensor | None = None  # [N]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1]:
            # One row: torch.mv is ~2.4x faster than F.linear for bf16 on CPU (same result bit for bit).
            y = torch.mv(self.weight, x.reshape(-1)).view(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)

    def one_row(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.weight, self.bias)


@dataclass
class Int4Linear:
    w: tinyserve_kernels.Int4Weights  # packed AWQ GEMM layout, prepared for its device
    bias: torch.Tensor | None = None  # [N]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return tinyserve_kernels.int4_linear(x, self.w, self.bias)

    def one_row(self, x: torch.Tensor) -> torch.Tensor:
        """x [1, K] -> [1, N] in x's dtype; the same numbers as __call__. For one bf16 row held for torch's op (no
        padding, no bias), or any bf16/fp32 row held for our kernel, it calls the kernel directly: dispatch's choice
        and reshapes cost ~5 us a call, 120 calls a step."""
        n = self.w.native
        if n is not None and x.dtype in (torch.bfloat16, torch.float32):
            return cpu_native.linear(x, n, self.bias)  # int4_linear's path for one row: ours at every M <= CPU_NATIVE_MAX_M
        p = self.w.int4pack
        if p is not None and self.bias is None and self.w.native is None and x.dtype == torch.bfloat16 and p.packed.shape[0] == p.out_features:
            return torch._weight_int4pack_mm_for_cpu(x, p.packed, p.op_group, p.scale_zero)
        return self(x)

    @property
    def nbytes(self) -> int:
        # What a one-row call reads: the INT4 form the kernel uses (not a dense copy cached for long prompts).
        w = self.w
        if w.native is not None:
            return _nbytes(w.native.packed, self.bias)
        if w.int4pack is not None:
            return _nbytes(w.int4pack.packed, w.int4pack.scale_zero, self.bias)
        return _nbytes(w.qweight, w.qzeros, w.scales, w.dense, self.bias)


@dataclass
class Int8Linear:
    """Weight-only int8 with one symmetric scale per output row: W[n, :] = q[n, :] * scale[n].

    Held for torch's `_weight_int8pack_mm` (qweight, scales), or for our CPU kernel (native: the same codes and scales
    in its layout, tinyserve_kernels/cpu_native.py), which reads the weights once for all rows of a batch instead of once per
    row, and computes each row the same whatever else is batched."""

    qweight: torch.Tensor | None  # [N, K] int8 (None when native holds the weights)
    scales: torch.Tensor | None  # [N] in the activation dtype (idem)
    bias: torch.Tensor | None = None
    native: cpu_native.NativeInt8 | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.native is not None:
            return cpu_native.int8_linear(x2, self.native, self.bias).view(*shape[:-1], -1)  # bias before the rounding
        y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales).view(*shape[:-1], -1)
        return y if self.bias is None else y + self.bias

    def one_row(self, x: torch.Tensor) -> torch.Tensor:
        """x [1, K] -> [1, N]; the same numbers as __call__, without its reshapes."""
        if self.native is not None:
            return cpu_native.int8_linear(x, self.native, self.bias)
        if self.bias is None:
            return torch._weight_int8pack_mm(x, self.qweight, self.scales)
        return self(x)

    @property
    def nbytes(self) -> int:
        if self.native is not None:
            return _nbytes(self.native.packed, self.native.scales, self.bias)
        return _nbytes(self.qweight, self.scales, self.bias)

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype, rows: int = 4096, native: bool = False) -> "Int8Linear":
        """[N, K] float -> int8 rows with scale max|w| / 127 (round to nearest), `rows` at a time (bounded memory).
        native: hold them for our CPU kernel (the scales rounded to `dtype` first, as torch's op gets them)."""
        N = weight.shape[0]
        q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scales = torch.empty(N, dtype=torch.float32, device=weight.device)
        for a in range(0, N, rows):
            w = weight[a : a + rows].to(torch.float32, copy=True)  # a copy even for fp32 weights: divided in place below
            s = w.abs().amax(dim=1).clamp_(min=1e-12).div_(127.0)
            q[a : a + rows] = w.div_(s[:, None]).round_().clamp_(-127, 127)
            scales[a : a + rows] = s
        if native:
            return cls(None, None, native=cpu_native.repack_int8(q, scales.to(dtype)))
        return cls(q, scales.to(dtype))


Linear = DenseLinear | Int4Linear | Int8Linear


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [H]
    qkv: Linear  # H -> (Hq + 2 Hkv) D, q then k then v along N
    o: Linear  # Hq D -> H
    mlp_norm: torch.Tensor  # [H]
    gate_up: Linear  # H -> 2 I, gate then up along N
    down: Linear  # I -> H


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [V, H]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [H]
    lm_head: Linear  # H -> V

    def decode_bytes(self) -> int:
        """Weight bytes one decode step reads (every linear and norm, plus one embedding row)."""
        total = self.embed[0].nbytes + _nbytes(self.norm) + self.lm_head.nbytes
        for lw in self.layers:
            total += _nbytes(lw.attn_norm, lw.mlp_norm) + sum(l.nbytes for l in (lw.qkv, lw.o, lw.gate_up, lw.down))
        return total


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """[D / 2] fp32 inverse frequencies, computed like transformers does (so fp32 logits match to ~1e-6)."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.kind == "default":
        return inv_freq
    # llama3: wavelengths longer than the original context are stretched by `factor`, short ones kept, a smooth
    # interpolation in between.
    low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
    high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_tables(rope: RopeConfig, head_dim: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [length, D] fp32 for positions 0..length-1.

    sin carries rotate-half's sign: rotate_half(x) * sin == roll(x, D/2) * sin_signed, with
    sin_signed = cat(-sin_half, sin_half). That turns RoPE into one roll and one fused multiply-add.
    """
    inv_freq = rope_inv_freq(rope, head_dim)  # [D/2]
    freqs = torch.arange(length, dtype=torch.int64).float()[:, None] * inv_freq[None, :]  # [length, D/2]
    cos = torch.cat([freqs.cos(), freqs.cos()], dim=-1)
    sin = torch.cat([-freqs.sin(), freqs.sin()], dim=-1)
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., D]; cos, sin broadcastable to x (sin with the rotate-half sign, see rope_tables)."""
    return torch.addcmul(x * cos, torch.roll(x, x.shape[-1] // 2, dims=-1), sin)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim, computed in fp32, returned in x's dtype."""
    H = x.shape[-1]
    if x.device.type != "cpu":
        return F.rms_norm(x, (H,), weight, eps)
    # On CPU, F.rms_norm is a composite of ~6 ops (1.4 ms of a 12.4 ms SmolLM2 decode step); layer_norm is one fused
    # kernel. LayerNorm of [x, -x] has mean 0 and variance mean(x^2), so its first half is exactly RMSNorm of x.
    # The same step took 11.9 ms this way (A/B in one process, 2 threads).
    return F.layer_norm(torch.cat([x, -x], dim=-1), (2 * H,), None, None, eps)[..., :H] * weight


def mlp(lw: LayerWeights, h: torch.Tensor) -> torch.Tensor:
    gate, up = lw.gate_up(h).chunk(2, dim=-1)
    return lw.down(F.silu(gate) * up)


def prefill(
    cfg: ModelConfig,
    w: ModelWeights,
    k_cache: torch.Tensor,  # [layers, slots, Hkv, S, D]
    v_cache: torch.Tensor,  # [layers, slots, Hkv, S, D]
    slot: int,
    tokens: torch.Tensor,  # [T] int64
    start: int,  # position of tokens[0]; positions before it are already in the slot's cache
    cos: torch.Tensor,  # [S, D] in the compute dtype
    sin: torch.Tensor,  # [S, D]
) -> torch.Tensor:
    """Run T tokens of one sequence, append their keys/values to its slot, return the last position's logits [V]."""
    T, Hq, Hkv, D = tokens.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    end = start + T
    x = F.embedding(tokens, w.embed)[None]  # [1, T, H]
    c, s = cos[start:end], sin[start:end]  # [T, D], broadcast over heads below
    mask = None
    if start:
        # Query t (position start + t) sees cache positions 0..start + t.
        mask = torch.arange(end, device=tokens.device)[None, :] <= torch.arange(start, end, device=tokens.device)[:, None]
    for layer, lw in enumerate(w.layers):
        h = rms_norm(x, lw.attn_norm, cfg.rms_norm_eps)
        qkv = lw.qkv(h).view(1, T, Hq + 2 * Hkv, D).transpose(1, 2)  # [1, Hq + 2 Hkv, T, D]
        qk = apply_rope(qkv[:, : Hq + Hkv], c, s)
        q, k, v = qk[:, :Hq], qk[:, Hq:], qkv[:, Hq + Hkv :]
        k_cache[layer, slot, :, start:end] = k[0]
        v_cache[layer, slot, :, start:end] = v[0]
        if start:
            k = k_cache[layer, slot : slot + 1, :, :end]  # [1, Hkv, end, D]
            v = v_cache[layer, slot : slot + 1, :, :end]
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not start, enable_gqa=Hq != Hkv)
        x = x + lw.o(attn.transpose(1, 2).reshape(1, T, Hq * D))
        x = x + mlp(lw, rms_norm(x, lw.mlp_norm, cfg.rms_norm_eps))
    # Only the last position goes through the final norm and lm_head.
    return w.lm_head(rms_norm(x[0, -1], w.norm, cfg.rms_norm_eps))


# A decode attention kernel: (q [M, Hkv, R, D], k [M, Hkv, L, D], v [M, Hkv, L, D], lengths [M] int64) -> [M, Hkv, R, D],
# row m attending to its positions 0..lengths[m]-1 with scale 1/sqrt(D) (tinyserve_kernels.cpu_native.decode_attention).
DecodeAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def decode(
    cfg: ModelConfig,
    w: ModelWeights,
    k_cache: torch.Tensor,  # [layers, slots, Hkv, S, D]
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # [M] int64, distinct
    tokens: torch.Tensor,  # [M] int64
    positions: torch.Tensor,  # [M] int64: where each token goes; row m attends to 0..positions[m]
    length: int,  # L >= max(positions) + 1: how much of the cache the batch attends over
    cos: torch.Tensor,  # [S, D]
    sin: torch.Tensor,
    first_slot: int | None = None,  # when slots == first_slot + arange(M): read the cache as a view (no gather)
    masked: bool = True,  # False only when M == 1 and length == positions[0] + 1 (nothing to hide)
    attention: DecodeAttention | None = None,  # None: torch's SDPA with a mask
) -> torch.Tensor:
    """One token for each of M sequences in their own slots; returns logits [M, V].

    Each row only attends to its own slot's positions 0..positions[m] (the rest is masked, or never read by
    `attention`), so a row's result does not depend on which other rows share the batch.
    """
    M, Hq, Hkv, D = tokens.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    R = Hq // Hkv
    x = F.embedding(tokens, w.embed)  # [M, H]
    c, s = cos[positions][:, None], sin[positions][:, None]  # [M, 1, D]
    # [M, 1, 1, L] True where a row may attend. A lone sequence attending exactly 0..pos needs no mask.
    mask = lengths = None
    if attention is not None:
        lengths = positions + 1  # [M]: row m attends to positions 0..positions[m]
    elif masked:
        mask = (torch.arange(length, device=tokens.device)[None, :] <= positions[:, None])[:, None, None, :]
    # Per-layer views, taken once per step: [slots, Hkv, S, D] each. A lone sequence (or a run of consecutive
    # slots) reads its rows as a view; other batches gather their rows (a copy of L positions per row).
    k_layers, v_layers = k_cache.unbind(0), v_cache.unbind(0)
    rows = slice(first_slot, first_slot + M) if first_slot is not None else slots
    for lw, kl, vl in zip(w.layers, k_layers, v_layers):
        h = rms_norm(x, lw.attn_norm, cfg.rms_norm_eps)
        qkv = lw.qkv(h).view(M, Hq + 2 * Hkv, D)
        qk = apply_rope(qkv[:, : Hq + Hkv], c, s)  # [M, Hq + Hkv, D]
        kl[slots, :, positions] = qk[:, Hq:]  # [M, Hkv, D] into each row's slot and position
        vl[slots, :, positions] = qkv[:, Hq + Hkv :]
        k, v = kl[rows, :, :length], vl[rows, :, :length]  # [M, Hkv, L, D]
        # Grouped-query attention without copying keys: the R query heads that share a key/value head become R
        # query rows of that head. q head h uses kv head h // R, as in transformers' repeat_kv.
        q = qk[:, :Hq].reshape(M, Hkv, R, D)
        if attention is not None:
            attn = attention(q, k, v, lengths)  # [M, Hkv, R, D]
        else:
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + lw.o(attn.reshape(M, Hq * D))
        x = x + mlp(lw, rms_norm(x, lw.mlp_norm, cfg.rms_norm_eps))
    return w.lm_head(rms_norm(x, w.norm, cfg.rms_norm_eps))


def decode_one(
    cfg: ModelConfig,
    w: ModelWeights,
    k_cache: torch.Tensor,  # [layers, slots, Hkv, S, D]
    v_cache: torch.Tensor,
    slot: int,
    token: int,
    pos: int,  # where the token goes; it attends to positions 0..pos of its slot
    cos: torch.Tensor,  # [S, D]
    sin: torch.Tensor,
    attention: DecodeAttention | None = None,  # as in decode
) -> torch.Tensor:
    """decode() for one sequence (M = 1, nothing masked): the same operations on the same operands, so the same logits
    [1, V] bit for bit, with about half the small ops and Python calls (one-sequence decode of a small model is bound
    by per-op overhead, not by the kernels): Python-int cache views instead of index_put and gathers, the residual
    stream kept in the first half of the [x, -x] buffer that rms_norm's layer_norm reads (no cat per norm), linears
    called through one_row (torch's op directly where it applies), in-place residual adds and activation. CPU only
    (its norm is rms_norm's CPU form); CUDA decodes through captured graphs."""
    H, Hq, Hkv, D, I = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    R, eps = Hq // Hkv, cfg.rms_norm_eps
    buf = torch.empty(1, 2 * H, dtype=w.embed.dtype, device=w.embed.device)  # [x, -x]
    x, neg_x = buf[:, :H], buf[:, H:]
    x.copy_(w.embed[token])

    def norm(weight: torch.Tensor) -> torch.Tensor:  # rms_norm(x, weight) on CPU, see there
        torch.neg(x, out=neg_x)
        return F.layer_norm(buf, (2 * H,), None, None, eps)[:, :H] * weight

    c, s = cos[pos], sin[pos]  # [D], broadcast over heads
    # Per-layer views, taken once per step: where this token's key/value go ([Hkv, D]) and what it attends ([1, Hkv, L, D]).
    k_new, v_new = k_cache[:, slot, :, pos].unbind(0), v_cache[:, slot, :, pos].unbind(0)
    k_seen, v_seen = k_cache[:, slot : slot + 1, :, : pos + 1].unbind(0), v_cache[:, slot : slot + 1, :, : pos + 1].unbind(0)
    lengths = torch.tensor([pos + 1], device=k_cache.device) if attention is not None else None
    for lw, kn, vn, k, v in zip(w.layers, k_new, v_new, k_seen, v_seen):
        qkv = lw.qkv.one_row(norm(lw.attn_norm)).view(1, Hq + 2 * Hkv, D)
        qk = apply_rope(qkv[:, : Hq + Hkv], c, s)  # [1, Hq + Hkv, D]
        kn.copy_(qk[0, Hq:])
        vn.copy_(qkv[0, Hq + Hkv :])
        q = qk[:, :Hq].view(1, Hkv, R, D)
        attn = attention(q, k, v, lengths) if attention is not None else F.scaled_dot_product_attention(q, k, v)  # as in decode
        x.add_(lw.o.one_row(attn.reshape(1, Hq * D)))
        gate_up = lw.gate_up.one_row(norm(lw.mlp_norm))  # [1, 2 I]
        x.add_(lw.down.one_row(F.silu(gate_up[:, :I]).mul_(gate_up[:, I:])))
    return w.lm_head.one_row(norm(w.norm))
