"""What every backend shares: the options it is planned with, the KV cache and RoPE tables it owns, and `step`."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tinyserve.config import ModelConfig
from tinyserve.runtime.kv_cache import KVCache
from tinyserve.model import ModelWeights, SeqChunk, rope_tables
from tinyserve_kernels import cpu

# On CPU, keep a dense copy of INT4 weights for prompts (a dense GEMM beats the INT4 kernels beyond a few rows)
# when that copy costs at most this much memory: 2 bytes per weight on top of ~0.56 (4 where it is fp32).
DENSE_PREFILL_MAX_BYTES = 1 << 30


@dataclass(frozen=True)
class BackendOptions:
    dtype: torch.dtype  # compute dtype
    num_slots: int  # KV cache slots (concurrent sequences)
    max_seq_len: int  # positions per slot
    lm_head: str = "auto"  # "auto" | "dense" | "int8" (weight-only, one scale per row; CPU)
    compile: str = "auto"  # "auto" | "on" | "off": CUDA graphs for decode steps
    batch_invariant: bool = False  # a row's logits must not depend on the rest of the batch (continuous batching)
    # Ask for a position's keys, values and logits not to depend on how it was computed (the chunk it was in, prefill
    # or decode, the batch): prompt chunks then run through the decode step's row-by-row arithmetic. Backends that
    # can say so in `position_invariant`; the prefix cache then reuses any prefix, decoded tokens included.
    position_invariant: bool = False


class Backend:
    """Runs steps of a model on one device. Subclasses convert the weights to their kernels' forms in __init__ and
    implement `step`; the reference forward (model.forward) defines what a step computes."""

    name = "base"
    position_invariant = False  # True when opts.position_invariant was asked for and this backend provides it

    def __init__(self, cfg: ModelConfig, weights: ModelWeights, device: torch.device, opts: BackendOptions, extra_slots: int = 0):
        self.cfg, self.weights, self.device, self.opts = cfg, weights, device, opts
        self.dtype = opts.dtype
        cos, sin = rope_tables(cfg.rope, cfg.head_dim, opts.max_seq_len)
        self.cos, self.sin = cos.to(device, self.dtype), sin.to(device, self.dtype)  # [S, D]
        self.cache = KVCache(cfg, opts.num_slots + extra_slots, opts.max_seq_len, self.dtype, device)

    def step(self, seqs: Sequence[SeqChunk]) -> torch.Tensor:
        """Write each chunk's keys/values into its slot; return the logits of each chunk's last token [B, V] fp32."""
        raise NotImplementedError


def int8_lm_head(cfg: ModelConfig, device: torch.device, mode: str) -> bool:
    """auto: int8 rows on CPU for INT4 checkpoints (a bf16 lm_head is ~40% of SmolLM2's decode bytes), else dense."""
    if mode == "auto":
        return device.type == "cpu" and cfg.quant is not None
    return mode == "int8"


def dense_prefill_fits(cfg: ModelConfig, device: torch.device, dtype: torch.dtype = cpu.DENSE_DTYPE) -> bool:
    """Whether a CPU backend keeps a dense copy of every INT4 weight for prompts (small models only; bf16, or fp32 on
    CPUs without bf16 GEMMs: tinyserve_kernels/cpu.py, DENSE_DTYPE)."""
    c = cfg
    params = c.num_layers * c.hidden_size * (c.q_size + 2 * c.kv_size + c.q_size + 3 * c.intermediate_size)
    return device.type == "cpu" and c.quant is not None and dtype.itemsize * params <= DENSE_PREFILL_MAX_BYTES
