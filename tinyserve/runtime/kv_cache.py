"""Static key/value cache: one slot per concurrent sequence, preallocated once, never resized.

    k, v: [layers, slots, Hkv, S, D]   S = max_seq_len

A slot is a row of both tensors. Slots are handed out and taken back by `SlotPool` in O(1); a freed slot's stale
contents are harmless because a sequence only ever attends to positions it has written itself.
"""

import torch

from tinyserve.config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, num_slots: int, max_seq_len: int, dtype: torch.dtype, device: torch.device):
        if num_slots <= 0 or max_seq_len <= 0:
            raise ValueError("the KV cache needs at least one slot and one position")
        shape = (cfg.num_layers, num_slots, cfg.num_kv_heads, max_seq_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots, self.max_seq_len = num_slots, max_seq_len

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def bytes_per_token(self) -> int:
        """Cache bytes one position occupies (keys and values, all layers)."""
        return self.nbytes // (self.num_slots * self.max_seq_len)

    @staticmethod
    def bytes_needed(cfg: ModelConfig, num_slots: int, max_seq_len: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_layers * num_slots * cfg.num_kv_heads * max_seq_len * cfg.head_dim * elem


class NoFreeSlot(RuntimeError):
    """Every slot holds a live sequence."""


class SlotPool:
    """Free-list of slot indices: alloc and free are O(1)."""

    def __init__(self, num_slots: int):
        self._free = list(range(num_slots - 1, -1, -1))  # a stack: alloc hands out slot 0 first
        self._in_use = [False] * num_slots

    def alloc(self, prefer: int | None = None) -> int:
        """A free slot: `prefer` if it is free (its stale contents may be worth keeping), else the next one."""
        if not self._free:
            raise NoFreeSlot(f"all {len(self._in_use)} KV cache slots are in use")
        if prefer is not None and not self._in_use[prefer]:
            self._free.remove(prefer)
            slot = prefer
        else:
            slot = self._free.pop()
        self._in_use[slot] = True
        return slot

    def free_slots(self) -> list[int]:
        return list(self._free)

    def free(self, slot: int) -> None:
        if not self._in_use[slot]:
            raise ValueError(f"slot {slot} is not in use")
        self._in_use[slot] = False
        self._free.append(slot)

    def in_use(self, slot: int) -> bool:
        return self._in_use[slot]

    @property
    def num_free(self) -> int:
        return len(self._free)
