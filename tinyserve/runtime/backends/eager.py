"""The eager backend: the reference forward (model.forward) with torch's ops, on any device.

INT4 linears go through tinyserve_kernels/dispatch.py (torch's int4 op, a cached dense copy or per-call dequant on
CPU; Triton or dequant + cuBLAS on CUDA). On CPU the lm_head may be int8 rows (torch's `_weight_int8pack_mm`), and a
one-row dense linear uses torch.mv (the same result as F.linear, ~2.4x faster for bf16 on CPU).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tinyserve.runtime.backends.base import Backend, BackendOptions, dense_prefill_fits, int8_lm_head
from tinyserve.config import ModelConfig
from tinyserve.model import DenseLinear, ModelWeights, PackedLinear, SeqChunk, nbytes, reference_step
from tinyserve_kernels import cpu, dispatch


@dataclass
class Int4Linear:
    w: dispatch.Int4Weights  # prepared for its device
    bias: torch.Tensor | None = None  # [N]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.int4_linear(x, self.w, self.bias)

    @property
    def nbytes(self) -> int:
        # What a one-row call reads: the INT4 form (not a dense copy cached for prompts).
        w = self.w
        if w.int4pack is not None:
            return nbytes(w.int4pack.packed, w.int4pack.scale_zero, self.bias)
        return nbytes(w.qweight, w.qzeros, w.scales, w.dense, self.bias)


@dataclass
class Int8Linear:
    """Weight-only int8 rows for torch's `_weight_int8pack_mm`: W[n, :] = qweight[n, :] * scales[n]."""

    qweight: torch.Tensor  # [N, K] int8
    scales: torch.Tensor  # [N] in the activation dtype
    bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.qweight, self.scales).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        return nbytes(self.qweight, self.scales, self.bias)


@dataclass
class CpuDenseLinear(DenseLinear):
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1]:
            y = torch.mv(self.weight, x.reshape(-1)).view(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


class EagerBackend(Backend):
    name = "eager"

    def __init__(self, cfg: ModelConfig, weights: ModelWeights, device: torch.device, opts: BackendOptions, extra_slots: int = 0):
        super().__init__(cfg, weights, device, opts, extra_slots)
        dense_copy = dense_prefill_fits(cfg, device)
        for lw in weights.layers:
            for name in lw.linears():
                setattr(lw, name, self.convert(getattr(lw, name), dense_copy))
        head = self.convert(weights.lm_head, False)
        if int8_lm_head(cfg, device, opts.lm_head) and isinstance(head, DenseLinear):
            q, s = cpu.quantize_int8_rows(head.weight)
            head = Int8Linear(q, s.to(self.dtype), head.bias)
        weights.lm_head = head
        # Batch-invariant decode groups rows by what the CPU kernels keep row-independent: torch's int4 op up to
        # CPU_INT4PACK_MAX_M rows; an fp32 dense matmul not even two (a row's sums depend on M), so one row at a time.
        self.invariant_rows = 1 << 30
        if device.type == "cpu":
            dense = any(isinstance(getattr(lw, n), DenseLinear) for lw in weights.layers for n in lw.linears())
            dense = dense or isinstance(weights.lm_head, DenseLinear)
            self.invariant_rows = 1 if dense and self.dtype == torch.float32 else dispatch.CPU_INT4PACK_MAX_M

    def convert(self, lin, dense_copy: bool):
        if isinstance(lin, PackedLinear):
            return Int4Linear(dispatch.prepare(lin.qweight, lin.qzeros, lin.scales, lin.group_size, cpu_dense_cache=dense_copy), lin.bias)
        if isinstance(lin, DenseLinear) and self.device.type == "cpu":
            return CpuDenseLinear(lin.weight, lin.bias)
        return lin

    def step(self, seqs: Sequence[SeqChunk]) -> torch.Tensor:
        if not self.opts.batch_invariant or len(seqs) == 1:
            return self.forward(seqs)
        # Decode rows in groups the kernels keep row-independent; a prompt chunk alone.
        groups: list[list[SeqChunk]] = []
        for s in seqs:
            if len(s.tokens) == 1 and groups and len(groups[-1][0].tokens) == 1 and len(groups[-1]) < self.invariant_rows:
                groups[-1].append(s)
            else:
                groups.append([s])
        out = [self.forward(g) for g in groups]
        return torch.cat(out) if len(out) > 1 else out[0]

    def forward(self, seqs: Sequence[SeqChunk]) -> torch.Tensor:
        return reference_step(self.cfg, self.weights, self.cache.k, self.cache.v, seqs, self.cos, self.sin).float()
