"""The model runner: owns the device, the weights, the static KV cache and the compiled/captured decode step.

API (what a scheduler, the CLI or the HTTP server calls):

    runner = ModelRunner(model_dir, RunnerConfig(num_slots=8, max_seq_len=2048))
    slot = runner.alloc_slot()                         # O(1); NoFreeSlot when all are taken
    logits = runner.prefill(slot, prompt_ids)          # [V] fp32 logits of the last prompt token
    logits = runner.decode([slot_a, slot_b], [tok_a, tok_b])   # [M, V] fp32, one row per (slot, token)
    runner.free_slot(slot)                             # O(1); the slot's cache rows are simply reused later

- One slot holds one sequence. `prefill(slot, ids, start=0)` writes positions start..start+T-1 of that slot and
  leaves every other slot untouched, so a new request can be prefilled while other slots hold live sequences.
  `start` > 0 continues a sequence (chunked prefill, or reusing a cached prefix: chat turns re-send the history).
- `decode(slots, tokens, positions=None)` runs one step for M sequences at once. Row m writes `tokens[m]` at
  `positions[m]` of `slots[m]` (default: the slot's current length, i.e. append) and attends to positions
  0..positions[m] of its own slot only, so a row's logits do not depend on the other rows.
- `length(slot)` is how many positions of the slot are valid. Positions may only grow by appending (or restart
  earlier, which truncates); reading positions never written is refused, never silent garbage.
  A prefill or decode past `max_seq_len` raises `ContextOverflow` (callers turn that into a `length` finish).
- Shapes: on CUDA, decode pads M up to a bucket (1, 2, 4, 8, ...) and the attended length up to a multiple of
  `LENGTH_BUCKET`, and replays one CUDA graph per (batch bucket, length bucket); padding rows write into a scratch
  slot that no sequence owns. On CPU there are no graphs: where our CPU kernels hold the INT4 weights and compute is
  bf16 (the default), each decode step and each prefill is one C++ call (tinyserve/fused_step.py), reading each row's
  slot in place; otherwise a lone sequence reads its cache rows as a view, several rows gather theirs.
- Sampling is separate (tinyserve.sampling): feed it the logits.
"""

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tinyserve_kernels import cpu_native
from tinyserve import model
from tinyserve.config import ConfigError, ModelConfig
from tinyserve.fused_step import FusedDecoder
from tinyserve.kv_cache import KVCache, SlotPool
from tinyserve.weights import load_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# CUDA graphs are captured per attended-length bucket: a multiple of this many positions.
LENGTH_BUCKET = 256
# batch_invariant decode attends over a length rounded up to a multiple of this: CPU SDPA then gives a row the same
# result whatever the padded length (measured bit-identical for padded lengths that are multiples of 32; other
# lengths change the kernel's blocking of the key axis and the last bits of the output).
INVARIANT_LENGTH_ALIGN = 32
# Batch-size buckets for CUDA graphs (rows are padded up to the next one).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Keep a dense bf16 copy of INT4 weights for CPU prefill when it costs at most this much memory.
DENSE_PREFILL_MAX_BYTES = 1 << 30


class ContextOverflow(ValueError):
    """A sequence would grow past the KV cache's max_seq_len."""


@dataclass
class RunnerConfig:
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    dtype: str = "auto"  # compute dtype; "auto": bfloat16 on CPU (fp16 matmul is unusable there), float16 on CUDA
    max_seq_len: int = 2048  # per slot; capped by the model's max_position_embeddings
    num_slots: int = 1  # concurrent sequences
    compile: str = "auto"  # "auto" | "on" | "off": torch.compile / CUDA graphs for the decode step
    lm_head: str = "auto"  # "auto" | "dense" | "int8"
    threads: int = 0  # CPU threads; 0 = every core this process may use
    # Make a row's decode logits bit-identical whatever else is in the batch (the server's continuous batching needs
    # this: greedy output must not depend on the load). See ModelRunner._decode_invariant for what it changes.
    batch_invariant: bool = False

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r} (choose from auto, {', '.join(DTYPES)})")
        if self.compile not in ("auto", "on", "off"):
            raise ConfigError(f"compile must be auto, on or off, got {self.compile!r}")
        if self.lm_head not in ("auto", "dense", "int8"):
            raise ConfigError(f"lm_head must be auto, dense or int8, got {self.lm_head!r}")
        if self.max_seq_len <= 0 or self.num_slots <= 0:
            raise ConfigError("max_seq_len and num_slots must be positive")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but this torch build sees no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {name!r} (cpu or cuda)")
    return dev


class ModelRunner:
    def __init__(
        self,
        model_dir: str | Path | None,
        config: RunnerConfig | None = None,
        *,
        model_config: ModelConfig | None = None,
        weights: model.ModelWeights | None = None,
    ):
        """Load model_dir (or use `model_config` + prebuilt `weights`, already on the device: the synthetic benchmark)."""
        rc = config or RunnerConfig()
        self.config = rc
        self.model_dir = Path(model_dir) if model_dir is not None else None
        if model_config is None:
            model_config = ModelConfig.load(self.model_dir)
        self.cfg = model_config
        self.device = resolve_device(rc.device)
        if self.device.type == "cpu":
            torch.set_num_threads(rc.threads or len(os.sched_getaffinity(0)))
        self.dtype = DTYPES[rc.dtype] if rc.dtype != "auto" else (torch.bfloat16 if self.device.type == "cpu" else torch.float16)
        if self.device.type == "cpu" and self.dtype == torch.float16:
            raise ConfigError("float16 compute is unusably slow on CPU (no fp16 matmul units); use bfloat16 or float32")
        if self.device.type == "cpu" and rc.compile == "on":
            # torch.compile of the decode step did not finish compiling within 10 minutes on the 2-core VM, and a
            # per-layer compile was slower than eager (guard checks on every call): see BENCHMARKS.md.
            raise ConfigError("--compile on needs CUDA (CUDA graphs); on CPU the decode step runs eagerly")
        self.max_seq_len = min(rc.max_seq_len, self.cfg.max_context)

        t0 = time.perf_counter()
        if weights is None:
            weights = load_weights(self.model_dir, self.cfg, self.device, self.dtype, lm_head=self.lm_head_mode(),
                                   dense_prefill=self.dense_prefill())
        self.weights = weights
        self.load_s = time.perf_counter() - t0
        # CPU decode attention: our kernel where our other CPU kernels run (2x torch's SDPA per layer at 16 rows; it
        # never reads past a row's length, so rows are batch-invariant by construction), else torch's SDPA.
        self.attention = None
        R = self.cfg.num_heads // self.cfg.num_kv_heads
        if self.device.type == "cpu" and cpu_native.use_by_default() and cpu_native.decode_attention_fits(R, self.cfg.head_dim, self.dtype):
            self.attention = cpu_native.decode_attention

        cos, sin = model.rope_tables(self.cfg.rope, self.cfg.head_dim, self.max_seq_len)
        self.cos, self.sin = cos.to(self.device, self.dtype), sin.to(self.device, self.dtype)
        self.num_slots = rc.num_slots
        self.graphs = None
        if self.device.type == "cuda" and rc.compile != "off":
            self.graphs = CudaGraphDecoder(self)
        # CUDA graphs pad batches with rows that write into one extra scratch slot no sequence ever owns.
        cache_slots = self.num_slots + (1 if self.graphs is not None else 0)
        cache_len = self.max_seq_len
        if rc.batch_invariant:
            cache_len = -(-cache_len // INVARIANT_LENGTH_ALIGN) * INVARIANT_LENGTH_ALIGN  # room for the aligned length
        self.cache = KVCache(self.cfg, cache_slots, cache_len, self.dtype, self.device)
        self.pool = SlotPool(self.num_slots)
        self._lengths = [0] * self.num_slots
        # CPU steps in one C++ call each where it applies (tinyserve/fused_step.py); model.prefill / decode otherwise.
        self.fused = None
        if FusedDecoder.applies(self.cfg, self.weights, self.dtype, self.device):
            self.fused = FusedDecoder(self.cfg, self.weights, self.cache.k, self.cache.v, self.cos, self.sin)

    def lm_head_mode(self) -> str:
        """auto: int8 rows on CPU for INT4 checkpoints (the lm_head is ~40% of SmolLM2's decode bytes in bf16, and
        torch's bf16 matmul reaches only a fraction of the bandwidth), the checkpoint's float weight otherwise."""
        mode = self.config.lm_head
        if mode == "auto":
            return "int8" if self.device.type == "cpu" and self.cfg.quant is not None else "dense"
        if mode == "int8" and self.device.type != "cpu":
            raise ConfigError("--lm-head int8 uses a CPU kernel (torch's int8 weight-only matmul); use dense on CUDA")
        return mode

    def dense_prefill(self) -> bool:
        """On CPU, also keep a bf16 copy of each INT4 weight for prompts (a dense GEMM beats the INT4 op beyond a few
        rows) when that copy is small: 2 bytes per weight on top of ~0.56."""
        c = self.cfg
        params = c.num_layers * c.hidden_size * (c.q_size + 2 * c.kv_size + c.q_size + 3 * c.intermediate_size)
        return self.device.type == "cpu" and c.quant is not None and 2 * params <= DENSE_PREFILL_MAX_BYTES

    # ---- slots -------------------------------------------------------------------------------------------------

    def alloc_slot(self) -> int:
        slot = self.pool.alloc()
        self._lengths[slot] = 0
        return slot

    def free_slot(self, slot: int) -> None:
        self.pool.free(slot)
        self._lengths[slot] = 0

    def length(self, slot: int) -> int:
        return self._lengths[slot]

    # ---- steps -------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, slot: int, tokens, start: int = 0) -> torch.Tensor:
        """Write tokens at positions start.. of `slot`; returns the last token's logits [V] fp32."""
        ids = torch.as_tensor(tokens, dtype=torch.long).to(self.device)
        T = ids.shape[0]
        self._check_slot(slot)
        if T == 0:
            raise ValueError("prefill needs at least one token")
        if not 0 <= start <= self._lengths[slot]:
            raise ValueError(f"prefill start {start} is past slot {slot}'s length {self._lengths[slot]}")
        if start + T > self.max_seq_len:
            raise ContextOverflow(f"{start + T} tokens do not fit the context of {self.max_seq_len} tokens")
        if self.fused is not None:
            logits = self.fused.prefill(slot, ids, start)
        else:
            logits = model.prefill(self.cfg, self.weights, self.cache.k, self.cache.v, slot, ids, start, self.cos, self.sin)
        self._lengths[slot] = start + T
        return logits.float()

    @torch.inference_mode()
    def decode(self, slots, tokens, positions=None) -> torch.Tensor:
        """One step for M sequences: tokens[m] goes to positions[m] (default: append) of slots[m]. Returns [M, V] fp32."""
        slots = [int(s) for s in slots]
        M = len(slots)
        if M == 0 or len(tokens) != M:
            raise ValueError("decode needs one token per slot and at least one slot")
        if len(set(slots)) != M:
            raise ValueError("decode slots must be distinct")
        for s in slots:
            self._check_slot(s)
        pos = [self._lengths[s] for s in slots] if positions is None else [int(p) for p in positions]
        for s, p in zip(slots, pos):
            if not 0 <= p <= self._lengths[s]:
                raise ValueError(f"decode position {p} is past slot {s}'s length {self._lengths[s]}")
            if p >= self.max_seq_len:
                raise ContextOverflow(f"slot {s} is full: the context holds {self.max_seq_len} tokens")
        logits = self._decode(slots, torch.as_tensor(tokens, dtype=torch.long), pos)
        for s, p in zip(slots, pos):
            self._lengths[s] = p + 1
        return logits

    def _decode(self, slots: list[int], tokens: torch.Tensor, pos: list[int]) -> torch.Tensor:
        if self.graphs is not None:
            return self.graphs(slots, tokens.tolist(), pos)
        if self.fused is not None:  # every row computed alone: batch-invariant as it is
            return self.fused.decode(slots, tokens.tolist(), pos).float()
        if self.config.batch_invariant:
            return self._decode_invariant(slots, tokens, pos)
        M = len(slots)
        if M == 1 and self.device.type == "cpu":
            # One sequence (chat, generate): the same numbers as model.decode with about half the small ops.
            return model.decode_one(
                self.cfg, self.weights, self.cache.k, self.cache.v, slots[0], int(tokens[0]), pos[0], self.cos, self.sin,
                attention=self.attention,
            ).float()
        length = max(pos) + 1
        contiguous = slots == list(range(slots[0], slots[0] + M))
        dev = self.device
        logits = model.decode(
            self.cfg,
            self.weights,
            self.cache.k,
            self.cache.v,
            torch.tensor(slots, device=dev),
            tokens.to(dev),
            torch.tensor(pos, device=dev),
            length,
            self.cos,
            self.sin,
            first_slot=slots[0] if contiguous else None,
            masked=M > 1 or not contiguous,
            attention=self.attention,
        )
        return logits.float()

    def _decode_invariant(self, slots: list[int], tokens: torch.Tensor, pos: list[int]) -> torch.Tensor:
        """Eager decode whose row m depends only on (slots[m], tokens[m], pos[m]), bit for bit. Two things in the
        plain path depend on the batch: the attended length (max over rows; CPU SDPA's result moves in the last bits
        with the padded length; our decode attention, self.attention, never reads past a row's own length) and, on CPU, the INT4 kernel (picked by M: with torch's int4 op, beyond
        tinyserve_kernels.dispatch.CPU_INT4PACK_MAX_M rows a dense GEMM with another summation order). So every row is masked
        over a length aligned to INVARIANT_LENGTH_ALIGN, and rows go through in groups no larger than the kernel keeps
        rows independent (tinyserve_kernels.dispatch.cpu_invariant_rows: 8 with torch's op, 32 or all with our own kernel)."""
        from tinyserve_kernels.dispatch import cpu_invariant_rows

        qkv = self.weights.layers[0].qkv
        group = cpu_invariant_rows(getattr(qkv, "w", None)) if self.device.type == "cpu" else len(slots)
        dev, A = self.device, INVARIANT_LENGTH_ALIGN
        out = []
        for a in range(0, len(slots), group):
            s, p = slots[a : a + group], pos[a : a + group]
            length = -(-(max(p) + 1) // A) * A  # the cache holds max_seq_len rounded up to A positions
            contiguous = s == list(range(s[0], s[0] + len(s)))
            logits = model.decode(
                self.cfg, self.weights, self.cache.k, self.cache.v, torch.tensor(s, device=dev), tokens[a : a + group].to(dev),
                torch.tensor(p, device=dev), length, self.cos, self.sin, first_slot=s[0] if contiguous else None, masked=True,
                attention=self.attention,
            )
            out.append(logits.float())
        return torch.cat(out) if len(out) > 1 else out[0]

    def _check_slot(self, slot: int) -> None:
        if not (0 <= slot < self.num_slots and self.pool.in_use(slot)):
            raise ValueError(f"slot {slot} is not allocated")


def batch_bucket(m: int, max_batch: int) -> int:
    return next((b for b in BATCH_BUCKETS if b >= m), max_batch) if m <= max_batch else m


class CudaGraphDecoder:
    """Decode steps replayed from CUDA graphs, one per (batch bucket, attended-length bucket), captured on first use.

    All graphs read their inputs from the same static device buffers and share one memory pool; the logits a replay
    returns are copied out before the next replay, so graphs may reuse each other's output memory. Everything but
    `_capture` is device-independent (the tests run it on CPU with an eager stand-in for capture).
    """

    def __init__(self, runner: "ModelRunner"):
        self.r = runner
        self.max_batch = batch_bucket(runner.num_slots, runner.num_slots)
        dev = runner.device
        self.inputs = torch.zeros(3, self.max_batch, dtype=torch.long, device=dev)  # rows: tokens, slots, positions
        self.host = torch.zeros(3, self.max_batch, dtype=torch.long)
        if dev.type == "cuda":
            self.host = self.host.pin_memory()
        self.graphs: dict[tuple[int, int], tuple[Callable[[], None], torch.Tensor]] = {}
        self.pool = None

    def __call__(self, slots: list[int], tokens: list[int], pos: list[int]) -> torch.Tensor:
        r, M = self.r, len(slots)
        B = batch_bucket(M, self.max_batch)
        L = min(-(-(max(pos) + 1) // LENGTH_BUCKET) * LENGTH_BUCKET, r.max_seq_len)
        scratch = r.num_slots
        pad = B - M
        # Padding rows: token 0 at position 0 of the scratch slot (they attend only to what they wrote themselves).
        self.host[0, :B] = torch.tensor(tokens + [0] * pad)
        self.host[1, :B] = torch.tensor(slots + [scratch] * pad)
        self.host[2, :B] = torch.tensor(pos + [0] * pad)
        self.inputs[:, :B].copy_(self.host[:, :B])  # blocking: the pinned buffer is rewritten next step
        if (B, L) not in self.graphs:
            self.graphs[(B, L)] = self._capture(B, L)
        replay, logits = self.graphs[(B, L)]
        replay()
        return logits[:M].float()

    def _step(self, B: int, L: int) -> torch.Tensor:
        r = self.r
        tokens, slots, positions = self.inputs[0, :B], self.inputs[1, :B], self.inputs[2, :B]
        return model.decode(r.cfg, r.weights, r.cache.k, r.cache.v, slots, tokens, positions, L, r.cos, r.sin)

    def _capture(self, B: int, L: int) -> tuple[Callable[[], None], torch.Tensor]:
        """(replay, logits): replay() reruns the step on the current inputs and leaves its result in logits [B, V]."""
        # One eager run first, on a side stream: it autotunes Triton kernels and creates library handles, none of
        # which may happen during capture. It writes exactly what the replay will write, so it changes nothing.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step(B, L)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._step(B, L)
        self.pool = graph.pool()
        return graph.replay, logits
