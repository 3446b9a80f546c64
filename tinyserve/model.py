"""The Llama-style decoder (Llama-2/3, SmolLM2, Mistral-style, Qwen2/2.5): one reference forward, pure torch.

`forward` runs a batch of sequences, each T >= 1 new tokens at its own slot and start position (a prompt chunk and a
decode step are the same call), and is the definition every backend (tinyserve/runtime/backends/) is tested against. No
device placement, no cache allocation, no kernel choice: the linears are whatever callables the weights hold (a
backend swaps in its kernels), the cache is passed in. Families differ only by data (biases, RoPE settings).

Shapes: H hidden size, Hq query heads, Hkv key/value heads, D head dim, R = Hq // Hkv, I intermediate size,
V vocabulary, N new tokens in the batch (all sequences), B sequences, S max_seq_len of the cache.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tinyserve.config import ModelConfig, RopeConfig
from tinyserve_kernels.layout import dequantize


@dataclass(frozen=True)
class SeqChunk:
    """New tokens of one sequence: they go to positions start..start + len(tokens) - 1 of its cache slot and attend
    to positions 0..their own of that slot (positions before start are already cached)."""

    slot: int
    start: int
    tokens: Sequence[int]


@dataclass
class DenseLinear:
    weight: torch.Tensor  # [N, K] (PyTorch orientation)
    bias: torch.Tensor | None = None  # [N]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    @property
    def nbytes(self) -> int:
        return nbytes(self.weight, self.bias)


@dataclass
class PackedLinear:
    """An INT4 linear as the file stores it (tinyserve_kernels/layout.py). Calling it dequantizes the whole weight: the
    exact reference; backends replace it with their kernels' form at load time."""

    qweight: torch.Tensor  # [K, N // 8] int32
    qzeros: torch.Tensor  # [K // G, N // 8] int32
    scales: torch.Tensor  # [K // G, N] fp16
    group_size: int  # G, resolved (never -1)
    bias: torch.Tensor | None = None  # [N]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize(self.qweight, self.qzeros, self.scales.float(), self.group_size).to(x.dtype)  # [K, N], one rounding
        y = x @ w
        return y if self.bias is None else y + self.bias.to(x.dtype)

    @property
    def nbytes(self) -> int:
        return nbytes(self.qweight, self.qzeros, self.scales, self.bias)


# A linear: x [..., K] -> [..., N], with the bytes a one-row call reads as `nbytes`.
Linear = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [H]
    qkv: Linear  # H -> (Hq + 2 Hkv) D, q then k then v along N
    o: Linear  # Hq D -> H
    mlp_norm: torch.Tensor  # [H]
    gate_up: Linear  # H -> 2 I, gate then up along N
    down: Linear  # I -> H

    def linears(self) -> tuple[str, ...]:
        return ("qkv", "o", "gate_up", "down")


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [V, H]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [H]
    lm_head: Linear  # H -> V

    def decode_bytes(self) -> int:
        """Weight bytes one decode step reads (every linear and norm, plus one embedding row)."""
        total = self.embed[0].nbytes + nbytes(self.norm) + self.lm_head.nbytes
        for lw in self.layers:
            total += nbytes(lw.attn_norm, lw.mlp_norm) + sum(getattr(lw, name).nbytes for name in lw.linears())
        return total


def nbytes(*tensors: torch.Tensor | None) -> int:
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
    # On CPU F.rms_norm is a composite of ~6 ops; layer_norm is one fused kernel. LayerNorm of [x, -x] has mean 0 and
    # variance mean(x^2), so its first half is exactly RMSNorm of x.
    return F.layer_norm(torch.cat([x, -x], dim=-1), (2 * H,), None, None, eps)[..., :H] * weight


# Attention over the cache for one layer: (layer, q [N, Hq, D], k [N, Hkv, D], v [N, Hkv, D]) -> [N, Hq, D]. It writes
# k and v into the cache at the new tokens' positions and attends each query to its own sequence's positions.
Attention = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class CacheAttention:
    """The reference attention: torch's SDPA, one sequence at a time, on views of that sequence's slot. A row reads
    only its own slot up to its own position, so its result never depends on what else is in the batch."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, seqs: Sequence[SeqChunk]):
        self.k_cache, self.v_cache = k_cache, v_cache  # [layers, slots, Hkv, S, D]
        self.seqs = seqs
        self.masks = []  # per sequence: None (causal from 0, or one token seeing everything) or [T, end] bool
        for s in seqs:
            T, end = len(s.tokens), s.start + len(s.tokens)
            mask = None
            if s.start and T > 1:  # query t (position start + t) sees cache positions 0..start + t
                mask = torch.arange(end, device=k_cache.device)[None, :] <= torch.arange(s.start, end, device=k_cache.device)[:, None]
            self.masks.append(mask)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        Hq, Hkv, D = q.shape[1], k.shape[1], q.shape[2]
        out = torch.empty_like(q)
        row = 0
        for s, mask in zip(self.seqs, self.masks):
            T, end = len(s.tokens), s.start + len(s.tokens)
            kc, vc = self.k_cache[layer, s.slot], self.v_cache[layer, s.slot]  # [Hkv, S, D]
            kc[:, s.start : end] = k[row : row + T].transpose(0, 1)
            vc[:, s.start : end] = v[row : row + T].transpose(0, 1)
            if T == 1:
                # Grouped-query attention without copying keys: the R query heads that share a key/value head become
                # R query rows of that head (q head h uses kv head h // R, as transformers' repeat_kv).
                qs = q[row].view(1, Hkv, Hq // Hkv, D)  # 4-D: CPU SDPA's flash kernel (3-D inputs take the slow math path)
                out[row] = F.scaled_dot_product_attention(qs, kc[None, :, :end], vc[None, :, :end]).view(Hq, D)
            else:
                qs = q[row : row + T].transpose(0, 1)  # [Hq, T, D]
                o = F.scaled_dot_product_attention(qs[None], kc[None, :, :end], vc[None, :, :end], attn_mask=mask,
                                                   is_causal=mask is None, enable_gqa=Hq != Hkv)
                out[row : row + T] = o[0].transpose(0, 1)
            row += T
        return out


def forward(
    cfg: ModelConfig,
    w: ModelWeights,
    tokens: torch.Tensor,  # [N] int64: the new tokens of every sequence, one after another
    positions: torch.Tensor,  # [N] int64: each token's position in its sequence
    attention: Attention,
    cos: torch.Tensor,  # [S, D] in the compute dtype
    sin: torch.Tensor,
    last: torch.Tensor | None = None,  # [B] int64 rows whose logits to return (None: all N)
) -> torch.Tensor:
    """The decoder over N new tokens; returns logits [B, V] (or [N, V]) in the lm_head's dtype."""
    N, Hq, Hkv, D = tokens.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    x = F.embedding(tokens, w.embed)  # [N, H]
    c, s = cos[positions][:, None], sin[positions][:, None]  # [N, 1, D], broadcast over heads
    for layer, lw in enumerate(w.layers):
        qkv = lw.qkv(rms_norm(x, lw.attn_norm, cfg.rms_norm_eps)).view(N, Hq + 2 * Hkv, D)
        qk = apply_rope(qkv[:, : Hq + Hkv], c, s)  # [N, Hq + Hkv, D]
        attn = attention(layer, qk[:, :Hq], qk[:, Hq:], qkv[:, Hq + Hkv :])  # [N, Hq, D]
        x = x + lw.o(attn.reshape(N, Hq * D))
        gate, up = lw.gate_up(rms_norm(x, lw.mlp_norm, cfg.rms_norm_eps)).chunk(2, dim=-1)
        x = x + lw.down(F.silu(gate) * up)
    if last is not None:
        x = x[last]  # only the rows whose logits are wanted go through the final norm and the lm_head
    return w.lm_head(rms_norm(x, w.norm, cfg.rms_norm_eps))


def batch_inputs(seqs: Sequence[SeqChunk], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [N], positions [N], last [B]) for `forward` from a batch of sequence chunks."""
    tokens, positions, last = [], [], []
    for s in seqs:
        tokens.extend(s.tokens)
        positions.extend(range(s.start, s.start + len(s.tokens)))
        last.append(len(tokens) - 1)
    as_long = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    return as_long(tokens), as_long(positions), as_long(last)


def reference_step(cfg: ModelConfig, w: ModelWeights, k_cache: torch.Tensor, v_cache: torch.Tensor, seqs: Sequence[SeqChunk],
                   cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """One step of the batch through `forward` with the reference attention: the last token's logits per sequence [B, V]."""
    tokens, positions, last = batch_inputs(seqs, w.embed.device)
    return forward(cfg, w, tokens, positions, CacheAttention(k_cache, v_cache, seqs), cos, sin, last)
