"""The model runner: owns the device, the slots and their lengths, and the backend that runs the steps.

    runner = ModelRunner(model_dir, RunnerConfig(num_slots=8, max_seq_len=2048))
    slot = runner.alloc_slot()                         # O(1); NoFreeSlot when all are taken
    logits = runner.step([SeqChunk(slot, 0, prompt_ids)])      # [B, V] fp32: each chunk's last token
    logits = runner.prefill(slot, prompt_ids)          # the same for one chunk: [V]
    logits = runner.decode([slot_a, slot_b], [tok_a, tok_b])   # one token per slot: [M, V]
    runner.free_slot(slot)                             # O(1); the slot's cache rows are simply reused later

- One slot holds one sequence. A chunk writes positions start..start+T-1 of its slot and attends to its own slot
  only, so a row's logits do not depend on the other rows. `start` may be at most the slot's length (restarting
  earlier truncates: chat turns reuse a cached prefix); reading positions never written is refused.
  A chunk past `max_seq_len` raises `ContextOverflow` (callers turn that into a `length` finish).
- The backend (tinyserve/runtime/backends/) is planned once here, from the device, the model and the options; the runner
  knows nothing of kernels. Sampling is separate (tinyserve.generation.sampling): feed it the logits.
"""

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tinyserve.runtime.backends import BackendOptions, plan
from tinyserve.config import ConfigError, ModelConfig
from tinyserve.runtime.kv_cache import SlotPool
from tinyserve.model import ModelWeights, SeqChunk
from tinyserve.weights import load_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ContextOverflow(ValueError):
    """A sequence would grow past the KV cache's max_seq_len."""


@dataclass
class RunnerConfig:
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    dtype: str = "auto"  # compute dtype; "auto": bfloat16 on CPU (fp16 matmul is unusable there), float16 on CUDA
    max_seq_len: int = 2048  # per slot; capped by the model's max_position_embeddings
    num_slots: int = 1  # concurrent sequences
    compile: str = "auto"  # "auto" | "on" | "off": CUDA graphs for the decode step
    lm_head: str = "auto"  # "auto" | "dense" | "int8"
    threads: int = 0  # CPU threads; 0 = every core this process may use
    # A row's decode logits bit-identical whatever else is in the batch (continuous batching: greedy output must not
    # depend on the load). Backends whose kernels are not row-invariant split the batch to keep it.
    batch_invariant: bool = False
    # A position's keys, values and logits independent of how it was computed (chunk, prefill or decode), where the
    # backend can (cpu-native): what the prefix cache needs to reuse decoded tokens. `position_invariant` says if it does.
    position_invariant: bool = False

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
        weights: ModelWeights | None = None,
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

        if rc.lm_head == "int8" and self.device.type != "cpu":
            raise ConfigError("--lm-head int8 uses a CPU kernel (torch's int8 weight-only matmul); use dense on CUDA")

        t0 = time.perf_counter()
        if weights is None:
            weights = load_weights(self.model_dir, self.cfg, self.device, self.dtype)
        opts = BackendOptions(self.dtype, rc.num_slots, self.max_seq_len, rc.lm_head, rc.compile, rc.batch_invariant,
                              rc.position_invariant)
        self.backend = plan(self.device, self.cfg, weights, opts)
        self.load_s = time.perf_counter() - t0
        self.num_slots = rc.num_slots
        self.pool = SlotPool(self.num_slots)
        self._lengths = [0] * self.num_slots
        self.generation = [0] * self.num_slots  # allocations of each slot so far (a prefix cache's validity check)

    @property
    def weights(self) -> ModelWeights:
        return self.backend.weights

    @property
    def cache(self):
        return self.backend.cache

    @property
    def position_invariant(self) -> bool:
        return self.backend.position_invariant

    # ---- slots -------------------------------------------------------------------------------------------------

    def alloc_slot(self, prefer: int | None = None, keep: int = 0) -> int:
        """A free slot (`prefer` if free). keep: its first positions still hold what the caller knows they hold (a
        prefix cache reusing a freed slot); they count as written. Every allocation bumps the slot's generation."""
        slot = self.pool.alloc(prefer)
        self._lengths[slot] = keep if slot == prefer else 0
        self.generation[slot] += 1
        return slot

    def free_slot(self, slot: int) -> None:
        self.pool.free(slot)
        self._lengths[slot] = 0

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Copy positions [0, n) of slot src's keys and values into slot dst (allocated), which then holds n
        positions. src may be free: its stale rows are what they were (the caller tracks that, by generation)."""
        self._check_slot(dst)
        if not 0 < n <= self.max_seq_len or src == dst:
            raise ValueError(f"cannot copy {n} positions from slot {src} to slot {dst}")
        k, v = self.cache.k, self.cache.v  # [layers, slots, Hkv, S, D]
        k[:, dst, :, :n].copy_(k[:, src, :, :n])
        v[:, dst, :, :n].copy_(v[:, src, :, :n])
        self._lengths[dst] = n

    def save_prefix(self, slot: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy in host memory of positions [0, n) of the slot's keys and values, [layers, Hkv, n, D] each. The slot
        may be free: its stale rows are what they were (the caller tracks that, by generation)."""
        if not 0 < n <= self.max_seq_len:
            raise ValueError(f"cannot save {n} positions of slot {slot}")
        k, v = self.cache.k, self.cache.v  # [layers, slots, Hkv, S, D]
        return k[:, slot, :, :n].to("cpu", copy=True), v[:, slot, :, :n].to("cpu", copy=True)

    def load_prefix(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write keys and values that save_prefix returned, [layers, Hkv, n, D], into positions [0, n) of slot
        (allocated), which then holds n positions."""
        self._check_slot(slot)
        n = k.shape[2]
        if not 0 < n <= self.max_seq_len or k.shape != v.shape:
            raise ValueError(f"cannot load {n} positions into slot {slot}")
        self.cache.k[:, slot, :, :n].copy_(k)
        self.cache.v[:, slot, :, :n].copy_(v)
        self._lengths[slot] = n

    def length(self, slot: int) -> int:
        return self._lengths[slot]

    # ---- steps -------------------------------------------------------------------------------------------------

    def truncate(self, slot: int, n: int) -> None:
        """Keep only positions [0, n) of the slot (speculative decoding's rejected tokens): later steps overwrite
        the rest."""
        self._check_slot(slot)
        if not 0 <= n <= self._lengths[slot]:
            raise ValueError(f"cannot truncate slot {slot} of length {self._lengths[slot]} to {n}")
        self._lengths[slot] = n

    @torch.inference_mode()
    def step(self, seqs: Sequence[SeqChunk], all_logits: bool = False) -> torch.Tensor:
        """Run one chunk per sequence (distinct slots); returns each chunk's last-token logits [B, V] fp32, or with
        all_logits every token's [sum of the chunks' lengths, V] (verifying speculated tokens: position-invariant
        runners only, so that a position's logits are the ones decoding it alone would give)."""
        if not seqs:
            raise ValueError("a step needs at least one sequence")
        if all_logits and not self.position_invariant:
            raise ValueError("every token's logits need a position-invariant runner (RunnerConfig.position_invariant on cpu-native)")
        if len({s.slot for s in seqs}) != len(seqs):
            raise ValueError("the slots of one step must be distinct")
        for s in seqs:
            self._check_slot(s.slot)
            if not len(s.tokens):
                raise ValueError("a chunk needs at least one token")
            if not 0 <= s.start <= self._lengths[s.slot]:
                raise ValueError(f"position {s.start} is past slot {s.slot}'s length {self._lengths[s.slot]}")
            if s.start + len(s.tokens) > self.max_seq_len:
                if len(s.tokens) == 1:
                    raise ContextOverflow(f"slot {s.slot} is full: the context holds {self.max_seq_len} tokens")
                raise ContextOverflow(f"{s.start + len(s.tokens)} tokens do not fit the context of {self.max_seq_len} tokens")
        logits = self.backend.step(seqs, all_logits) if all_logits else self.backend.step(seqs)
        for s in seqs:
            self._lengths[s.slot] = s.start + len(s.tokens)
        return logits

    def prefill(self, slot: int, tokens, start: int = 0) -> torch.Tensor:
        """Write tokens at positions start.. of `slot`; returns the last token's logits [V] fp32."""
        return self.step([SeqChunk(slot, start, [int(t) for t in tokens])])[0]

    def decode(self, slots, tokens, positions=None) -> torch.Tensor:
        """One token per slot: tokens[m] goes to positions[m] (default: append) of slots[m]. Returns [M, V] fp32."""
        if len(slots) != len(tokens):
            raise ValueError("decode needs one token per slot")
        pos = positions if positions is not None else [self._lengths[s] if 0 <= s < self.num_slots else 0 for s in slots]
        return self.step([SeqChunk(int(s), int(p), [int(t)]) for s, t, p in zip(slots, tokens, pos)])

    def _check_slot(self, slot: int) -> None:
        if not (0 <= slot < self.num_slots and self.pool.in_use(slot)):
            raise ValueError(f"slot {slot} is not allocated")
