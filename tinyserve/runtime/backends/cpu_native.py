"""The cpu-native backend: every layer of a step in one C++ call (tinyserve_kernels/csrc/cpu_decode.cpp), around our
CPU kernels (tinyserve_kernels/cpu_native.py), the lm_head after it.

Decode rows go through Decoder::decode in one call; each prompt chunk through Decoder::prefill (our INT4 kernel up to
NATIVE_MAX_ROWS rows, then the dense copy when one is held; torch's SDPA). Every row is computed alone by
row-invariant kernels, so a row's logits never depend on the rest of the batch. With `position_invariant`, prompt
chunks join the decode rows in one Decoder::decode call (our INT4 kernel at every M, the decode attention per row),
so a position's keys and values are the same however it was computed: prefilled in any chunk or decoded. The arithmetic is model.forward's
in bf16, with the norm's sum of squares and SiLU's exp in another order: logits agree with the reference forward to
bf16 rounding, not bit for bit (tests/test_backend_cpu_native.py).
"""

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tinyserve.runtime.backends.base import Backend, BackendOptions, dense_prefill_fits, int8_lm_head
from tinyserve.runtime.backends.eager import CpuDenseLinear
from tinyserve.config import ModelConfig
from tinyserve.model import ModelWeights, PackedLinear, SeqChunk, nbytes
from tinyserve_kernels import cpu, cpu_native

# Our INT4 kernel beats a cached dense bf16 weight up to this many rows (scripts/bench_kernels.py, five SmolLM2
# shapes; BENCHMARKS.md "Exact integer sums"); without a dense copy it runs at every M.
NATIVE_MAX_ROWS = 32


@dataclass
class NativeInt4Linear:
    w: cpu_native.NativePacked
    dense: torch.Tensor | None = None  # dense copy for prompts (tinyserve_kernels/cpu.py, hold_dense), or None
    bias: torch.Tensor | None = None  # [N]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] <= NATIVE_MAX_ROWS or self.dense is None:
            y = cpu_native.linear(x2, self.w, self.bias)  # the bias added in fp32 before the one rounding
        else:
            y = cpu.dense_linear(x2, self.dense, self.w.out_features).to(x.dtype)
            y = y if self.bias is None else y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], -1)

    @property
    def nbytes(self) -> int:
        return nbytes(self.w.packed, self.bias)


@dataclass
class NativeInt8Linear:
    w: cpu_native.NativeInt8
    bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_native.int8_linear(x.reshape(-1, x.shape[-1]), self.w, self.bias).view(*x.shape[:-1], -1)

    @property
    def nbytes(self) -> int:
        return nbytes(self.w.packed, self.w.scales, self.bias)


def applies(cfg: ModelConfig, weights: ModelWeights, dtype: torch.dtype) -> bool:
    """bf16 compute, every decoder linear INT4 with one group size, and a head layout the decode attention takes."""
    if dtype != torch.bfloat16 or not cpu_native.decode_attention_fits(cfg.num_heads // cfg.num_kv_heads, cfg.head_dim, dtype):
        return False
    linears = [getattr(lw, name) for lw in weights.layers for name in lw.linears()]
    return all(isinstance(l, PackedLinear) for l in linears) and len({l.group_size for l in linears}) == 1


class CpuNativeBackend(Backend):
    name = "cpu-native"

    def __init__(self, cfg: ModelConfig, weights: ModelWeights, device: torch.device, opts: BackendOptions, variant: str = "native"):
        """variant: which build of the kernels (tinyserve_kernels/cpu_native.py, VARIANTS; the tests run each engine)."""
        super().__init__(cfg, weights, device, opts)
        self.position_invariant = opts.position_invariant
        # The decoder reads dense prompt weights in bf16 only; prompts never use them when position-invariant.
        dense_copy = dense_prefill_fits(cfg, device, torch.bfloat16) and not self.position_invariant
        for lw in weights.layers:
            for name in lw.linears():
                p: PackedLinear = getattr(lw, name)
                dense = cpu.dense_copy(p.qweight, p.qzeros, p.scales, p.group_size, torch.bfloat16) if dense_copy else None
                setattr(lw, name, NativeInt4Linear(cpu_native.repack(p.qweight, p.qzeros, p.scales, p.group_size), dense, p.bias))
        head = weights.lm_head
        if isinstance(head, PackedLinear):
            head = NativeInt4Linear(cpu_native.repack(head.qweight, head.qzeros, head.scales, head.group_size), None, head.bias)
        elif int8_lm_head(cfg, device, opts.lm_head):
            q, s = cpu.quantize_int8_rows(head.weight)
            head = NativeInt8Linear(cpu_native.repack_int8(q, s.to(self.dtype)), head.bias)  # scales rounded as torch's op gets them
        else:
            head = CpuDenseLinear(head.weight, head.bias)
        weights.lm_head = head
        w = weights
        layers = [[lw.attn_norm, lw.qkv.w.packed, lw.o.w.packed, lw.mlp_norm, lw.gate_up.w.packed, lw.down.w.packed] for lw in w.layers]
        biases = [[lw.qkv.bias, lw.o.bias, lw.gate_up.bias, lw.down.bias] for lw in w.layers]
        dense = [[lw.qkv.dense, lw.o.dense, lw.gate_up.dense, lw.down.dense] for lw in w.layers]
        self.decoder = cpu_native.load(variant).Decoder(
            w.embed, layers, biases, dense, w.norm, self.cos.contiguous(), self.sin.contiguous(), self.cache.k, self.cache.v,
            cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, w.layers[0].qkv.w.group_size, NATIVE_MAX_ROWS,
            cfg.rms_norm_eps)

    def step(self, seqs: Sequence[SeqChunk], all_logits: bool = False) -> torch.Tensor:
        if self.position_invariant:
            h = self.rows(seqs)
            if all_logits:
                return self.weights.lm_head(h).float()
            last = torch.tensor(list(itertools.accumulate(len(s.tokens) for s in seqs))) - 1
            return self.weights.lm_head(h[last]).float()
        if all_logits:
            raise ValueError("every token's logits need position_invariant")
        decode = [i for i, s in enumerate(seqs) if len(s.tokens) == 1]
        if len(decode) == len(seqs):
            h = self.decode(seqs)
        else:
            h = torch.empty(len(seqs), self.cfg.hidden_size, dtype=self.dtype)
            if decode:
                h[decode] = self.decode([seqs[i] for i in decode])
            for i, s in enumerate(seqs):
                if len(s.tokens) > 1:
                    h[i] = self.decoder.prefill(torch.tensor(s.tokens, dtype=torch.long), s.slot, s.start)
        return self.weights.lm_head(h).float()

    def rows(self, seqs: Sequence[SeqChunk]) -> torch.Tensor:
        """[sum T, H]: the final hidden state of every token of every chunk, all in one decode call."""
        t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
        tokens = [tok for s in seqs for tok in s.tokens]
        slots = [s.slot for s in seqs for _ in s.tokens]
        positions = [s.start + i for s in seqs for i in range(len(s.tokens))]
        return self.decoder.decode(t(tokens), t(slots), t(positions))

    def decode(self, seqs: Sequence[SeqChunk]) -> torch.Tensor:
        """[M, H]: the final hidden state of one token for each of M sequences."""
        t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
        return self.decoder.decode(t([s.tokens[0] for s in seqs]), t([s.slot for s in seqs]), t([s.start for s in seqs]))
