"""The CUDA-graphs backend: prompts run eagerly, decode steps replay CUDA graphs of model.forward.

One graph per (batch bucket, attended-length bucket), captured on first use. All graphs read their inputs from the
same static device buffers and share one memory pool; the logits a replay returns are copied out before the next
replay. Batches are padded up to a bucket with rows that write into one extra cache slot no sequence ever owns.
Everything but `_capture` is device-independent (the tests run it on CPU with an eager stand-in for capture).
"""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from tinyserve.runtime.backends.base import BackendOptions
from tinyserve.runtime.backends.eager import EagerBackend
from tinyserve.config import ModelConfig
from tinyserve.model import ModelWeights, SeqChunk, forward

# Attended lengths are padded up to a multiple of this many positions (one graph per bucket).
LENGTH_BUCKET = 256
# Batch sizes are padded up to the next of these.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def batch_bucket(m: int, max_batch: int) -> int:
    return next((b for b in BATCH_BUCKETS if b >= m), max_batch) if m <= max_batch else m


class GatherAttention:
    """Decode attention with fixed shapes (capturable): row b writes its token at positions[b] of slots[b], gathers
    its slot's first L positions and masks those past its own."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, length: int):
        self.k_cache, self.v_cache = k_cache, v_cache  # [layers, slots, Hkv, S, D]
        self.slots, self.positions, self.length = slots, positions, length  # [B], [B], L
        self.mask = (torch.arange(length, device=slots.device)[None, :] <= positions[:, None])[:, None, None, :]  # [B, 1, 1, L]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, Hq, D = q.shape
        Hkv = k.shape[1]
        kl, vl = self.k_cache[layer], self.v_cache[layer]
        kl[self.slots, :, self.positions] = k
        vl[self.slots, :, self.positions] = v
        kk, vv = kl[self.slots, :, : self.length], vl[self.slots, :, : self.length]  # [B, Hkv, L, D]
        qq = q.view(B, Hkv, Hq // Hkv, D)  # the R query heads of a kv head as R query rows
        return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=self.mask).view(B, Hq, D)


class CudaGraphBackend(EagerBackend):
    name = "cuda-graphs"

    def __init__(self, cfg: ModelConfig, weights: ModelWeights, device: torch.device, opts: BackendOptions):
        super().__init__(cfg, weights, device, opts, extra_slots=1)
        self.scratch = opts.num_slots  # the padding rows' slot
        self.max_batch = batch_bucket(opts.num_slots, opts.num_slots)
        self.inputs = torch.zeros(3, self.max_batch, dtype=torch.long, device=device)  # rows: tokens, slots, positions
        self.host = torch.zeros(3, self.max_batch, dtype=torch.long)
        if device.type == "cuda":
            self.host = self.host.pin_memory()
        self.graphs: dict[tuple[int, int], tuple[Callable[[], None], torch.Tensor]] = {}
        self.pool = None

    def step(self, seqs: Sequence[SeqChunk]) -> torch.Tensor:
        if any(len(s.tokens) != 1 for s in seqs):
            return super().step(seqs)
        M = len(seqs)
        B = batch_bucket(M, self.max_batch)
        L = min(-(-(max(s.start for s in seqs) + 1) // LENGTH_BUCKET) * LENGTH_BUCKET, self.opts.max_seq_len)
        pad = B - M
        # Padding rows: token 0 at position 0 of the scratch slot (they attend only to what they wrote themselves).
        self.host[0, :B] = torch.tensor([s.tokens[0] for s in seqs] + [0] * pad)
        self.host[1, :B] = torch.tensor([s.slot for s in seqs] + [self.scratch] * pad)
        self.host[2, :B] = torch.tensor([s.start for s in seqs] + [0] * pad)
        self.inputs[:, :B].copy_(self.host[:, :B])  # blocking: the pinned buffer is rewritten next step
        if (B, L) not in self.graphs:
            self.graphs[(B, L)] = self._capture(B, L)
        replay, logits = self.graphs[(B, L)]
        replay()
        return logits[:M].float()

    def _decode(self, B: int, L: int) -> torch.Tensor:
        tokens, slots, positions = self.inputs[0, :B], self.inputs[1, :B], self.inputs[2, :B]
        attention = GatherAttention(self.cache.k, self.cache.v, slots, positions, L)
        return forward(self.cfg, self.weights, tokens, positions, attention, self.cos, self.sin)

    def _capture(self, B: int, L: int) -> tuple[Callable[[], None], torch.Tensor]:
        """(replay, logits): replay() reruns the step on the current inputs and leaves its result in logits [B, V]."""
        # One eager run first, on a side stream: it autotunes Triton kernels and creates library handles, none of
        # which may happen during capture. It writes exactly what the replay will write, so it changes nothing.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._decode(B, L)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._decode(B, L)
        self.pool = graph.pool()
        return graph.replay, logits
