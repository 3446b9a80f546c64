"""The input statistics v_proj's weight error is actually seen through.

Attention averages v_proj's outputs over positions before anything reads them: query head h at token t gets
sum_s A[h, t, s] W_v x_s = W_v xbar[h, t], with xbar[h, t] = sum_s A[h, t, s] x_s. A weight error dW_v therefore costs
E ||dW_v xbar||^2, not E ||dW_v x||^2, and the Hessian for the rows of key/value head g is
Hbar_g = mean over g's query heads and the tokens of xbar xbar^T. Attention concentrates on a few positions (the
first token above all: attention sinks) whose inputs the plain X^T X / T weighs like any other token's. On SmolLM2 at
w4 g64, GPTQ of block 3's v_proj against X^T X / T left a block output error of 22% of the block's update (RTN: 18%),
against Hbar 5.3% (BENCHMARKS.md, issue 20).

The attention weights are recomputed from the block's own q_proj and k_proj outputs (rotary embedding, causal
softmax), as the block's attention computes them, so nothing depends on the attention implementation.
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class AttentionShape:
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float  # the softmax's scale of q.k

    @staticmethod
    def of(attn: nn.Module) -> "AttentionShape":
        """The shape of a transformers Llama/Qwen2 attention module."""
        cfg = attn.config
        return AttentionShape(cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim, float(attn.scaling))


@dataclass(frozen=True)
class ValueSite:
    """Where run_block finds the attention of a block: the stats key of q/k/v's shared input, and the q_proj and
    k_proj modules whose outputs give the attention weights."""

    site: str
    q: nn.Module
    k: nn.Module
    shape: AttentionShape


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding as Llama and Qwen2 apply it (halves rotated): x [B, h, S, D], cos/sin [B, S, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def value_gram(x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
               shape: AttentionShape) -> torch.Tensor:
    """sum over tokens and each kv head's query heads of xbar xbar^T -> [kv_heads, K, K] fp32 (divide by the token
    count times heads // kv_heads for the mean). x [B, S, K] the attention's input, q [B, S, heads * D] and
    k [B, S, kv_heads * D] its q_proj and k_proj outputs."""
    B, S, K = x.shape
    D, group = shape.head_dim, shape.heads // shape.kv_heads
    cos, sin = (t.to(torch.float32) for t in position_embeddings)
    q = _rotate(q.float().view(B, S, shape.heads, D).transpose(1, 2), cos, sin)  # [B, h, S, D]
    k = _rotate(k.float().view(B, S, shape.kv_heads, D).transpose(1, 2), cos, sin)  # [B, kv, S, D]
    k = k.repeat_interleave(group, dim=1)
    causal = torch.ones(S, S, dtype=torch.bool, device=x.device).triu_(1)
    attn = (q @ k.transpose(-1, -2)).mul_(shape.scaling).masked_fill_(causal, float("-inf")).softmax(-1)  # [B, h, S, S]
    # sum over g's query heads of xbar^T xbar = X^T (sum_h A_h^T A_h) X: the [S, S] middle costs S^3 per head instead
    # of forming xbar [h, S, K] and its Gram (3x fewer flops at Qwen2.5-0.5B's S = 512, K = 896).
    out = torch.empty(shape.kv_heads, K, K, device=x.device)
    for g in range(shape.kv_heads):
        m = causal_gram(attn[:, g * group : (g + 1) * group]).to(x.dtype)  # [B, S, S]
        out[g] = (x.reshape(B * S, K).t() @ (m @ x).reshape(B * S, K)).float()
    return out


CAUSAL_BLOCKS = 8  # column blocks of causal_gram: 0.23x the full product's flops (many blocks: 1/6)


def causal_gram(a: torch.Tensor) -> torch.Tensor:
    """a [B, h, S, S] causal attention weights (a[..., t, s] = 0 for s > t) -> sum over h of a_h^T a_h [B, S, S] fp32.

    Entry (s1, s2) sums over rows t >= max(s1, s2) only, so the column block [j0, j1) of the blocks on and above the
    diagonal takes rows t >= j0 alone: a[t >= j0, :j1]^T a[t >= j0, j0:j1]. The blocks below the diagonal are copied
    from those above."""
    B, h, S, _ = a.shape
    width = -(-S // CAUSAL_BLOCKS)
    m = torch.empty(B, S, S, dtype=a.dtype, device=a.device)
    for j0 in range(0, S, width):
        j1 = min(j0 + width, S)
        rows = a[:, :, j0:, :j1]  # [B, h, S - j0, j1]
        m[:, :j1, j0:j1] = (rows.transpose(-1, -2) @ rows[..., j0:j1]).sum(1)
    for j0 in range(0, S, width):
        j1 = min(j0 + width, S)
        m[:, j1:, j0:j1] = m[:, j0:j1, j1:].transpose(1, 2)
    return m
