"""Prefix cache: a new sequence starts from the longest prefix of its prompt whose keys and values some slot already
holds.

Only positions computed exactly as the uncached path would compute them are reused, so greedy output is bit-identical
with and without the cache:
- on a position-invariant runner (the cpu-native backend as `serve` builds it: a position's KV is the same whether it
  was prefilled in any chunk or decoded), any common prefix, a finished sequence's reply included: turn n + 1 of a
  chat finds turn n's prompt and reply in the slot that ran it;
- elsewhere (a position's KV depends on the length of the chunk it was computed in and on prefill vs decode:
  scripts/probe_kv_reuse.py, BENCHMARKS.md), whole prefill chunks at the same multiples of the chunk size of an
  earlier prompt; a partial last chunk and decoded tokens are recomputed.

Two tiers:
- the slots themselves: a finished sequence's slot keeps its rows until it is allocated again (least recently used
  first), and a running sequence's prompt rows never change. A prefix held by a free slot is taken over (no copy);
  one held by a running sequence is copied into the new slot (~1 ms per 1,000 tokens here, against ~1 s to prefill
  them). Entries carry the slot's allocation count, so a slot handed out elsewhere (another scheduler on the same
  runner) drops out;
- host memory, up to `host_bytes`: before a slot's rows are overwritten (the slot goes to another prompt), what it
  held is copied out, and a later prompt that starts with it copies it back instead of prefilling. Least recently
  used entries go first when the budget is full. So the cache outlives the slot pool: 16 slots serve more than 16
  conversations that come back.
Copying beats sharing blocks through a paged cache here: every backend reads one contiguous [S, D] row per slot and
head (the C++ decoder and the CUDA graphs included), and a copy costs ~1% of the prefill it saves.
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tinyserve.runtime.runner import ModelRunner

# A slot's rows are copied to host memory only when at least this many positions would be lost: a short tail is
# cheaper to recompute than to copy a long entry for.
MIN_SAVED_TOKENS = 32


@dataclass
class Saved:
    """A prefix's keys and values in host memory."""

    tokens: tuple[int, ...]
    k: torch.Tensor  # [layers, Hkv, n, D]
    v: torch.Tensor
    used: float

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class PrefixCache:
    def __init__(self, runner: ModelRunner, chunk: int, host_bytes: int = 0):
        """chunk: the scheduler's prefill chunk; positions are reused in whole chunks unless the runner is
        position-invariant. host_bytes: the budget of the host-memory tier (0: slots only)."""
        self.runner = runner
        self.chunk = 1 if runner.position_invariant else chunk  # the unit of reuse
        self.entries: dict[int, tuple[int, tuple[int, ...], float]] = {}  # slot -> (generation, tokens, last used)
        self.host_bytes = host_bytes
        self.saved: list[Saved] = []

    @property
    def saved_bytes(self) -> int:
        return sum(e.nbytes for e in tuple(self.saved))  # (read by the metrics from another thread)

    def _valid(self, slot: int) -> tuple[int, ...]:
        e = self.entries.get(slot)
        return e[1] if e is not None and e[0] == self.runner.generation[slot] else ()

    def reusable(self, held: Sequence[int], prompt: Sequence[int]) -> int:
        """Positions of `prompt` that `held` (the tokens a slot holds) serves: the common prefix, in whole units of
        reuse, leaving the last prompt token to run (it gives the first token's logits)."""
        n = 0
        limit = min(len(held), len(prompt) - 1)
        while n < limit and held[n] == prompt[n]:
            n += 1
        return n - n % self.chunk

    def take(self, prompt: Sequence[int]) -> tuple[int, int]:
        """Allocate a slot for `prompt` -> (slot, positions already holding its prefix)."""
        free = set(self.runner.pool.free_slots())
        best, n = None, 0
        for slot in self.entries:
            m = self.reusable(self._valid(slot), prompt)
            if m > n or (m == n and m and slot in free and best not in free):  # a free slot needs no copy
                best, n = slot, m
        saved = None
        for e in self.saved:
            m = self.reusable(e.tokens, prompt)
            if m > n:
                saved, n = e, m
        now = time.monotonic()
        if saved is None and n and best in free:
            self._save(best, n)  # its rows past n are about to be overwritten
            slot = self.runner.alloc_slot(prefer=best, keep=n)
        else:
            # the least recently used free slot (one holding nothing first) gives its rows up
            victim = min(free, key=lambda s: self.entries[s][2] if self._valid(s) else -1.0)
            self._save(victim, 0)
            slot = self.runner.alloc_slot(prefer=victim)
            if saved is not None:
                self.runner.load_prefix(slot, saved.k[:, :, :n], saved.v[:, :, :n])
                saved.used = now
            elif n:
                self.runner.copy_prefix(best, slot, n)
        self.entries[slot] = (self.runner.generation[slot], tuple(prompt[:n]), now)
        if saved is None and best is not None and best != slot and n:
            g, held, _ = self.entries[best]
            self.entries[best] = (g, held, now)
        return slot, n

    def _save(self, slot: int, keep: int) -> None:
        """Slot is about to be given to a prompt that keeps only its first `keep` positions: copy what it holds to
        host memory if that loses MIN_SAVED_TOKENS or more and the budget allows (evicting the least recently used)."""
        held = self._valid(slot)
        if not self.host_bytes or len(held) - keep < MIN_SAVED_TOKENS:
            return
        for e in self.saved:
            if e.tokens[: len(held)] == held:  # already there (it came from host memory, or was saved before)
                e.used = time.monotonic()
                return
        need = len(held) * self.runner.cache.bytes_per_token()
        if need > self.host_bytes:
            return
        self.saved = [e for e in self.saved if held[: len(e.tokens)] != e.tokens]  # prefixes of this one
        self.saved.sort(key=lambda e: e.used)
        while self.saved and self.saved_bytes + need > self.host_bytes:
            self.saved.pop(0)
        k, v = self.runner.save_prefix(slot, len(held))
        self.saved.append(Saved(held, k, v, self.entries[slot][2]))

    def record(self, slot: int, prompt: Sequence[int], start: int, end: int) -> None:
        """Prompt positions [start, end) of a sequence that took its slot from take() were just prefilled: they extend
        the slot's entry when they are reusable (any chunk on a position-invariant runner, else a whole one)."""
        held = self._valid(slot)
        whole = self.chunk == 1 or (end - start == self.chunk and start % self.chunk == 0)
        if whole and len(held) == start:
            self.entries[slot] = (self.runner.generation[slot], tuple(prompt[:end]), time.monotonic())

    def release(self, slot: int, tokens: Sequence[int]) -> None:
        """A sequence that took its slot from take() ends, its slot about to be freed: tokens (its prompt and the
        tokens it fed back) are what the slot holds, as far as the runner's length says. On a position-invariant
        runner they all become the slot's entry (the next turn of a chat starts after the reply)."""
        n = min(len(tokens), self.runner.length(slot))
        if self.chunk == 1 and len(self._valid(slot)) <= n:
            self.entries[slot] = (self.runner.generation[slot], tuple(tokens[:n]), time.monotonic())
