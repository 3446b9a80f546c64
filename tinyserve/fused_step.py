"""The fused CPU steps: every layer of model.decode (or model.prefill) in one C++ call (tinyserve_kernels/csrc/cpu_decode.cpp),
the lm_head after it in Python.

With the linears and the attention already in our CPU kernels, what was left of a one-sequence SmolLM2 decode step was
~20 small torch ops per layer between them (norms, RoPE, cache writes, residual adds, SiLU), a quarter of the step's
time, most of it dispatch. The C++ step runs them as plain loops and calls the kernels on raw buffers; a prefill keeps
its GEMMs (the same choice as tinyserve_kernels/dispatch.py: our INT4 kernel up to CPU_NATIVE_MAX_M rows, then the dense copy)
and torch's SDPA. Same operations and rounding points as model.decode / model.prefill in bf16; the norm's sum and the
SiLU's exp are computed in another order, so logits match them to bf16 rounding, not bit for bit
(tests/test_fused_step.py). Every decode row is computed alone, so a row's logits do not depend on the rest of the batch.

It applies where the runner's CPU kernels do: bf16 activations, every decoder linear an INT4 weight held for our kernel
(one group size), and a head layout our decode attention takes. Anything else decodes through model.decode.
"""

import torch

from tinyserve_kernels import cpu_native
from tinyserve_kernels.dispatch import CPU_NATIVE_MAX_M
from tinyserve.config import ModelConfig
from tinyserve.model import Int4Linear, ModelWeights


class FusedDecoder:
    def __init__(self, cfg: ModelConfig, w: ModelWeights, k_cache: torch.Tensor, v_cache: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, variant: str = "native"):
        """k_cache, v_cache [layers, slots, Hkv, S, D] and cos, sin [P, D] (P <= S: the runner may round the cache
        length up): the runner's, bf16 (use `applies` first).
        variant: which build of the kernels (tinyserve_kernels/cpu_native.py, VARIANTS; the tests run each engine)."""
        self.lm_head = w.lm_head
        G = w.layers[0].qkv.w.group_size
        layers = [[lw.attn_norm, lw.qkv.w.native.packed, lw.o.w.native.packed, lw.mlp_norm, lw.gate_up.w.native.packed,
                   lw.down.w.native.packed] for lw in w.layers]
        biases = [[lw.qkv.bias, lw.o.bias, lw.gate_up.bias, lw.down.bias] for lw in w.layers]
        dense = [[lw.qkv.w.dense, lw.o.w.dense, lw.gate_up.w.dense, lw.down.w.dense] for lw in w.layers]
        self.impl = cpu_native.load(variant).Decoder(
            w.embed, layers, biases, dense, w.norm, cos.contiguous(), sin.contiguous(), k_cache, v_cache, cfg.num_heads,
            cfg.num_kv_heads, cfg.intermediate_size, G, CPU_NATIVE_MAX_M, cfg.rms_norm_eps)

    @staticmethod
    def applies(cfg: ModelConfig, w: ModelWeights, dtype: torch.dtype, device: torch.device) -> bool:
        if device.type != "cpu" or dtype != torch.bfloat16 or not cpu_native.use_by_default():
            return False
        if not cpu_native.decode_attention_fits(cfg.num_heads // cfg.num_kv_heads, cfg.head_dim, dtype):
            return False
        linears = [l for lw in w.layers for l in (lw.qkv, lw.o, lw.gate_up, lw.down)]
        if not all(isinstance(l, Int4Linear) and l.w.native is not None for l in linears):
            return False
        return len({l.w.group_size for l in linears}) == 1

    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each of M sequences (distinct slots; row m attends to positions 0..positions[m] of its slot).
        Returns logits [M, V] in bf16 (the lm_head's dtype)."""
        h = self.impl.decode(torch.tensor(tokens), torch.tensor(slots), torch.tensor(positions))  # [M, H]
        return self.lm_head.one_row(h) if len(slots) == 1 else self.lm_head(h)

    def prefill(self, slot: int, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """model.prefill: tokens [T] int64 at positions start.. of `slot`; returns the last position's logits [V]."""
        return self.lm_head(self.impl.prefill(tokens.contiguous(), slot, start))
