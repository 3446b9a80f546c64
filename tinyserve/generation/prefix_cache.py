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

The cache is the slots themselves: a finished sequence's slot keeps its rows until it is allocated again (least
recently used first), and a running sequence's prompt rows never change. A prefix held by a free slot is taken over
(no copy); one held by a running sequence is copied into the new slot (~1 ms per 1,000 tokens here, against ~1 s to
prefill them). Entries carry the slot's allocation count, so a slot handed out elsewhere (a chat Session) drops out.
"""

import time
from collections.abc import Sequence

from tinyserve.runtime.runner import ModelRunner


class PrefixCache:
    def __init__(self, runner: ModelRunner, chunk: int):
        """chunk: the scheduler's prefill chunk; positions are reused in whole chunks unless the runner is
        position-invariant."""
        self.runner = runner
        self.chunk = 1 if runner.position_invariant else chunk  # the unit of reuse
        self.entries: dict[int, tuple[int, tuple[int, ...], float]] = {}  # slot -> (generation, tokens, last used)

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
        now = time.monotonic()
        if n and best in free:
            slot = self.runner.alloc_slot(prefer=best, keep=n)
        else:
            # the least recently used free slot (one holding nothing first) gives its rows up
            victim = min(free, key=lambda s: self.entries[s][2] if self._valid(s) else -1.0)
            slot = self.runner.alloc_slot(prefer=victim)
            if n:
                self.runner.copy_prefix(best, slot, n)
        self.entries[slot] = (self.runner.generation[slot], tuple(prompt[:n]), now)
        if best is not None and best != slot and n:
            g, held, _ = self.entries[best]
            self.entries[best] = (g, held, now)
        return slot, n

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
