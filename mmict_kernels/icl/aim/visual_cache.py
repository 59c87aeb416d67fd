"""Frozen visual tokens kept in memory, so an image or video seen again skips the vision tower.

The backbone is frozen, so an item's visual tokens depend only on its content: a training run
meets the same query images every epoch, and an evaluation at several shot counts meets them once
per count. Keeping them (least recently used dropped beyond a byte bound) saves the vision tower's
work and, for vision towers that read their patch grid on the host (Qwen2-VL's: its grid sizes,
attention segments and split sizes come back to the host in every call), the host syncs of every
call after the first. Keys are the items' content digests (:meth:`VisualInput.digest`).
"""

from __future__ import annotations

import collections

from .visual import VisualInput, VisualTokens


class VisualTokenCache:
    """LRU map: item digest -> :class:`VisualTokens` (detached), bounded by ``max_bytes`` of embeddings."""

    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes: expected a positive number of bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[bytes, VisualTokens] = collections.OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get_or_compute(self, items: list[VisualInput], compute) -> list[VisualTokens]:
        """Each item's tokens; ``compute(missing_items)`` encodes the ones not held (in one call)."""
        keys = [item.digest() for item in items]
        missing = [i for i, k in enumerate(dict.fromkeys(keys)) if k not in self._entries]
        unique = list(dict.fromkeys(keys))
        if missing:
            computed = compute([items[keys.index(unique[i])] for i in missing])
            for i, tokens in zip(missing, computed):
                self._put(unique[i], VisualTokens(tokens.embeds.detach(), tokens.segments))
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        out = []
        for k in keys:
            found = self._entries.get(k)
            if found is None:  # evicted by this very call (bound smaller than the batch): recompute
                found = compute([items[keys.index(k)]])[0]
            else:
                self._entries.move_to_end(k)
            out.append(found)
        return out

    def _put(self, key: bytes, tokens: VisualTokens) -> None:
        size = tokens.embeds.numel() * tokens.embeds.element_size()
        self._entries[key] = tokens
        self._bytes += size
        while self._bytes > self.max_bytes and self._entries:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.embeds.numel() * old.embeds.element_size()
